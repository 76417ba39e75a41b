"""fastopt.kernels: hand-written Triton kernels, one op per module, each launcher beside its kernel.

Installed as the package ``fastopt.kernels`` (setup.py ``package_dir``). Importing it needs
triton; fastopt.backends imports it lazily and reports the ImportError as the reason the
``triton`` backend is unavailable. Kernels know nothing of optimizers: launchers take lists of
tensors and scalars with the signature of ``fastopt.reference.<op>_reference``.

Each launcher runs its op over all tensors of a (device, dtype) group in ONE launch; how, and how
the in-place Laplacian stays race-free, is in ``_multi_tensor.py``. On CPU tensors the kernels run
in Triton's interpreter, which triton reads from ``TRITON_INTERPRET=1`` when a kernel is
decorated, i.e. when this package is first imported: set it before that.
"""

import torch
import triton  # noqa: F401  (the backend is unavailable without it; backends reports why)

from ._library import traceable
from .batched_gram import BATCHED_GRAM_DTYPES, batched_gram_triton
from .jacobian_products import JACOBIAN_PRODUCTS_DTYPES, jacobian_products_triton
from .ladagrad_step import ladagrad_step_triton
from .ladam_step import ladam_step_triton
from .ladam_update_lap_step import ladam_update_lap_step_triton
from .ladam_wave_step import ladam_wave_step_triton
from .ladam_weight_lap_step import ladam_weight_lap_step_triton
from .lrmsprop_step import lrmsprop_step_triton

# torch.compile sees each LAdam-family launcher as one opaque custom op, torch.ops.fastopt_triton.<op>
# (kernels/_library.py); eagerly the launchers run directly.
ladam_step_triton = traceable("ladam_step", ladam_step_triton)
ladam_update_lap_step_triton = traceable("ladam_update_lap_step", ladam_update_lap_step_triton)
ladam_weight_lap_step_triton = traceable("ladam_weight_lap_step", ladam_weight_lap_step_triton)
ladam_wave_step_triton = traceable("ladam_wave_step", ladam_wave_step_triton)
ladagrad_step_triton = traceable("ladagrad_step", ladagrad_step_triton)
lrmsprop_step_triton = traceable("lrmsprop_step", lrmsprop_step_triton)

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
# What fastopt.backends reads: the dtypes each op takes (LAdam family: math in fp32, state in the
# parameter's dtype).
DTYPES = {
    **{
        op: _FLOATS
        for op in (
            "ladam_step",
            "ladam_update_lap_step",
            "ladam_weight_lap_step",
            "ladam_wave_step",
            "ladagrad_step",
            "lrmsprop_step",
        )
    },
    "batched_gram": BATCHED_GRAM_DTYPES,
    "jacobian_products": JACOBIAN_PRODUCTS_DTYPES,
}

__all__ = [
    "DTYPES",
    "ladam_step_triton",
    "ladam_update_lap_step_triton",
    "ladam_weight_lap_step_triton",
    "ladam_wave_step_triton",
    "ladagrad_step_triton",
    "lrmsprop_step_triton",
    "batched_gram_triton",
    "jacobian_products_triton",
]
