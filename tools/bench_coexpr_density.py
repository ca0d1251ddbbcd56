"""How much the co-expression graph's density moves the reference-vs-ours step ratio (BENCHMARKS.md, Model).

tools/bench_model.py gives both models a co-expression graph of 20 random neighbours + a self-loop per gene;
GEARS keeps only neighbours with Pearson r > 0.4, which on real data leaves about one edge per gene. The
reference runs that GNN once per cell, ours once per step, so density favours us. This runs both models in
one process, steps alternating, with the tool's graph ('dense') or with self-loops only ('sparse').

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/bench_coexpr_density.py dense
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/bench_coexpr_density.py sparse
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_model


def _self_loops_only(dense_graphs):
    def graphs(num_genes, num_perts, k=20, seed=0):
        import torch

        go, _coexpr = dense_graphs(num_genes, num_perts, k, seed)
        nodes = torch.arange(num_genes)
        return go, (torch.stack([nodes, nodes]), torch.ones(num_genes))

    return graphs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("density", choices=["dense", "sparse"])
    p.add_argument("--scale", default="norman", choices=sorted(bench_model.SCALES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    if args.density == "sparse":
        bench_model._graphs = _self_loops_only(bench_model._graphs)
    cfg = {"scale": args.scale, "batch": args.batch, "warmup": 1, "steps": args.steps, "distinct": None, "dtype": "fp32"}
    sides = {"reference": bench_model.build_reference(cfg), "ours": bench_model.build_ours(cfg)}
    for step, batches in sides.values():
        step(batches[0])
    times = {name: [] for name in sides}
    for i in range(1, 1 + args.steps):
        for name, (step, batches) in sides.items():
            cpu, wall = time.process_time(), time.perf_counter()
            step(batches[i])
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    for name, rows in times.items():
        wall = sum(w for w, _ in rows) / len(rows)
        cpu = sum(c for _, c in rows) / len(rows)
        print(f"{args.density} {name}: wall {wall:.2f} s/step, CPU {cpu:.2f} s/step over {len(rows)} steps")
    ref_cpu = sum(c for _, c in times["reference"]); ours_cpu = sum(c for _, c in times["ours"])
    print(f"{args.density} reference / ours CPU time: {ref_cpu / ours_cpu:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
