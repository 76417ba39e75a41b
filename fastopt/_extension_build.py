"""How the extension fastopt._C is compiled: one place for setup.py (ahead of time) and
fastopt.extension (at run time, when the installed build is missing).

Plain Python without imports from fastopt, so that setup.py can load this file on its own.
Both builds read :func:`sources` (listed here by name: a file added to csrc/ is built once it is
listed) and :func:`config` (compile and link flags, with OpenMP as far as the compiler allows).

OpenMP: ``-fopenmp`` makes ATen's ``at::parallel_for``, inlined from torch's headers into the
extension, run the CPU loops on torch's intra-op threads; compiled without it, that loop runs on
the calling thread (same results, csrc/ tiles by shape). A compiler that refuses ``-fopenmp``
(Apple's clang, for one) gets ``-fopenmp-simd`` if it takes that: the ``#pragma omp simd``
reductions of csrc/gram_cpu.cpp then vectorise, and round, as in the OpenMP build. Each is probed
once per process by building a tiny shared library with the C++ compiler the builds use
(``torch.utils.cpp_extension.get_cxx_compiler()``: ``$CXX``, else ``c++``).
"""

from __future__ import annotations

import functools
import glob
import os
import shlex
import subprocess
import tempfile
from typing import List, NamedTuple, Optional, Tuple

# The sources live in csrc/ at the repository root, beside the fastopt package.
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

# cuda_host.cpp compiles to nothing without FASTOPT_WITH_CUDA, so it is listed with the C++ sources.
CPP_SOURCES = (
    "bindings.cpp",
    "cuda_host.cpp",
    "gram_checks.cpp",
    "gram_cpu.cpp",
    "lm_conv_cpu.cpp",
    "lm_conv_delta_cpu.cpp",
    "lm_small_solve_cpu.cpp",
    "ladagrad_step_cpu.cpp",
    "ladam_step_cpu.cpp",
    "ladam_wave_step_cpu.cpp",
    "lrmsprop_step_cpu.cpp",
    "lsq_step_cpu.cpp",
    "multi_tensor_cpu.cpp",
    "tensor_lists.cpp",
)
CUDA_SOURCES = ("gram.cu", "ladagrad_step.cu", "ladam_step.cu", "ladam_wave_step.cu", "lrmsprop_step.cu")

# -O3: GCC vectorises the kernels' loops only at -O3. -fno-math-errno: sqrt must not set errno,
# else its loops stay scalar. -g0: no debug info (halves compile time and the library's size).
# No -ffast-math, and -ffp-contract=off / --fmad=false: the kernels must round as the reference's
# torch ops do, one rounding per operation (GCC fuses a * b + c into an FMA in the AVX2+FMA loops
# otherwise, nvcc everywhere); LAdam wave_variance's v cancels down to near eps, where that one
# rounding moved a few updates by 6e-4 relative (tests/test_cpu_ladam_modes.py, large tensors).
BASE_CXX_FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-g0")
NVCC_FLAGS = ["-O3", "--fmad=false"]
CUDA_MACRO = "FASTOPT_WITH_CUDA"

_OPENMP_PROBE = """#include <omp.h>
int fastopt_openmp_probe(int n) {
  int threads = 0;
#pragma omp parallel for reduction(+ : threads)
  for (int i = 0; i < n; ++i) threads += omp_get_num_threads() > 0;
  return threads;
}
"""
_SIMD_PROBE = """float fastopt_simd_probe(const float* x, int n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += x[i];
  return s;
}
"""


class Config(NamedTuple):
    """The flags of one build of fastopt._C; ``note`` says what OpenMP it has, when not all."""

    cxx_flags: List[str]
    ld_flags: List[str]
    openmp: str  # "openmp", "openmp-simd" or "none"
    note: str


def sources(csrc: str = CSRC) -> Tuple[List[str], List[str]]:
    """(C++ sources, CUDA sources) of the extension as paths, or ([], []) where csrc/ holds none of
    them (an install without csrc/). Raises FileNotFoundError naming a listed source that is missing."""
    cpp = [os.path.join(csrc, name) for name in CPP_SOURCES]
    cu = [os.path.join(csrc, name) for name in CUDA_SOURCES]
    missing = [path for path in cpp + cu if not os.path.isfile(path)]
    if len(missing) == len(cpp) + len(cu):
        return [], []
    if missing:
        raise FileNotFoundError(
            f"fastopt._C: listed sources missing from {csrc}: {', '.join(missing)} "
            "(fastopt/_extension_build.py lists the sources)"
        )
    return cpp, cu


def headers(csrc: str = CSRC) -> List[str]:
    """The headers in csrc/ (*.h, *.cuh), sorted: what every source may include."""
    return sorted(p for pattern in ("*.h", "*.cuh") for p in glob.glob(os.path.join(csrc, pattern)))


def unlisted(csrc: str = CSRC) -> List[str]:
    """Sources in csrc/ that the lists above leave out (so they are not built)."""
    present = {os.path.basename(p) for pattern in ("*.cpp", "*.cu") for p in glob.glob(os.path.join(csrc, pattern))}
    return sorted(present - set(CPP_SOURCES + CUDA_SOURCES))


def _build_error(compiler: str, flags: List[str], source: str) -> Optional[str]:
    """None if ``compiler`` builds ``source`` into a shared library with ``flags``, else why not."""
    with tempfile.TemporaryDirectory(prefix="fastopt_probe_") as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        cmd = shlex.split(compiler) + flags + ["-shared", "-fPIC", src, "-o", os.path.join(tmp, "probe.so")]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as err:
            return f"{type(err).__name__}: {err}"
    if done.returncode == 0:
        return None
    lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else f"exit {done.returncode}")
    return f"{compiler} {' '.join(flags)}: {first}"


@functools.lru_cache(maxsize=None)
def _openmp_support(compiler: str) -> Tuple[str, Optional[str]]:
    """("openmp" | "openmp-simd" | "none", why not "openmp"), probed once per process and compiler."""
    why = _build_error(compiler, ["-fopenmp"], _OPENMP_PROBE)
    if why is None:
        return "openmp", None
    return ("openmp-simd" if _build_error(compiler, ["-fopenmp-simd"], _SIMD_PROBE) is None else "none"), why


def config(compiler: Optional[str] = None) -> Config:
    """Flags for building fastopt._C with ``compiler`` (default: torch's C++ compiler, ``$CXX`` or
    ``c++``): the base flags plus ``-fopenmp``, else ``-fopenmp-simd``, else neither, whichever
    the compiler takes first. New lists on every call (torch's builds append to them)."""
    if compiler is None:
        from torch.utils.cpp_extension import get_cxx_compiler

        compiler = get_cxx_compiler()
    openmp, why = _openmp_support(compiler)
    if openmp == "openmp":
        return Config([*BASE_CXX_FLAGS, "-fopenmp"], ["-fopenmp"], openmp, "")
    serial = f"its CPU loops run on one thread ({why})"
    if openmp == "openmp-simd":
        return Config(
            [*BASE_CXX_FLAGS, "-fopenmp-simd"],
            [],
            openmp,
            f"{compiler} has no OpenMP: building fastopt._C with -fopenmp-simd only; {serial}",
        )
    return Config(
        list(BASE_CXX_FLAGS), [], openmp, f"{compiler} has no OpenMP: building fastopt._C without it; {serial}"
    )


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
