"""End-to-end training throughput (loader + GEARS + DeepSpeed step), W=1 (no Ray) or W workers (Ray).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 DS_ACCELERATOR=cpu RAY_AUTH_MODE=token \
    .venv/bin/python tools/bench_train.py STORE --workers 2 --batch 32 --steps 60 [--config configs/norman.yaml]

Runs `--epochs` epochs of `--steps` steps each (train.max_steps_per_epoch), then prints one JSON line:
training cells/s (global, training phase only, mean over epochs after the first), step time, peak RSS.
The per-worker batch is --batch / --workers so that the global batch is the same for every W.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "token")


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
    args = p.parse_args()

    from gears_dist.config import deep_merge
    from gears_dist.train.config import load_run_config

    repo = pathlib.Path(__file__).resolve().parents[1]
    over = {"name": "bench", "train": {"epochs": args.epochs, "max_steps_per_epoch": args.steps, "log_every": 10**6},
            "data": {"loader": {"batch_size": args.batch // args.workers}},
            "model": {"hidden_size": args.hidden}, "deepspeed": {"zero_stage": args.zero},
            "sharding": {"mode": args.sharding}, "tracking": {"enabled": False},
            "scaling": {"num_workers": args.workers, "max_failures": 0}}
    cfg = load_run_config(args.config or repo / "configs" / "norman.yaml", deep_merge({}, over))
    out = pathlib.Path(tempfile.mkdtemp(prefix="bench-train-"))
    t0 = time.perf_counter()
    try:
        if args.workers == 1 and not args.ray:
            from gears_dist.train.loop import run_single

            summary = run_single(cfg, args.store, out)
        else:
            from gears_dist.distributed.launcher import train_with_ray

            summary = train_with_ray(cfg, args.store, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    hist = summary["history"]
    timed = hist[1:] or hist
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "workers": args.workers, "ray": args.ray or args.workers > 1, "global_batch": args.batch,
        "sharding": args.sharding, "zero": args.zero, "hidden": args.hidden, "steps_per_epoch": args.steps,
        "train_cells_per_s": round(sum(h["cells_per_s"] for h in timed) / len(timed)),
        "step_time_ms": round(sum(h["step_time_ms"] for h in timed) / len(timed), 1),
        "go_nodes_used_rank0": hist[-1]["go_nodes_used"], "worker_peak_rss_mb": round(hist[-1]["peak_rss_mb"]),
        "driver_peak_rss_mb": round(ru.ru_maxrss / 1024), "driver_minor_faults": ru.ru_minflt,
        "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
