"""Benchmarks of gears_dist.graphs: GO graph build, out-of-core co-expression, METIS partitioning.

Each part runs in its own process so that its peak RSS (VmHWM) and minor page faults are its own:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/bench_graphs.py go
    ... tools/bench_graphs.py coexpr --cells 50000 100000 200000 --genes 8000 [--keep DIR]
    ... tools/bench_graphs.py partition
    ... tools/bench_graphs.py coexpr-sample --store STORE --max-cells 50000 200000   (graphs.coexpr.max_cells)
    ... tools/bench_graphs.py all          (go, coexpr at 5e4/1e5/2e5 cells, partition)

Results are printed as Markdown rows and appended as JSON lines to .bench/graphs.jsonl.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import append_jsonl, load_avg, peak_rss_mb, usage

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / ".bench" / "graphs.jsonl"


def _usage() -> dict:
    # cpu_s (user + system, all threads) beside wall seconds: the machine is shared, so wall time
    # alone overstates the cost when other jobs hold the cores.
    u = usage()
    return {"cpu_s": round(u["cpu_s"], 1), "peak_rss_gb": round(peak_rss_mb() * 1024 / 1e6, 3),
            "minor_faults": u["minor_faults"], "load_avg_1m": round(load_avg(), 1)}


def _record(row: dict) -> None:
    append_jsonl(OUT, row)


def bench_go(args) -> None:
    from gears_dist.data.genes import go_annotations, human_symbols
    from gears_dist.graphs.config import GOGraphConfig
    from gears_dist.graphs.go import build_go_graph

    t0 = time.perf_counter()
    go_annotations()
    t_load = time.perf_counter() - t0
    genes = human_symbols()
    t0 = time.perf_counter()
    graph = build_go_graph(genes, GOGraphConfig(k=20, threshold=0.1, universe="all"))
    t_build = time.perf_counter() - t0
    _record(
        {
            "bench": "go",
            "num_genes": graph.num_nodes,
            "num_edges": graph.num_edges,
            "num_isolated": len(graph.isolated()),
            "load_table_s": round(t_load, 2),
            "build_s": round(t_build, 2),
            **_usage(),
        }
    )


def _make_store(path: pathlib.Path, num_cells: int, num_genes: int, chunk_cells: int, seed: int) -> None:
    """A minimal valid store whose X is low-rank + noise, ~60% zeros, written chunk by chunk."""
    import zarr

    from gears_dist.data.store import building_store, write_manifest

    rng = np.random.default_rng(seed)
    loadings = rng.normal(0, 1, (16, num_genes)).astype(np.float32) * (rng.random(num_genes) < 0.3)
    with building_store(path, overwrite=True) as tmp:
        root = zarr.open_group(tmp, mode="w")
        x = root.create_array(
            "X", shape=(num_cells, num_genes), chunks=(chunk_cells, num_genes), dtype="float32"
        )
        for start in range(0, num_cells, chunk_cells):
            stop = min(num_cells, start + chunk_cells)
            z = rng.standard_normal((stop - start, 16), dtype=np.float32)
            block = z @ loadings
            block += rng.standard_normal(block.shape, dtype=np.float32)
            block -= 0.3
            np.maximum(block, 0, out=block)
            x[start:stop] = block
        s = np.dtypes.StringDType()
        root.create_array("conditions/name", data=np.array(["ctrl"], dtype=s))
        root.create_array("conditions/genes", data=np.array([""], dtype=s))
        for name, val in (("num_cells", num_cells), ("stop", num_cells), ("start", 0), ("num_genes", 0)):
            root.create_array(f"conditions/{name}", data=np.array([val], dtype=np.int64))
        root.create_array("conditions/is_control", data=np.array([True]))
        root.create_array("genes/symbol", data=np.array([f"G{i}" for i in range(num_genes)], dtype=s))
        write_manifest(tmp, {"counts": {"num_cells": num_cells, "num_genes": num_genes, "num_conditions": 1}})


def bench_coexpr_one(args) -> None:
    from gears_dist.data.store import open_store
    from gears_dist.graphs.coexpr import build_coexpression_graph
    from gears_dist.graphs.config import CoexprConfig

    store = open_store(args.store)
    t0 = time.perf_counter()
    graph = build_coexpression_graph(store, np.array([[0, store.num_cells]]), CoexprConfig())
    dt = time.perf_counter() - t0
    _record(
        {
            "bench": "coexpr",
            "num_cells": store.num_cells,
            "num_genes": store.num_genes,
            "chunk_cells": store.chunk_cells,
            "store_gb_on_disk": round(args.disk_gb, 2),
            "num_edges": graph.num_edges,
            "seconds": round(dt, 1),
            "us_per_cell": round(1e6 * dt / store.num_cells, 1),
            **_usage(),
        }
    )


def bench_coexpr_sample(args) -> None:
    """graphs.coexpr.max_cells against every cell on a condition-grouped store: time, and how far the sampled
    correlations and the k-NN edges move (controls + single-gene conditions, as training uses)."""
    from gears_dist.data.store import open_store
    from gears_dist.graphs.build import training_conditions
    from gears_dist.graphs.coexpr import (condition_cell_ranges, coexpression_edges, correlation_from_cov,
                                          correlation_stats, sample_ranges)

    store = open_store(args.store)
    ranges = condition_cell_ranges(store, training_conditions(store, None))

    def graph(rr):
        t0, c0 = time.perf_counter(), time.process_time()
        n, _, cov = correlation_stats(store.X, rr)
        r = correlation_from_cov(cov)
        del cov
        src, dst, _ = coexpression_edges(r, 20, 0.4)
        edges = set(zip(src[src != dst].tolist(), dst[src != dst].tolist()))
        return n, r, edges, time.perf_counter() - t0, time.process_time() - c0

    n_all, r_all, e_all, s_all, c_all = graph(ranges)
    _record({"bench": "coexpr_sample", "store": args.store, "num_genes": store.num_genes, "max_cells": None,
             "num_cells": int(n_all), "seconds": round(s_all, 1), "cpu_s": round(c_all, 1),
             "num_edges": len(e_all), **_usage()})
    iu = np.triu_indices(store.num_genes, 1)
    strong = np.abs(r_all[iu]) > 0.3
    for m in args.max_cells:
        n, r, e, sec, cpu = graph(sample_ranges(ranges, m, store.chunk_cells))
        d = np.abs(r[iu] - r_all[iu])
        both = len(e & e_all)
        _record({"bench": "coexpr_sample", "store": args.store, "num_genes": store.num_genes, "max_cells": m,
                 "num_cells": int(n), "seconds": round(sec, 1), "cpu_s": round(cpu, 1),
                 "time_vs_all": round(sec / s_all, 3), "abs_dr_max": round(float(d.max()), 4),
                 "abs_dr_p99": round(float(np.quantile(d, 0.99)), 4),
                 "abs_dr_mean_where_r_over_0.3": round(float(d[strong].mean()), 4) if strong.any() else None,
                 "num_edges": len(e), "edges_shared": both,
                 "edge_jaccard": round(both / max(1, len(e | e_all)), 4), **_usage()})


def bench_coexpr(args) -> None:
    root = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="bench_coexpr_"))
    try:
        for n in args.cells:
            path = root / f"coexpr_{n}x{args.genes}.zarr"
            if not path.exists():
                t0 = time.perf_counter()
                _make_store(path, n, args.genes, args.chunk_cells, seed=n)
                print(f"generated {path} in {time.perf_counter() - t0:.0f} s", flush=True)
            disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
            _child("coexpr-one", "--store", str(path), "--disk-gb", str(disk))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def genome_screen(num_singles: int, num_pairs: int, num_measured: int, seed: int = 0):
    """Conditions like a genome-wide CRISPR screen: real symbols, lognormal cells per condition."""
    from gears_dist.data.genes import human_symbols

    rng = np.random.default_rng(seed)
    symbols = np.array(human_symbols())
    perturbed = sorted(rng.choice(symbols, num_singles, replace=False))
    measured = sorted(rng.choice(symbols, num_measured, replace=False))
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < num_pairs:
        pairs.add(tuple(sorted(rng.choice(perturbed, 2, replace=False))))
    conds = [()] + [(g,) for g in perturbed] + sorted(pairs)
    cells = np.maximum(10, rng.lognormal(np.log(200), 0.5, len(conds))).astype(np.int64)
    cells[0] = 20 * 200
    return conds, cells, sorted(set(perturbed) | set(measured))


def bench_partition(args) -> None:
    from gears_dist.graphs.config import GOGraphConfig
    from gears_dist.graphs.go import build_go_graph
    from gears_dist.graphs.order import graph_condition_order
    from gears_dist.graphs.partition import halo_sizes, partition_conditions, partition_from_order

    conds, cells, nodes = genome_screen(args.singles, args.pairs, args.measured)
    t0 = time.perf_counter()
    go = build_go_graph(nodes, GOGraphConfig(), perturbed=sorted({g for c in conds for g in c}))
    t_go = time.perf_counter() - t0
    t0 = time.perf_counter()
    order = graph_condition_order(conds, cells, go)
    t_order = time.perf_counter() - t0
    _record(
        {
            "bench": "screen",
            "num_conditions": len(conds),
            "num_cells": int(cells.sum()),
            "go_nodes": go.num_nodes,
            "go_edges": go.num_edges,
            "go_build_s": round(t_go, 2),
            "locality_order_s": round(t_order, 2),
        }
    )
    for w in args.parts:
        for method in ("metis", "order", "contiguous", "random"):
            t0 = time.perf_counter()
            if method == "order":
                part = partition_from_order(order, conds, cells, go, w)
            else:
                part = partition_conditions(conds, cells, go, w, method, seed=0)
            dt = time.perf_counter() - t0
            halos = halo_sizes(go, part, conds, 1)
            _record(
                {
                    "bench": "partition",
                    "W": w,
                    "method": method,
                    "seconds": round(dt, 3),
                    "balance": round(part.balance, 4),
                    "edge_cut": part.edge_cut,
                    "num_pairs": part.num_pairs,
                    "edge_cut_frac": round(part.edge_cut_frac, 4),
                    "halo1_max": int(halos.max()),
                    "halo1_mean": float(halos.mean()),
                    **_usage(),
                }
            )


def _child(*argv: str) -> None:
    subprocess.run([sys.executable, __file__, *argv], check=True, env=os.environ.copy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("go")
    s = sub.add_parser("coexpr")
    s.add_argument("--cells", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    s.add_argument("--genes", type=int, default=8000)
    s.add_argument("--chunk-cells", type=int, default=2048)
    s.add_argument(
        "--keep", default=None, help="directory to keep the generated stores in (reused if present)"
    )
    s = sub.add_parser("coexpr-one")
    s.add_argument("--store", required=True)
    s.add_argument("--disk-gb", type=float, default=0.0)
    s = sub.add_parser("coexpr-sample")
    s.add_argument("--store", required=True)
    s.add_argument("--max-cells", type=int, nargs="+", default=[50_000, 200_000])
    s = sub.add_parser("partition")
    s.add_argument("--singles", type=int, default=10_000)
    s.add_argument("--pairs", type=int, default=500)
    s.add_argument("--measured", type=int, default=8000)
    s.add_argument("--parts", type=int, nargs="+", default=[2, 4, 8, 16])
    sub.add_parser("all")
    args = p.parse_args()
    if args.what == "all":
        for what in ("go", "partition", "coexpr"):
            _child(what)
        return
    {"go": bench_go, "coexpr": bench_coexpr, "coexpr-one": bench_coexpr_one, "coexpr-sample": bench_coexpr_sample,
     "partition": bench_partition}[
        args.what
    ](args)


if __name__ == "__main__":
    main()
