"""Streaming loader throughput alone (no model): cells/s, bytes read and mixing per worker.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \
    .venv/bin/python tools/bench_loader.py STORE [--workers 2] [--sharding graph] [--batch 32] [--steps 400]

Simulates each rank of a W-worker run in turn (same plan, loader and epoch as training) and prints one
JSON line per rank: cells/s, MB read, cells held in the shuffle buffer, distinct conditions per batch,
peak RSS and minor page faults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--sharding", choices=["graph", "random"], default="graph")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--buffer-chunks", type=int, default=8)
    p.add_argument("--group-cells", type=int, default=1)
    p.add_argument("--steps", type=int, default=400, help="batches timed per rank (0 = whole epoch)")
    args = p.parse_args()

    import numpy as np

    from gears_dist.data.loader import LoaderConfig, ShardLoader, plan_shard
    from gears_dist.data.splits import load_split
    from gears_dist.data.store import open_store
    from gears_dist.graphs.build import ensure_graphs, load_partition
    from gears_dist.graphs.graph import perturbation_index
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import condition_indices, prepare_run

    cfg = run_config_from_dict({"sharding": {"mode": args.sharding}})
    keys = prepare_run(cfg, args.store, args.workers)
    store = open_store(args.store)
    split = load_split(store, keys["split"])
    train = condition_indices(store.condition_names, split.train, "train")
    go = ensure_graphs(store, cfg.graphs, keys["split"]).go
    pert_index = perturbation_index(go.nodes, store.condition_genes())
    part = load_partition(store, keys["partition"]).part_of_condition if keys["partition"] else None
    lcfg = LoaderConfig(batch_size=args.batch, buffer_chunks=args.buffer_chunks, group_cells=args.group_cells)
    for rank in range(args.workers):
        plan = plan_shard(store, train, rank, args.workers, sharding=args.sharding, part_of_condition=part)
        loader = ShardLoader(store, plan, pert_index, lcfg, seed=0)
        setup_bytes = loader.bytes_read
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        cells, distinct = 0, []
        for i, batch in enumerate(loader.epoch_batches(0)):
            cells += batch.num_cells
            distinct.append(batch.ucond.numel())
            if args.steps and i + 1 >= args.steps:
                break
        dt = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({
            "rank": rank, "workers": args.workers, "sharding": args.sharding, "cells": cells,
            "cells_per_s": round(cells / dt), "genes": store.num_genes, "shard_cells": plan.num_cells,
            "shard_frac": round(plan.num_cells / plan.total_train_cells, 3),
            "mb_read": round((loader.bytes_read - setup_bytes) / 2**20, 1),
            "mb_per_1k_cells": round((loader.bytes_read - setup_bytes) / 2**20 / max(cells, 1) * 1000, 2),
            "max_buffered_cells": loader.max_buffered_cells,
            "distinct_conditions_per_batch": round(float(np.mean(distinct)), 2),
            "peak_rss_mb": round(ru.ru_maxrss / 1024), "minor_faults": ru.ru_minflt - faults0}), flush=True)


if __name__ == "__main__":
    main()
