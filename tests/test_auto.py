"""fastopt.auto against ladam.auto 0.4.1, and fastopt's top-level names against ladam's."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastopt
import fastopt.auto
from fastopt.auto import analyze_model, auto_configure

ladam = pytest.importorskip("ladam")
assert ladam.__version__ == "0.4.1", "the parity tests pin ladam 0.4.1 (pip install ladam==0.4.1)"
import ladam.auto  # noqa: E402


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.attn = Attention(16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50)


class TinyRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 12, num_layers=2, batch_first=True)
        self.gru = nn.GRU(12, 6)
        self.fc = nn.Linear(12, 4)


class Odd(nn.Module):
    """Parameters owned directly by a custom module (shape fallback), frozen ones, 3-D conv kinds."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 3, 3))
        self.matrix = nn.Parameter(torch.randn(6, 5))
        self.scale = nn.Parameter(torch.ones(5))
        self.frozen = nn.Linear(5, 5)
        self.frozen.weight.requires_grad_(False)
        self.deconv = nn.ConvTranspose2d(3, 2, 3)
        self.conv1 = nn.Conv1d(2, 3, 3)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.gn = nn.GroupNorm(2, 4)
        self.bilinear = nn.Bilinear(3, 4, 5)


def mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def cnn():
    # No conv bias before a BatchNorm: its exact gradient is 0, so it would be round-off noise that
    # Adam's normalisation blows up to full-size steps (in either package) in the training test.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def big_cnn():  # linear weights under 10% of the parameters: ladam's "mixed optimizer" sentence
    return nn.Sequential(nn.Conv2d(3, 64, 5), nn.Conv2d(64, 64, 5), nn.Flatten(), nn.Linear(64, 10))


MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "big_cnn": big_cnn,
    "transformer": TinyTransformer,
    "multihead": lambda: nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2)),
    "rnn": TinyRNN,
    "odd": Odd,
    "bare_linear": lambda: nn.Linear(7, 3),
    "only_norms": lambda: nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4)),
    "no_params": lambda: nn.Sequential(nn.ReLU(), nn.Flatten()),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_analyze_model_equals_ladam(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    ours, theirs = analyze_model(model), ladam.auto.analyze_model(model)
    assert ours == theirs
    assert list(ours) == list(theirs)  # key order too, nested dicts included
    for key in ("layer_counts", "layer_params", "c2_map"):
        assert list(ours[key].items()) == list(theirs[key].items()), key


def test_analyze_model_covers_every_architecture_and_sentence():
    # The zoo above reaches each architecture and each of ladam's three recommendations.
    reports = [ladam.auto.analyze_model(m()) for m in MODELS.values()]
    assert {r["architecture"] for r in reports} == {"mlp", "cnn", "transformer", "rnn"}
    sentences = {r["recommendation"].split()[0] for r in reports}
    assert {"Architecture", "Only"} <= sentences and any(s[0].isdigit() for s in sentences)


def group_summary(opt):
    return [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]


CONFIGS = [
    dict(lr=1e-3, total_steps=100),
    dict(lr=3e-2, total_epochs=4, steps_per_epoch=25, weight_decay=0.01),
    dict(lr=1e-3, total_steps=10, total_epochs=3, steps_per_epoch=7),  # total_steps wins
    dict(lr=1e-3, use_scheduler=False),
    dict(lr=1e-3, total_steps=50, use_scheduler=False),
    dict(lr=2e-3, total_epochs=5, use_scheduler=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("name", [n for n in MODELS if n != "no_params"])
def test_auto_configure_equals_ladam(name, config):
    torch.manual_seed(0)
    model = MODELS[name]()
    opt, sched = auto_configure(model, **config)
    ref_opt, ref_sched = ladam.auto.auto_configure(model, **config)
    assert type(opt) is fastopt.LAdam
    assert len(opt.param_groups) == len(ref_opt.param_groups)
    for g, rg in zip(opt.param_groups, ref_opt.param_groups):
        assert [id(p) for p in g["params"]] == [id(p) for p in rg["params"]]
        for key in rg:
            if key != "params":
                assert g[key] == rg[key], key
    if ref_sched is None:
        assert sched is None
    else:
        assert type(sched) is fastopt.ChiAnnealScheduler
        assert sched.optimizer is opt
        for attr in ("total_steps", "warmup_steps", "settle_start", "base_lrs", "step_count"):
            assert getattr(sched, attr) == getattr(ref_sched, attr), attr


def test_auto_configure_defaults_need_steps_like_ladam():
    model = mlp()
    for fn in (auto_configure, ladam.auto.auto_configure):
        for kw in ({}, dict(total_epochs=3), dict(steps_per_epoch=3)):
            with pytest.raises(
                ValueError,
                match=r"Either total_steps or \(total_epochs \+ steps_per_epoch\) "
                r"required when use_scheduler=True",
            ):
                fn(model, **kw)


def test_no_trainable_parameter_refused_like_ladam():
    model = nn.Linear(3, 3).requires_grad_(False)
    for fn in (auto_configure, ladam.auto.auto_configure):
        with pytest.raises(ValueError, match="empty parameter list"):
            fn(model, total_steps=10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_training_matches_ladam(name):
    torch.manual_seed(1)
    model = MODELS[name]()
    if name == "transformer":  # softmax ignores the key bias: same round-off-noise gradient as above
        model.block.self_attn.in_proj_bias.requires_grad_(False)
    ref = copy.deepcopy(model)
    kw = dict(lr=1e-2, total_steps=8, weight_decay=0.01)
    opt, sched = auto_configure(model, **kw)
    ref_opt, ref_sched = ladam.auto.auto_configure(ref, **kw)
    g = torch.Generator().manual_seed(2)
    if name == "mlp":
        batches = [(torch.randn(16, 10, generator=g),) for _ in range(8)]
    elif name == "cnn":
        batches = [(torch.randn(4, 3, 8, 8, generator=g),) for _ in range(8)]
    else:
        batches = [(torch.randint(0, 50, (4, 6), generator=g),) for _ in range(8)]

    def loss_of(m, x):
        if name == "transformer":
            h = m.block(m.embed(x))
            h = m.attn.out_proj(m.attn.q_proj(h) + m.attn.k_proj(h) + m.attn.v_proj(h))
            return m.head(m.norm(h)).logsumexp(-1).mean()
        return m(x).square().mean()

    for (x,) in batches:
        for m, o, s in ((model, opt, sched), (ref, ref_opt, ref_sched)):
            o.zero_grad()
            loss_of(m, x).backward()
            o.step()
            s.step()
        assert [gr["lr"] for gr in opt.param_groups] == [gr["lr"] for gr in ref_opt.param_groups]
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}.{n}: {m}")
    # A group with c2 > 0 (the linear weights) took part, so the Laplacian path was compared too.
    assert any(g["c2"] > 0 and any(p.numel() >= 16 for p in g["params"]) for g in opt.param_groups)


BAD = [
    (dict(model="net"), TypeError, "model must be a torch.nn.Module, got str"),
    (dict(lr=0.0), ValueError, r"Invalid lr: 0.0 \(must be > 0\)"),
    (dict(lr=-1e-3), ValueError, "Invalid lr: -0.001"),
    (dict(lr=float("nan")), ValueError, "Invalid lr: nan"),
    (dict(lr=float("inf")), ValueError, r"Invalid lr: inf \(must be finite\)"),
    (dict(lr="1e-3"), TypeError, "lr must be a real number"),
    (dict(total_steps=0), ValueError, r"Invalid total_steps: 0 \(must be >= 1\)"),
    (dict(total_steps=10.0), TypeError, "total_steps must be an int"),
    (dict(total_steps=True), TypeError, "total_steps must be an int"),
    (dict(total_epochs=0, steps_per_epoch=5), ValueError, "Invalid total_epochs: 0"),
    (dict(total_epochs=2, steps_per_epoch=-5), ValueError, "Invalid steps_per_epoch: -5"),
    (dict(total_epochs=2, steps_per_epoch="5"), TypeError, "steps_per_epoch must be an int"),
    (dict(total_steps=10, weight_decay=-0.1), ValueError, r"Invalid weight_decay: -0.1 \(must be >= 0.0\)"),
    (dict(total_steps=10, weight_decay=float("nan")), ValueError, "Invalid weight_decay: nan"),
    (dict(total_steps=10, use_scheduler=1), TypeError, "use_scheduler must be a bool"),
]


@pytest.mark.parametrize("kw, exc, match", BAD, ids=str)
def test_bad_arguments(kw, exc, match):
    kw = dict(kw)
    model = kw.pop("model", None) or mlp()
    with pytest.raises(exc, match=match):
        auto_configure(model, **kw)


def test_analyze_model_refuses_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        analyze_model([nn.Linear(2, 2)])


def test_public_names_cover_ladam():
    missing = [n for n in ladam.__all__ if not hasattr(fastopt, n)]
    assert not missing, missing
    assert set(ladam.__all__) <= set(fastopt.__all__)
    assert fastopt.WaveAdam is fastopt.LAdam and fastopt.LAdamW is fastopt.LAdam
    assert fastopt.WaveNorm is fastopt.nn.WaveNorm and fastopt.ChiNorm is fastopt.nn.ChiNorm
    assert fastopt.compute_neuron_order is fastopt.nn.compute_neuron_order
    assert fastopt.auto.auto_configure is auto_configure and "auto" in fastopt.__all__
    # fastopt.nn is reachable but not exported by `import *`, where it would shadow torch.nn.
    assert "nn" not in fastopt.__all__
    namespace = {}
    exec("from torch import nn\nfrom fastopt import *", namespace)
    assert namespace["nn"] is torch.nn


@pytest.mark.parametrize(
    "stmt", ["import fastopt.auto; fastopt.auto.auto_configure", "from fastopt.nn.reorder import reorder_linear_layer"]
)
def test_fresh_imports_have_no_cycle(stmt):
    # Each entry point imported first, in a fresh interpreter (auto imports fastopt.optim).
    subprocess.run([sys.executable, "-c", stmt], check=True, capture_output=True, timeout=120)
