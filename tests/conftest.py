"""Session setup shared by all tests.

Triton kernels run on CPU tensors in Triton's interpreter. triton 3.x reads TRITON_INTERPRET when a
kernel is *decorated* (``triton.jit`` checks ``triton.knobs.runtime.interpret``), i.e. when
fastopt.kernels is first imported, so where there is no GPU it is set here, before any test module
imports anything, and fastopt.kernels is imported right away: a test that later unsets the variable
(tests/test_backends.py does, with monkeypatch) cannot leave compiled kernels behind for the rest
of the session. With a GPU nothing is set, and the same tests run the compiled kernels on CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import fastopt.kernels  # noqa: F401  (decorate the kernels now, in interpreter mode)
    except ImportError:  # no triton: the triton tests skip with the reason fastopt.backends gives
        pass
