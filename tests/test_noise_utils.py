"""fastopt.noise utilities and demo: the landscape's gradient, minima and smoothing against
analytic values, the plots, the missing-matplotlib error, the demo on small settings."""

import math
import sys

import numpy as np
import pytest
import torch

from fastopt.noise import (
    NoiseEstimator,
    compute_gradient_variance,
    create_noisy_landscape,
    demo,
    plot_training_curves,
    visualize_landscape,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_gradient_matches_central_differences():
    land = create_noisy_landscape(3, 0.4, curvature=[1.0, 2.0, 0.5], seed=1)
    x = np.array([0.3, -1.2, 2.0])
    loss, grad = land.compute_loss_and_grad(x)
    h = 1e-6
    numeric = [
        (land.compute_loss_and_grad(x + h * e)[0] - land.compute_loss_and_grad(x - h * e)[0]) / (2 * h)
        for e in np.eye(3)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-8)
    # Batched rows give the same values; torch in, torch out.
    losses, grads = land.compute_loss_and_grad(np.stack([x, 2 * x]))
    assert losses[0] == loss and np.array_equal(grads[0], grad)
    t_loss, t_grad = land.compute_loss_and_grad(torch.from_numpy(x))
    assert isinstance(t_grad, torch.Tensor) and float(t_loss) == loss and np.array_equal(t_grad.numpy(), grad)
    assert land.smooth_loss(x) == pytest.approx(0.5 * (0.09 + 2 * 1.44 + 0.5 * 4.0))


def test_without_noise_the_landscape_is_the_bowl():
    land = create_noisy_landscape(2, 0.0, curvature=2.0, seed=0)
    x = np.array([1.0, -3.0])
    loss, grad = land.compute_loss_and_grad(x)
    assert loss == pytest.approx(10.0) and np.allclose(grad, [2.0, -6.0])
    assert land.count_local_minima() == 1
    assert land.in_global_basin(np.array([100.0, -50.0]))


def test_global_minimum_and_basin_against_a_dense_grid():
    land = create_noisy_landscape(1, 0.5, frequency=8.0, seed=3)
    x = np.linspace(-6, 6, 400001)[:, None]
    f, _ = land.compute_loss_and_grad(x)
    x_star, f_star = land.global_minimum()
    assert abs(x_star[0] - x[np.argmin(f), 0]) < 2 * math.pi / 8 / 64
    assert f_star == pytest.approx(f.min(), abs=1e-3)
    # Local minima of the dense grid: the global one is in the basin, every other one is not.
    interior = (f[1:-1] < f[:-2]) & (f[1:-1] < f[2:])
    minima = x[1:-1][interior]
    assert len(minima) == land.count_local_minima() > 5
    inside = [land.in_global_basin(m) for m in minima]
    assert sum(inside) == 1 and inside[int(np.argmin(f[1:-1][interior]))]


def test_spurious_minima_trap_small_fixed_steps_only():
    """The demo's premise: gradient descent that starts in a spurious minimum of local curvature
    lambda = c + a omega^2 cos(omega x + phi) stays there when lr lambda < 2 and leaves otherwise."""
    land = create_noisy_landscape(1, 0.5, frequency=8.0, seed=3)
    x = np.linspace(-6, 6, 400001)[:, None]
    f, _ = land.compute_loss_and_grad(x)
    interior = (f[1:-1] < f[:-2]) & (f[1:-1] < f[2:])
    minima = x[1:-1][interior]
    spurious = [m for m in minima if not land.in_global_basin(m)]
    assert len(spurious) == len(minima) - 1
    for start in (spurious[0], spurious[len(spurious) // 2]):
        curvature = 1.0 + 0.5 * 64 * math.cos(8.0 * start[0] + land.phase[0])
        for lr, stays in ((1.0 / curvature, True), (3.0 / curvature, False)):
            p = start.copy()
            for _ in range(200):
                p = p - lr * land.compute_loss_and_grad(p)[1]
            assert (abs(p[0] - start[0]) < 1e-3) == stays


def test_sample_gradients_average_to_the_smoothed_gradient():
    """E[grad L(x + s xi)] = c x + a omega exp(-omega^2 s^2 / 2) sin(omega x + phi) per coordinate."""
    land = create_noisy_landscape(2, 0.5, frequency=4.0, spread=0.3, seed=5)
    x = np.array([0.7, -0.2])
    losses, grads = land.sample_gradients(x, 200000, np.random.default_rng(0))
    assert grads.shape == (200000, 2) and losses.shape == (200000,)
    expected = x + 0.5 * 4.0 * math.exp(-0.5 * (4.0 * 0.3) ** 2) * np.sin(4.0 * x + land.phase)
    stderr = grads.std(axis=0) / math.sqrt(len(grads))
    assert (np.abs(grads.mean(axis=0) - expected) < 5 * stderr).all()


def test_compute_gradient_variance_is_the_sum_of_per_parameter_variances():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((10, 4))
    g -= g.mean(axis=0)
    g *= np.array([1.0, 2.0, 0.5, 3.0]) / g.std(axis=0, ddof=1)
    assert compute_gradient_variance(g) == pytest.approx(1 + 4 + 0.25 + 9, rel=1e-12)
    assert compute_gradient_variance(torch.from_numpy(g)) == pytest.approx(14.25, rel=1e-12)
    assert compute_gradient_variance(g) == pytest.approx(NoiseEstimator().compute_variance(g).sum(), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=0, noise_scale=0.1), "Invalid dim"),
        (dict(dim=2, noise_scale=-0.1), "Invalid noise_scale"),
        (dict(dim=2, noise_scale=0.1, frequency=0.0), "Invalid frequency"),
        (dict(dim=2, noise_scale=0.1, curvature=[1.0, -1.0]), "Invalid curvature"),
        (dict(dim=2, noise_scale=0.1, spread=-1.0), "Invalid spread"),
    ],
)
def test_bad_landscape_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_noisy_landscape(**kwargs)


def test_bad_params_shape():
    with pytest.raises(ValueError, match=r"params must have shape \(2,\) or \(batch, 2\)"):
        create_noisy_landscape(2, 0.1).compute_loss_and_grad(np.zeros(3))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_visualize_landscape_writes_a_png(tmp_path, dim):
    land = create_noisy_landscape(dim, 0.3, seed=0)
    path = visualize_landscape(
        land, tmp_path / "sub" / "land.png", trajectories={"run": np.zeros((5, dim)) + 0.5}, resolution=40
    )
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match=r"trajectories\['bad'\] must have shape \(steps, %d\)" % dim):
        visualize_landscape(land, tmp_path / "x.png", trajectories={"bad": np.zeros((5, dim + 1))})


def test_plot_training_curves_writes_a_png(tmp_path):
    path = plot_training_curves(
        {
            "fixed": {"loss": [3, 2, 1], "lr": [0.1] * 3},
            "adaptive": {"loss": [3, 1.5, 0.5], "lr": [0.1, 0.2, 0.1], "noise": [0, 1, 0]},
        },
        tmp_path / "curves.png",
        title="t",
    )
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    plot_training_curves({"plain": [1.0, -1.0]}, tmp_path / "plain.png")
    with pytest.raises(ValueError, match="curves must be a non-empty dict"):
        plot_training_curves({}, tmp_path / "none.png")


def test_plots_without_matplotlib_say_how_to_install_it(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"plot_training_curves needs matplotlib .*pip install .fastopt\[plot\]."):
        plot_training_curves({"a": [1.0, 2.0]}, tmp_path / "a.png")
    with pytest.raises(ImportError, match="visualize_landscape needs matplotlib"):
        visualize_landscape(create_noisy_landscape(2, 0.1), tmp_path / "b.png")
    assert not (tmp_path / "a.png").exists()


def test_demo_runs_every_rule_from_the_same_start():
    result = demo.run_demo(seeds=3, steps=30, dim=2)
    for run in demo.RUNS:
        assert len(result.escaped[run]) == 3 and len(result.excess_loss[run]) == 3
        assert min(result.excess_loss[run]) >= -1e-3  # never below the global minimum
        assert len(result.curves[run]["loss"]) == 30 and result.trajectories[run].shape == (31, 2)
    starts = [result.trajectories[run][0] for run in demo.RUNS]
    assert all(np.array_equal(starts[0], s) for s in starts)
    assert result.curves[demo.FIXED_BASE]["lr"] == [0.02] * 30
    lrs = result.curves[demo.ADAPTIVE]["lr"]
    assert all(0.002 <= lr <= 0.2 for lr in lrs) and len(set(lrs)) > 10


def test_demo_sign_test():
    result = demo.DemoResult()
    result.escaped = {
        demo.ADAPTIVE: [True] * 6 + [False] * 2,
        demo.FIXED_BASE: [False] * 6 + [True, False],
        demo.FIXED_MAX: [True] * 8,
    }
    wins, losses, p = result.sign_test(demo.ADAPTIVE, demo.FIXED_BASE)
    assert (wins, losses) == (6, 1)
    assert p == pytest.approx(2 * (1 + 7) / 2**7)  # two-sided exact binomial, 7 discordant seeds
    assert result.sign_test(demo.ADAPTIVE, demo.FIXED_MAX)[:2] == (0, 2)


def test_demo_main_prints_its_verdict_and_writes_its_plots(tmp_path, capsys):
    assert demo.main(["--seeds", "2", "--steps", "20", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "noise-adaptive escaped more often than fixed base_lr: " in out
    assert "noise-adaptive escaped more often than fixed max_lr: " in out
    for name in ("noise_demo_landscape.png", "noise_demo_curves.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC
