"""Tools for parity-testing fastopt: the shape zoo, deterministic gradient streams, verbose
comparisons and :func:`check_backend`, which steps a backend beside the reference.

fastopt's own tests and ``python -m fastopt`` use these; they are public so that users can run the
same checks on their machine (``fastopt.testing.check_backend("triton", "cuda")``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

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


def make_params(dtype: torch.dtype = torch.float32, names: Optional[Iterable[str]] = None, seed: int = 0,
                device="cpu") -> List[torch.Tensor]:
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


def grad_stream(params: Sequence[torch.Tensor], steps: int, seed: int = 1, none_every: int = 5):
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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    """torch.testing-style closeness with a report of how many elements differ, where, and NaN/inf."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(diff), torch.zeros_like(diff), diff)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"max abs diff {diff.max().item():.3e}; first at {idx}: "
            f"actual {[a[tuple(i)].item() for i in idx]} expected {[e[tuple(i)].item() for i in idx]}; "
            f"NaN actual/expected {int(torch.isnan(a).sum())}/{int(torch.isnan(e).sum())}, "
            f"inf {int(torch.isinf(a).sum())}/{int(torch.isinf(e).sum())}")


def assert_all_close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], *, rtol: float,
                     atol: float, what: str = "") -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, rtol=rtol, atol=atol, what=f"{what}[{i}]")


# How far a backend may stray from the reference after a few steps: fp32/fp64 round-off (kernels
# sum the stencil in their own order), a few units in the last place for bf16/fp16 (the same fp32
# math rounded once per step, where a rounding boundary may fall either way).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
    torch.float16: dict(rtol=4e-3, atol=1e-3),
}

# One configuration per op (and both stencils for the default op): label, class, keywords, op.
CHECKS = [
    ("LAdam variance_lap 9point", "LAdam", dict(mode="variance_lap"), "ladam_step"),
    ("LAdam variance_lap 5point", "LAdam", dict(mode="variance_lap", stencil="5point"), "ladam_step"),
    ("LAdam update_lap", "LAdam", dict(mode="update_lap"), "ladam_update_lap_step"),
    ("LAdam weight_lap", "LAdam", dict(mode="weight_lap"), "ladam_weight_lap_step"),
    ("LAdam wave_variance", "LAdam", dict(mode="wave_variance", wave_E0=3.0), "ladam_wave_step"),
    ("LAdaGrad", "LAdaGrad", dict(lr_decay=0.01), "ladagrad_step"),
    ("LRMSProp", "LRMSProp", dict(), "lrmsprop_step"),
    ("LRMSProp momentum", "LRMSProp", dict(momentum=0.9), "lrmsprop_step"),
]
_COMMON = dict(lr=1e-2, c2=1e-2, weight_decay=0.1, min_spatial_size=4)


@dataclass
class CheckResult:
    backend: str
    check: str
    dtype: torch.dtype
    max_abs_diff: Optional[float]   # None when not run
    passed: Optional[bool]          # None when not run
    note: str = ""


def _run_steps(opt, params, steps):
    for grads in grad_stream(params, steps):
        set_grads(params, grads)
        opt.step()


def check_backend(backend: str, device="cpu", dtypes: Optional[Sequence[torch.dtype]] = None,
                  steps: int = 5) -> List[CheckResult]:
    """Step ``backend`` and a trusted implementation side by side on the shape zoo.

    Every backend but "torch" is compared with fastopt.reference (backend "torch"); "torch" itself
    is compared with the ``ladam`` package, if installed (its spec). Returns one
    :class:`CheckResult` per configuration of :data:`CHECKS` and dtype.
    """
    from . import optim

    device = torch.device(device)
    if dtypes is None:
        dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    results = []
    for label, cls_name, kw, op in CHECKS:
        for dtype in dtypes:
            reason = backends.why_not(backend, op, device, dtype)
            oracle, note = _oracle(backend, cls_name, dtype)
            if reason is None and oracle is None:
                reason = note
            if reason is not None:
                results.append(CheckResult(backend, label, dtype, None, None, reason))
                continue
            kwargs = {**_COMMON, **kw}
            params = make_params(dtype, device=device)
            expected = clone_params(params)
            _run_steps(getattr(optim, cls_name)(params, backend=backend, **kwargs), params, steps)
            _run_steps(oracle(expected, **kwargs), expected, steps)
            tol = TOLERANCES[dtype]
            worst, passed = 0.0, True
            for a, e in zip(params, expected):
                diff = (a.detach().double() - e.detach().double()).abs()
                worst = max(worst, float(diff.max()))
                passed &= bool(torch.isclose(a.detach().double(), e.detach().double(), **tol).all())
            results.append(CheckResult(backend, label, dtype, worst, passed, note))
    return results


def _oracle(backend, cls_name, dtype):
    """(constructor of what ``backend`` is checked against, note); the constructor is None, and
    the note says why, when there is nothing to check against."""
    from . import optim

    if backend != "torch":
        return (lambda params, **kw: getattr(optim, cls_name)(params, backend="torch", **kw)), "vs fastopt.reference"
    if dtype not in (torch.float32, torch.float64):
        # ladam rounds every bf16/fp16 intermediate; the reference computes in fp32 by design
        # (tests/test_reference_vs_ladam.py checks that policy step by step).
        return None, "not compared: ladam computes bf16/fp16 in bf16/fp16, the reference in fp32"
    try:
        import ladam
    except ImportError:
        return None, "not compared: ladam is not installed (pip install ladam==0.4.1)"
    cls = {"LAdam": ladam.LAdamW, "LAdaGrad": ladam.LAdaGrad, "LRMSProp": ladam.LRMSProp}[cls_name]
    return cls, f"vs ladam {ladam.__version__}"
