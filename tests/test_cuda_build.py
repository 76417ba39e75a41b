"""The CUDA step kernels as the sm_90 build compiles them (nvcc -cubin, then cuobjdump -sass; no GPU
needed, deterministic): the fp32 and bf16 LAdam step kernels move their streams with 128-bit global
loads and stores (LDG.E.128 / STG.E.128) and use no generic loads or stores (LD.E / ST.E, which
test the address space before every access), see csrc/multi_tensor_cuda.cuh. Their resource use
(registers, shared memory, spills) is printed (pytest -s shows it).

Only the two kernels checked are compiled (a small translation unit instantiating them from the
shipped headers, with the extension's nvcc flags), one nvcc per kernel, in parallel.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from fastopt import _extension_build as build

ARCH = "sm_90"
KERNELS = {  # name -> (functor, math type)
    "fp32": ("LAdamStepFunctor<float, float>", "float"),
    "bf16": ("LAdamStepFunctor<bf16, float>", "float"),
}
SOURCE = """#include "multi_tensor_cuda.cuh"
namespace fastopt {{
namespace cuda {{
template __global__ void step_kernel<{op}>({op}, Coupling<{m}>, const TensorArgs*, const Tile*, const {m}*,
                                          DeviceScalars);
}}  // namespace cuda
}}  // namespace fastopt
"""


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    return candidate if candidate and os.path.isfile(candidate) else None


def _cuobjdump(nvcc):
    """cuobjdump from PATH, beside nvcc (its real location, not a wrapper's), or Triton's bundled one."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    places = [os.path.dirname(os.path.realpath(nvcc))]
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=30)
        places += re.findall(r"TOP=(\S+)", out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import triton

        places.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    except ImportError:
        pass
    for place in places:
        for candidate in (os.path.join(place, "cuobjdump"), os.path.join(place, "bin", "cuobjdump")):
            if os.path.isfile(candidate):
                return candidate
    return None


NVCC = _nvcc()
CUOBJDUMP = _cuobjdump(NVCC) if NVCC else None
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (set CUDA_HOME or put nvcc on PATH)"),
    pytest.mark.skipif(NVCC is not None and CUOBJDUMP is None, reason="cuobjdump not found beside nvcc or on PATH"),
]


@pytest.fixture(scope="module")
def cubins():
    """{name: (sass text, resource-usage text)} of the kernels, compiled once for this module."""
    tmp = tempfile.mkdtemp(prefix="fastopt_cuda_build_")
    procs = {}
    for name, (op, math) in KERNELS.items():
        src = os.path.join(tmp, f"{name}.cu")
        with open(src, "w") as f:
            f.write(SOURCE.format(op=op, m=math))
        cmd = [NVCC, f"-arch={ARCH}", "-cubin", *build.NVCC_FLAGS, "-I", build.CSRC, "-o", src[:-3] + ".cubin", src]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd)
    out = {}
    for name, (proc, cmd) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-4000:]}"
        cubin = os.path.join(tmp, f"{name}.cubin")
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        out[name] = (sass, res)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _accesses(sass):
    """Counts of the global/generic memory instructions in the SASS, by opcode with modifiers."""
    counts = {}
    for op in re.findall(r"\s((?:LDG|STG|LD|ST)\.[A-Z0-9.]+)\s", sass):
        counts[op] = counts.get(op, 0) + 1
    return counts


@pytest.mark.parametrize("name", list(KERNELS))
def test_ladam_step_kernel_uses_128_bit_global_accesses(cubins, name):
    sass, res = cubins[name]
    assert "step_kernel" in sass, "the kernel is missing from the cubin"
    counts = _accesses(sass)
    usage = " ".join(line.strip() for line in res.splitlines() if "REG:" in line)
    print(f"\n{name} LAdam step kernel ({ARCH}): {usage}\n  accesses: {dict(sorted(counts.items()))}")
    sys.stdout.flush()
    wide_loads = sum(n for op, n in counts.items() if op.startswith("LDG.E.128"))
    wide_stores = sum(n for op, n in counts.items() if op.startswith("STG.E.128"))
    # The 128-bit path reads g, m, v in the advance and p in the update, and writes m, v and p.
    assert wide_loads >= 4, f"expected 128-bit loads of p, g, m, v; got {counts}"
    assert wide_stores >= 3, f"expected 128-bit stores of p, m, v; got {counts}"
    generic = {op: n for op, n in counts.items() if op.startswith(("LD.", "ST."))}
    assert not generic, f"generic loads/stores (the address space unknown to the compiler): {generic}"
    assert re.search(r"REG:\d+", usage), res
    assert "STACK:0" in usage and "LOCAL:0" in usage, f"register spills: {usage}"
