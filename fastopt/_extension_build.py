"""How the extension fastopt._C is compiled: one place for setup.py (ahead of time) and
fastopt.extension (at run time, when the installed build is missing).

Plain Python without imports from fastopt, so that setup.py can load this file on its own.
"""
from __future__ import annotations

import glob
import os
from typing import List, Tuple

# The sources live in csrc/ at the repository root, beside the fastopt package.
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

# -O3: GCC vectorises the kernels' loops only at -O3. -fno-math-errno: sqrt must not set errno,
# else its loops stay scalar. -g0: no debug info (halves compile time and the library's size).
# No -ffast-math: the kernels must round as the reference does.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-g0"]
NVCC_FLAGS = ["-O3"]
LD_FLAGS = ["-fopenmp"]
CUDA_MACRO = "FASTOPT_WITH_CUDA"


def sources(csrc: str = CSRC) -> Tuple[List[str], List[str]]:
    """(C++ sources, CUDA sources) of the extension, sorted."""
    return (sorted(glob.glob(os.path.join(csrc, "*.cpp"))), sorted(glob.glob(os.path.join(csrc, "*.cu"))))


def cuda_buildable(cu_sources) -> Tuple[bool, str]:
    """Whether the CUDA sources can be compiled here, and if not, why."""
    import torch
    from torch.utils import cpp_extension

    if not cu_sources:
        return False, "no CUDA sources"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, ""
