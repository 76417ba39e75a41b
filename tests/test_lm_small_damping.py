"""StandardDampingStrategy computes lambda with Python floats; these tests hold it to the package's
0-dim tensor arithmetic bit for bit (torch-levenberg-marquardt 1.2.3's damping.py), under both
default dtypes and with integer factors, and check the tensor face of the attributes: reads,
assignments (a subclass's), reset, and state_dict round trips."""

from __future__ import annotations

import random

import pytest
import torch

import fastopt.lm as flm

tlm = pytest.importorskip("torch_levenberg_marquardt")


def _random_arguments(rng: random.Random) -> dict:
    return dict(
        starting_value=10 ** rng.uniform(-12, 3),
        dec_factor=rng.uniform(0.01, 0.99),
        inc_factor=rng.choice([rng.uniform(1.01, 1000.0), 10, 3]),  # ints: int64 tensors in the package
        min_value=10 ** rng.uniform(-40, -5),
        max_value=10 ** rng.uniform(3, 38),
        auto_reset=rng.random() < 0.3,
    )


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_lambda_sequences_are_the_packages_bit_for_bit(default_dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        rng = random.Random(0)
        for trial in range(150):
            kwargs = _random_arguments(rng)
            ours, theirs = flm.StandardDampingStrategy(**kwargs), tlm.damping.StandardDampingStrategy(**kwargs)
            for i in range(80):
                if rng.random() < 0.45:
                    ours.on_successful_update(None)
                    theirs.on_successful_update(None)
                else:
                    ours.on_unsuccessful_update(None)
                    theirs.on_unsuccessful_update(None)
                assert ours.stop_attempts(None) == theirs.stop_attempts(None), (trial, i)
                assert ours.stop_training(None) == theirs.stop_training(None), (trial, i)
                lam, ref = ours.get_current_damping(), theirs.get_current_damping()
                assert _same(lam, ref), f"trial {trial} update {i}: {lam!r} vs {ref!r} ({kwargs})"
                assert ours.current_damping_value() == ref.item()
            for name in ("starting_value", "dec_factor", "inc_factor", "min_value", "max_value"):
                assert _same(getattr(ours, name), getattr(theirs, name)), name
    finally:
        torch.set_default_dtype(previous)


def test_lambda_reaches_and_stays_at_its_bounds():
    ours = flm.StandardDampingStrategy(starting_value=1.0, dec_factor=0.5, min_value=0.3, max_value=4.0)
    theirs = tlm.damping.StandardDampingStrategy(starting_value=1.0, dec_factor=0.5, min_value=0.3, max_value=4.0)
    for _ in range(5):
        ours.on_successful_update(None)
        theirs.on_successful_update(None)
    assert _same(ours.get_current_damping(), theirs.get_current_damping())
    assert ours.current_damping_value() == pytest.approx(0.3, rel=1e-7)
    for _ in range(5):
        ours.on_unsuccessful_update(None)
        theirs.on_unsuccessful_update(None)
    assert ours.current_damping_value() == 4.0 and ours.stop_attempts(None) and ours.stop_training(None)


def test_assigned_tensors_and_numbers_are_taken_as_the_package_takes_them():
    class Halving(flm.StandardDampingStrategy):
        # The package's way of writing a subclass: assign tensors computed from the attributes.
        def on_successful_update(self, loss):
            self.damping_factor = torch.max(self.damping_factor / 2, self.min_value)

    strategy = Halving(starting_value=1e-2)
    strategy.on_successful_update(None)
    assert strategy.current_damping_value() == torch.tensor(1e-2).div(2).item()
    strategy.on_unsuccessful_update(None)  # the float path continues from the assigned tensor
    assert _same(strategy.get_current_damping(), torch.tensor(1e-2).div(2) * torch.tensor(10.0))
    strategy.damping_factor = torch.tensor(0.25, dtype=torch.float64)  # keeps its dtype
    assert strategy.get_current_damping().dtype == torch.float64
    strategy.inc_factor = 3  # a number: as torch.tensor(3), an int64 tensor
    assert strategy.inc_factor.dtype == torch.int64
    strategy.on_unsuccessful_update(None)
    assert _same(strategy.get_current_damping(), torch.tensor(0.25, dtype=torch.float64) * torch.tensor(3))
    with pytest.raises(ValueError, match="damping_factor must hold one number"):
        strategy.damping_factor = torch.ones(2)


def test_reads_are_tensors_and_reset_returns_to_the_start():
    strategy = flm.StandardDampingStrategy(starting_value=1e-3)
    first = strategy.get_current_damping()
    assert isinstance(first, torch.Tensor) and first.dim() == 0 and first.dtype == torch.get_default_dtype()
    assert strategy.get_current_damping() is first  # the same tensor until lambda changes
    strategy.on_unsuccessful_update(None)
    assert first.item() == pytest.approx(1e-3) and strategy.get_current_damping().item() == pytest.approx(1e-2)
    strategy.reset()
    assert _same(strategy.get_current_damping(), torch.tensor(1e-3))


def test_state_dict_round_trips_and_loads_the_packages():
    strategy = flm.StandardDampingStrategy(starting_value=1e-2, inc_factor=7.0, damping_mode="adaptive")
    for _ in range(3):
        strategy.on_unsuccessful_update(None)
    state = strategy.state_dict()
    assert all(isinstance(state[k], torch.Tensor) for k in ("damping_factor", "inc_factor", "max_value"))
    restored = flm.StandardDampingStrategy()
    restored.load_state_dict(state)
    assert restored.damping_mode == "adaptive"
    for name in ("damping_factor", "starting_value", "dec_factor", "inc_factor", "min_value", "max_value"):
        assert _same(getattr(restored, name), getattr(strategy, name)), name
    restored.on_successful_update(None)
    strategy.on_successful_update(None)
    assert _same(restored.get_current_damping(), strategy.get_current_damping())
    # The package's strategy holds the same attributes as tensors: its values load too.
    theirs = tlm.damping.StandardDampingStrategy(starting_value=5e-3)
    theirs.on_unsuccessful_update(None)
    loaded = flm.StandardDampingStrategy()
    loaded.load_state_dict({k: getattr(theirs, k) for k in loaded._STATE})
    assert _same(loaded.get_current_damping(), theirs.get_current_damping())
    with pytest.raises(KeyError, match="missing"):
        loaded.load_state_dict({"damping_factor": torch.tensor(1.0)})
