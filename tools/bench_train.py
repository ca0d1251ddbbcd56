"""End-to-end training throughput (loader + GEARS + DeepSpeed step), W=1 (no Ray) or W workers (Ray).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 DS_ACCELERATOR=cpu RAY_AUTH_MODE=token \
    .venv/bin/python tools/bench_train.py STORE --workers 2 --batch 32 --steps 60 [--config configs/norman.yaml]

Runs `--epochs` epochs of `--steps` steps each (train.max_steps_per_epoch), then prints one JSON line:
training cells/s (global, training phase only, mean over epochs after the first = steady state), step
time, the time of one full epoch extrapolated from the steady-state step time, and per worker (rank):
peak RSS (the worker process's own high-water mark), GO nodes its GNN touches, MB read from the store
per 1,000 training cells, and its shard's share of the training cells.
The per-worker batch is --batch / --workers so that the global batch is the same for every W.

Run `prepare` first (split, graphs, partition; `tools/bench_genome.py` does) if the worker's peak RSS
must exclude graph building: with W=1 the worker is this process and prepare_run runs in it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import shutil
import tempfile
import time

from _common import load_avg, peak_rss_mb, usage

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "token")

RANK_FILE = "bench_ranks.jsonl"


def _make_rank_recorder(path: str):
    """A Ray Train callback on the controller that appends every rank's epoch report to `path`
    (ray.train.Result only keeps rank 0's metrics)."""
    from ray.train import UserCallback

    class RankRecorder(UserCallback):
        def __init__(self, out: str):
            self.out = out

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.out, "a") as f:
                for rank, m in enumerate(metrics):
                    if "epoch" in m:
                        f.write(json.dumps({"rank": rank, **{k: float(v) for k, v in m.items()}}) + "\n")

    return RankRecorder(path)


def _plan_cells(cfg, store_path: str, world: int) -> tuple[list[int], int, dict]:
    """Training cells of each rank's shard (as the workers plan them), all training cells, the run's keys."""
    from gears_dist.data.loader import plan_shard
    from gears_dist.data.splits import load_split
    from gears_dist.data.store import open_store
    from gears_dist.graphs.build import load_partition
    from gears_dist.train.loop import condition_indices, prepare_run

    keys = prepare_run(cfg, store_path, world)
    store = open_store(store_path)
    train = condition_indices(store.condition_names, load_split(store, keys["split"]).train, "train")
    part = load_partition(store, keys["partition"]).part_of_condition if keys["partition"] else None
    plans = [plan_shard(store, train, r, world, sharding=cfg.sharding.mode, part_of_condition=part,
                        include_controls=cfg.data.loader.include_controls, seed=cfg.seed) for r in range(world)]
    return [pl.num_cells for pl in plans], plans[0].total_train_cells, keys


def _per_rank(rows: list[dict], batch_per_worker: int, shard_cells: list[int], total_cells: int) -> list[dict]:
    """Per rank: peak RSS, GO nodes, MB read per 1k cells (steady-state epochs: bytes read between epochs)."""
    out = []
    for rank in sorted({int(r["rank"]) for r in rows}):
        mine = sorted((r for r in rows if int(r["rank"]) == rank), key=lambda r: r["epoch"])
        read = [b["bytes_read_mb"] - a["bytes_read_mb"] for a, b in itertools.pairwise(mine)]
        cells = [b["train_steps"] * batch_per_worker for b in mine[1:]]
        out.append({"rank": rank, "peak_rss_mb": round(mine[-1]["peak_rss_mb"]),
                    "go_nodes_used": int(mine[-1]["go_nodes_used"]),
                    "shard_cells": shard_cells[rank], "shard_frac": round(shard_cells[rank] / max(total_cells, 1), 3),
                    "mb_read_per_1k_cells": round(sum(read) / max(sum(cells), 1) * 1000, 2) if read else None})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--config", default=None, help="base preset (default: configs/norman.yaml)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--ray", action="store_true", help="use Ray even for one worker")
    p.add_argument("--batch", type=int, default=32, help="global batch (per worker: batch / workers)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sharding", choices=["graph", "random"], default="graph")
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: the config's")
    p.add_argument("--coexpr-max-cells", type=int, default=None,
                   help="graphs.coexpr.max_cells (0 or unset: the config's)")
    p.add_argument("--tag", default=None, help="free text copied into the JSON line")
    args = p.parse_args()

    from gears_dist.config import deep_merge
    from gears_dist.data.store import open_store
    from gears_dist.train.config import load_run_config

    repo = pathlib.Path(__file__).resolve().parents[1]
    per_worker = args.batch // args.workers
    over = {"name": "bench", "train": {"epochs": args.epochs, "max_steps_per_epoch": args.steps, "log_every": 10**6},
            "data": {"loader": {"batch_size": per_worker}},
            "model": {"hidden_size": args.hidden}, "deepspeed": {"zero_stage": args.zero},
            "sharding": {"mode": args.sharding}, "tracking": {"enabled": False},
            # a worker uses cpus_per_worker torch threads: the machine's cores shared among the workers
            "scaling": {"num_workers": args.workers, "max_failures": 0,
                        "cpus_per_worker": max(1, (os.cpu_count() or 1) // args.workers)}}
    if args.precision:
        over["deepspeed"]["precision"] = args.precision
    if args.coexpr_max_cells:
        over["graphs"] = {"coexpr": {"max_cells": args.coexpr_max_cells}}
    cfg = load_run_config(args.config or repo / "configs" / "norman.yaml", deep_merge({}, over))
    load_start = load_avg()
    shard_cells, total_cells, keys = _plan_cells(cfg, args.store, args.workers)
    store = open_store(args.store)
    out = pathlib.Path(tempfile.mkdtemp(prefix="bench-train-"))
    t0 = time.perf_counter()
    use_ray = args.ray or args.workers > 1
    try:
        if not use_ray:
            from gears_dist.train.loop import run_single

            summary = run_single(cfg, args.store, out)
            rank_rows = [{"rank": 0, **h} for h in summary["history"]]
        else:
            from gears_dist.distributed.launcher import train_with_ray

            rank_file = out / RANK_FILE
            summary = train_with_ray(cfg, args.store, out / "run", callbacks=[_make_rank_recorder(str(rank_file))])
            rank_rows = [json.loads(line) for line in rank_file.read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - t0
    hist = summary["history"]
    timed = hist[1:] or hist
    step_ms = sum(h["step_time_ms"] for h in timed) / len(timed)
    # every worker runs steps_per_epoch = train cells // (W * per-worker batch) steps (the loader's rule)
    full_steps = max(1, total_cells // (args.workers * per_worker))
    ru = usage()
    ranks = _per_rank(rank_rows, per_worker, shard_cells, total_cells)
    if not use_ray:
        ranks[0]["peak_rss_mb"] = round(peak_rss_mb())  # this process is the worker
    print(json.dumps({
        "phase": "train", "tag": args.tag, "store": str(args.store), "num_cells": store.num_cells,
        "genes": store.num_genes, "conditions": len(store.condition_names),
        "workers": args.workers, "ray": use_ray, "global_batch": args.batch, "batch_per_worker": per_worker,
        "sharding": args.sharding, "zero": args.zero, "hidden": args.hidden,
        "precision": cfg.deepspeed.precision, "steps_per_epoch_timed": args.steps, "epochs": args.epochs,
        "train_cells_per_s": round(sum(h["cells_per_s"] for h in timed) / len(timed), 1),
        "step_time_ms": round(step_ms, 1), "train_cells": total_cells, "full_epoch_steps": full_steps,
        "epoch_time_extrapolated_s": round(full_steps * step_ms / 1e3, 1),
        "ranks": ranks, "worker_peak_rss_mb_max": max(r["peak_rss_mb"] for r in ranks),
        "driver_peak_rss_mb": round(peak_rss_mb()), "driver_minor_faults": ru["minor_faults"],
        "split": keys["split"], "partition": keys["partition"],
        "load_avg_1m_start": load_start, "load_avg_1m_end": load_avg(),
        "wall_s": round(wall, 1)}), flush=True)


if __name__ == "__main__":
    main()
