"""fastopt.compute_neuron_order / reorder_linear_layer against the real ladam 0.4.1 functions."""

import copy

import pytest
import torch
from torch import nn

import fastopt

ladam = pytest.importorskip("ladam")
assert ladam.__version__ == "0.4.1", "the parity tests pin ladam 0.4.1 (pip install ladam==0.4.1)"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def block_activations(batch, n, blocks, seed):
    """Neurons in ``blocks`` groups that share a latent signal, columns shuffled."""
    g = gen(seed)
    latent = torch.randn(batch, blocks, generator=g)
    group = torch.arange(n) % blocks
    act = latent[:, group] + 0.3 * torch.randn(batch, n, generator=g)
    return act[:, torch.randperm(n, generator=g)]


CASES = {
    "random_64x5": lambda: torch.randn(64, 5, generator=gen(0)),
    "random_32x17": lambda: torch.randn(32, 17, generator=gen(1)),
    "random_2x9": lambda: torch.randn(2, 9, generator=gen(2)),
    "random_128x200": lambda: torch.randn(128, 200, generator=gen(3)),
    "relu_64x40": lambda: torch.relu(torch.randn(64, 40, generator=gen(4))),
    "blocks_100x48": lambda: block_activations(100, 48, 6, seed=5),
    "blocks_16x31": lambda: block_activations(16, 31, 4, seed=6),
    # Ties: duplicated columns correlate equally with everything, and constant (dead) neurons all
    # correlate 0 with every neuron (std clamped to 1e-8): ties go to the lowest index.
    "duplicated_columns": lambda: torch.randn(24, 6, generator=gen(7))[:, [0, 1, 2, 1, 3, 0, 4, 2, 5, 1]],
    "dead_neurons": lambda: torch.cat(
        [
            torch.randn(20, 4, generator=gen(8)),
            torch.zeros(20, 5),
            torch.randn(20, 3, generator=gen(9)),
            torch.ones(20, 2),
        ],
        dim=1,
    ),
    "all_constant": lambda: torch.full((10, 8), 3.0),
    "anticorrelated": lambda: (lambda a: torch.cat([a, -a, 2 * a], dim=1))(torch.randn(30, 4, generator=gen(10))),
    "float64_input": lambda: torch.randn(50, 12, generator=gen(11), dtype=torch.float64),
    "requires_grad": lambda: torch.randn(40, 10, generator=gen(12)).requires_grad_(),
    "n1": lambda: torch.randn(8, 1, generator=gen(13)),
    "n2": lambda: torch.randn(8, 2, generator=gen(14)),
    "n3_constant": lambda: torch.zeros(8, 3),
    "n4": lambda: block_activations(8, 4, 2, seed=15),
    "n0": lambda: torch.randn(8, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_order_as_ladam(case):
    act = CASES[case]()
    ours = fastopt.compute_neuron_order(act)
    theirs = ladam.compute_neuron_order(act)
    assert ours == theirs
    assert sorted(ours) == list(range(act.shape[1]))
    assert all(type(i) is int for i in ours)


def test_structured_order_groups_correlated_neurons():
    # Not only equal to ladam: on a clean block structure the tour visits each block in one run.
    act = block_activations(200, 30, 3, seed=21)
    order = fastopt.compute_neuron_order(act)
    assert order == ladam.compute_neuron_order(act)
    corr = torch.corrcoef(act.t())
    block_of = {}
    for j in range(30):  # block id: the lowest index among strongly correlated neurons
        block_of[j] = min(k for k in range(30) if corr[j, k] > 0.5)
    runs = [block_of[j] for j in order]
    changes = sum(a != b for a, b in zip(runs, runs[1:]))
    assert changes == 2, runs


def mlp(seed, bias=True, hidden=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, 3, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
def test_reorder_keeps_function_and_matches_ladam(bias):
    net = mlp(0, bias=bias)
    x = torch.randn(64, 5, generator=gen(1))
    with torch.no_grad():
        hidden = net[1](net[0](x))
        before = net(x)
    order = fastopt.compute_neuron_order(hidden)
    assert order != list(range(12))  # the test would be vacuous with the identity

    ref = copy.deepcopy(net)
    if not bias:
        with pytest.raises(AttributeError):  # ladam fails on a layer without bias ...
            ladam.reorder_linear_layer(copy.deepcopy(ref[0]), copy.deepcopy(ref[2]), order)
        ref[0].bias = nn.Parameter(torch.zeros(12))  # ... so give its copy one, to compare weights
    ladam.reorder_linear_layer(ref[0], ref[2], order)
    ptrs = [p.data_ptr() for p in net.parameters()]
    params = list(net.parameters())
    fastopt.reorder_linear_layer(net[0], net[2], order)

    assert torch.equal(net[0].weight, ref[0].weight)
    assert torch.equal(net[2].weight, ref[2].weight)
    if bias:
        assert torch.equal(net[0].bias, ref[0].bias)
        assert torch.equal(net[2].bias, ref[2].bias)  # untouched in both
    else:
        assert net[0].bias is None and net[2].bias is None
    with torch.no_grad():
        after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    # In place: same Parameter objects and the same storage.
    assert list(net.parameters()) == params
    assert [p.data_ptr() for p in net.parameters()] == ptrs


def test_training_after_reorder_matches_ladam():
    net, ref = mlp(2), mlp(2)
    opt = fastopt.LAdam(net.parameters(), lr=1e-2, backend="torch")
    ref_opt = ladam.LAdamW(ref.parameters(), lr=1e-2)
    order = list(reversed(range(12)))
    fastopt.reorder_linear_layer(net[0], net[2], order)
    ladam.reorder_linear_layer(ref[0], ref[2], order)
    x, y = torch.randn(16, 5, generator=gen(3)), torch.randn(16, 3, generator=gen(4))
    for _ in range(3):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            o.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_reorder_same_layer_twice_like_ladam():
    # A square layer feeding itself (a recurrence): rows then columns permuted, as in ladam.
    torch.manual_seed(5)
    layer, ref = nn.Linear(6, 6), None
    ref = copy.deepcopy(layer)
    order = [3, 1, 5, 0, 2, 4]
    fastopt.reorder_linear_layer(layer, layer, order)
    ladam.reorder_linear_layer(ref, ref, order)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)


def test_order_as_tensor_or_tuple():
    for order in (torch.tensor([2, 0, 1, 3]), (2, 0, 1, 3), torch.tensor([2, 0, 1, 3], dtype=torch.int32)):
        torch.manual_seed(0)
        a, b = nn.Linear(3, 4), nn.Linear(4, 2)
        ra, rb = copy.deepcopy(a), copy.deepcopy(b)
        fastopt.reorder_linear_layer(a, b, order)
        ladam.reorder_linear_layer(ra, rb, [2, 0, 1, 3])
        assert torch.equal(a.weight, ra.weight) and torch.equal(b.weight, rb.weight)


def test_bad_activations():
    for fn in (fastopt.compute_neuron_order, ladam.compute_neuron_order):  # same errors as ladam
        with pytest.raises(TypeError, match="Expected torch.Tensor"):
            fn([[1.0, 2.0]])
        with pytest.raises(ValueError, match="Expected 2D tensor"):
            fn(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"at least 2 rows.*shape \(1, 8\)"):
        fastopt.compute_neuron_order(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"at least 2 rows.*shape \(0, 8\)"):
        fastopt.compute_neuron_order(torch.randn(0, 8))
    for bad in (float("nan"), float("inf"), -float("inf")):
        act = torch.randn(10, 8)
        act[3, 5] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            fastopt.compute_neuron_order(act)
    with pytest.raises(ValueError, match="NaN or inf"):  # finite in fp64, inf after the cast
        fastopt.compute_neuron_order(torch.full((4, 6), 1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match="too large to correlate"):  # the column sums overflow
        fastopt.compute_neuron_order(torch.full((4, 6), 3e38))
    # What ladam makes of a NaN: an "order" that is no permutation.
    act = torch.randn(10, 8)
    act[0, 0] = float("nan")
    assert sorted(ladam.compute_neuron_order(act)) != list(range(8))


def test_bad_reorder_arguments():
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    conv = nn.Conv1d(4, 4, 1)
    for fn in (fastopt.reorder_linear_layer, ladam.reorder_linear_layer):  # same TypeErrors as ladam
        with pytest.raises(TypeError, match="layer must be nn.Linear"):
            fn(conv, b, [0, 1, 2, 3])
        with pytest.raises(TypeError, match="next_layer must be nn.Linear"):
            fn(a, conv, [0, 1, 2, 3])
    w_a, w_b = a.weight.clone(), b.weight.clone()
    with pytest.raises(ValueError, match=r"Invalid next_layer: its in_features=5 .* layer.out_features=4"):
        fastopt.reorder_linear_layer(a, nn.Linear(5, 2), [0, 1, 2, 3])
    for order in ([0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 1, 3], [0, 1, 2, 4], [-1, 0, 1, 2], [[0, 1], [2, 3]], []):
        with pytest.raises(ValueError, match=r"Invalid order: .*permutation of range\(4\)"):
            fastopt.reorder_linear_layer(a, b, order)
    for order in ([0.0, 1.0, 2.0, 3.0], [True, False, True, False], "0123", None):
        with pytest.raises(TypeError, match="order must"):
            fastopt.reorder_linear_layer(a, b, order)
    # Nothing was touched by the refused calls.
    assert torch.equal(a.weight, w_a) and torch.equal(b.weight, w_b)
