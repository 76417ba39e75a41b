"""fastopt.nn's WaveNorm, WaveNormDamped and ChiNorm against the real ladam 0.4.1 layers.

Both layers get the same (perturbed) parameters through a strict state_dict load; outputs, output
shapes, the input's gradient and every parameter's gradient are compared for 1-D to 5-D inputs,
several feature counts, n_steps 0 and 3, train and eval. Then state_dict layout and cross-loading,
ChiNorm's running statistics, repr, and the argument and input checks.
"""

import copy
import re

import pytest
import torch

import fastopt
from fastopt.testing import assert_close

ladam = pytest.importorskip("ladam")
assert ladam.__version__ == "0.4.1", "the parity tests pin ladam 0.4.1 (pip install ladam==0.4.1)"

PAIRS = {
    "WaveNorm": (ladam.WaveNorm, fastopt.WaveNorm),
    "WaveNormDamped": (ladam.WaveNormDamped, fastopt.WaveNormDamped),
    "ChiNorm": (ladam.ChiNorm, fastopt.ChiNorm),
}
WAVES = ("WaveNorm", "WaveNormDamped")


def input_shape(rank, c):
    """Features at dim 1 of a 4-D input and last otherwise (where both packages read them)."""
    return {1: (c,), 2: (6, c), 3: (3, 4, c), 4: (2, c, 3, 5), 5: (2, 3, 2, 2, c)}[rank]


def make_pair(name, c, seed=0, **kw):
    """ladam's layer with perturbed parameters, and fastopt's with the same state (strict load)."""
    theirs_cls, ours_cls = PAIRS[name]
    theirs = theirs_cls(c, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen)).add_(0.05 * torch.randn(p.shape, generator=gen))
    ours = ours_cls(c, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def close(actual, expected, what, rtol=2e-5):
    """fp32 round-off: within rtol of the expected tensor's largest magnitude (sums of many terms
    come out in another order than ladam's; measured against fp64, both are off by ~1e-7 of it)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30, what=what)


def run(layer, x):
    """One forward (a training one moves ChiNorm's running energy) and the backward of a fixed
    random weighting of the output."""
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * weight).sum().backward()
    return out, x.grad, {n: p.grad for n, p in layer.named_parameters()}


def compare(theirs, ours, x, what):
    out_t, gx_t, g_t = run(theirs, x)
    out_o, gx_o, g_o = run(ours, x)
    assert out_o.shape == out_t.shape, f"{what}: output shape {tuple(out_o.shape)} vs ladam {tuple(out_t.shape)}"
    assert out_o.dtype == out_t.dtype
    close(out_o, out_t, f"{what} output")
    close(gx_o, gx_t, f"{what} input grad")
    assert list(g_o) == list(g_t)
    for n in g_t:
        assert (g_o[n] is None) == (g_t[n] is None), f"{what}: grad of {n} is None in one package only"
        if g_t[n] is not None:
            close(g_o[n], g_t[n], f"{what} grad of {n}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n_steps", [0, 3])
@pytest.mark.parametrize("c", [1, 2, 5])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", WAVES)
def test_wave_layers_match_ladam(name, rank, c, n_steps, training):
    theirs, ours = make_pair(name, c, seed=rank * 10 + c, n_steps=n_steps)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(input_shape(rank, c), generator=torch.Generator().manual_seed(c))
    compare(theirs, ours, x, f"{name}(c={c}, n_steps={n_steps}) on {tuple(x.shape)}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("c", [1, 2, 5])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_chinorm_matches_ladam(rank, c, training):
    theirs, ours = make_pair("ChiNorm", c, seed=rank * 10 + c, g_init=0.3)
    if not training:  # give the running energy something to hold first, identically in both
        warm = 2.0 * torch.randn(input_shape(rank, c), generator=torch.Generator().manual_seed(3))
        theirs(warm), ours(warm)
    theirs.train(training)
    ours.train(training)
    # Per-feature scales up to 4: with g ~ 0.3 some features hit the eps floor of chi^2.
    x = torch.randn(input_shape(rank, c), generator=torch.Generator().manual_seed(c))
    scale = torch.linspace(0.5, 4.0, c)
    x = x * (scale.view(1, c, 1, 1) if rank == 4 else scale)
    compare(theirs, ours, x, f"ChiNorm(c={c}) on {tuple(x.shape)}")
    for key in ("running_energy", "num_batches_tracked"):
        assert_close(getattr(ours, key), getattr(theirs, key), rtol=1e-6, atol=1e-7, what=key)


@pytest.mark.parametrize("name", list(PAIRS))
def test_wide_4d_and_channels_last_inputs(name):
    theirs, ours = make_pair(name, 16, seed=3)
    x = torch.randn(4, 16, 9, 7, generator=torch.Generator().manual_seed(5))
    compare(theirs, ours, x, f"{name} on NCHW")
    compare(theirs, ours, x.to(memory_format=torch.channels_last), f"{name} on channels_last")


@pytest.mark.parametrize("name", list(PAIRS))
def test_float64_layers_match_ladam(name):
    theirs, ours = make_pair(name, 5, seed=11)
    theirs.double()
    ours.double()
    x = torch.randn(3, 5, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    compare(theirs, ours, x, f"{name} fp64")


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dict_layout_and_cross_loading(name):
    theirs_cls, ours_cls = PAIRS[name]
    theirs, ours = theirs_cls(4), ours_cls(4)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_o) == list(sd_t)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    for key in sd_t:  # fresh layers: same initial values, shapes and dtypes
        assert sd_o[key].dtype == sd_t[key].dtype and sd_o[key].shape == sd_t[key].shape, key
        assert torch.equal(sd_o[key], sd_t[key]), key

    # Trained-looking state from ladam loads strictly into fastopt, and fastopt's back into ladam.
    theirs, _ = make_pair(name, 4, seed=5)
    theirs(torch.randn(8, 4))  # ChiNorm: running stats move
    fresh_ours = ours_cls(4)
    fresh_ours.load_state_dict(theirs.state_dict(), strict=True)
    fresh_theirs = theirs_cls(4)
    fresh_theirs.load_state_dict(fresh_ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[key], value), key
        assert torch.equal(fresh_theirs.state_dict()[key], value), key
    x = torch.randn(6, 4)
    fresh_ours.eval(), fresh_theirs.eval()
    close(fresh_ours(x), fresh_theirs(x), f"{name} after cross-loading")


def test_chinorm_running_stats_then_eval():
    theirs, ours = make_pair("ChiNorm", 6, seed=2)
    gen = torch.Generator().manual_seed(0)
    for i in range(7):
        x = (1 + i) * torch.randn(5, 6, 3, 3, generator=gen)
        close(ours(x), theirs(x), f"training batch {i}")
        close(ours.running_energy, theirs.running_energy, f"running_energy after batch {i}")
        assert ours.num_batches_tracked.dtype == torch.long
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == i + 1
    theirs.eval()
    ours.eval()
    before = copy.deepcopy(ours.state_dict())
    x = torch.randn(4, 6, 3, 3, generator=gen)
    compare(theirs, ours, x, "ChiNorm eval after 7 batches")
    for key, value in before.items():  # eval neither moves the running energy nor counts batches
        assert torch.equal(ours.state_dict()[key], value), key
    # In eval the output depends on the running energy, not on the batch's own energy.
    assert not torch.allclose(ours(x), ours.train()(x))


def test_init_damping_clamped_like_ladam():
    for d in (0.0, 1e-4, 0.3, 0.5, 0.9995, 1.0):
        theirs, ours = ladam.WaveNormDamped(3, init_damping=d), fastopt.WaveNormDamped(3, init_damping=d)
        assert torch.equal(ours.damping_raw, theirs.damping_raw), d


@pytest.mark.parametrize(
    "name, kw",
    [
        ("WaveNorm", {}),
        ("WaveNorm", dict(n_steps=0, dt=0.25, c=2.0, chi=0.5)),
        ("WaveNormDamped", {}),
        ("WaveNormDamped", dict(n_steps=1, init_damping=0.2)),
        ("ChiNorm", {}),
        ("ChiNorm", dict(tau=0.25, eps=1e-3)),
        ("ChiNorm", dict(tau=0, eps=1)),
    ],
    ids=str,
)
def test_extra_repr_like_ladam(name, kw):
    theirs_cls, ours_cls = PAIRS[name]
    assert repr(ours_cls(7, **kw)) == repr(theirs_cls(7, **kw))


BAD_ARGS = [
    ("WaveNorm", dict(num_features=0), ValueError, r"num_features: 0 \(must be >= 1\)"),
    ("WaveNorm", dict(num_features=2.0), TypeError, "num_features must be an int"),
    ("WaveNorm", dict(num_features=True), TypeError, "num_features must be an int"),
    ("WaveNorm", dict(num_features=4, n_steps=-1), ValueError, r"n_steps: -1 \(must be >= 0\)"),
    ("WaveNorm", dict(num_features=4, n_steps=1.5), TypeError, "n_steps must be an int"),
    ("WaveNorm", dict(num_features=4, dt=float("nan")), ValueError, "Invalid dt: nan"),
    ("WaveNorm", dict(num_features=4, c=float("inf")), ValueError, r"Invalid c: inf \(must be finite\)"),
    ("WaveNorm", dict(num_features=4, chi="1"), TypeError, "chi must be a real number"),
    ("WaveNormDamped", dict(num_features=-3), ValueError, "num_features: -3"),
    ("WaveNormDamped", dict(num_features=4, dt=float("-inf")), ValueError, "Invalid dt"),
    (
        "WaveNormDamped",
        dict(num_features=4, init_damping=1.5),
        ValueError,
        r"init_damping: 1.5 \(must be in \[0.0, 1.0\]\)",
    ),
    ("WaveNormDamped", dict(num_features=4, init_damping=-0.1), ValueError, "init_damping"),
    ("WaveNormDamped", dict(num_features=4, init_damping=None), TypeError, "init_damping must be a real number"),
    ("ChiNorm", dict(num_features=0), ValueError, "num_features"),
    ("ChiNorm", dict(num_features=4, chi0_init=float("nan")), ValueError, "Invalid chi0_init: nan"),
    ("ChiNorm", dict(num_features=4, g_init=float("inf")), ValueError, "g_init: inf"),
    ("ChiNorm", dict(num_features=4, tau=1.1), ValueError, r"tau: 1.1 \(must be in \[0.0, 1.0\]\)"),
    ("ChiNorm", dict(num_features=4, tau=-0.5), ValueError, "tau"),
    ("ChiNorm", dict(num_features=4, eps=0.0), ValueError, r"eps: 0.0 \(must be > 0\)"),
    ("ChiNorm", dict(num_features=4, eps=-1e-5), ValueError, "eps"),
    ("ChiNorm", dict(num_features=4, eps="small"), TypeError, "eps must be a real number"),
]


@pytest.mark.parametrize("name, kw, exc, match", BAD_ARGS)
def test_bad_constructor_args(name, kw, exc, match):
    with pytest.raises(exc, match=match):
        PAIRS[name][1](**kw)


@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 3, 3), (2, 3, 3, 6), (6,), (2, 3, 6)])
@pytest.mark.parametrize("name", list(PAIRS))
def test_wrong_feature_count_is_refused(name, shape):
    layer = PAIRS[name][1](5)
    with pytest.raises(ValueError, match=re.escape(f"shape {tuple(shape)}") + ".*expected num_features=5"):
        layer(torch.randn(shape))


@pytest.mark.parametrize("name", list(PAIRS))
def test_one_feature_layer_does_not_broadcast_over_wider_input(name):
    # ladam broadcasts its [1, 1] parameters over any width and returns a result (ChiNorm in eval;
    # in training its running-energy update fails); fastopt refuses in both modes.
    theirs, ours = PAIRS[name][0](1).eval(), PAIRS[name][1](1)
    x = torch.randn(4, 3)
    assert theirs(x).shape == (4, 3)
    for training in (True, False):
        with pytest.raises(ValueError, match=r"shape \(4, 3\) has 3 features at dim 1, expected num_features=1"):
            ours.train(training)(x)


@pytest.mark.parametrize("name", list(PAIRS))
def test_bad_inputs(name):
    layer = PAIRS[name][1](3)
    with pytest.raises(ValueError, match=r"shape \(\) has no feature dimension \(num_features=3\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="expects a torch.Tensor input, got list"):
        layer([1.0, 2.0, 3.0])
