"""The CUDA step kernels as the sm_90 build compiles them (nvcc -cubin, then cuobjdump -sass; no GPU
needed, deterministic): the fp32 and bf16 LAdam step kernels (variance_lap), and the wave_variance
step kernel in fp32, bf16 and fp16, move their streams with 128-bit global loads and stores
(LDG.E.128 / STG.E.128) and use no generic loads or stores (LD.E / ST.E, which test the address
space before every access), see csrc/multi_tensor_cuda.cuh; wave_variance's E0^2 reduction kernels
(csrc/ladam_wave_e0.cuh) use no generic accesses either. None spills. Their resource use
(registers, shared memory, spills) is printed (pytest -s shows it). Nothing here runs on a GPU.

Only the kernels checked are compiled (a small translation unit per entry instantiating them from
the shipped headers, with the extension's nvcc flags), one nvcc per entry, in parallel.
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
# name -> (functor, math type, 128-bit loads, 128-bit stores the step kernel needs at least). The
# 128-bit path of variance_lap reads g, m, v in the advance and p in the update, and writes m, v, p;
# wave_variance's reads g, m, v in the advance and p, g, v, v_prev in the update, and writes m in the
# advance and p, v, v_prev in the update.
KERNELS = {
    "fp32": ("LAdamStepFunctor<float, float>", "float", 4, 3),
    "bf16": ("LAdamStepFunctor<bf16, float>", "float", 4, 3),
    "wave_fp32": ("LAdamWaveStepFunctor<float, float>", "float", 7, 4),
    "wave_bf16": ("LAdamWaveStepFunctor<bf16, float>", "float", 7, 4),
    "wave_fp16": ("LAdamWaveStepFunctor<fp16, float>", "float", 7, 4),
}
SOURCE = """#include "multi_tensor_cuda.cuh"
{include}
namespace fastopt {{
namespace cuda {{
template __global__ void step_kernel<{op}>({op}, Coupling<{m}>, const TensorArgs*, const Tile*, const {m}*,
                                          DeviceScalars);
{extra}
}}  // namespace cuda
}}  // namespace fastopt
"""
# The wave's E0^2 reduction, instantiated beside its step kernel.
WAVE_E0 = """template __global__ void e0_partial_kernel<{op}>({op}, const TensorArgs*, const Tile*, double*,
                                                DeviceScalars);
template __global__ void e0_finish_kernel<{op}>({op}, const TensorArgs*, const Tile*, int64_t, const double*,
                                               DeviceScalars);
"""


def _source(op, math):
    wave = op.startswith("LAdamWaveStepFunctor")
    return SOURCE.format(
        op=op,
        m=math,
        include='#include "ladam_wave_e0.cuh"' if wave else "",
        extra=WAVE_E0.format(op=op) if wave else "",
    )


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
    for name, (op, math, _, _) in KERNELS.items():
        src = os.path.join(tmp, f"{name}.cu")
        with open(src, "w") as f:
            f.write(_source(op, math))
        cmd = [NVCC, f"-arch={ARCH}", "-cubin", *build.NVCC_FLAGS, "-I", build.CSRC, "-o", src[:-3] + ".cubin", src]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd)
    out = {}
    for name, (proc, cmd) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-4000:]}"
        cubin = os.path.join(tmp, f"{name}.cubin")
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        out[name] = (_by_function(sass), _by_function(res))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _by_function(text):
    """{mangled kernel name: its part of cuobjdump's output}."""
    parts = re.split(r"^\s*(?:Function|\.text\.)\s*:?\s*([A-Za-z0-9_$]+)\s*:?\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _kernel(parts, kind):
    """The one entry of ``parts`` whose mangled name has the kernel ``kind`` (e.g. step_kernel)."""
    found = {name: text for name, text in parts.items() if kind in name}
    assert len(found) == 1, f"expected one {kind} in the cubin, found {sorted(found)} of {sorted(parts)}"
    return next(iter(found.values()))


def _usage(res):
    return " ".join(line.strip() for line in res.splitlines() if "REG:" in line)


def _accesses(sass):
    """Counts of the global/generic memory instructions in the SASS, by opcode with modifiers."""
    counts = {}
    for op in re.findall(r"\s((?:LDG|STG|LD|ST)\.[A-Z0-9.]+)\s", sass):
        counts[op] = counts.get(op, 0) + 1
    return counts


def _check_no_generic_no_spills(counts, usage, res):
    generic = {op: n for op, n in counts.items() if op.startswith(("LD.", "ST."))}
    assert not generic, f"generic loads/stores (the address space unknown to the compiler): {generic}"
    assert re.search(r"REG:\d+", usage), res
    assert "STACK:0" in usage and "LOCAL:0" in usage, f"register spills: {usage}"


@pytest.mark.parametrize("name", list(KERNELS))
def test_ladam_step_kernel_uses_128_bit_global_accesses(cubins, name):
    sass_parts, res_parts = cubins[name]
    _, _, min_loads, min_stores = KERNELS[name]
    sass, res = _kernel(sass_parts, "step_kernel"), _kernel(res_parts, "step_kernel")
    counts = _accesses(sass)
    usage = _usage(res)
    print(f"\n{name} LAdam step kernel ({ARCH}): {usage}\n  accesses: {dict(sorted(counts.items()))}")
    sys.stdout.flush()
    wide_loads = sum(n for op, n in counts.items() if op.startswith("LDG.E.128"))
    wide_stores = sum(n for op, n in counts.items() if op.startswith("STG.E.128"))
    assert wide_loads >= min_loads, f"expected >= {min_loads} 128-bit loads (one per stream read); got {counts}"
    assert wide_stores >= min_stores, f"expected >= {min_stores} 128-bit stores (one per stream written); got {counts}"
    _check_no_generic_no_spills(counts, usage, res)


@pytest.mark.parametrize("name", [name for name in KERNELS if name.startswith("wave_")])
@pytest.mark.parametrize("kind", ["e0_partial_kernel", "e0_finish_kernel"])
def test_wave_e0_reduction_kernels_use_global_accesses_without_spills(cubins, name, kind):
    sass_parts, res_parts = cubins[name]
    sass, res = _kernel(sass_parts, kind), _kernel(res_parts, kind)
    counts = _accesses(sass)
    usage = _usage(res)
    print(f"\n{name} {kind} ({ARCH}): {usage}\n  accesses: {dict(sorted(counts.items()))}")
    sys.stdout.flush()
    # partial: reads g, writes one double; finish: reads the partials, writes the tensor's E0^2.
    assert any(op.startswith("LDG.E") for op in counts), f"no global loads: {counts}"
    assert any(op.startswith("STG.E") for op in counts), f"no global stores: {counts}"
    _check_no_generic_no_spills(counts, usage, res)
