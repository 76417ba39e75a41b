"""The triton backend (kernels/): parity with fastopt.reference for every op, stencil and dtype over
the shape zoo, tiles smaller than the tensors (the border protocol of the in-place stencil), one
launch per step, the tile table's cache and the errors.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which runs programs one after another: a program that read a neighbour's
already-updated state gets a wrong answer here, so the parity tests with many tiles per tensor
catch a race in the protocol, and test_a_naive_in_place_stencil_is_caught shows that they would.
With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import contextlib

import pytest
import torch

import fastopt
from fastopt import backends
from fastopt.testing import (
    CHECKS,
    COMMON,
    clone_params,
    compare_optimizers,
    grad_stream,
    make_params,
    set_grads,
    step_side_by_side,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    backends.why_not("triton", device=DEVICE) is not None, reason=str(backends.why_not("triton", device=DEVICE))
)
if backends.why_not("triton", device=DEVICE) is None:
    import fastopt.kernels as kernels
    from fastopt.kernels import _multi_tensor as mt
    from fastopt.kernels import _table

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CONFIGS = [pytest.param(c, id=c[0].replace(" ", "-")) for c in CHECKS]
# Beside the zoo (one tile each at the default 32 x 32 tiles), a tensor of 2 x 2 tiles.
CROSSING = [(40, 40)]
# With 4 x 4 tiles (tile=16, tile_width=4): 1, 2 and >= 3 tiles along each side, partial tiles, a
# 1-D tensor, a narrow one (3 columns: 4-wide tiles, one column of tiles), 4-D and non-contiguous.
TINY_TILES = dict(tile=16, tile_width=4)
TINY_SHAPES = {
    "2x2 tiles": lambda dt: torch.randn(5, 7, dtype=dt),
    "3x3 tiles": lambda dt: torch.randn(9, 11, dtype=dt),
    "1x2 tiles": lambda dt: torch.randn(3, 6, dtype=dt),
    "narrow": lambda dt: torch.randn(13, 3, dtype=dt),
    "1-D": lambda dt: torch.randn(37, dtype=dt),
    "no lap": lambda dt: torch.randn(2, 11, dtype=dt),
    "channels_last": lambda dt: torch.randn(3, 2, 2, 2, dtype=dt).to(memory_format=torch.channels_last),
    "transposed": lambda dt: torch.randn(6, 5, dtype=dt).t(),
}


def _device_params(params):
    return [p.detach().to(DEVICE).requires_grad_() for p in params]


def _assert_same_as_reference(cls_name, hyper, params, **kwargs):
    """Step ``params`` with backend='triton' and CPU copies with backend='torch'; compare each
    param and every state entry (step counts and use_lap included). Kernels and reference round
    differently by an ulp here and there (e.g. torch's CPU sqrt is not always correctly rounded);
    that ulp is of the largest terms, which can be far larger than a result that cancels (a
    momentum buffer): atol scales with the tensor's magnitude."""
    step_side_by_side(cls_name, params, backend="triton", hyper=hyper, scale_atol=True, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference_on_the_zoo(config, dtype):
    """3 steps in fp32 (None grads on some: step counts diverge); 2 in bf16/fp16, which add the
    rounding of results and state to the params' dtype (and keep the interpreter's time down)."""
    label, cls_name, kw, op = config
    params = _device_params(make_params(dtype) + [torch.randn(s, dtype=dtype) for s in CROSSING])
    _assert_same_as_reference(cls_name, {**COMMON, **kw}, params, steps=3 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("config", CONFIGS)
def test_tiles_smaller_than_the_tensors(config):
    label, cls_name, kw, op = config
    torch.manual_seed(0)
    params = _device_params([make(torch.float32) for make in TINY_SHAPES.values()])
    with mt.use_settings(**TINY_TILES):
        _assert_same_as_reference(cls_name, {**COMMON, **kw}, params, steps=2, none_every=0)


def test_tiles_smaller_than_the_tensors_bf16():
    """The stash holds state in the params' dtype: the protocol once more in bf16."""
    torch.manual_seed(0)
    params = _device_params([make(torch.bfloat16) for make in TINY_SHAPES.values()])
    with mt.use_settings(**TINY_TILES):
        _assert_same_as_reference("LAdam", dict(COMMON), params, steps=2, none_every=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_empty_tensors_ride_along(config):
    """Empty tensors among others: nothing written for them, the others as the reference. An empty
    channels_last (0, 0, 0, 2) tensor has stride 0 on its dimension of size 2, which once read as
    overlapping memory (hypothesis found it)."""
    label, cls_name, kw, op = config
    torch.manual_seed(0)
    empty_channels_last = torch.randn(0, 0, 0, 2, dtype=torch.float16).to(memory_format=torch.channels_last)
    params = _device_params(
        [
            empty_channels_last,
            torch.randn(5, 7, dtype=torch.float16),
            torch.randn(0, dtype=torch.float16),
            torch.randn(0, 6, dtype=torch.float16).t(),
        ]
    )
    _assert_same_as_reference(cls_name, {**COMMON, **kw}, params, steps=2, none_every=0)


def test_use_lap_without_a_stencil_still_clamps_at_eps():
    """The reference smooths v_hat wherever use_lap is on: clamp(v_hat + c2 * 0, min=eps) on a
    tensor whose layout has no stencil (1 row, 2 columns, 3 elements). Gradients of 1e-5 put v_hat
    (1e-10) below eps = 1e-8, where the clamp changes the step tenfold."""
    params = _device_params(make_params(torch.float32, ["rows1", "cols2", "1d_3", "many"]))
    _assert_same_as_reference("LAdam", dict(COMMON), params, steps=2, none_every=0, grad_scale=1e-5)


@pytest.mark.parametrize("wave_E0", [0.0, "auto"])
def test_wave_records_the_mean_of_the_first_squared_gradient(wave_E0):
    """wave_E0 = 0: step 1 reduces mean(g^2) over each tensor in the launch (here over several
    tiles), later steps use it."""
    torch.manual_seed(0)
    params = _device_params([torch.randn(9, 13), torch.randn(37), torch.randn(2, 3)])
    with mt.use_settings(**TINY_TILES):
        _assert_same_as_reference(
            "LAdam", {**COMMON, "mode": "wave_variance", "wave_E0": wave_E0}, params, steps=2, none_every=0
        )


def test_grads_need_not_share_the_params_layout():
    torch.manual_seed(0)
    params = _device_params([torch.randn(9, 13), torch.randn(5, 2, 3, 3).to(memory_format=torch.channels_last)])
    expected = clone_params([p.detach().cpu() for p in params])
    ours = fastopt.LAdam(params, backend="triton", **COMMON)
    ref = fastopt.LAdam(expected, backend="torch", **COMMON)
    for step in range(2):
        grads = [torch.randn(p.shape) for p in params]
        params[0].grad = grads[0].t().contiguous().t().to(DEVICE) if step else grads[0].to(DEVICE)  # column-major
        params[1].grad = grads[1].to(DEVICE)  # contiguous, unlike its channels_last param
        set_grads(expected, grads)
        with mt.use_settings(**TINY_TILES):
            ours.step()
        ref.step()
    compare_optimizers(ours, ref, params, expected, scale_atol=True).check()


def test_the_64_bit_index_path(monkeypatch):
    """Tensors of 2**31 elements need int64 offsets; the same kernels with IDX=int64, on small
    tensors by lowering the threshold."""
    monkeypatch.setattr(_table, "_INT32_LIMIT", 64)
    torch.manual_seed(0)
    params = _device_params([torch.randn(9, 13), torch.randn(37), torch.randn(3, 4)])
    with mt.use_settings(**TINY_TILES):
        table = mt.table_for(
            params, [[torch.zeros_like(p) for p in params]], [torch.ones((), device=DEVICE)] * 3, [True] * 3
        )
        assert table.index_64
        _assert_same_as_reference("LAdam", dict(COMMON), params, steps=2, none_every=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="a race shows deterministically only in the interpreter")
def test_a_naive_in_place_stencil_is_caught(monkeypatch):
    """The same kernel writing v in place without the border protocol (stash slots set to 0 in the
    table) disagrees with the reference: the parity tests above can see a race."""
    build = mt.TensorTable.__init__

    def without_protocol(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.meta[:, mt.STASH_SLOTS.value] = 0

    monkeypatch.setattr(mt.TensorTable, "__init__", without_protocol)
    torch.manual_seed(0)
    params = _device_params([torch.randn(9, 13), torch.randn(37)])
    with mt.use_settings(**TINY_TILES), pytest.raises(AssertionError, match="elements differ"):
        _assert_same_as_reference("LAdam", dict(COMMON), params, steps=2, none_every=0)


# -- launches, the table cache ---------------------------------------------------------------------
@contextlib.contextmanager
def _counting_launches(monkeypatch, run_them=True):
    """Record each launch of a fastopt kernel (by wrapping JITFunction.run, or the interpreter's
    InterpretedFunction.run); with run_them=False the kernels do not run (host work alone)."""
    launched = []
    for cls in {type(k) for k in _KERNELS()}:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            launched.append(self)
            return _original(self, *args, **kwargs) if run_them else None

        monkeypatch.setattr(cls, "run", run)
    yield launched


def _KERNELS():
    from fastopt.kernels import (
        ladagrad_step,
        ladam_step,
        ladam_update_lap_step,
        ladam_wave_step,
        ladam_weight_lap_step,
        lrmsprop_step,
    )

    return [
        ladam_step._ladam_step_kernel,
        ladam_update_lap_step._ladam_update_lap_step_kernel,
        ladam_weight_lap_step._ladam_weight_lap_step_kernel,
        ladam_wave_step._ladam_wave_step_kernel,
        ladagrad_step._ladagrad_step_kernel,
        lrmsprop_step._lrmsprop_step_kernel,
    ]


def _aten_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count() as mode:
        fn()
    return mode.ops


@pytest.mark.parametrize("config", CONFIGS)
def test_one_launch_per_step_whatever_the_number_of_tensors(config, monkeypatch):
    label, cls_name, kw, op = config
    per_step = {}
    for n in (2, 12):
        params = _device_params([torch.randn(3 + i, 5) for i in range(n)])
        opt = getattr(fastopt, cls_name)(params, backend="triton", **{**COMMON, **kw})
        with _counting_launches(monkeypatch) as launched:
            for grads in grad_stream(params, 2, none_every=0):
                set_grads(params, grads)
                opt.step()
        per_step[n] = len(launched) / 2
    assert per_step == {2: 1, 12: 1}


def test_steady_state_steps_reuse_the_table_and_issue_a_fixed_number_of_torch_ops(monkeypatch):
    """The launcher's host work per step (the kernel itself not run): no table rebuilt, and the
    same few torch ops (upload of the grads' addresses, the stash) for 3 tensors as for 30."""
    built = []
    build = mt.TensorTable.__init__

    def counted(self, *args, **kwargs):
        built.append(self)
        build(self, *args, **kwargs)

    monkeypatch.setattr(mt.TensorTable, "__init__", counted)
    ops = {}
    for n in (3, 30):
        params = [torch.randn(4, 5, device=DEVICE) for _ in range(n)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        steps = [torch.zeros((), device=DEVICE) for _ in params]

        def step():
            torch._foreach_add_(steps, 1)
            grads = [torch.randn_like(p) for p in params]
            hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, c2=1e-2, stencil="9point")
            return lambda: kernels.ladam_step_triton(params, grads, *state, steps, [True] * n, **hyper)

        step()()
        built.clear()
        with _counting_launches(monkeypatch, run_them=False) as launched:
            ops[n] = _aten_ops(step())
            step()()
        assert not built and len(launched) == 2
    assert ops[3] == ops[30] and len(ops[3]) <= 8, ops  # CPU: 2 (the address table, the stash)


def test_the_table_is_dropped_when_a_tensor_dies():
    params = [torch.randn(4, 5, device=DEVICE)]
    state = [torch.zeros_like(params[0])]
    steps = [torch.ones((), device=DEVICE)]
    mt.table_for(params, [state], steps, [True])
    count = len(mt._TABLES)
    del state[:]
    assert len(mt._TABLES) == count - 1


# -- errors ----------------------------------------------------------------------------------------
def _lists(n=2, shape=(4, 5)):
    params = [torch.randn(shape, device=DEVICE) for _ in range(n)]
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        exp_avgs=[torch.zeros_like(p) for p in params],
        exp_avg_sqs=[torch.zeros_like(p) for p in params],
        steps=[torch.ones((), device=DEVICE) for _ in params],
        use_laps=[True] * n,
    )


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, c2=1e-2, stencil="9point")


def _swap(key, index, make):
    def breakage(args, hyper):
        args[key][index] = make(args[key][index])

    return breakage


@pytest.mark.parametrize(
    "breakage,match",
    [
        (_swap("grads", 1, lambda g: torch.randn(5, 4, device=DEVICE)), r"grads\[1\] has shape \(5, 4\)"),
        (_swap("grads", 0, lambda g: g.double()), r"grads\[0\] is torch.float64"),
        (_swap("exp_avgs", 1, lambda m: torch.zeros(5, 4, device=DEVICE).t()), r"state list 0\[1\] must be contiguous"),
        (_swap("steps", 0, lambda s: s.long()), r"steps\[0\] must be a 1-element float32"),
        (lambda args, hyper: args["exp_avg_sqs"].pop(), r"state list 1 has 1 tensors for 2 params"),
        (
            _swap("params", 0, lambda p: torch.randn(1, 5, device=DEVICE).expand(4, 5)),
            r"params\[0\] has overlapping memory",
        ),
        (lambda args, hyper: hyper.update(stencil="7point"), r"Invalid stencil: '7point'. Choose from"),
    ],
    ids=["grad shape", "grad dtype", "state layout", "step dtype", "list lengths", "overlapping param", "stencil"],
)
def test_bad_input_is_refused_before_anything_is_written(breakage, match):
    args, hyper = _lists(), dict(HYPER)
    breakage(args, hyper)
    before = {key: [t.clone() for t in args[key]] for key in ("params", "exp_avgs", "steps")}
    with pytest.raises(ValueError, match=match):
        kernels.ladam_step_triton(**args, **hyper)
    for key, tensors in before.items():
        assert all(torch.equal(a, b) for a, b in zip(args[key], tensors)), key


def test_a_tensor_of_too_many_unmergeable_dims_is_refused():
    p = torch.randn([2] * 9, device=DEVICE).permute(8, 7, 6, 5, 4, 3, 2, 1, 0)
    state = [[torch.zeros(p.shape, device=DEVICE)] for _ in range(2)]
    with pytest.raises(ValueError, match="up to 8 dimensions"):
        kernels.ladam_step_triton([p], [torch.randn_like(p)], *state, [torch.ones((), device=DEVICE)], [True], **HYPER)


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the policy, on a machine without a GPU
    # every op but least_squares' step ops, LM's small-system QR solve and its per-sample conv
    # gradients (C++ on CPU, the torch reference elsewhere)
    cpu_only = {"lsq_propose", "lsq_update", "lm_small_solve", "conv2d_per_sample_grads", "conv2d_input_delta"}
    assert set(kernels.DTYPES) == set(backends.OPS) - cpu_only
    for op, dtypes in kernels.DTYPES.items():
        for dtype in dtypes:
            assert backends.resolve(op, "cuda", dtype) == "triton", (op, dtype)


@pytest.mark.parametrize("path", ["generic", "vector"])
def test_the_stash_holds_exactly_the_borders_the_cost_figures_count(path, monkeypatch):
    """bench/stencil_cost.py reports the generic protocol's extra memory and traffic from
    TileGrid.border_elements / halo_elements: the stash slots a launch really writes are those.
    The vector path recomputes its borders at commit instead (kernels/_vector_tile.py): it writes
    no stash slot."""
    if path == "generic":
        monkeypatch.setattr(_table, "_vector_ready", lambda *args: False)
    stashes = []
    make = mt.TensorTable.stash

    def kept(self):
        stash = make(self).fill_(float("nan"))
        stashes.append(stash)
        return stash

    monkeypatch.setattr(mt.TensorTable, "stash", kept)
    shapes = [(5, 7), (9, 11), (13, 3), (37,), (3, 2, 2, 2)]
    if path == "vector":
        shapes = [(5, 8), (9, 12), (36,), (3, 2, 2, 2)]  # rows of a multiple of 4 elements (16 bytes)
    params = [torch.randn(s, device=DEVICE) for s in shapes]
    with mt.use_settings(**TINY_TILES) as settings:
        state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        kernels.ladam_step_triton(
            params,
            [torch.randn_like(p) for p in params],
            *state,
            [torch.ones((), device=DEVICE) for _ in params],
            [True] * len(params),
            **HYPER,
        )
        expected = sum(mt.tile_grid(s, True, settings).border_elements() for s in shapes)
    assert expected > 0
    assert int((~torch.isnan(stashes[-1])).sum()) == (expected if path == "generic" else 0)


# -- the vector path (kernels/_vector_tile.py) and its host-side choice ------------------------------
# With 4 x 4 tiles every 2-D tensor with >= 4 columns (a multiple of 4) takes the vector path in fp32;
# odd column counts, strided params and misaligned grads take the generic one, in the same launch.
VECTOR_SHAPES = {
    "3x3 tiles, 12 columns": lambda dt: torch.randn(9, 12, dtype=dt),
    "2x2 tiles, 8 columns": lambda dt: torch.randn(5, 8, dtype=dt),
    "1-D, 40": lambda dt: torch.randn(40, dtype=dt),
    "no lap, 4 x 4": lambda dt: torch.randn(2, 16, dtype=dt),
    "4-D, 4 columns": lambda dt: torch.randn(7, 1, 2, 2, dtype=dt),
}


def _launched_vector_modes(monkeypatch):
    """Record the VECTOR constexpr of every launch."""
    from fastopt.kernels import _adam, _launch, ladagrad_step, lrmsprop_step

    seen = []
    launch = _launch.launch

    def recorded(kernel, table, grads, *args, **kwargs):
        launch(kernel, table, grads, *args, **kwargs)
        if kwargs.get("vectorized", len(args) > 5 and args[5]):  # launch's 9th positional argument
            seen.append(table.vector_mode())

    for module in (_adam, ladagrad_step, lrmsprop_step):  # the launchers of the vectorized kernels
        monkeypatch.setattr(module, "launch", recorded)
    return seen


VECTOR_OPS = ("ladam_step", "ladagrad_step", "lrmsprop_step")  # the kernels with a vector path


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.values[0][3] in VECTOR_OPS])
@pytest.mark.parametrize("mix", ["all vector", "mixed", "all generic"])
def test_the_vector_and_generic_paths_match_the_reference(mix, config, monkeypatch):
    label, cls_name, kw, op = config
    torch.manual_seed(0)
    shapes = list(VECTOR_SHAPES.values())
    if mix == "mixed":
        shapes += [TINY_SHAPES["transposed"], TINY_SHAPES["2x2 tiles"], TINY_SHAPES["1-D"]]
    if mix == "all generic":
        monkeypatch.setattr(_table, "_vector_ready", lambda *args: False)
    params = _device_params([make(torch.float32) for make in shapes])
    seen = _launched_vector_modes(monkeypatch)
    with mt.use_settings(**TINY_TILES):
        _assert_same_as_reference(cls_name, {**COMMON, **kw}, params, steps=3, none_every=0)
    assert set(seen) == {{"all vector": 1, "mixed": 2, "all generic": 0}[mix]}, seen


def test_misaligned_grads_take_the_generic_path(monkeypatch):
    """Grads that are views into a flat buffer (DDP's gradient_as_bucket_view) need not be 16-byte
    aligned: the launch falls back to the generic path for all tensors, with the same results."""
    torch.manual_seed(0)
    params = _device_params([make(torch.float32) for make in VECTOR_SHAPES.values()])
    expected = clone_params([p.detach().cpu() for p in params])
    ours = fastopt.LAdam(params, backend="triton", **COMMON)
    ref = fastopt.LAdam(expected, backend="torch", **COMMON)
    seen = _launched_vector_modes(monkeypatch)
    for _ in range(2):
        grads = [torch.randn(p.shape) for p in params]
        bucket = torch.zeros(1 + sum(g.numel() for g in grads), device=DEVICE)
        offset = 1  # 4 bytes past an aligned allocation
        for p, g in zip(params, grads):
            p.grad = bucket[offset : offset + g.numel()].view(g.shape)
            p.grad.copy_(g)
            offset += g.numel()
        set_grads(expected, grads)
        with mt.use_settings(**TINY_TILES):
            ours.step()
        ref.step()
    compare_optimizers(ours, ref, params, expected, scale_atol=True).check()
    assert seen == [0, 0], seen
