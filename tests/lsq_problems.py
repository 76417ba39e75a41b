"""Classic nonlinear least-squares test problems (Moré, Garbow and Hillstrom, "Testing
unconstrained optimization software", ACM TOMS 7(1), 1981: the MINPACK-1 test set), written once
for numpy (scipy) and torch (fastopt).

Each residual function takes ``x`` of shape (..., P) and a namespace ``xp`` (numpy or torch) and
returns (..., N): batched for fastopt, one problem for scipy. ``MGH[name] = (fn, x0, published
minimum of sum(f**2) or None)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _const(xp, values, like):
    if xp is torch:
        return torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return np.asarray(values, dtype=float)


def _stack(xp, parts):
    return xp.stack(parts, -1)


def rosenbrock(x, xp):
    return _stack(xp, [10 * (x[..., 1] - x[..., 0] ** 2), 1 - x[..., 0]])


def freudenstein_roth(x, xp):
    x1, x2 = x[..., 0], x[..., 1]
    return _stack(xp, [-13 + x1 + ((5 - x2) * x2 - 2) * x2, -29 + x1 + ((x2 + 1) * x2 - 14) * x2])


def powell_badly_scaled(x, xp):
    x1, x2 = x[..., 0], x[..., 1]
    return _stack(xp, [1e4 * x1 * x2 - 1, xp.exp(-x1) + xp.exp(-x2) - 1.0001])


def brown_badly_scaled(x, xp):
    x1, x2 = x[..., 0], x[..., 1]
    return _stack(xp, [x1 - 1e6, x2 - 2e-6, x1 * x2 - 2])


def beale(x, xp):
    x1, x2 = x[..., 0], x[..., 1]
    return _stack(xp, [y - x1 * (1 - x2**i) for i, y in ((1, 1.5), (2, 2.25), (3, 2.625))])


def jennrich_sampson(x, xp):
    i = _const(xp, np.arange(1, 11), x)
    return 2 + 2 * i - (xp.exp(i * x[..., 0:1]) + xp.exp(i * x[..., 1:2]))


def helical_valley(x, xp):
    x1, x2, x3 = x[..., 0], x[..., 1], x[..., 2]
    theta = xp.arctan(x2 / x1) / (2 * math.pi) + xp.where(x1 < 0, 0.5, 0.0)
    return _stack(xp, [10 * (x3 - 10 * theta), 10 * (xp.sqrt(x1**2 + x2**2) - 1), x3])


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]


def bard(x, xp):
    u = np.arange(1, 16.0)
    v = 16 - u
    w = np.minimum(u, v)
    u, v, w, y = (_const(xp, a, x) for a in (u, v, w, _BARD_Y))
    return y - (x[..., 0:1] + u / (v * x[..., 1:2] + w * x[..., 2:3]))


_GAUSSIAN_Y = [
    0.0009,
    0.0044,
    0.0175,
    0.0540,
    0.1295,
    0.2420,
    0.3521,
    0.3989,
    0.3521,
    0.2420,
    0.1295,
    0.0540,
    0.0175,
    0.0044,
    0.0009,
]


def gaussian(x, xp):
    t = _const(xp, (8 - np.arange(1, 16)) / 2, x)
    y = _const(xp, _GAUSSIAN_Y, x)
    return x[..., 0:1] * xp.exp(-x[..., 1:2] * (t - x[..., 2:3]) ** 2 / 2) - y


_MEYER_Y = [34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744, 8261, 7030, 6005, 5147, 4427, 3820, 3307, 2872]


def meyer(x, xp):
    t = _const(xp, 45 + 5 * np.arange(1, 17), x)
    return x[..., 0:1] * xp.exp(x[..., 1:2] / (t + x[..., 2:3])) - _const(xp, _MEYER_Y, x)


def box_3d(x, xp):
    t = _const(xp, 0.1 * np.arange(1, 11), x)
    return xp.exp(-t * x[..., 0:1]) - xp.exp(-t * x[..., 1:2]) - x[..., 2:3] * (xp.exp(-t) - xp.exp(-10 * t))


def powell_singular(x, xp):
    x1, x2, x3, x4 = x[..., 0], x[..., 1], x[..., 2], x[..., 3]
    return _stack(xp, [x1 + 10 * x2, math.sqrt(5) * (x3 - x4), (x2 - 2 * x3) ** 2, math.sqrt(10) * (x1 - x4) ** 2])


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
_KO_U = [4, 2, 1, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def kowalik_osborne(x, xp):
    u, y = _const(xp, _KO_U, x), _const(xp, _KO_Y, x)
    return y - x[..., 0:1] * (u**2 + u * x[..., 1:2]) / (u**2 + u * x[..., 2:3] + x[..., 3:4])


_OSBORNE1_Y = [
    0.844,
    0.908,
    0.932,
    0.936,
    0.925,
    0.908,
    0.881,
    0.850,
    0.818,
    0.784,
    0.751,
    0.718,
    0.685,
    0.658,
    0.628,
    0.603,
    0.580,
    0.558,
    0.538,
    0.522,
    0.506,
    0.490,
    0.478,
    0.467,
    0.457,
    0.448,
    0.438,
    0.431,
    0.424,
    0.420,
    0.414,
    0.411,
    0.406,
]


def osborne1(x, xp):
    t = _const(xp, 10.0 * np.arange(33), x)
    y = _const(xp, _OSBORNE1_Y, x)
    return y - (x[..., 0:1] + x[..., 1:2] * xp.exp(-t * x[..., 3:4]) + x[..., 2:3] * xp.exp(-t * x[..., 4:5]))


# name -> (residuals, x0, published minimum of sum(f**2), or None where it is 0)
MGH = {
    "rosenbrock": (rosenbrock, [-1.2, 1.0], None),
    "freudenstein_roth": (freudenstein_roth, [0.5, -2.0], 48.9842),
    "powell_badly_scaled": (powell_badly_scaled, [0.0, 1.0], None),
    "brown_badly_scaled": (brown_badly_scaled, [1.0, 1.0], None),
    "beale": (beale, [1.0, 1.0], None),
    "jennrich_sampson": (jennrich_sampson, [0.3, 0.4], 124.362),
    "helical_valley": (helical_valley, [-1.0, 0.0, 0.0], None),
    "bard": (bard, [1.0, 1.0, 1.0], 8.21487e-3),
    "gaussian": (gaussian, [0.4, 1.0, 0.0], 1.12793e-8),
    "meyer": (meyer, [0.02, 4000.0, 250.0], 87.9458),
    "box_3d": (box_3d, [0.0, 10.0, 20.0], None),
    "powell_singular": (powell_singular, [3.0, -1.0, 0.0, 1.0], None),
    "kowalik_osborne": (kowalik_osborne, [0.25, 0.39, 0.415, 0.39], 3.07505e-4),
    "osborne1": (osborne1, [0.5, 1.5, -1.0, 0.01, 0.02], 5.46489e-5),
}


def assert_backend_fits_like_torch(backend: str) -> None:
    """least_squares on ``backend`` takes the torch backend's iterates: two exponential decays
    (16 points, 3 parameters, float64), same solutions and status."""
    from fastopt.lm import least_squares

    t = torch.linspace(0, 4, 16, dtype=torch.float64)
    y = torch.stack([2.0 * torch.exp(-1.1 * t) + 0.3, 1.5 * torch.exp(-0.7 * t) - 0.1])

    def residuals(p, yb):
        return p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:] - yb

    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).repeat(2, 1)
    a = least_squares(residuals, x0, args=(y,), backend=backend)
    b = least_squares(residuals, x0, args=(y,), backend="torch")
    torch.testing.assert_close(a.x, b.x, rtol=1e-10, atol=1e-12)
    assert torch.equal(a.status, b.status) and torch.equal(a.nfev, b.nfev)
