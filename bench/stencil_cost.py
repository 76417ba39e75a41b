"""What the race-free in-place stencil of the triton backend costs, counted exactly from the tile
table the kernels run on (no GPU needed: these are byte counts, not timings).

    python bench/stencil_cost.py                     # LAdam variance_lap, fp32, the bench workloads
    python bench/stencil_cost.py --op ladam_weight_lap_step --dtype bfloat16
    python bench/stencil_cost.py --out bench/results/triton_stencil_cost.md   # append the table there

For each workload: programs (tiles) per launch and their lane use; the border protocol's extra
memory (stash scratch for one launch, persistent counters, the table) and its extra traffic (stash
written and read back, halo elements read from neighbouring tiles) against the op's roofline
traffic (each array read once, each updated array written once). The halo and stash accesses are
L1/L2 traffic in the main; the DRAM share is the upper bound reported as "extra traffic".
See kernels/_multi_tensor.py for the protocol.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastopt import benchmarking
from fastopt.kernels import _multi_tensor as mt

# op -> (arrays read per element, arrays written, arrays read at neighbouring elements (halo),
#        arrays stashed on borders)
OPS = {
    "ladam_step": (4, 3, 2, 1),  # p g m v; p m v; v g; v
    "ladam_update_lap_step": (4, 3, 3, 2),  # halo m v g; stash m v
    "ladam_weight_lap_step": (4, 3, 4, 3),  # halo p m v g; stash p m v
    "ladam_wave_step": (5, 4, 1, 1),  # p g m v v_prev; p m v v_prev; halo v; stash v
    "ladagrad_step": (3, 2, 2, 1),  # p g s; p s; halo s g; stash s
    "lrmsprop_step": (3, 2, 2, 1),  # without momentum
}
WORKLOADS = ["4x4096x4096", "resnet50", "1000x1K-64K", "convnet200"]


def cost(shapes, op: str, dtype: torch.dtype, stencil: str, settings: mt.LaunchSettings, min_spatial_size=16):
    reads, writes, halo_arrays, stashed = OPS[op]
    elem = torch.empty((), dtype=dtype).element_size()
    cuts = [mt.tile_grid(s, int(torch.Size(s).numel()) >= min_spatial_size, settings) for s in shapes]
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    tiles = sum(c.tiles for c in cuts)
    border = sum(c.border_elements() for c in cuts)
    halo = sum(c.halo_elements(stencil) for c in cuts)
    roofline = numel * elem * (reads + writes)
    stash_traffic = 2 * border * stashed * elem
    halo_traffic = halo * halo_arrays * elem
    state_bytes = numel * elem  # one state array
    return dict(
        tensors=len(shapes),
        params=numel,
        programs=tiles,
        lane_use=numel / (tiles * settings.tile),
        border_share=border / numel,
        stash_MB=border * stashed * elem / 1e6,
        stash_vs_state=border * stashed / numel,
        counters_KB=4 * tiles / 1e3,
        table_KB=(4 * tiles + 8 * len(shapes) * (mt.META_FIELDS.value + mt.LAYOUT_FIELDS.value + 1)) / 1e3,
        roofline_MB=roofline / 1e6,
        extra_traffic=(stash_traffic + halo_traffic) / roofline,
        stash_traffic=stash_traffic / roofline,
        halo_traffic=halo_traffic / roofline,
        upload_B=8 * len(shapes),
        state_MB=state_bytes / 1e6,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="ladam_step", choices=sorted(OPS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--stencil", default="9point", choices=["9point", "5point"])
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=sorted(benchmarking.WORKLOADS))
    parser.add_argument("--out", default=None, help="Markdown file to append the table to")
    args = parser.parse_args(argv)
    settings = mt.settings()
    dtype = getattr(torch, args.dtype)
    title = (
        f"{args.op}, {args.dtype}, {args.stencil}; tiles of {settings.tile} lanes, at most {settings.tile_width} "
        f"wide, {settings.num_warps} warps; parameters of >= 16 elements use the Laplacian (ladam's default)"
    )
    head = (
        "workload",
        "tensors",
        "params",
        "programs",
        "lane use",
        "border",
        "stash MB (x state)",
        "counters KB",
        "table KB",
        "upload B/step",
        "roofline MB",
        "extra traffic (stash + halo)",
    )
    rows = []
    for w in args.workloads:
        c = cost(benchmarking.WORKLOADS[w](), args.op, dtype, args.stencil, settings)
        rows.append(
            (
                w,
                str(c["tensors"]),
                f"{c['params'] / 1e6:.1f}M",
                str(c["programs"]),
                f"{c['lane_use']:.0%}",
                f"{c['border_share']:.1%}",
                f"{c['stash_MB']:.2f} ({c['stash_vs_state']:.1%})",
                f"{c['counters_KB']:.1f}",
                f"{c['table_KB']:.1f}",
                str(c["upload_B"]),
                f"{c['roofline_MB']:.0f}",
                f"{c['extra_traffic']:.1%} ({c['stash_traffic']:.1%} + {c['halo_traffic']:.1%})",
            )
        )
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    table = "\n".join("  ".join(x.ljust(wd) for x, wd in zip(r, widths)).rstrip() for r in [head] + rows)
    print(title)
    print(table)
    if args.out:
        env = benchmarking.environment(torch.device("cpu"))
        with open(args.out, "a") as f:
            f.write(
                f"\n## {title} (counted, not timed; fastopt {env['fastopt']}, commit {env['commit']})\n\n"
                f"```\n{table}\n```\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
