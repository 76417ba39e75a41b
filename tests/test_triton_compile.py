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


@pytest.mark.skipif(backends.why_not("triton") is not None, reason=str(backends.why_not("triton")))
@pytest.mark.parametrize("variant", [[], ["--lr-on-device"]], ids=["lr_argument", "lr_on_device"])
def test_every_kernel_compiles_for_sm90(variant):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "kernel_resources.py"), "--arch", "90", *variant],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip(f"Triton's CUDA backend cannot compile here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
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
