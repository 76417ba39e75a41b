"""The GPU path of the triton backend compiles: every kernel built for sm_90 (H100) by Triton's CUDA
backend, which needs no GPU. The interpreter-run tests (test_triton_kernels.py) check the math and
the race-free protocol; they cannot see a construct that Triton's compiler rejects. Runs
bench/kernel_resources.py in a fresh process, without TRITON_INTERPRET."""

import os
import subprocess
import sys

import pytest

from fastopt import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_compiling(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run bench/<script> in a fresh process without TRITON_INTERPRET (it compiles for sm_90);
    skip where Triton's CUDA backend cannot compile, fail on any other error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip(f"Triton's CUDA backend cannot compile here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.skipif(backends.why_not("triton") is not None, reason=str(backends.why_not("triton")))
@pytest.mark.parametrize("variant", [[], ["--lr-on-device"]], ids=["lr_argument", "lr_on_device"])
def test_every_kernel_compiles_for_sm90(variant):
    done = _run_compiling("kernel_resources.py", "--arch", "90", *variant)
    for op in (
        "ladam_step",
        "ladam_update_lap_step",
        "ladam_weight_lap_step",
        "ladam_wave_step",
        "ladagrad_step",
        "lrmsprop_step",
    ):
        assert f"\n{op} " in done.stdout, done.stdout


def test_kernels_unpack_only_flat_tuples():
    """triton 3.6 (on this project's GPU machines) computes a kernel's cache key with
    ``set(target)`` over each assignment target and fails at the first launch on a nested one
    (``a, (b, c) = f()``: unhashable list); 3.8+ accepts it, so neither the interpreter nor the
    sm_90 compile here would show it. Every @triton.jit function must unpack flat."""
    import ast
    import glob

    nested = []
    for path in sorted(glob.glob(os.path.join(ROOT, "kernels", "*.py"))):
        tree = ast.parse(open(path).read(), path)
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or not any("jit" in ast.unparse(d) for d in fn.decorator_list):
                continue
            for node in ast.walk(fn):
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else ([node.target] if isinstance(node, (ast.For, ast.AugAssign, ast.AnnAssign)) else [])
                )
                for target in targets:
                    if isinstance(target, (ast.Tuple, ast.List)) and any(
                        isinstance(e, (ast.Tuple, ast.List, ast.Starred)) for e in target.elts
                    ):
                        nested.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} in {fn.name}")
    assert not nested, "nested tuple targets in Triton kernels: " + ", ".join(nested)


# Register bounds of the vector paths on sm_90 (65536 registers per SM, allocated per warp in units
# of 256): ladam_step fp32 at 8 warps and <= 128 registers keeps 2 programs (16 warps) per SM, bf16
# at 4 warps and <= 168 registers 3 programs (12 warps); ladagrad_step and lrmsprop_step at 8 warps
# within 128. The target for ladam_step (3 programs of 8 warps, <= 80 registers) is not met:
# with ptxas maxnreg=80 it spills (bench/results/triton_kernel_model.md). These bounds stop a
# regression; they do not claim the target.
REGISTER_BOUNDS = {
    "ladam_step fp32": 128,
    "ladam_step bf16": 168,
    "ladagrad_step fp32": 128,
    "ladagrad_step bf16": 168,
    "lrmsprop_step fp32": 128,
    "lrmsprop_step bf16": 168,
}
# 128-bit accesses each vector path must have: loads of p, g, the state it reads and the north and
# south halo rows of the accumulator and g (ladam_step: p, g, m, v + 4; the siblings: p, g, a + 4;
# lrmsprop's momentum buffer once more); stores of p and every state (ladam_step: p, m, v).
WIDE_ACCESSES = {"ladam_step": (8, 3), "ladagrad_step": (7, 2), "lrmsprop_step": (7, 2)}


@pytest.mark.skipif(backends.why_not("triton") is not None, reason=str(backends.why_not("triton")))
def test_the_vector_paths_move_their_streams_128_bits_wide():
    """bench/kernel_model.py on the sm_90 build (deterministic, not timed): the vector paths of
    ladam_step, ladagrad_step and lrmsprop_step move their streams with 128-bit loads and stores,
    use no generic LD/ST, spill nothing and stay within their register bounds; the common-path
    figures are printed."""
    import json

    done = _run_compiling("kernel_model.py", "--json")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(found) == set(REGISTER_BOUNDS), sorted(found)
    for key, f in found.items():
        print(key, {k: f[k] for k in ("registers", "spills", "warps", "programs_per_sm", "per_element", "widths")})
        widths = f["widths"]
        loads, stores = WIDE_ACCESSES[key.split()[0]]
        assert widths.get("LDG.128", 0) >= loads, (key, widths)
        assert widths.get("STG.128", 0) >= stores, (key, widths)
        assert not any(k.startswith(("LD.", "ST.")) for k in widths), (key, widths)
        assert f["spills"] == 0, (key, f["spills"])
        assert f["registers"] <= REGISTER_BOUNDS[key], (key, f["registers"])
        assert f["per_thread"] is not None, f["note"]
