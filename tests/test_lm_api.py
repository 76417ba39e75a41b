"""fastopt.LM, fit and the Lightning helper: results, guarantees on bad input, options, checkpoints."""

import logging

import pytest
import torch

import fastopt
import fastopt.lm as flm
from fastopt.lm import testing as lm_testing
from fastopt.lm.testing import tanh_mlp
from fastopt.testing import assert_close


def mlp(sizes=(1, 8, 1), seed=0, dtype=torch.float64):
    return tanh_mlp(sizes, seed, dtype)


def sinc_data(n=64, dtype=torch.float64):
    return lm_testing.sinc_data(n, frequency=3.0, dtype=dtype)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def test_fastopt_LM_is_the_front():
    assert fastopt.LM is flm.LM


def test_step_reports_and_lowers_the_loss():
    model = mlp()
    lm = fastopt.LM(model, torch.nn.MSELoss())
    x, y = sinc_data()
    first = lm.step(x, y)
    assert isinstance(first, flm.StepResult)
    assert first.accepted and first.attempts >= 1 and isinstance(first.damping, float)
    losses = [first.loss.item()] + [lm.step(x, y).loss.item() for _ in range(15)]
    assert losses[-1] < 0.1 * losses[0]
    assert torch.allclose(torch.nn.functional.mse_loss(model(x), y), torch.tensor(losses[-1], dtype=torch.float64))


def test_lm_takes_the_steps_of_the_tlm_module_while_steps_are_accepted():
    x, y = sinc_data()
    lm = fastopt.LM(mlp(), solve_method="qr")
    module = flm.LevenbergMarquardtModule(mlp(), solve_method="qr")
    for _ in range(6):
        r = lm.step(x, y)
        _, loss, _, logs = module.training_step(x, y)
        assert r.accepted and r.attempts == logs["attempts"]
        assert_close(r.loss, loss, rtol=1e-12, atol=1e-14, what="loss")
    assert_close(lm.flat_params, module.flat_params, rtol=1e-12, atol=1e-14, what="params")


def test_a_step_that_cannot_lower_the_loss_leaves_the_parameters():
    model = mlp()
    x, _ = sinc_data()
    with torch.no_grad():
        y = model(x)  # an exact fit: no update lowers the loss
    before = params_of(model)
    lm = fastopt.LM(model, attempts_per_step=3, damping=flm.StandardDampingStrategy(conditional_stopping=False))
    r = lm.step(x, y)
    assert not r.accepted and r.attempts == 3
    for a, b in zip(params_of(model), before):
        assert torch.equal(a, b)
    # the tlm-compatible module takes its last update instead (the package's behaviour)
    module = flm.LevenbergMarquardtModule(mlp(), attempts_per_step=3)
    module.training_step(x, y)


def test_non_finite_residuals_raise_and_change_nothing():
    model = mlp()
    x, y = sinc_data()
    y[3] = float("nan")
    before = params_of(model)
    lm = fastopt.LM(model)
    damping = lm.damping_strategy.get_current_damping().clone()
    with pytest.raises(ValueError, match="1 of 64 residuals are not finite"):
        lm.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    assert torch.equal(lm.damping_strategy.get_current_damping(), damping)


def test_non_finite_trial_parameters_are_rejected_and_restored():
    # A huge learning rate sends the trial parameters to inf: the attempt is rejected, the
    # parameters restored, lambda raised.
    model = mlp()
    x, y = sinc_data()
    lm = fastopt.LM(model, learning_rate=1e308, attempts_per_step=2)
    before = params_of(model)
    r = lm.step(x, y)
    assert not r.accepted
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    assert r.damping > 1e-3


@pytest.mark.parametrize(
    "loss_fn,match",
    [
        (torch.nn.KLDivLoss(), "Unsupported loss_fn.*subclass fastopt.lm.Loss"),
        (lambda a, b: (a - b).abs().mean(), "Unsupported loss_fn"),
    ],
)
def test_unsupported_losses_say_what_to_do(loss_fn, match):
    with pytest.raises(TypeError, match=match):
        fastopt.LM(mlp(), loss_fn)


@pytest.mark.parametrize(
    "loss_fn,match",
    [
        (torch.nn.MSELoss(reduction="sum"), "reduction='sum'"),
        (torch.nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing=0.1"),
    ],
)
def test_torch_losses_with_settings_the_residuals_do_not_reproduce(loss_fn, match):
    with pytest.raises(ValueError, match=match):
        fastopt.LM(mlp(), loss_fn)


@pytest.mark.parametrize(
    "torch_loss,ours",
    [
        (torch.nn.MSELoss(), flm.MSELoss),
        (torch.nn.L1Loss(), flm.L1Loss),
        (torch.nn.HuberLoss(delta=0.5), flm.HuberLoss),
        (torch.nn.CrossEntropyLoss(), flm.CrossEntropyLoss),
        (torch.nn.BCELoss(), flm.BCELoss),
        (torch.nn.BCEWithLogitsLoss(), flm.BCEWithLogitsLoss),
    ],
)
def test_torch_losses_are_converted(torch_loss, ours):
    converted = flm.as_residual_loss(torch_loss)
    assert isinstance(converted, ours)
    pred, target = torch.rand(5, 1, dtype=torch.float64), torch.rand(5, 1, dtype=torch.float64)
    if ours is flm.CrossEntropyLoss:
        pred, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    assert torch.allclose(converted(pred, target), torch_loss(pred, target))
    assert torch.allclose(converted.residuals(pred, target).square().mean(), torch_loss(pred, target))


def test_mismatched_shapes_are_refused():
    x, y = sinc_data()
    with pytest.raises(ValueError, match=r"predictions of shape \(64, 1\) and targets of shape \(64,\)"):
        fastopt.LM(mlp()).step(x, y.squeeze(1))
    with pytest.raises(ValueError, match=r"predictions of shape"):
        flm.LevenbergMarquardtModule(mlp()).training_step(x, y.squeeze(1))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(solve_method="lu"),
            ValueError,
            r"Invalid solve_method: 'lu'. Choose from: \('qr', 'cholesky', 'solve'\)",
        ),
        (dict(learning_rate=0.0), ValueError, "Invalid learning_rate: 0.0"),
        (dict(attempts_per_step=0), ValueError, r"Invalid attempts_per_step: 0 \(must be >= 1\)"),
        (dict(max_batch_size=0), ValueError, "Invalid max_batch_size: 0"),
        (dict(jacobian="numeric"), ValueError, "Invalid jacobian: 'numeric'"),
        (dict(reuse_factorization="always"), ValueError, "Invalid reuse_factorization"),
        (dict(fallback="svd"), ValueError, "Invalid fallback: 'svd'"),
        (dict(backend="fast"), ValueError, "Invalid backend: 'fast'"),
        (dict(damping="high"), TypeError, "damping must be a number"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastopt.LM(mlp(), **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(damping_mode="levenberg"),
            r"Invalid damping_mode: 'levenberg'. Choose from: \('standard', 'adaptive', 'fletcher'\)",
        ),
        (dict(inc_factor=-1.0), "Invalid inc_factor: -1.0"),
        (dict(min_value=1.0, max_value=0.5), "Invalid min_value/max_value"),
    ],
)
def test_bad_damping_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flm.StandardDampingStrategy(**kwargs)


def test_bad_models():
    with pytest.raises(ValueError, match="no trainable parameters"):
        fastopt.LM(torch.nn.Tanh())
    with pytest.raises(TypeError, match="float32 or float64.*model.float"):
        fastopt.LM(torch.nn.Linear(2, 2).half())
    mixed = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.Linear(2, 1).double())
    with pytest.raises(ValueError, match="one device with one dtype"):
        fastopt.LM(mixed)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastopt.LM(lambda x: x)


class FixedSelection(flm.ParamSelectionStrategy):
    def __init__(self, idx):
        self.idx = idx

    def select_parameters(self):
        return self.idx


def test_selection_errors():
    x, y = sinc_data()
    for idx, match in [
        (torch.tensor([0, 99]), r"must lie in \[0, 25\)"),
        (torch.tensor([1, 1]), "distinct"),
        (torch.tensor([], dtype=torch.long), "selected no parameters"),
        ([0, 1], "1-D integer tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            fastopt.LM(mlp(), param_selection=FixedSelection(idx)).step(x, y)
    with pytest.raises(ValueError, match="Invalid mode: 'sequential'"):
        flm.LayerSelectionStrategy(mlp().parameters(), mode="sequential")
    with pytest.raises(ValueError, match="cannot exceed"):
        flm.RandomSelectionStrategy(mlp().parameters(), subset_size=26)


def test_unsorted_selection_equals_sorted_selection():
    x, y = sinc_data()
    idx = torch.tensor([3, 17, 0, 24, 9, 12, 8])
    results = []
    for order in (idx, idx.sort().values):
        lm = fastopt.LM(mlp(), param_selection=FixedSelection(order), solve_method="qr")
        for _ in range(3):
            lm.step(x, y)
        results.append(lm.flat_params.clone())
    assert_close(results[0], results[1], rtol=1e-10, atol=1e-12, what="unsorted vs sorted")
    untouched = torch.ones(25, dtype=torch.bool)
    untouched[idx] = False
    initial = torch.cat([p.detach().flatten() for p in mlp().parameters()])
    assert torch.equal(results[0][untouched], initial[untouched])


@pytest.mark.parametrize("damping_mode", ["standard", "adaptive", "fletcher"])
def test_eigh_reuse_takes_the_same_steps(damping_mode):
    x, y = sinc_data()
    runs = []
    for reuse in ("never", "eigh"):
        lm = fastopt.LM(
            mlp(),
            damping=flm.StandardDampingStrategy(damping_mode=damping_mode),
            reuse_factorization=reuse,
            learning_rate=1.5,
        )
        runs.append([(r.attempts, r.accepted, r.loss.item()) for r in (lm.step(x, y) for _ in range(6))])
        runs[-1].append(lm.flat_params.clone())
    assert [r[:2] for r in runs[0][:-1]] == [r[:2] for r in runs[1][:-1]]
    assert any(r[0] > 1 for r in runs[0][:-1]), "the configuration should retry some steps"
    assert_close(runs[1][-1], runs[0][-1], rtol=1e-8, atol=1e-10, what="eigh vs per-attempt")


def _singular_problem():
    # A parameter the output ignores: its Jacobian column is zero, so with fletcher damping the
    # damped matrix has a zero row and column and Cholesky fails.
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self, x):
            return self.net(x)

    return WithUnused(), flm.StandardDampingStrategy(damping_mode="fletcher")


def test_failed_cholesky_escalates_damping_with_a_warning(caplog):
    model, damping = _singular_problem()
    module = flm.LevenbergMarquardtModule(model, damping_strategy=damping, solve_method="cholesky", attempts_per_step=3)
    x, y = sinc_data()
    before = params_of(model)
    with caplog.at_level(logging.WARNING, logger="fastopt.lm"):
        _, _, _, logs = module.training_step(x, y)
    assert "not positive-definite" in caplog.text
    assert logs["attempts"] == 3 and logs["damping"] > 1e-3
    # every attempt failed to solve: no update was ever applied, not even the last one
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


def test_failed_cholesky_falls_back_to_lstsq():
    # lstsq gives the minimum-norm solution: the unused parameter stays put and the others take
    # the steps of the same network without it.
    model, damping = _singular_problem()
    lm = fastopt.LM(model, damping=damping, fallback="lstsq")
    plain = fastopt.LM(mlp(), damping=flm.StandardDampingStrategy(damping_mode="fletcher"))
    x, y = sinc_data()
    for _ in range(3):
        r, p = lm.step(x, y), plain.step(x, y)
        assert r.accepted and (r.attempts, r.damping) == (p.attempts, p.damping)
    assert torch.equal(model.unused.detach(), torch.zeros(2, dtype=torch.float64))
    assert_close(
        lm.flat_params[2:], plain.flat_params, rtol=1e-8, atol=1e-10, what="with vs without the unused parameter"
    )


@pytest.mark.parametrize("fallback", ["qr", "solve"])
def test_a_fallback_that_fails_too_counts_as_a_rejected_attempt(fallback):
    model, damping = _singular_problem()
    before = params_of(model)
    r = fastopt.LM(model, damping=damping, fallback=fallback, attempts_per_step=2).step(*sinc_data())
    assert not r.accepted and r.attempts == 2 and r.damping > 1e-3
    assert r.solver_failures == 2 or fallback == "qr"  # QR does not fail: its update is not finite
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


def test_jacfwd_and_jacrev_agree():
    x, y = sinc_data(16)  # 16 residuals < 25 parameters: the underdetermined system too
    finals = []
    for mode in ("jacrev", "jacfwd"):
        lm = fastopt.LM(mlp(), jacobian=mode)
        results = [lm.step(x, y) for _ in range(3)]
        finals.append((lm.flat_params.clone(), [r.attempts for r in results]))
    assert finals[0][1] == finals[1][1]
    assert_close(finals[1][0], finals[0][0], rtol=1e-9, atol=1e-11, what="jacfwd vs jacrev")


def test_split_batches_give_the_same_steps():
    x, y = sinc_data(200)
    finals = []
    for mbs in (None, 33):
        lm = fastopt.LM(mlp(), max_batch_size=mbs)
        for _ in range(4):
            lm.step(x, y)
        finals.append(lm.flat_params.clone())
    assert_close(finals[1], finals[0], rtol=1e-9, atol=1e-11, what="split vs whole")


def test_workspace_is_reused_between_steps():
    lm = fastopt.LM(mlp())
    x, y = sinc_data()
    lm.step(x, y)
    ptr = lm._workspace._buffers["gram"].data_ptr()
    lm.step(x, y)
    assert lm._workspace._buffers["gram"].data_ptr() == ptr


def test_state_dict_round_trip():
    x, y = sinc_data()
    lm = fastopt.LM(mlp(), damping=flm.StandardDampingStrategy(damping_mode="adaptive"))
    for _ in range(3):
        lm.step(x, y)
    model_state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    state = lm.state_dict()
    expected = [lm.step(x, y) for _ in range(2)]

    model = mlp(seed=5)
    model.load_state_dict(model_state)
    resumed = fastopt.LM(model, damping=flm.StandardDampingStrategy())
    resumed.load_state_dict(state)
    assert resumed.steps == 3 and resumed.damping_strategy.damping_mode == "adaptive"
    got = [resumed.step(x, y) for _ in range(2)]
    for a, b in zip(got, expected):
        assert (a.attempts, a.accepted, a.damping) == (b.attempts, b.accepted, b.damping)
        assert torch.equal(a.loss, b.loss)
    with pytest.raises(KeyError, match="steps"):
        resumed.load_state_dict({})


def test_fit_runs_epochs_and_stops_when_damping_saturates(capsys):
    x, y = sinc_data(96)
    loader = [(x[i::3], y[i::3]) for i in range(3)]  # each batch spans the whole curve
    lm = fastopt.LM(mlp())
    history = flm.fit(lm, loader, epochs=3, metrics={"mae": lambda o, t: (o - t).abs().mean()})
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"damping", "attempts", "accepted", "steps"} <= set(history[0])
    assert "damping" in capsys.readouterr().err  # the tqdm bar shows it

    model = mlp()
    with torch.no_grad():
        exact = [(xb, model(xb)) for xb, _ in loader]
    stopping = fastopt.LM(model, damping=flm.StandardDampingStrategy(starting_value=1.0, inc_factor=1e4, max_value=1e8))
    history = flm.fit(stopping, exact, epochs=5, progress=False)
    assert len(history) == 1 and history[0]["stopped"] and history[0]["steps"] == 1
    with pytest.raises(ValueError, match="Invalid epochs"):
        flm.fit(lm, loader, epochs=-1)


def test_lightning_helper():
    pl = pytest.importorskip("pytorch_lightning")
    x, y = sinc_data(96)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, sampler=[i + 3 * j for i in range(3) for j in range(32)]
    )
    lm = fastopt.LM(mlp())
    module = flm.LightningLM(lm)
    assert flm.CustomLightningModule is flm.LightningLM and flm.utils.CustomLightningModule is flm.LightningLM
    start = torch.nn.functional.mse_loss(lm.model(x), y).item()
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, loader)
    assert torch.nn.functional.mse_loss(lm.model(x), y).item() < 0.5 * start
    assert lm.steps == 9


def test_layerwise_jacobian_applies_only_where_it_is_exact():
    from fastopt.lm._layerwise import unsupported_reason

    nn = torch.nn
    assert unsupported_reason(mlp()) is None
    assert unsupported_reason(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 1))) is None
    shared = nn.Linear(2, 2)
    cases = {
        "not an nn.Sequential": _singular_problem()[0],
        "BatchNorm1d has parameters or buffers": nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2)),
        "may act across samples": nn.Sequential(nn.Flatten(0), nn.Linear(2, 1)),
        "dropout in training mode": nn.Sequential(nn.Linear(1, 2), nn.Dropout(0.5)),
        "appears twice": nn.Sequential(shared, nn.Tanh(), shared),
        "groups=1": nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)),
    }
    # parameters whose columns the layer-by-layer path would never write: on the Sequential itself,
    # or an extra one on a Linear layer
    on_container = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1))
    on_container.register_parameter("offset", nn.Parameter(torch.zeros(1)))
    on_layer = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1))
    on_layer[0].register_parameter("scale", nn.Parameter(torch.ones(1)))
    cases["parameter 'offset' is not the weight or bias"] = on_container
    cases["parameter '0.scale' is not the weight or bias"] = on_layer
    for expected, model in cases.items():
        assert expected in unsupported_reason(model), expected
    assert unsupported_reason(nn.Sequential(nn.Linear(1, 2), nn.Dropout(0.5)).eval()) is None
    with pytest.raises(ValueError, match="jacobian='layerwise' cannot differentiate this model: .*BatchNorm1d"):
        fastopt.LM(cases["BatchNorm1d has parameters or buffers"].double().eval(), jacobian="layerwise").step(
            *sinc_data()
        )


def test_auto_falls_back_to_torch_func_with_the_same_result():
    # A custom module: torch.func's vmap(jacrev); its steps equal the layer-by-layer ones of the
    # same network written as an nn.Sequential.
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = mlp()

        def forward(self, x):
            return self.seq(x)

    x, y = sinc_data()
    finals = []
    for model in (Custom(), mlp()):
        lm = fastopt.LM(model)
        results = [lm.step(x, y) for _ in range(3)]
        finals.append(([r.attempts for r in results], lm.flat_params.clone()))
    assert finals[0][0] == finals[1][0]
    assert_close(finals[0][1], finals[1][1], rtol=1e-10, atol=1e-12, what="torch.func vs layer by layer")


@pytest.mark.parametrize("channels,height,width", [(1, 28, 28), (3, 9, 6)])
@pytest.mark.parametrize("kernel,stride,padding", [((4, 4), (2, 2), 0), ((2, 3), (1, 2), (1, 2)), ((3, 3), (1, 1), 1)])
def test_layerwise_unfold_equals_torch_unfold(channels, height, width, kernel, stride, padding):
    # The strided-view unfold of the conv Jacobian's reference against F.unfold (im2col), bit for bit.
    from fastopt.reference.conv_grads import unfolded_input

    a = torch.randn(5, channels, height, width)
    expected = torch.nn.functional.unfold(a, kernel, padding=padding, stride=stride)
    pads = (padding, padding) if isinstance(padding, int) else padding
    got = unfolded_input(a, kernel, stride, pads, (1, 1))
    assert got.shape == expected.shape and torch.equal(got, expected)
    dilated = unfolded_input(a, (2, 2), (1, 1), (0, 0), (2, 2))
    assert torch.equal(dilated, torch.nn.functional.unfold(a, (2, 2), dilation=(2, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layerwise_explicit_chain_rule_equals_autograd_bit_for_bit(dtype):
    # Linear stacks under MSE take their deltas by the chain rule written out (no autograd): the
    # same [J | r] as the autograd layer-by-layer path, bit for bit, over activations, several
    # outputs per sample, an odd batch, a frozen weight and a leading activation.
    from fastopt.lm._layerwise import LayerwiseJacobian

    nn = torch.nn
    torch.manual_seed(0)
    models = [
        tanh_mlp((1, 20, 1), dtype=dtype),
        tanh_mlp((3, 7, 5, 2), dtype=dtype),
        nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.Sigmoid(), nn.Identity(), nn.Linear(4, 3)),
        nn.Sequential(nn.Tanh(), nn.Linear(2, 5), nn.ReLU(inplace=True), nn.Linear(5, 2, bias=False)),
        nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(5, 4), nn.ReLU(inplace=True)),
    ]
    models[2][2].weight.requires_grad_(False)
    for model in models:
        model.to(dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]
        offsets, start = {}, 0
        for p in trainable:
            offsets[id(p)], start = start, start + p.numel()
        jacobian = LayerwiseJacobian(model, offsets)
        assert jacobian.explicit_chain
        first = next(m for m in model if isinstance(m, nn.Linear))
        x = torch.randn(37, first.in_features, dtype=dtype)
        last = [m for m in model if isinstance(m, nn.Linear)][-1]
        y = torch.randn(37, last.out_features, dtype=dtype)
        explicit = torch.full((y.numel(), start + 1), float("nan"), dtype=dtype)
        autograd = explicit.clone()
        jacobian(x, y, flm.loss.MSELoss(), explicit)
        jacobian.explicit_chain = False
        jacobian(x, y, flm.loss.MSELoss(), autograd)
        assert torch.equal(explicit, autograd), type(model[1])
    # ELU's written-out backward (from its output) is not autograd's bit for bit: Linear stacks
    # with it keep autograd; a GELU has none.
    assert not LayerwiseJacobian(nn.Sequential(nn.Linear(1, 2), nn.ELU()), {}).chain_rule_serves(
        torch.zeros(3, 1), flm.loss.MSELoss()
    )
    assert not LayerwiseJacobian(nn.Sequential(nn.Linear(1, 2), nn.GELU()), {}).explicit_chain


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.Sequential(
            torch.nn.Linear(2, 5),
            torch.nn.Tanh(),
            torch.nn.Linear(5, 4),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(4, 1),
        ),
        lambda: torch.nn.Sequential(  # ELU: no written-out backward, the autograd path
            torch.nn.Linear(2, 4),
            torch.nn.ELU(inplace=True),
            torch.nn.Linear(4, 3),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(3, 1),
        ),
    ],
    ids=["explicit-chain", "autograd"],
)
def test_layerwise_jacobian_with_inplace_activations_equals_torch_func(make):
    # An in-place activation must not overwrite the layer outputs the layer-by-layer Jacobian
    # differentiates with respect to (it did: steps 0.6 away from torch.func's after 3 steps).
    finals = []
    for mode in ("auto", "jacrev"):
        torch.manual_seed(1)
        lm = fastopt.LM(make().double(), jacobian=mode)
        x, y = torch.randn(50, 2, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
        attempts = [lm.step(x, y).attempts for _ in range(3)]
        finals.append((attempts, lm.flat_params.clone()))
    assert finals[0][0] == finals[1][0]
    assert_close(finals[0][1], finals[1][1], rtol=1e-10, atol=1e-12, what="layer by layer vs torch.func")


def test_a_parameter_outside_the_layers_gets_its_jacobian_column():
    """A parameter the layer-by-layer path does not write (registered on the Sequential) sends the
    model to torch.func: its column is the true (zero) derivative, not stale memory."""
    nn = torch.nn
    x, y = sinc_data()
    steps = []
    for mode in ("auto", "jacrev"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        model.register_parameter("unused", nn.Parameter(torch.full((3,), 7.0, dtype=torch.float64)))
        lm = fastopt.LM(model, jacobian=mode)
        for _ in range(3):
            lm.step(x, y)
        assert torch.equal(model.unused.detach(), torch.full((3,), 7.0, dtype=torch.float64))
        steps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-10, atol=1e-12)
