"""fastopt.kernels: hand-written Triton kernels, one op per module, each launcher beside its kernel.

Installed as the package ``fastopt.kernels`` (setup.py ``package_dir``). Importing it needs
triton; fastopt.backends imports it lazily and reports the ImportError as the reason the
``triton`` backend is unavailable. Kernels know nothing of optimizers: launchers take lists of
tensors and scalars with the signature of ``fastopt.reference.<op>_reference``.
"""
import triton  # noqa: F401  (the backend is unavailable without it; backends reports why)

# batched_gram (fastopt.lm.least_squares): appended last, merging into whatever DTYPES the kernels
# above declare.
from .batched_gram import BATCHED_GRAM_DTYPES, batched_gram_triton  # noqa: E402

DTYPES = {**globals().get("DTYPES", {}), "batched_gram": BATCHED_GRAM_DTYPES}

# Levenberg-Marquardt's Jacobian products (issue #5); DTYPES keeps any entries defined above.
from .jacobian_products import JACOBIAN_PRODUCTS_DTYPES, jacobian_products_triton  # noqa: E402

DTYPES = {**globals().get("DTYPES", {}), "jacobian_products": JACOBIAN_PRODUCTS_DTYPES}
