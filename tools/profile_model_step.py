"""Profile one GEARS training step (forward + loss + backward + clip + Adam) with torch.profiler on CPU.

Per-cell path (fast_path='off'), random batches as tools/bench_model.py builds them; fp32 and bf16 autocast.
Prints the top ops by self CPU time (--shapes: one row per op and input shapes), the matmul ops against
everything else, and the ops on (cell, gene) rows against the fixed work per step (gene-level layers, GO
GNN, optimizer: ops that touch no tensor with a row per cell and gene).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/profile_model_step.py \
        --scale norman --batch 32 --dtypes fp32 bf16 [--shapes]

--package picks the model package to import (e.g. a copy of an older version importable under another name),
so two versions can be profiled with the same harness.
"""

from __future__ import annotations

import argparse
import sys

from bench_model import SCALES
from bench_model_ab import build

# Ops that carry the decoder's (and every other layer's) dense matmul work.
MATMUL_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_addmm_activation", "mkldnn::_linear_pointwise"}


def build_step(package: str, scale: str, batch: int, dtype: str, seed: int = 0):
    """The same step and batches as tools/bench_model_ab.py times (3 batches: 2 warm-up, 1 profiled)."""
    step, batches = build(package, scale, batch, dtype, 3, {}, seed)
    return step, batches


def profile(package: str, scale: str, batch: int, dtype: str, rows: int, shapes: bool = False) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, batches = build_step(package, scale, batch, dtype)
    step(batches[0])
    step(batches[1])
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(batches[2])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    print(f"\n=== {package} {scale} B={batch} {dtype}: self CPU total {total / 1e3:.1f} ms, "
          f"matmul ops {mm / 1e3:.1f} ms ({100 * mm / total:.0f}%), other {(total - mm) / 1e3:.1f} ms")
    num_genes = SCALES[scale][0]
    by_shape = prof.key_averages(group_by_input_shape=True)
    row = [e for e in by_shape if _per_row(e.input_shapes, num_genes, batch)]
    row_ms = sum(e.self_cpu_time_total for e in row) / 1e3
    row_mm = sum(e.self_cpu_time_total for e in row if e.key in MATMUL_OPS) / 1e3
    print(f"ops on (cell, gene) rows {row_ms:.1f} ms (matmul {row_mm:.1f}, other {row_ms - row_mm:.1f}); "
          f"fixed per step (gene-level layers, GO GNN, optimizer, ...) {total / 1e3 - row_ms:.1f} ms")
    table = by_shape if shapes else events
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48,
                      max_shapes_column_width=60 if shapes else None))


def _per_row(shapes, num_genes: int, batch: int) -> bool:
    """Whether an op touches a tensor with one row (or value) per (cell, gene): [B*G, ...], or one that has
    both a B and a G dimension ([G, B, h], [B, G], ...). Everything else is work per step, not per cell."""
    for shape in shapes:
        if not shape:
            continue
        if shape[0] == batch * num_genes or (num_genes in shape and batch in shape):
            return True
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="norman", choices=sorted(SCALES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--package", default="gears_dist.model")
    parser.add_argument("--shapes", action="store_true", help="one row per op and input shapes")
    args = parser.parse_args(argv)
    for dtype in args.dtypes:
        profile(args.package, args.scale, args.batch, dtype, args.rows, args.shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
