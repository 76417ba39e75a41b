"""torch-levenberg-marquardt 1.2.3's public names beyond the LM module, against the package itself:
training.OptimizerModule / TrainingModule, utils.FastDataLoader, utils.fit with torchmetrics,
utils.CustomLightningModule, the tree helpers, and fit's loader fast path."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fastopt.lm as flm
from fastopt.lm.loader import indexes_tensors_directly, iterate_batches
from fastopt.lm.testing import sinc_data, tanh_mlp

tlm = pytest.importorskip("torch_levenberg_marquardt")
torchmetrics = pytest.importorskip("torchmetrics")

MODULES = ("training", "loss", "damping", "selection", "utils", "tree")
fit_module = importlib.import_module("fastopt.lm.fit")


def _package_names(module):
    """The names a tlm module defines or re-exports from the package itself."""
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if inspect.ismodule(value):
            continue
        if getattr(value, "__module__", "").startswith("torch_levenberg_marquardt"):
            yield name


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_of_the_package_exists(module):
    theirs = importlib.import_module(f"torch_levenberg_marquardt.{module}")
    ours = importlib.import_module(f"fastopt.lm.{module}")
    names = sorted(set(_package_names(theirs)))
    assert names, module
    missing = [n for n in names if not hasattr(ours, n)]
    assert not missing, f"fastopt.lm.{module} lacks {missing}"
    assert hasattr(flm, module)  # reachable as tlm.<module> after `import fastopt.lm as tlm`


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y)
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert u.dtype == v.dtype and torch.equal(u, v)
    return True


def _data(n=103):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=gen), torch.randint(0, 5, (n,), generator=gen))


def _run_seeded(make_loader, seed=7):
    torch.manual_seed(seed)
    batches = [list(b) for b in make_loader()]
    return batches, torch.get_rng_state()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("repeat", [1, 3])
@pytest.mark.parametrize("batch_size", [10, 103, 500])
def test_fast_data_loader_yields_the_package_batches(shuffle, repeat, batch_size):
    dataset = _data()
    theirs, state_theirs = _run_seeded(
        lambda: tlm.utils.FastDataLoader(dataset, batch_size, repeat=repeat, shuffle=shuffle)
    )
    ours, state_ours = _run_seeded(
        lambda: flm.utils.FastDataLoader(dataset, batch_size, repeat=repeat, shuffle=shuffle)
    )
    _same_batches(theirs, ours)
    assert torch.equal(state_theirs, state_ours)  # the same random draws
    assert len(flm.utils.FastDataLoader(dataset, batch_size, repeat=repeat)) == len(
        tlm.utils.FastDataLoader(dataset, batch_size, repeat=repeat)
    )
    assert isinstance(flm.utils.FastDataLoader(dataset, batch_size), DataLoader)


class _DictSamples(Dataset):
    """Samples that are dicts, collated by a custom function."""

    def __init__(self, n):
        self.x = torch.arange(float(n)).unsqueeze(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": 2 * self.x[i]}


def _collate_pairs(samples):
    return (torch.stack([s["x"] for s in samples]), torch.stack([s["y"] for s in samples]))


def test_fast_data_loader_with_another_dataset_and_collate():
    dataset = _DictSamples(23)
    theirs, _ = _run_seeded(lambda: tlm.utils.FastDataLoader(dataset, 4, shuffle=True, collate_fn=_collate_pairs))
    ours, _ = _run_seeded(lambda: flm.utils.FastDataLoader(dataset, 4, shuffle=True, collate_fn=_collate_pairs))
    _same_batches(theirs, ours)
    # Dict samples with the default collate: batches are dicts of tensors.
    torch.manual_seed(1)
    theirs = list(tlm.utils.FastDataLoader(dataset, 5, shuffle=True))
    torch.manual_seed(1)
    ours = list(flm.utils.FastDataLoader(dataset, 5, shuffle=True))
    assert len(ours) == len(theirs) == 5
    for a, b in zip(theirs, ours):
        assert sorted(a) == sorted(b) == ["x", "y"]
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_fast_data_loader_generator_and_bad_arguments():
    dataset = _data()
    a = list(flm.utils.FastDataLoader(dataset, 10, shuffle=True, generator=torch.Generator().manual_seed(3)))
    b = list(flm.utils.FastDataLoader(dataset, 10, shuffle=True, generator=torch.Generator().manual_seed(3)))
    _same_batches(a, b)
    with pytest.raises(ValueError, match="batch_size"):
        flm.utils.FastDataLoader(dataset, 0)
    with pytest.raises(TypeError, match="batch_size"):
        flm.utils.FastDataLoader(dataset, 2.5)
    with pytest.raises(ValueError, match="repeat"):
        flm.utils.FastDataLoader(dataset, 4, repeat=0)
    with pytest.raises(TypeError, match="shuffle"):
        flm.utils.FastDataLoader(dataset, 4, shuffle="yes")
    with pytest.raises(TypeError, match="collate_fn"):
        flm.utils.FastDataLoader(dataset, 4, collate_fn=3)
    with pytest.raises(TypeError, match="generator"):
        flm.utils.FastDataLoader(dataset, 4, generator=3)


LOADER_CASES = {
    "sequential": dict(batch_size=10),
    "shuffle": dict(batch_size=10, shuffle=True),
    "shuffle-drop_last": dict(batch_size=10, shuffle=True, drop_last=True),
    "seeded-generator": dict(batch_size=7, shuffle=True, generator="seeded"),
    "sampler-list": dict(batch_size=4, sampler=[5, 3, 1, 0, 2, 9, 8]),
}


@pytest.mark.parametrize("case", sorted(LOADER_CASES))
def test_loader_fast_path_yields_the_dataloader_batches(case):
    dataset = _data()

    def make():
        kw = dict(LOADER_CASES[case])
        if kw.get("generator") == "seeded":
            kw["generator"] = torch.Generator().manual_seed(11)
        return DataLoader(dataset, **kw)

    assert indexes_tensors_directly(make())
    loader = make()
    # Two epochs from one loader: the second epoch's shuffle follows from the first's draws.
    theirs, state_theirs = _run_seeded(lambda: [*loader, *loader])
    loader = make()
    ours, state_ours = _run_seeded(lambda: [*iterate_batches(loader), *iterate_batches(loader)])
    _same_batches(theirs, ours)
    assert torch.equal(state_theirs, state_ours)
    if loader.generator is not None:
        reference = make()
        for _epoch in range(2):  # the same two epochs, drawing from the reference's generator
            list(reference)
        assert torch.equal(reference.generator.get_state(), loader.generator.get_state())


def _collate_list(samples):
    return torch.utils.data.default_collate(samples)


class _Loader(DataLoader):
    pass


@pytest.mark.parametrize(
    "make",
    [
        lambda d: DataLoader(d, batch_size=4, collate_fn=_collate_list),
        lambda d: _Loader(d, batch_size=4),
        lambda d: DataLoader(torch.utils.data.Subset(d, range(20)), batch_size=4),
        lambda d: DataLoader(d, batch_size=None),
        lambda d: DataLoader(d, batch_size=4, num_workers=1),
    ],
    ids=["custom-collate", "subclass", "subset", "no-batching", "workers"],
)
def test_other_loaders_are_iterated_as_they_are(make):
    loader = make(_data(20))
    assert not indexes_tensors_directly(loader)
    assert type(iterate_batches(loader)) is type(iter(loader))


class _Counting(TensorDataset):
    """A TensorDataset subclass that counts per-sample fetches (not taken by the fast path)."""

    fetches = 0

    def __getitem__(self, i):
        _Counting.fetches += 1
        return super().__getitem__(i)


def test_fit_does_not_fetch_samples_one_by_one(monkeypatch):
    x, y = sinc_data(60)
    model = tanh_mlp((1, 4, 1))
    module = flm.training.OptimizerModule(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss())

    def refuse(self, index):
        raise AssertionError("a sample was fetched one by one")

    monkeypatch.setattr(TensorDataset, "__getitem__", refuse)
    history = flm.fit(module, DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True), epochs=2, progress=False)
    assert [h["steps"] for h in history] == [3, 3]
    with pytest.raises(AssertionError, match="one by one"):
        list(DataLoader(TensorDataset(x, y), batch_size=20))  # the check itself bites


def _assert_same_tree(a, b):
    from torch.utils._pytree import tree_flatten

    (leaves_a, spec_a), (leaves_b, spec_b) = tree_flatten(a), tree_flatten(b)
    assert spec_a == spec_b
    for u, v in zip(leaves_a, leaves_b):
        assert type(u) is type(v)
        assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v


def test_tree_helpers_match_the_package():
    batch = {"a": torch.arange(12.0).reshape(6, 2), "b": [torch.arange(6), (torch.ones(6, 1), 3.5)], "name": "s"}
    indices = [4, 0, 2]
    for fn, args in (
        ("tree_slice", (1, 4)),
        ("tree_unsqueeze", (1,)),
        ("tree_first_tensor", ()),
        ("tree_to_device", ("cpu",)),
    ):
        theirs = getattr(tlm.tree, fn)(batch, *args)
        ours = getattr(flm.tree, fn)(batch, *args)
        _assert_same_tree(ours, theirs)
    tensors_only = {"a": batch["a"], "b": [batch["b"][0], (batch["b"][1][0],)]}
    _assert_same_tree(flm.tree.tree_indices(tensors_only, indices), tlm.tree.tree_indices(tensors_only, indices))
    _assert_same_tree(flm.tree.tree_cat([tensors_only, tensors_only]), tlm.tree.tree_cat([tensors_only, tensors_only]))
    _assert_same_tree(flm.tree.tree_cat([batch, batch]), tlm.tree.tree_cat([batch, batch]))
    # Leaves that cannot be indexed stay as they are (the package fails on a number).
    assert flm.tree.tree_indices(batch, indices)["b"][1][1] == 3.5
    assert flm.tree.tree_indices(batch, indices)["name"] == "s"
    with pytest.raises(ValueError, match="no tensor"):
        flm.tree.tree_first_tensor({"a": 1})


def _sinc_module(package, kind, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    if kind == "adam":
        return package.training.OptimizerModule(
            model, torch.optim.Adam(model.parameters(), lr=0.01), torch.nn.MSELoss()
        )
    return package.training.LevenbergMarquardtModule(model, loss_fn=package.loss.MSELoss(), solve_method="cholesky")


class _RecordingBar:
    """Stands in for tqdm: keeps every postfix and every update."""

    def __init__(self, record, **kwargs):
        self.record, self.kwargs, self.leave = record, kwargs, kwargs.get("leave")
        record.append(("bar", kwargs.get("total"), kwargs.get("desc")))

    def update(self, n):
        self.record.append(("update", n))

    def set_postfix(self, values, refresh=True):  # fastopt's fit redraws at tqdm's rate (refresh=False)
        self.record.append(("postfix", dict(values)))

    def write(self, text):
        self.record.append(("write", text))

    def close(self):
        self.record.append(("close", self.leave))


def _fit_recorded(package, monkeypatch, kind, **kwargs):
    record = []
    factory = lambda **kw: _RecordingBar(record, **kw)  # noqa: E731
    if package is tlm:
        monkeypatch.setattr(tlm.utils, "tqdm", factory)
    else:
        monkeypatch.setattr(fit_module, "_progress_bar_class", lambda: factory)
    module = _sinc_module(package, kind)
    x, y = sinc_data(90)
    loader = package.utils.FastDataLoader(TensorDataset(x, y), 30, repeat=2, shuffle=True)
    metrics = {"mse": torchmetrics.MeanSquaredError(), "mae": torchmetrics.MeanAbsoluteError()}
    torch.manual_seed(5)
    package.utils.fit(module, loader, epochs=2, metrics=metrics, **kwargs)
    return record, module


def _postfix_values(record):
    return [v for kind, *v in record if kind == "postfix"]


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("every", [1, 4])
def test_fit_shows_what_the_package_shows(monkeypatch, capsys, overwrite, every):
    # OptimizerModule: the same arithmetic in both packages, so the same numbers exactly.
    theirs, module_t = _fit_recorded(
        tlm, monkeypatch, "adam", overwrite_progress_bar=overwrite, update_every_n_steps=every
    )
    printed_t = capsys.readouterr().out
    ours, module_o = _fit_recorded(
        flm, monkeypatch, "adam", overwrite_progress_bar=overwrite, update_every_n_steps=every
    )
    printed_o = capsys.readouterr().out
    assert ours == theirs
    assert printed_o == printed_t
    for p, q in zip(module_t.model.parameters(), module_o.model.parameters()):
        assert torch.equal(p, q)


def test_fit_metrics_and_logs_of_levenberg_marquardt_match_the_package(monkeypatch, capsys):
    theirs, _ = _fit_recorded(tlm, monkeypatch, "lm")
    ours, _ = _fit_recorded(flm, monkeypatch, "lm")
    assert [kind for kind, *_ in ours] == [kind for kind, *_ in theirs]
    for (a,), (b,) in zip(_postfix_values(ours), _postfix_values(theirs)):
        assert list(a) == list(b)  # same keys, same order
        for key in a:
            if key in ("mse", "mae"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
            elif key in ("attempts",):
                assert a[key] == b[key]
            else:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-3), key


def test_fit_records_metric_values_per_epoch():
    x, y = sinc_data(60)
    model = tanh_mlp((1, 4, 1))
    module = flm.training.OptimizerModule(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss())
    metric = torchmetrics.MeanSquaredError()
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    history = flm.fit(
        module, loader, epochs=1, progress=False, metrics={"mse": metric, "plain": lambda o, t: (o - t).abs().max()}
    )
    expected = torchmetrics.MeanSquaredError()
    # Recompute the epoch's MSE from the same steps: SGD from the same start.
    model2 = tanh_mlp((1, 4, 1))
    sgd = torch.optim.SGD(model2.parameters(), lr=0.1)
    maxima = []
    for xb, yb in loader:
        out = model2(xb)
        expected.update(out.detach(), yb)
        maxima.append((out - yb).abs().max().item())
        sgd.zero_grad()
        torch.nn.functional.mse_loss(out, yb).backward()
        sgd.step()
    assert history[0]["mse"] == pytest.approx(expected.compute().item(), rel=1e-6)
    assert history[0]["plain"] == pytest.approx(sum(maxima) / len(maxima), rel=1e-6)
    with pytest.raises(TypeError, match="metrics"):
        flm.fit(module, loader, epochs=1, progress=False, metrics=[metric])
    with pytest.raises(TypeError, match=r"metrics\['m'\]"):
        flm.fit(module, loader, epochs=1, progress=False, metrics={"m": 3})
    with pytest.raises(TypeError, match="epochs"):
        flm.fit(module, loader, epochs=1.5, progress=False)
    with pytest.raises(TypeError, match="progress"):
        flm.fit(module, loader, epochs=1, progress="no")


def test_optimizer_module_takes_the_package_steps():
    x, y = sinc_data(64)
    batches = [(x[i::4], y[i::4]) for i in range(4)]
    results = []
    for package in (tlm, flm):
        module = _sinc_module(package, "adam", seed=3)
        outs = [module.training_step(xb, yb) for xb, yb in batches]
        results.append((module, outs))
    (m_t, outs_t), (m_o, outs_o) = results
    for a, b in zip(outs_t, outs_o):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:] == (False, {})
    for p, q in zip(m_t.model.parameters(), m_o.model.parameters()):
        assert torch.equal(p, q)
    assert m_o.device == torch.device("cpu") and m_o.model is m_o._model
    assert isinstance(m_o, flm.training.TrainingModule) and flm.utils.TrainingModule is flm.training.TrainingModule
    model = tanh_mlp((1, 2, 1))
    with pytest.raises(TypeError, match="model"):
        flm.training.OptimizerModule(object(), torch.optim.SGD(model.parameters(), lr=1), torch.nn.MSELoss())
    with pytest.raises(TypeError, match="optimizer"):
        flm.training.OptimizerModule(model, "adam", torch.nn.MSELoss())
    with pytest.raises(TypeError, match="loss_fn"):
        flm.training.OptimizerModule(model, torch.optim.SGD(model.parameters(), lr=1), "mse")
    with pytest.raises(ValueError, match="no parameters"):
        flm.training.OptimizerModule(torch.nn.Tanh(), torch.optim.SGD(model.parameters(), lr=1), torch.nn.MSELoss())


def test_training_module_is_abstract_with_the_package_members():
    with pytest.raises(TypeError):
        flm.training.TrainingModule()
    theirs = {n for n in vars(tlm.training.TrainingModule) if not n.startswith("_")}
    ours = {n for n in vars(flm.training.TrainingModule) if not n.startswith("_")}
    assert theirs == ours == {"training_step", "model", "device"}


def test_fit_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    x, y = sinc_data(30)
    model = tanh_mlp((1, 3, 1))
    module = flm.training.OptimizerModule(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss())
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    assert len(flm.fit(module, loader, epochs=2, progress=False)) == 2
    with pytest.raises(ImportError, match=r"fastopt\[progress\]"):
        flm.fit(module, loader, epochs=1)


def test_lightning_without_pytorch_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, "fastopt.lm.lightning", raising=False)
    with pytest.raises(ImportError, match=r"fastopt\[lightning\]"):
        importlib.import_module("fastopt.lm.lightning")
    monkeypatch.delitem(sys.modules, "fastopt.lm.lightning", raising=False)


def test_extras_are_declared():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {
        e: {r.split("[")[0].split(">")[0].split("=")[0].strip().lower().replace("-", "_") for r in reqs}
        for e, reqs in extras.items()
    }
    assert "tqdm" in names["progress"] and "matplotlib" in names["plot"]
    assert "pytorch_lightning" in names["lightning"] and "torchmetrics" in names["metrics"]
    assert any(r.startswith("fastopt[") and "progress" in r and "lightning" in r for r in extras["all"])
    assert "fastopt[all]" in extras["dev"]
    assert "tqdm" not in names["dev"] and "matplotlib" not in names["dev"]  # dev builds on the extras


def test_custom_lightning_module_logs_what_the_package_logs():
    pl = pytest.importorskip("pytorch_lightning")
    x, y = sinc_data(90)
    logged = []
    for package in (tlm, flm):
        module = _sinc_module(package, "adam", seed=1)
        wrapper = package.utils.CustomLightningModule(module, metrics={"mae": torchmetrics.MeanAbsoluteError()})
        loader = package.utils.FastDataLoader(TensorDataset(x, y), 30, shuffle=True)
        trainer = pl.Trainer(
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        torch.manual_seed(2)
        trainer.fit(wrapper, loader)
        logged.append(
            (
                {k: float(v) for k, v in trainer.callback_metrics.items()},
                [p.detach().clone() for p in module.model.parameters()],
            )
        )
    (metrics_t, params_t), (metrics_o, params_o) = logged
    assert sorted(metrics_t) == sorted(metrics_o)
    for key in metrics_t:
        assert metrics_o[key] == pytest.approx(metrics_t[key], rel=1e-6), key
    for p, q in zip(params_t, params_o):
        assert torch.equal(p, q)
