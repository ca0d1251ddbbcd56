"""Genome-scale table in one command: build, prepare and train on generated Replogle-genome-wide-like stores.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \
    .venv/bin/python tools/bench_genome.py --sizes 200000 1000000 2000000 --out-dir .bench/genome

For each size (cells), each phase in its own child process (so its peak RSS is its own):

1. build: ``gears_dist.data.synthetic.write_store`` with preset ``genome`` (8,248 genes, 9,866 single
   perturbations + control, log1p X + statistics), 2 sampling workers (tools/bench_synthetic.py --keep);
   skipped when STORE already exists (its earlier build line is reused from the results file);
2. prepare: what ``prepare_run`` builds on first use — the split (simulation, seed 1), the co-expression
   graph (a streaming pass over all training cells), the GO graph and the W=2 METIS partition — timed
   part by part, with the child's peak RSS (VmHWM), CPU seconds and minor faults;
3. train: tools/bench_train.py at W=1 (one process, no Ray) and W=2 (Ray, graph sharding), global batch 32,
   `--steps` steps per epoch for 2 epochs (the first is warm-up; figures from the second), with each worker's
   peak RSS, GO nodes, MB read per 1k cells and the full epoch time extrapolated from the step time.

Results: one JSON line per phase appended to OUT_DIR/genome.jsonl, and a markdown summary printed at the end
(``--report`` prints it from the file without running anything). ``--delete-after`` removes each store once
its rows are measured (disk).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

from _common import append_jsonl, bench_env, last_json_line, load_avg, peak_rss_mb, read_jsonl, usage

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = "genome.jsonl"


def prepare(store: str, world: int, coexpr_max_cells: int | None) -> dict:
    """Run prepare_run as training does, timing its parts (wrappers around the module functions it calls)."""
    from gears_dist.data import splits
    from gears_dist.graphs import build
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import prepare_run

    seconds: dict[str, float] = {}

    def timed(module, name: str, label: str) -> None:
        original = getattr(module, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t

        setattr(module, name, wrapper)

    timed(splits, "make_and_save_split", "split_s")
    timed(build, "build_coexpression_graph", "coexpr_s")
    timed(build, "build_go_graph", "go_s")
    timed(build, "ensure_partition", "partition_s")
    cfg = run_config_from_dict({"sharding": {"mode": "graph"}, "graphs": {"coexpr": {"max_cells": coexpr_max_cells}}})
    load = load_avg()
    t0 = time.perf_counter()
    keys = prepare_run(cfg, store, world)
    wall = time.perf_counter() - t0
    ru = usage()
    return {"phase": "prepare", "store": store, "world_size": world, "seconds": round(wall, 1),
            **{k: round(v, 1) for k, v in seconds.items()}, "cpu_s": round(ru["cpu_s"], 1),
            "peak_rss_mb": round(peak_rss_mb()), "minor_faults": ru["minor_faults"], "keys": keys,
            "load_avg_1m_start": load, "load_avg_1m_end": load_avg()}


def _child(cmd: list[str], log: pathlib.Path) -> dict:
    """Run a benchmark child; its last JSON line is the result."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=bench_env(), stdout=subprocess.PIPE, stderr=f,
                              text=True)
        f.write(proc.stdout)
    row = last_json_line(proc.stdout)
    if proc.returncode != 0 or row is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return row


def report(path: pathlib.Path) -> str:
    rows = read_jsonl(path)
    out = ["| cells | phase | W | wall s | detail | peak RSS MB (per process) | load avg |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r.get("num_cells")
        if r["phase"] == "build":
            detail = (f"X {r['seconds_x']:.0f} s + stats {r['seconds_stats']:.0f} s; {r['cells_per_s']:.0f} cells/s; "
                      f"{r['bytes'] / 1e9:.2f} GB")
            out.append(f"| {n:,} | build | - | {r['seconds']:.0f} | {detail} | main {r['peak_rss_mib']:.0f}, "
                       f"sampler {r['worker_peak_rss_mib']:.0f} | {r['load_avg_1m']} |")
        elif r["phase"] == "prepare":
            detail = ", ".join(f"{k[:-2]} {r[k]:.0f} s" for k in ("split_s", "coexpr_s", "go_s", "partition_s") if k in r)
            out.append(f"| {n:,} | prepare | - | {r['seconds']:.0f} | {detail}; cpu {r['cpu_s']:.0f} s | "
                       f"{r['peak_rss_mb']} | {r['load_avg_1m_start']}-{r['load_avg_1m_end']} |")
        elif r["phase"] == "train":
            ranks = r["ranks"]
            detail = (f"{r['train_cells_per_s']:.0f} cells/s, {r['step_time_ms']:.0f} ms/step, epoch "
                      f"{r['full_epoch_steps']:,} steps ≈ {r['epoch_time_extrapolated_s'] / 3600:.2f} h; GO nodes "
                      + " / ".join(f"{k['go_nodes_used']:,}" for k in ranks) + "; MB/1k cells "
                      + " / ".join(str(k["mb_read_per_1k_cells"]) for k in ranks))
            out.append(f"| {n:,} | train | {r['workers']} | {r['wall_s']:.0f} | {detail} | "
                       + " / ".join(str(k["peak_rss_mb"]) for k in ranks)
                       + f" | {r['load_avg_1m_start']}-{r['load_avg_1m_end']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200000, 1000000, 2000000])
    p.add_argument("--out-dir", type=pathlib.Path, default=REPO / ".bench" / "genome")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="training world sizes")
    p.add_argument("--steps", type=int, default=30, help="steps per epoch (2 epochs; the first is warm-up)")
    p.add_argument("--phases", nargs="+", default=["build", "prepare", "train"],
                   choices=["build", "prepare", "train"])
    p.add_argument("--delete-after", action="store_true", help="delete each store after its rows")
    p.add_argument("--report", action="store_true", help="only print the summary of OUT_DIR/genome.jsonl")
    p.add_argument("--coexpr-max-cells", type=int, default=200000,
                   help="graphs.coexpr.max_cells (as configs/replogle_gw.yaml); 0: every training cell")
    p.add_argument("--prepare-only", metavar="STORE", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.prepare_only:
        print(json.dumps(prepare(args.prepare_only, 2, args.coexpr_max_cells or None)), flush=True)
        return
    results = args.out_dir / RESULTS
    if args.report:
        print(report(results))
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = args.out_dir / "genome.log"
    py = sys.executable
    for n in args.sizes:
        store = args.out_dir / f"genome_{n}.zarr"
        if "build" in args.phases and not store.exists():
            row = _child([py, "tools/bench_synthetic.py", "--preset", "genome", "--num-cells", str(n), "--format",
                          "store", "--workers", "2", "--out-dir", str(args.out_dir), "--keep"], log)
            append_jsonl(results, {"phase": "build", **row})
        if not store.exists():
            print(f"no store {store}; skipping {n:,} cells", flush=True)
            continue
        if "prepare" in args.phases:
            row = _child([py, "tools/bench_genome.py", "--prepare-only", str(store),
                          "--coexpr-max-cells", str(args.coexpr_max_cells)], log)
            append_jsonl(results, {**row, "num_cells": n})
        if "train" in args.phases:
            for w in args.workers:
                row = _child([py, "tools/bench_train.py", str(store), "--workers", str(w), "--batch", "32",
                              "--steps", str(args.steps), "--epochs", "2", "--tag", "genome",
                              "--coexpr-max-cells", str(args.coexpr_max_cells)], log)
                append_jsonl(results, row)
        if args.delete_after:
            shutil.rmtree(store, ignore_errors=True)
    print(report(results))


if __name__ == "__main__":
    main()
