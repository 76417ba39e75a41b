"""Tools for parity-testing fastopt: the shape zoo, deterministic gradient streams, verbose
comparisons, :func:`step_side_by_side`, which steps a backend's optimizer beside the reference and
compares parameters and every state entry, and :func:`check_backend`, which does that for every
op and dtype of a backend.

fastopt's own tests and ``python -m fastopt`` use these; they are public so that users can run the
same checks on their machine (``fastopt.testing.check_backend("triton", "cuda")``)::

    from fastopt.testing import COMMON, make_params, step_side_by_side
    params = make_params(torch.bfloat16, device="cuda")
    step_side_by_side("LAdam", params, backend="triton", hyper=COMMON, steps=5)  # raises on a mismatch
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import backends

# Odd sizes on purpose: every boundary rule of fastopt.reference.stencil_layout is hit
# (1-D below and at 4 elements, fewer than 3 rows or columns, the (shape[0], -1) view of 3-D to 5-D
# weights), plus layouts a kernel must not get wrong (channels_last, non-contiguous).
ZOO: Dict[str, Callable[[torch.dtype], torch.Tensor]] = {
    "1d_3": lambda dt: torch.randn(3, dtype=dt),
    "1d_4": lambda dt: torch.randn(4, dtype=dt),
    "1d_17": lambda dt: torch.randn(17, dtype=dt),
    "rows1": lambda dt: torch.randn(1, 40, dtype=dt),
    "rows2": lambda dt: torch.randn(2, 40, dtype=dt),
    "rows3": lambda dt: torch.randn(3, 40, dtype=dt),
    "cols1": lambda dt: torch.randn(40, 1, dtype=dt),
    "cols2": lambda dt: torch.randn(40, 2, dtype=dt),
    "cols3": lambda dt: torch.randn(40, 3, dtype=dt),
    "3x3": lambda dt: torch.randn(3, 3, dtype=dt),
    "many": lambda dt: torch.randn(37, 29, dtype=dt),
    "3d": lambda dt: torch.randn(8, 5, 7, dtype=dt),
    "4d_conv": lambda dt: torch.randn(16, 3, 3, 3, dtype=dt),
    "5d": lambda dt: torch.randn(4, 3, 2, 3, 5, dtype=dt),
    "channels_last": lambda dt: torch.randn(12, 8, 3, 3, dtype=dt).to(memory_format=torch.channels_last),
    "transposed": lambda dt: torch.randn(30, 20, dtype=dt).t(),
    "strided": lambda dt: torch.randn(24, 26, dtype=dt)[:, ::2],
}


def make_params(
    dtype: torch.dtype = torch.float32,
    names: Optional[Iterable[str]] = None,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> List[torch.Tensor]:
    """Fresh leaf parameters of the zoo (the same values for the same seed, on any device)."""
    torch.manual_seed(seed)
    return [ZOO[n](dtype).to(device).requires_grad_() for n in (names or ZOO)]


def clone_params(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Leaf copies with the same values, shapes and strides."""
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
        q.copy_(p.detach())
        out.append(q.requires_grad_())
    return out


def grad_stream(
    params: Sequence[torch.Tensor], steps: int, seed: int = 1, none_every: int = 5
) -> Iterator[List[Optional[torch.Tensor]]]:
    """Per step, a gradient per parameter (None for parameter i at steps where
    (step + i) % none_every == 0, so step counts diverge between tensors)."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = []
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)
            grads.append(None if none_every and (t + i) % none_every == 0 else g)
        yield grads


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


# -- closeness ---------------------------------------------------------------------------------------
def _magnitude(expected: torch.Tensor) -> float:
    """max(1, max|expected|) over the finite elements: an inf must not widen a tolerance to inf."""
    finite = expected[torch.isfinite(expected)]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


def _compare(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, scale_atol: bool, what: str
) -> Tuple[float, Optional[str]]:
    """(largest |actual - expected|, the report of :func:`mismatch`). A NaN on one side only counts
    as an infinite difference, NaN against NaN and inf against the same inf as none."""
    actual, expected = actual.detach(), expected.detach()
    if actual.shape != expected.shape:
        return float("inf"), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.cpu().double(), expected.cpu().double()
    scale = _magnitude(e) if scale_atol else 1.0
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol * scale, equal_nan=True)
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    diff = torch.nan_to_num(torch.where(same, torch.zeros_like(a), (a - e).abs()), nan=float("inf"))
    worst = float(diff.max()) if diff.numel() else 0.0
    if not bad.any():
        return worst, None
    idx = bad.nonzero()[:5].tolist()
    scaled = f" = {atol} x max|expected| {scale:.3g}" if scale_atol else ""
    return worst, (
        f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (rtol={rtol}, atol={atol * scale:.3g}{scaled}); "
        f"max abs diff {worst:.3e}; first at {idx}: "
        f"actual {[a[tuple(i)].item() for i in idx]} expected {[e[tuple(i)].item() for i in idx]}; "
        f"NaN actual/expected {int(torch.isnan(a).sum())}/{int(torch.isnan(e).sum())}, "
        f"inf {int(torch.isinf(a).sum())}/{int(torch.isinf(e).sum())}"
    )


def mismatch(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, scale_atol: bool = False, what: str = ""
) -> Optional[str]:
    """None if ``actual`` is close to ``expected`` everywhere, else a one-line report.

    Close: same shape and ``|actual - expected| <= atol + rtol * |expected|`` elementwise
    (``torch.isclose`` in float64 on the CPU, NaN equal to NaN). The report gives how many
    elements differ, the largest difference, the first (up to 5) indices with both values there,
    and the NaN and inf counts of each side.

    ``scale_atol=True`` multiplies ``atol`` by max(1, max|expected|) over the finite elements:
    a result that cancels carries the round-off of its largest terms, not of itself. A momentum
    buffer of values ~10 sums terms of that size, so an element near 0 is off by their rounding
    (seen on the cpu backend: 1e-6 off at -0.019, both it and the fp32 reference 3e-6 from the
    fp64 result), and kernels round an ulp differently here and there (torch's CPU sqrt is not
    always correctly rounded).
    """
    return _compare(actual, expected, rtol=rtol, atol=atol, scale_atol=scale_atol, what=what)[1]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, scale_atol: bool = False, what: str = ""
) -> None:
    """Raise AssertionError with :func:`mismatch`'s report unless ``actual`` is close to ``expected``."""
    report = mismatch(actual, expected, rtol=rtol, atol=atol, scale_atol=scale_atol, what=what)
    if report:
        raise AssertionError(report)


def assert_all_close(
    actual: Sequence[torch.Tensor],
    expected: Sequence[torch.Tensor],
    *,
    rtol: float,
    atol: float,
    scale_atol: bool = False,
    what: str = "",
) -> None:
    """:func:`assert_close` of each pair (each tensor scaled by its own magnitude with ``scale_atol``)."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, rtol=rtol, atol=atol, scale_atol=scale_atol, what=f"{what}[{i}]")


# How far a backend may stray from the reference after a few steps: fp32/fp64 round-off (kernels
# sum the stencil in their own order), a few units in the last place for bf16/fp16 (the same fp32
# math rounded once per step, where a rounding boundary may fall either way).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
    torch.float16: dict(rtol=4e-3, atol=1e-3),
}
# State entries that count: equal in any dtype, never merely close.
EXACT_STATE = frozenset({"step"})


# -- optimizers side by side -------------------------------------------------------------------------
@dataclass
class Comparison:
    """What :func:`compare_optimizers` or :func:`step_side_by_side` found."""

    ours: Any = None  # the optimizers compared
    reference: Any = None
    max_abs_diff: float = 0.0  # over every parameter and state tensor compared
    mismatches: List[str] = field(default_factory=list)  # one report each; empty when all matched

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def check(self) -> "Comparison":
        """Raise AssertionError listing the mismatches, if any; else return self."""
        if self.mismatches:
            shown = "\n".join(self.mismatches[:8])
            more = f"\n... and {len(self.mismatches) - 8} more" if len(self.mismatches) > 8 else ""
            raise AssertionError(f"{len(self.mismatches)} mismatch(es) with the reference:\n{shown}{more}")
        return self

    def _add(self, worst: float, report: Optional[str]) -> None:
        self.max_abs_diff = max(self.max_abs_diff, worst)
        if report:
            self.mismatches.append(report)


def _tolerance(dtype: torch.dtype, rtol: Optional[float], atol: Optional[float]) -> Dict[str, float]:
    tol = dict(TOLERANCES.get(dtype, dict(rtol=0.0, atol=0.0)))  # integer and bool tensors: equal
    if rtol is not None:
        tol["rtol"] = rtol
    if atol is not None:
        tol["atol"] = atol
    return tol


def _compare_state_entry(
    found: Comparison, key: str, a: Any, e: Any, foreign: bool, rtol, atol, scale_atol: bool, what: str
) -> None:
    if not (torch.is_tensor(a) or torch.is_tensor(e)):
        if a != e:
            found.mismatches.append(f"{what}: {a!r} != {e!r}")
        return
    if not torch.is_tensor(a):
        found.mismatches.append(f"{what}: {a!r} is not a tensor (the reference holds one)")
        return
    if not a.is_contiguous():  # fastopt keeps state contiguous in logical order (the stencil walks it)
        found.mismatches.append(f"{what} is not contiguous: stride {a.stride()} for shape {tuple(a.shape)}")
    if not torch.is_tensor(e):  # ladam keeps step as an int, wave_E0_auto as a float
        e = torch.tensor(e, dtype=torch.float64)
    elif not foreign and a.dtype != e.dtype:
        found.mismatches.append(f"{what}: dtype {a.dtype} != {e.dtype}")
    if key in EXACT_STATE:
        found._add(*_compare(a, e, rtol=0.0, atol=0.0, scale_atol=False, what=what))
    else:
        found._add(*_compare(a, e, **_tolerance(a.dtype, rtol, atol), scale_atol=scale_atol, what=what))


def _compare_into(
    found: Comparison,
    ours,
    reference,
    ours_params: Sequence[torch.Tensor],
    ref_params: Sequence[torch.Tensor],
    *,
    rtol,
    atol,
    scale_atol: Union[bool, str],
    state_keys: Union[None, str, Mapping[str, str]],
    names: Optional[Sequence[str]],
    what: str,
) -> None:
    renamed: Optional[Mapping[str, str]]
    if isinstance(state_keys, str):  # "ladam": the optimizer class says how ladam names its state
        renamed = getattr(type(ours), "_LADAM_STATE_KEYS", {})
    else:
        renamed = state_keys
    if len(ours_params) != len(ref_params):
        found.mismatches.append(f"{what}{len(ours_params)} parameters vs {len(ref_params)} in the reference")
        return
    for i, (p, q) in enumerate(zip(ours_params, ref_params)):
        where = f"{what}{names[i] if names else f'param[{i}]'} {tuple(q.shape)} {str(q.dtype).replace('torch.', '')}"
        found._add(*_compare(p, q, **_tolerance(q.dtype, rtol, atol), scale_atol=scale_atol is True, what=where))
        mine, theirs = ours.state.get(p, {}), reference.state.get(q, {})
        if renamed is not None:  # a foreign reference: its keys renamed; ours may keep more
            theirs = {renamed.get(k, k): value for k, value in theirs.items()}
            missing = sorted(set(theirs) - set(mine))
            if missing:
                found.mismatches.append(f"{where}: state lacks {missing} (the reference's keys: {sorted(theirs)})")
        elif mine.keys() != theirs.keys():
            found.mismatches.append(f"{where}: state keys {sorted(mine)} != {sorted(theirs)}")
        for key, e in theirs.items():
            if key in mine:
                _compare_state_entry(
                    found,
                    key,
                    mine[key],
                    e,
                    state_keys is not None,
                    rtol,
                    atol,
                    bool(scale_atol),
                    f"{where} state[{key!r}]",
                )


def compare_optimizers(
    ours: torch.optim.Optimizer,
    reference: torch.optim.Optimizer,
    ours_params: Sequence[torch.Tensor],
    ref_params: Sequence[torch.Tensor],
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    scale_atol: Union[bool, str] = False,
    state_keys: Union[None, str, Mapping[str, str]] = None,
    names: Optional[Sequence[str]] = None,
    what: str = "",
) -> Comparison:
    """Compare two optimizers' parameters (``ours_params[i]`` with ``ref_params[i]``) and every
    entry of each parameter's state, 0-dim ones included; returns a :class:`Comparison`
    (``.check()`` raises on a mismatch).

    Tensors must be close as :func:`mismatch` says, with :data:`TOLERANCES` of the reference
    tensor's dtype unless ``rtol``/``atol`` are given; step counts (:data:`EXACT_STATE`) must be
    equal; state tensors of ``ours`` contiguous and of the reference's dtype; other entries
    (``use_lap``) equal. ``scale_atol`` as in :func:`mismatch`, for parameters and state
    (True) or for state tensors alone ("state"). ``what`` starts each report.

    The state keys must be the same, unless ``state_keys`` maps a foreign reference's keys to
    ours (``"ladam"``: the renaming ``ours`` applies when it loads a ladam state_dict,
    ``{"m": "exp_avg", "v": "exp_avg_sq", ...}``): then every key of the reference must be in
    ours, which may keep more, and its plain numbers (ladam's integer step) are compared as
    tensors. ``names`` label the parameters in reports.
    """
    found = Comparison(ours, reference)
    _compare_into(
        found,
        ours,
        reference,
        list(ours_params),
        list(ref_params),
        rtol=rtol,
        atol=atol,
        scale_atol=scale_atol,
        state_keys=state_keys,
        names=names,
        what=what,
    )
    return found


ParamsOrGroups = Union[Sequence[torch.Tensor], Sequence[Dict[str, Any]]]


def _groups_and_copies(params: ParamsOrGroups) -> Tuple[list, List[torch.Tensor], list, List[torch.Tensor]]:
    """(our groups or params, our flat params, the reference's groups or params: leaf copies on the
    CPU, other keys kept, the reference's flat params)."""
    given: list = list(params)
    if given and isinstance(given[0], dict):
        groups = [list(g["params"]) for g in given]
        ref_groups = [
            {**g, "params": clone_params([p.detach().cpu() for p in tensors])} for g, tensors in zip(given, groups)
        ]
        return given, [p for g in groups for p in g], ref_groups, [p for g in ref_groups for p in g["params"]]
    ref = clone_params([p.detach().cpu() for p in given])
    return given, given, ref, ref


def step_side_by_side(
    optimizer: Union[str, Callable],
    params: ParamsOrGroups,
    *,
    backend: str,
    hyper: Optional[Mapping[str, Any]] = None,
    steps: int = 3,
    reference: Union[str, Callable] = "torch",
    state_keys: Union[None, str, Mapping[str, str]] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    scale_atol: Union[bool, str] = False,
    every_step: bool = False,
    names: Optional[Sequence[str]] = None,
    seed: int = 1,
    none_every: int = 5,
    grad_scale: float = 1.0,
    step_context: Optional[Callable[[], Any]] = None,
    check: bool = True,
    what: str = "",
) -> Comparison:
    """Step ``optimizer(params, backend=backend, **hyper)`` and a reference on leaf copies of
    ``params`` on the CPU side by side, ``steps`` times, with the same gradients; then compare
    parameters and every state entry as :func:`compare_optimizers` does (after every step with
    ``every_step``).

    ``optimizer``: a class of :mod:`fastopt.optim` or its name ("LAdam"). ``params``: tensors on
    any device, or param groups (dicts, other keys kept for the reference). ``reference``: a
    backend name (default "torch", i.e. fastopt.reference) or a constructor called as
    ``reference(copies, **hyper)`` (``ladam.LAdamW``, with ``state_keys="ladam"``).
    Gradients: :func:`grad_stream` (``seed``, ``none_every``: None for some parameters on some
    steps, so step counts diverge), times ``grad_scale``. ``step_context()`` is entered around
    each step of ``optimizer`` only (a thread count, a tiling). With ``check`` (the default) a
    mismatch raises AssertionError at the first step compared that has one; without, all are
    collected in the returned :class:`Comparison`. ``what`` starts each report.
    """
    from . import optim

    cls = getattr(optim, optimizer) if isinstance(optimizer, str) else optimizer
    hyper = dict(hyper or {})
    ours_arg, ours_params, ref_arg, ref_params = _groups_and_copies(params)
    ours = cls(ours_arg, backend=backend, **hyper)
    ref = cls(ref_arg, backend=reference, **hyper) if isinstance(reference, str) else reference(ref_arg, **hyper)
    found = Comparison(ours, ref)
    context = step_context or contextlib.nullcontext
    for t, grads in enumerate(grad_stream(ref_params, steps, seed=seed, none_every=none_every)):
        if grad_scale != 1.0:
            grads = [None if g is None else g * grad_scale for g in grads]
        set_grads(ref_params, grads)
        set_grads(ours_params, [None if g is None else g.to(p.device) for g, p in zip(grads, ours_params)])
        with context():
            ours.step()
        ref.step()
        if every_step or t == steps - 1:
            _compare_into(
                found,
                ours,
                ref,
                ours_params,
                ref_params,
                rtol=rtol,
                atol=atol,
                scale_atol=scale_atol,
                state_keys=state_keys,
                names=names,
                what=f"{what}step {t + 1}: ",
            )
            if check:
                found.check()
    return found


# -- every op and dtype of a backend -----------------------------------------------------------------
# One configuration per op (and both stencils for the default op): label, class, keywords, op.
CHECKS: List[Tuple[str, str, Dict[str, Any], str]] = [
    ("LAdam variance_lap 9point", "LAdam", dict(mode="variance_lap"), "ladam_step"),
    ("LAdam variance_lap 5point", "LAdam", dict(mode="variance_lap", stencil="5point"), "ladam_step"),
    ("LAdam update_lap", "LAdam", dict(mode="update_lap"), "ladam_update_lap_step"),
    ("LAdam weight_lap", "LAdam", dict(mode="weight_lap"), "ladam_weight_lap_step"),
    ("LAdam wave_variance", "LAdam", dict(mode="wave_variance", wave_E0=3.0), "ladam_wave_step"),
    ("LAdaGrad", "LAdaGrad", dict(lr_decay=0.01), "ladagrad_step"),
    ("LRMSProp", "LRMSProp", dict(), "lrmsprop_step"),
    ("LRMSProp momentum", "LRMSProp", dict(momentum=0.9), "lrmsprop_step"),
]
# The hyperparameters every check shares (min_spatial_size=4: the zoo's small tensors get the Laplacian).
COMMON = dict(lr=1e-2, c2=1e-2, weight_decay=0.1, min_spatial_size=4)


@dataclass
class CheckResult:
    backend: str
    check: str
    dtype: torch.dtype
    max_abs_diff: Optional[float]  # over params and state; None when not run
    passed: Optional[bool]  # None when not run
    note: str = ""


def check_backend(
    backend: str,
    device: Union[str, torch.device] = "cpu",
    dtypes: Optional[Sequence[torch.dtype]] = None,
    steps: int = 5,
) -> List[CheckResult]:
    """Step ``backend`` and a trusted implementation side by side on the shape zoo
    (:func:`step_side_by_side`: parameters within :data:`TOLERANCES`, state tensors too with atol
    scaled by their magnitude, step counts equal).

    Every backend but "torch" is compared with fastopt.reference (backend "torch"); "torch" itself
    is compared with the ``ladam`` package, if installed (its spec). Returns one
    :class:`CheckResult` per configuration of :data:`CHECKS` and dtype; a failed one's note starts
    with the first mismatch.
    """
    device = torch.device(device)
    if dtypes is None:
        dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    results = []
    for label, cls_name, kw, op in CHECKS:
        for dtype in dtypes:
            reason = backends.why_not(backend, op, device, dtype)
            reference, state_keys, note = _oracle(backend, cls_name, dtype)
            if reason is None and reference is None:
                reason = note
            if reason is not None:
                results.append(CheckResult(backend, label, dtype, None, None, reason))
                continue
            found = step_side_by_side(
                cls_name,
                make_params(dtype, device=device),
                backend=backend,
                hyper={**COMMON, **kw},
                steps=steps,
                reference=reference,
                state_keys=state_keys,
                scale_atol="state",
                check=False,
            )
            results.append(
                CheckResult(
                    backend,
                    label,
                    dtype,
                    found.max_abs_diff,
                    found.passed,
                    note if found.passed else f"{found.mismatches[0]}; {note}",
                )
            )
    return results


def _oracle(backend, cls_name, dtype):
    """(what ``backend`` is checked against, the ``state_keys`` of :func:`compare_optimizers`,
    note); what is None, and the note says why, when there is nothing to check against."""
    if backend != "torch":
        return "torch", None, "vs fastopt.reference"
    if dtype not in (torch.float32, torch.float64):
        # ladam rounds every bf16/fp16 intermediate; the reference computes in fp32 by design
        # (tests/test_reference_vs_ladam.py checks that policy step by step).
        return None, None, "not compared: ladam computes bf16/fp16 in bf16/fp16, the reference in fp32"
    try:
        import ladam
    except ImportError:
        return None, None, "not compared: ladam is not installed (pip install ladam==0.4.1)"
    cls = {"LAdam": ladam.LAdamW, "LAdaGrad": ladam.LAdaGrad, "LRMSProp": ladam.LRMSProp}[cls_name]
    return cls, "ladam", f"vs ladam {ladam.__version__}"
