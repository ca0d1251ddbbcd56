"""Benchmark the synthetic screen generator: cells/s, peak RSS and minor page faults of one write.

One configuration per run (so peak RSS is that of this write alone), e.g.::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        .venv/bin/python tools/bench_synthetic.py --preset norman --num-cells 100000 --format h5ad --workers 2

    .venv/bin/python tools/bench_synthetic.py --compare-samplers    # NB sampler vs gamma+numpy, side by side

Prints one JSON line. The output is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from _common import minor_faults, peak_rss_mb, usage

from gears_dist.data import synthetic


def _usage() -> dict:
    kids = usage(resource.RUSAGE_CHILDREN)  # the sampling workers: ru_maxrss of the largest one
    return {"peak_rss_mib": round(peak_rss_mb(), 1), "worker_peak_rss_mib": round(kids["maxrss_mb"], 1),
            "minor_faults": minor_faults() + kids["minor_faults"]}


def _size(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_write(args) -> dict:
    spec = synthetic.preset(args.preset, num_cells=args.num_cells, num_genes=args.num_genes, seed=args.seed)
    out_dir = pathlib.Path(args.out_dir or tempfile.mkdtemp(prefix="bench-synthetic-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (f"{args.preset}_{spec.num_cells}." + ("zarr" if args.format == "store" else "h5ad"))
    t0 = time.perf_counter()
    if args.format == "store":
        report = synthetic.write_store(spec, out, overwrite=True, num_workers=args.workers)
    else:
        report = synthetic.write_h5ad(spec, out, overwrite=True, num_workers=args.workers)
    wall = time.perf_counter() - t0
    result = {"preset": args.preset, "format": args.format, "num_cells": spec.num_cells,
              "num_genes": report["num_genes"], "num_conditions": report["num_conditions"],
              "workers": args.workers, "seconds": round(wall, 2), "cells_per_s": round(spec.num_cells / wall, 1),
              "bytes": _size(out), "nnz": report.get("nnz"),
              **{k: round(report[k], 2) for k in ("seconds_x", "seconds_stats") if k in report}, **_usage(), "cpus": os.cpu_count(),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        synthetic.truth_path(out).unlink(missing_ok=True)
    return result


def bench_samplers(repeats: int = 3) -> dict:
    """NB counts for one norman block (2,048 cells x 5,045 genes), best of `repeats`, interleaved:
    the inversion sampler `nb_sparse` against gamma + numpy's Generator.poisson (+ sparsify)."""
    spec = synthetic.preset("norman", num_cells=20000)
    model = synthetic.screen_model(spec)
    layout = synthetic.cell_layout(model, grouped=False)
    n = spec.block_cells
    mu = np.exp(model.effects[layout.codes[:n]] + model.log_base[0]
                + np.float32(np.log(spec.measured_library_median))).astype(np.float32)
    times = {"nb_inversion": [], "gamma_numpy_poisson": []}
    for r in range(repeats):
        rng = np.random.default_rng(r)
        t = time.perf_counter()
        synthetic.nb_sparse(mu, model.theta, rng)
        times["nb_inversion"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rate = rng.standard_gamma(np.broadcast_to(model.theta, mu.shape), dtype=np.float32)
        rate *= mu
        rate /= model.theta
        np.flatnonzero(rng.poisson(rate))
        times["gamma_numpy_poisson"].append(time.perf_counter() - t)
    best = {k: round(min(v), 3) for k, v in times.items()}
    return {"entries": int(mu.size), **{f"{k}_s": v for k, v in best.items()},
            "speedup": round(best["gamma_numpy_poisson"] / best["nb_inversion"], 2),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="norman")
    p.add_argument("--num-cells", type=int, default=None)
    p.add_argument("--num-genes", type=int, default=None)
    p.add_argument("--format", choices=["h5ad", "store"], default="h5ad")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--compare-samplers", action="store_true")
    args = p.parse_args(argv)
    result = bench_samplers() if args.compare_samplers else bench_write(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
