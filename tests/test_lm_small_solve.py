"""The lm_small_solve op (csrc/lm_small_solve_cpu.cpp): one damped 'qr' system of a small
Levenberg-Marquardt step, against its spec fastopt.reference.lm_small_solve_reference (LAPACK's
geqrf + ormqr + triangular solve), over odd sizes, layouts, float32 / float64, singular systems
and bad arguments; and fastopt.lm's steps with it against the torch backend and the package."""

from __future__ import annotations

import pytest
import torch

import fastopt.lm as flm
from fastopt import backends
from fastopt.lm._engine.solve import SMALL_QR_COLUMNS
from fastopt.reference import lm_small_solve_reference

OP = "lm_small_solve"
DTYPES = [torch.float32, torch.float64]
HAS_CPU_OP = backends.available("cpu", OP, "cpu", torch.float32)
needs_op = pytest.mark.skipif(not HAS_CPU_OP, reason=str(backends.why_not("cpu", OP, "cpu", torch.float32)))


def _op():
    return backends.select(OP, "cpu", torch.float32, "cpu")


def _system(n, dtype, layout="contiguous", seed=0):
    """A Gauss-Newton-like system: lower triangle of G^T G / n in ``layout``, its diagonal, a rhs.
    The strict upper triangle holds NaN: the op must read the lower one only."""
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(n + 4, n, generator=g, dtype=torch.float64)
    gram = (j.T @ j / n).to(dtype)
    rhs = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    matrix = torch.where(upper, torch.full_like(gram, float("nan")), gram)
    if layout == "padded":  # rows at a longer stride, as fastopt.lm's workspace keeps the Gram matrix
        wide = torch.full((n, n + 7), float("nan"), dtype=dtype)
        wide[:, :n] = matrix
        matrix = wide[:, :n]
    elif layout == "transposed":  # the same values, column-major
        matrix = matrix.T.contiguous().T
    diagonal = gram.diagonal().clone()
    if layout == "padded":
        spread = torch.zeros(2 * n, dtype=dtype)
        spread[::2] = diagonal
        diagonal = spread[::2]
        spread_rhs = torch.zeros(3 * n, dtype=dtype)
        spread_rhs[::3] = rhs
        rhs = spread_rhs[::3]
    return matrix, diagonal, rhs


def _exact(matrix, diagonal, rhs, shift):
    """The solution in float64 from the symmetric system's own LU solve."""
    lower = torch.tril(matrix.double().nan_to_num(0.0), -1)
    full = lower + lower.T + torch.diag(diagonal.double() + shift)
    return torch.linalg.solve(full, rhs.double())


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 61, SMALL_QR_COLUMNS, 130])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "transposed"])
@pytest.mark.parametrize("shift", [0.0, 1e-3, 10.0])
def test_op_matches_the_reference(dtype, n, layout, shift):
    matrix, diagonal, rhs = _system(n, dtype, layout, seed=n)
    before = [t.clone() for t in (matrix, diagonal, rhs)]
    ours = _op()(matrix, diagonal, rhs, shift=shift)
    spec = lm_small_solve_reference(matrix, diagonal, rhs, shift=shift)
    exact = _exact(matrix, diagonal, rhs, shift)
    assert ours.shape == (n,) and ours.dtype == dtype and ours.is_contiguous()
    # Both are backward-stable QR solves: each within the same bound of the exact solution.
    eps = torch.finfo(dtype).eps
    full = torch.tril(matrix.double().nan_to_num(0.0), -1)
    cond = torch.linalg.cond(full + full.T + torch.diag(diagonal.double() + shift)).item()
    bound = 50 * n * eps * cond * exact.norm().item() + 1e-300
    assert (ours.double() - exact).norm().item() <= bound, f"op error {(ours.double() - exact).norm()} > {bound}"
    assert (spec.double() - exact).norm().item() <= bound, f"reference error {(spec.double() - exact).norm()}"
    # And so within twice that bound of each other (they round differently: not bit for bit).
    assert (ours.double() - spec.double()).norm().item() <= 2 * bound
    for t, old in zip((matrix, diagonal, rhs), before):  # inputs are read, never written
        assert torch.equal(t.nan_to_num(7.0), old.nan_to_num(7.0))


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_singular_systems_give_non_finite_solutions_as_lapack(dtype):
    # A zero row and column (a parameter the loss ignores, no damping): a zero pivot of R.
    matrix, diagonal, rhs = _system(9, dtype)
    matrix = matrix.clone()
    matrix[4, :4] = 0
    matrix[5:, 4] = 0
    diagonal = diagonal.clone()
    diagonal[4] = 0
    rhs = rhs.clone()
    rhs[4] = 0
    ours = _op()(matrix, diagonal, rhs, shift=0.0)
    spec = lm_small_solve_reference(matrix, diagonal, rhs, shift=0.0)
    assert not bool(torch.isfinite(ours).all()) and not bool(torch.isfinite(spec).all())
    # NaN in the system: NaN out, nothing raised.
    matrix[3, 1] = float("nan")
    assert not bool(torch.isfinite(_op()(matrix, diagonal, rhs, shift=1.0)).all())


@needs_op
def test_empty_and_one_by_one():
    x = _op()(torch.ones(1, 1), torch.tensor([4.0]), torch.tensor([2.0]), shift=1.0)
    assert torch.equal(x, torch.tensor([0.4]))
    assert _op()(torch.ones(0, 0), torch.ones(0), torch.ones(0), shift=1.0).shape == (0,)


def _bad_arguments():
    m, d, r = torch.eye(3), torch.ones(3), torch.ones(3)
    return [
        ((torch.ones(3, 4), d, r), ValueError, "matrix must be square"),
        ((torch.ones(3), d, r), ValueError, "matrix must be square"),
        ((m.half(), d.half(), r.half()), TypeError, "matrix must be float32 or float64"),
        ((m.long(), d.long(), r.long()), TypeError, "matrix must be float32 or float64"),
        ((m, d.double(), r), TypeError, "diagonal must have the dtype of matrix"),
        ((m, d, r.double()), TypeError, "rhs must have the dtype of matrix"),
        ((m, torch.ones(4), r), ValueError, "diagonal must have shape"),
        ((m, d, torch.ones(3, 1)), ValueError, "rhs must have shape"),
    ]


@pytest.mark.parametrize("args, error, match", _bad_arguments())
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_op), "torch"])
def test_bad_arguments_name_the_argument(args, error, match, backend):
    fn = backends.select(OP, "cpu", torch.float32, backend)
    with pytest.raises(error, match=match):
        fn(*args, shift=1.0)


def test_the_op_is_registered_with_the_backends():
    assert OP in backends.OPS
    assert backends.select(OP, "cpu", torch.float64, "torch") is lm_small_solve_reference
    for dtype in DTYPES:
        assert backends.available("torch", OP, "cpu", dtype)
    assert not backends.available("torch", OP, "cpu", torch.float16)


# -- fastopt.lm's steps with the op --------------------------------------------------------------
def _sinc(n, dtype):
    x = torch.linspace(-3, 3, n, dtype=dtype).unsqueeze(1)
    return x, torch.sinc(x)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_op), "torch"])
@pytest.mark.parametrize("damping_mode", ["standard", "adaptive", "fletcher"])
@pytest.mark.parametrize("data", ["over", "under"])
def test_qr_steps_on_either_backend_match_the_package(backend, damping_mode, data):
    """The parity harness of tests/test_lm_parity.py with the solve's backend named: 'cpu' (the op)
    and 'torch' (LAPACK's QR through torch) both take the package's steps."""
    pytest.importorskip("torch_levenberg_marquardt")
    from test_lm_parity import OVER, UNDER, assert_same_steps, kwargs, mlp, run_both

    make = kwargs(solve_method="qr", damping=dict(damping_mode=damping_mode))
    records = run_both(lambda: mlp([1, 8, 1]), [OVER if data == "over" else UNDER], 6, make, ours=dict(backend=backend))
    assert_same_steps(records, f"qr/{damping_mode}/{data} on {backend}")


class _WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
        self.unused = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return self.net(x)


@needs_op
def test_a_failed_solve_leaves_the_parameters_unchanged():
    """A parameter the output ignores and fletcher damping: every damped system is singular, every
    solve gives NaN, no attempt changes the parameters, lambda climbs as in the package."""
    tlm = pytest.importorskip("torch_levenberg_marquardt")
    x, y = _sinc(50, torch.float64)
    results = []
    for package, kwargs in ((flm, dict(backend="cpu")), (tlm, {})):
        torch.manual_seed(0)
        model = _WithUnused()
        module = package.training.LevenbergMarquardtModule(
            model,
            damping_strategy=package.damping.StandardDampingStrategy(damping_mode="fletcher"),
            solve_method="qr",
            attempts_per_step=3,
            **kwargs,
        )
        before = module.flat_params.clone()
        _, _, _, logs = module.training_step(x, y)
        assert torch.equal(module.flat_params, before)
        results.append((logs["attempts"], float(logs["damping"])))
    assert results[0] == results[1] and results[0][0] == 3 and results[0][1] > 1e-3


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_a_backend_without_the_op_solves_by_lapack(backend):
    """Backends without lm_small_solve (torch by choice; cuda, triton named for the products) take
    torch's geqrf path: same solution, nothing raised for the missing op."""
    from fastopt.lm._engine import NormalEquations, Workspace
    from fastopt.lm._engine.solve import DampedSolver

    matrix, diagonal, rhs = _system(7, torch.float64)
    matrix = torch.nan_to_num(matrix, nan=0.0)
    eq = NormalEquations(True, matrix.clone(), rhs, diagonal, None, "torch", Workspace())
    solver = DampedSolver(eq, "qr", None, backend)
    assert solver._small_qr is None
    x = solver.solve_diagonal(0.5)
    assert (x - _exact(matrix, diagonal, rhs, 0.5)).abs().max().item() < 1e-12


def test_the_finiteness_check_survives_an_overflowing_sum():
    from fastopt.lm.training import _all_finite

    big = torch.tensor([3e38, 3e38, -1.0])  # finite entries whose float32 sum is inf
    assert _all_finite(big) and _all_finite(torch.zeros(3))
    assert not _all_finite(torch.tensor([1.0, float("inf")]))
    assert not _all_finite(torch.tensor([1.0, float("nan")]))
    assert not _all_finite(torch.tensor([float("inf"), float("-inf")]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_mse_loss_is_the_packages_bit_for_bit(dtype):
    """fastopt.lm.MSELoss evaluates the loss with ATen's mse_loss op where nothing needs a grad:
    the same value, bit for bit, as the package's (y_pred - y_true).square().mean()."""
    gen = torch.Generator().manual_seed(3)
    loss = flm.loss.MSELoss()
    for shape in [(1000, 1), (7,), (33, 5), (12345,), (3, 4, 5), (100001, 1), (1,)]:
        a = torch.randn(shape, generator=gen).to(dtype)
        b = torch.randn(shape, generator=gen).to(dtype)
        for pred, target in (
            (a, b),
            (a.flip(0), b),
            (a.transpose(0, -1), b.transpose(0, -1)),
            (a.unsqueeze(-1).expand(*shape, 3)[..., 1], b),
        ):
            ours, theirs = loss(pred, target), (pred - target).square().mean()
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (dtype, shape)
    # With a grad: the three ops, so the package's graph and the package's gradient bits.
    ours_input = torch.randn(10, 1, generator=gen, dtype=torch.float32).requires_grad_()
    theirs_input = ours_input.detach().clone().requires_grad_()
    target = torch.randn(10, 1, generator=gen)
    loss(ours_input, target).backward()
    (theirs_input - target).square().mean().backward()
    assert torch.equal(ours_input.grad, theirs_input.grad)
