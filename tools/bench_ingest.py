"""Ingest benchmarks (BENCHMARKS.md, rows "Ingest" and "Store X codec and chunks", command C17).

Two measurements:

``codecs``  The X chunk shape and codec. One generated screen is ingested once; its X is then
            rewritten with each (cells per chunk, codec) pair and measured: bytes on disk vs the
            source h5ad, write throughput, and read throughput of ONE worker (zarr limited to one
            thread) reading contiguous ranges of cells (a worker's shard, read as the loader does)
            and random 32-cell batches.
``scale``   Ingest of generated screens of N cells (default 1e5 and 1e6), each in a fresh child
            process: wall time, cells/s, peak RSS (VmHWM of the child), minor page faults, bytes
            of the source and of the store. Peak RSS must not grow with N.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        .venv/bin/python tools/bench_ingest.py codecs --num-cells 20000 --num-genes 5045
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        .venv/bin/python tools/bench_ingest.py scale --sizes 100000 1000000 --num-genes 1000 \
        --memory-budget-mb 1024 512
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \
        .venv/bin/python tools/bench_ingest.py scale --sizes 100000 --num-genes 1000 --x-format csc

Generated files live in --workdir (default a fresh directory under /tmp) and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from _common import last_json_line, peak_rss_mb


def du(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def generate(path: pathlib.Path, num_cells: int, num_genes: int | None, seed: int = 0, preset: str = "norman",
             compression: str | None = None) -> float:
    """A generated screen (default a Norman-like one: 236 perturbations; "genome": ~9,900 perturbations, 8,248
    genes), scattered cells, raw counts, CSR, via gears_dist.data.synthetic."""
    from gears_dist.data import synthetic

    spec = synthetic.preset(preset, num_cells=num_cells, num_genes=num_genes, seed=seed)
    t0 = time.perf_counter()
    synthetic.write_h5ad(spec, path, style="gears", overwrite=True, num_workers=2, compression=compression)
    return time.perf_counter() - t0


def codec_table():
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    return {
        "zstd(1)": ZstdCodec(level=1),
        "zstd(3)": ZstdCodec(level=3),
        "blosc-zstd(3)+bitshuffle": BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),
        "blosc-lz4(5)+shuffle": BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),
    }


def run_codecs(args) -> list[dict]:
    import zarr

    from gears_dist.data.ingest import ingest

    work = pathlib.Path(args.workdir)
    src = work / "codecs.h5ad"
    generate(src, args.num_cells, args.num_genes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = ingest(src, work / "codecs.zarr", overwrite=True)
    x = store.X[...]
    src_bytes = du(src)
    rng = np.random.default_rng(0)
    rows = []
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})  # one worker = one thread
    for chunk in args.chunks:
        for name, codec in codec_table().items():
            path = work / f"x-{chunk}-{name}.zarr"
            root = zarr.open_group(path, mode="w")
            arr = root.create_array("X", shape=x.shape, chunks=(chunk, x.shape[1]), dtype="float32",
                                    compressors=[codec])
            t0 = time.perf_counter()
            arr[...] = x
            write_s = time.perf_counter() - t0
            span = max(chunk, 8192 // chunk * chunk)
            starts = rng.integers(0, max(1, x.shape[0] - span), size=12) // chunk * chunk
            t0 = time.perf_counter()
            for s in starts:
                arr[s:s + span]
            seq_s = (time.perf_counter() - t0) / (len(starts) * span)
            batches = rng.integers(0, x.shape[0] - 32, size=60)
            t0 = time.perf_counter()
            for b in batches:
                arr[b:b + 32]
            batch_s = (time.perf_counter() - t0) / len(batches)
            row = {"chunk_cells": chunk, "chunk_MiB": chunk * x.shape[1] * 4 / 2**20, "codec": name,
                   "store_MB": du(path) / 1e6, "ratio_vs_h5ad": du(path) / src_bytes,
                   "write_MBps": x.nbytes / 1e6 / write_s,
                   "seq_read_cells_per_s": 1 / seq_s, "seq_read_MBps": x.shape[1] * 4 / 1e6 / seq_s,
                   "batch32_ms": batch_s * 1e3}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(path)
    print(f"source h5ad {src_bytes / 1e6:.1f} MB, {x.shape[0]} cells x {x.shape[1]} genes, "
          f"dense float32 {x.nbytes / 1e6:.1f} MB")
    return rows


def convert(path: pathlib.Path, x_format: str) -> None:
    """Rewrite the generated CSR file as CSC or dense (in memory: only for the smaller sizes)."""
    import anndata as ad

    a = ad.read_h5ad(path)
    a.X = a.X.tocsc() if x_format == "csc" else a.X.toarray()
    a.write_h5ad(path)


def child_ingest(src: str, dest: str, budget_mb: int) -> None:
    """One ingest in this (fresh) process; prints its time, manifest figures and this process's peak RSS."""
    warnings.simplefilter("ignore")
    from gears_dist.data.ingest import ingest

    t0 = time.perf_counter()
    s = ingest(src, dest, overwrite=True, memory_budget_mb=budget_mb)
    print(json.dumps({"seconds": time.perf_counter() - t0, "manifest_ingest": s.manifest["ingest"],
                      "counts": s.manifest["counts"], "normalization": s.manifest["normalization"]["choice"],
                      "peak_rss_MB": peak_rss_mb()}))


def run_child(src: pathlib.Path, dest: pathlib.Path, budget_mb: int) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "_ingest", str(src), str(dest), str(budget_mb)],
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"ingest child failed ({proc.returncode})")
    result = last_json_line(out)
    # Peak RSS is the child's VmHWM (high-water RSS of its own address space). ru_maxrss is NOT used:
    # Linux carries the pre-exec (forked-parent) RSS into it, which would report the generator's memory.
    result.update(ru_maxrss_MB=usage.ru_maxrss / 1024,
                  minor_faults=usage.ru_minflt, major_faults=usage.ru_majflt, user_s=usage.ru_utime,
                  sys_s=usage.ru_stime)
    return result


def run_scale(args) -> list[dict]:
    work = pathlib.Path(args.workdir)
    rows = []
    for n in args.sizes:
        src, dest = work / f"screen-{n}.h5ad", work / f"screen-{n}.zarr"
        gen_s = generate(src, n, args.num_genes, preset=args.preset, compression=args.compression)
        if args.x_format != "csr":
            convert(src, args.x_format)
        for budget in args.memory_budget_mb:
            res = run_child(src, dest, budget)
            row = {"preset": args.preset, "num_cells": n, "num_genes": res["counts"]["num_genes"],
                   "x_format": args.x_format, "source_compression": args.compression,
                   "memory_budget_mb": budget, "generate_s": round(gen_s, 1), "ingest_s": round(res["seconds"], 1),
                   "cells_per_s": round(n / res["seconds"]), "peak_rss_MB": round(res["peak_rss_MB"]),
                   "user_s": round(res["user_s"], 1), "sys_s": round(res["sys_s"], 1),
                   "minor_faults": res["minor_faults"], "major_faults": res["major_faults"],
                   "source_MB": round(du(src) / 1e6, 1), "store_MB": round(du(dest) / 1e6, 1),
                   "store_vs_source": round(du(dest) / du(src), 3),
                   # per-condition statistics (conditions x genes): what grows with perturbations, not cells
                   "stats_MB": round(du(dest / "stats") / 1e6, 1),
                   "spill_MB": round(res["manifest_ingest"]["spill_bytes"] / 1e6, 1),
                   "spill_uncompressed_MB": round(res["manifest_ingest"].get("spill_uncompressed_bytes", 0) / 1e6, 1),
                   "num_conditions": res["counts"]["num_conditions"], "normalization": res["normalization"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(dest, ignore_errors=True)
        src.unlink()
        pathlib.Path(str(src) + ".truth.json").unlink(missing_ok=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("codecs")
    c.add_argument("--num-cells", type=int, default=20000)
    c.add_argument("--num-genes", type=int, default=5045)
    c.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 1024])
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    s.add_argument("--num-genes", type=int, default=1000, help="0: the preset's")
    s.add_argument("--preset", default="norman", help="generator preset (norman: 236 perturbations; genome: ~9,900)")
    s.add_argument("--memory-budget-mb", type=int, nargs="+", default=[1024])
    s.add_argument("--x-format", choices=["csr", "csc", "dense"], default="csr",
                   help="storage of X in the source file (csc/dense: converted in memory, small sizes only)")
    s.add_argument("--compression", choices=["gzip", "lzf"], default=None,
                   help="HDF5 filter of the source's X arrays (with byte shuffle), as many published h5ad files")
    for q in (c, s):
        q.add_argument("--workdir", default=None)
        q.add_argument("--out", default=None, help="also write the rows as JSON here")
    i = sub.add_parser("_ingest")  # internal: one ingest in a fresh process (run_child)
    i.add_argument("src")
    i.add_argument("dest")
    i.add_argument("budget_mb", type=int)
    args = p.parse_args(argv)
    if getattr(args, "num_genes", None) == 0:
        args.num_genes = None
    if args.what == "_ingest":
        child_ingest(args.src, args.dest, args.budget_mb)
        return 0
    own = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_ingest-", dir="/tmp")
    pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
    try:
        rows = run_codecs(args) if args.what == "codecs" else run_scale(args)
    finally:
        if own:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
