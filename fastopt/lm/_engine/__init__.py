"""The computations of a Levenberg-Marquardt step, shared by both fronts of :mod:`fastopt.lm`,
one module each:

* :mod:`.parameters`: :class:`FlatParameters`, the trainable parameters as one flat vector (the
  model's parameters become views into it, as in torch-levenberg-marquardt), with a backup for
  rejected attempts; :class:`Selection`, the columns a parameter selection strategy picks.
* :mod:`.jacobian`: :class:`ResidualJacobian`, ``[J | r]`` for a batch slice, J = dr/dtheta over
  the selected parameters. Layer stacks (``nn.Sequential`` of Linear/Conv2d and sample-wise
  modules) go layer by layer (:mod:`fastopt.lm._layerwise`), straight into a kept buffer;
  anything else through torch.func: per-sample ``vmap`` of ``jacrev`` (``jacfwd`` when a sample
  has more residuals than there are parameters), where the residual column comes out of the same
  pass: the function is ``s * r(theta)`` at ``s = 1``, whose derivative in ``s`` is r.
* :mod:`.normal_equations`: :func:`normal_equations`, ``J^T J / B`` and ``J^T r / B``
  (overdetermined) or ``J J^T / B`` and ``r / B`` (underdetermined), through the
  ``jacobian_products`` op chosen by :func:`fastopt.backends.choose`, slice by slice (at most
  ``max_batch_size`` samples, and at most :func:`chunk_samples` per Jacobian call), the lower
  triangle only.
* :mod:`.solve`: :class:`DampedSolver`, the damped system for one damping value after another.
  The undamped matrix stays in place; an attempt rewrites only its diagonal (O(P)), since every
  factorization copies the matrix anyway. ``reuse="eigh"`` factors once per step instead (see its
  doc). A 'qr' system of up to ``SMALL_QR_COLUMNS`` columns goes to the ``lm_small_solve`` op
  instead (one C++ call: the damped matrix built from the lower triangle, factored and solved).
* :mod:`.workspace`: :class:`Workspace`, the big buffers, kept from step to step.

This package re-exports them all: import from ``fastopt.lm._engine``.
"""

from __future__ import annotations

from .jacobian import JACOBIAN_MODES, ResidualJacobian, call_model
from .normal_equations import NormalEquations, chunk_samples, normal_equations
from .parameters import LINALG_DTYPES, FlatParameters, Selection, make_selection
from .solve import FALLBACKS, REUSE_MODES, SOLVE_METHODS, DampedSolver, SolveFailed, logger
from .workspace import Workspace

__all__ = [
    "FlatParameters",
    "Selection",
    "make_selection",
    "LINALG_DTYPES",
    "ResidualJacobian",
    "call_model",
    "JACOBIAN_MODES",
    "NormalEquations",
    "normal_equations",
    "chunk_samples",
    "DampedSolver",
    "SolveFailed",
    "SOLVE_METHODS",
    "REUSE_MODES",
    "FALLBACKS",
    "Workspace",
    "logger",
]
