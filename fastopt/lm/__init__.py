"""fastopt.lm: Levenberg-Marquardt.

Batched nonlinear least squares: :func:`least_squares` and :func:`curve_fit` solve thousands of
independent small problems at once on one device, with scipy.optimize's meanings.
"""
from .curve_fitting import OptimizeWarning, curve_fit
from .nonlinear_lsq import TERMINATION_MESSAGES, LeastSquaresResult, least_squares

__all__ = ["least_squares", "curve_fit", "LeastSquaresResult", "OptimizeWarning", "TERMINATION_MESSAGES"]
