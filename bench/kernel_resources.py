"""Compile every fastopt Triton kernel for a GPU target without a GPU (Triton's CUDA backend and its
bundled ptxas run anywhere) and report what ptxas gives each: registers per thread, stack
(spills), shared memory, SASS instructions, IEEE divisions per element. A compile error here is
one the interpreter-run tests cannot see.

    python bench/kernel_resources.py                 # sm_90 (H100), the default launch settings
    python bench/kernel_resources.py --arch 80 --out bench/results/triton_kernel_resources.md
    python bench/kernel_resources.py --lr-on-device  # the capturable variants (lr read in-kernel)

Must run without TRITON_INTERPRET=1 (the kernels are compiled, not interpreted).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench/kernel_resources.py compiles the kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastopt.kernels import (
    _multi_tensor,
    ladagrad_step,
    ladam_step,
    ladam_update_lap_step,  # noqa: E402
    ladam_wave_step,
    ladam_weight_lap_step,
    lrmsprop_step,
)

KERNELS = {
    "ladam_step": (ladam_step._ladam_step_kernel, {}),
    "ladam_update_lap_step": (ladam_update_lap_step._ladam_update_lap_step_kernel, {}),
    "ladam_weight_lap_step": (ladam_weight_lap_step._ladam_weight_lap_step_kernel, {}),
    "ladam_wave_step": (ladam_wave_step._ladam_wave_step_kernel, {"E0_FROM_GRADS": True}),
    "ladagrad_step": (ladagrad_step._ladagrad_step_kernel, {}),
    "lrmsprop_step": (lrmsprop_step._lrmsprop_step_kernel, {"MOMENTUM": True}),
}
POINTERS = {
    "tiles": "*i32",
    "meta": "*i64",
    "p_layouts": "*i64",
    "g_ptrs": "*i64",
    "g_layouts": "*i64",
    "counters": "*i32",
    "tensor_counters": "*i32",
    "partials": "*fp32",
    "grad_scale": "*fp32",
    "found_inf": "*fp32",
}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def warps_for(dtype: str, kernel=None, vector: int = 1) -> int:
    """Warps per program the launches use for this dtype and kernel (LaunchSettings.warps, as
    kernels/_launch.py asks it; ``vector``: the VECTOR constexpr, for kernels that have one)."""
    has_vector = kernel is None or "VECTOR" in kernel.arg_names
    return _multi_tensor.settings().warps(4 if dtype == "fp32" else 2, vector if has_vector else 0)


def compile_kernel(kernel, constexprs, arch: int, dtype: str, stencil: int, index_64: bool, lr_on_device: bool = False):
    settings = _multi_tensor.settings()
    names = kernel.arg_names
    const = {
        "TILE": settings.tile,
        "BORDER_LANES": settings.border_lanes,
        "STENCIL": stencil,
        "IDX": tl.int64 if index_64 else tl.int32,
        "LR_ON_DEVICE": lr_on_device,
        **constexprs,
    }
    if "VECTOR" in names:  # kernels with the vector path (kernels/_vector_tile.py)
        const.setdefault("VECTOR", 1)
        const.update(TW=settings.tile_width, VEC=16 // {"fp32": 4, "bf16": 2, "fp16": 2}[dtype])
    pointers = {**POINTERS, "lr": "*fp32"} if lr_on_device else POINTERS
    signature = {n: pointers.get(n, f"*{dtype}" if n == "stash" else "fp32") for n in names if n not in const}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=const)
    return triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps_for(dtype, kernel, const.get("VECTOR", 1)), "enable_fp_fusion": False},
    )


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    return dict(
        registers=field("REG"),
        stack=field("STACK"),
        shared=field("SHARED"),
        sass=len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M)),
        divisions=compiled.asm["ptx"].count("div.rn.f32"),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--stencil", type=int, default=9, choices=[9, 5])
    parser.add_argument("--index-64", action="store_true", help="the 64-bit offsets variant")
    parser.add_argument("--lr-on-device", action="store_true", help="the capturable variant (lr read in-kernel)")
    parser.add_argument("--only", nargs="+", default=None, choices=sorted(KERNELS))
    parser.add_argument("--out", default=None, help="Markdown file to append the table to")
    args = parser.parse_args(argv)
    s = _multi_tensor.settings()
    warps = warps_for(args.dtype, ladam_step._ladam_step_kernel)
    per_thread = s.tile // (32 * warps)
    title = (
        f"sm_{args.arch}, {args.dtype}, {args.stencil}-point, {'int64' if args.index_64 else 'int32'} offsets; "
        f"{s.tile} lanes, {warps} warps ({per_thread} elements per thread); triton {triton.__version__}"
        + ("; lr read in-kernel (capturable)" if args.lr_on_device else "")
    )
    lines = [f"{'kernel':<24} {'registers':>9} {'stack B':>7} {'shared B':>8} {'SASS instr':>10} {'div.rn/elem':>11}"]
    for name, (kernel, constexprs) in KERNELS.items():
        if args.only and name not in args.only:
            continue
        r = resources(
            compile_kernel(kernel, constexprs, args.arch, args.dtype, args.stencil, args.index_64, args.lr_on_device)
        )
        lines.append(
            f"{name:<24} {r['registers']:>9} {r['stack']:>7} {r['shared']:>8} {r['sass']:>10} "
            f"{r['divisions'] * 32 * warps_for(args.dtype, kernel) / s.tile:>11.1f}"
        )
        print(lines[-1] if len(lines) > 2 else "\n".join([title] + lines), flush=True)
    if args.out:
        import torch

        from fastopt.benchmarking import environment

        commit = environment(torch.device("cpu"))["commit"]
        with open(args.out, "a") as f:
            f.write(
                f"\n## {title}; commit {commit} (compiled without a GPU, not run)\n\n```\n"
                + "\n".join(lines)
                + "\n```\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
