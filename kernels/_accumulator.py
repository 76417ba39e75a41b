"""The accumulator of squared gradients ``a <- keep a + gain g^2`` and its Laplacian-smoothed
denominator: LAdam's v (keep = b2, gain = 1 - b2), LAdaGrad's sum (keep = gain = 1), LRMSProp's
square average (keep = alpha, gain = 1 - alpha).

Math: fastopt/reference/siblings.py. The denominator of LAdaGrad and LRMSProp is
``sqrt(max(a + c2 lap(a), 0)) + eps`` where the tensor uses the Laplacian, else ``sqrt(a) + eps``.
"""

import triton
import triton.language as tl

from ._stencil import smoothed
from ._tile import offsets


@triton.jit
def accumulated(flat, mask, args):
    """This step's accumulator at elements ``flat``, from the old one and g."""
    acc_ptr, g_ptr, g_layout, g_strided, g_factor, keep, gain = args
    g_at = flat
    if g_strided:
        g_at = offsets(flat, g_layout)
    g = tl.load(g_ptr + g_at, mask=mask, other=0.0).to(tl.float32) * g_factor
    return tl.load(acc_ptr + flat, mask=mask, other=0.0).to(tl.float32) * keep + gain * g * g


@triton.jit
def smoothed_accumulator(geo, elem, acc_ptr, g, g_ptr, g_layout, g_factor, keep, gain, eps, c2, STENCIL: tl.constexpr):
    """(new accumulator, denominator) at this program's lanes; ``g`` is their gradient (fp32,
    unscaled), ``g_factor`` what a gradient read from ``g_ptr`` is unscaled by."""
    flat, valid = elem[2], elem[3]
    acc = tl.load(acc_ptr + flat, mask=valid, other=0.0).to(tl.float32) * keep + gain * g * g
    args = (acc_ptr, g_ptr, g_layout, tl.load(g_layout) != 0, g_factor, keep, gain)
    return acc, tl.sqrt_rn(smoothed(accumulated, args, acc, geo, elem, 1.0, c2, 0.0, STENCIL, False)) + eps
