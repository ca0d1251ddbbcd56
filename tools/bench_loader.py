"""Streaming loader throughput alone (no model): cells/s, bytes read and mixing per worker.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \
    .venv/bin/python tools/bench_loader.py STORE [--workers 2] [--sharding graph] [--batch 32] [--steps 400]

Simulates each rank of a W-worker run in turn (same plan, loader and epoch as training) and prints one
JSON line per rank: cells/s, MB read, cells held in the shuffle buffer, distinct conditions per batch,
peak RSS and minor page faults, and the GO nodes the rank's GNN must process: the 1-hop in-neighbourhood
(halo) of the GO nodes its training cells perturb (`go_nodes_halo`), and what training computes
(`go_nodes_processed`: the halo with graph sharding and W > 1, every node otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _common import load_avg, minor_faults, peak_rss_mb

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--sharding", choices=["graph", "random"], default="graph")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--buffer-mb", type=float, default=256.0, help="shuffle window in MB of decoded cells")
    p.add_argument("--buffer-chunks", type=int, default=None, help="window in chunks instead of --buffer-mb")
    p.add_argument("--group-cells", type=int, default=1)
    p.add_argument("--steps", type=int, default=400, help="batches timed per rank (0 = whole epoch)")
    p.add_argument("--coexpr-max-cells", type=int, default=None,
                   help="graphs.coexpr.max_cells for the graphs prepare_run builds (reuses bench_genome's graphs)")
    args = p.parse_args()

    import numpy as np

    from gears_dist.data.loader import LoaderConfig, ShardLoader, plan_shard
    from gears_dist.data.splits import load_split
    from gears_dist.data.store import open_store
    from gears_dist.graphs.build import ensure_graphs, load_partition
    from gears_dist.graphs.graph import perturbation_index
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import condition_indices, prepare_run

    cfg = run_config_from_dict({"sharding": {"mode": args.sharding},
                                "graphs": {"coexpr": {"max_cells": args.coexpr_max_cells}}})
    keys = prepare_run(cfg, args.store, args.workers)
    store = open_store(args.store)
    split = load_split(store, keys["split"])
    train = condition_indices(store.condition_names, split.train, "train")
    go = ensure_graphs(store, cfg.graphs, keys["split"]).go
    pert_index = perturbation_index(go.nodes, store.condition_genes())
    part = load_partition(store, keys["partition"]).part_of_condition if keys["partition"] else None
    lcfg = LoaderConfig(batch_size=args.batch, buffer_mb=args.buffer_mb, buffer_chunks=args.buffer_chunks,
                        group_cells=args.group_cells)
    go_src, go_dst = (np.asarray(a) for a in go.to_torch()[0].numpy())
    for rank in range(args.workers):
        plan = plan_shard(store, train, rank, args.workers, sharding=args.sharding, part_of_condition=part)
        loader = ShardLoader(store, plan, pert_index, lcfg, seed=0)
        setup_bytes = loader.bytes_read
        faults0 = minor_faults()
        t0 = time.perf_counter()
        cells, distinct = 0, []
        for i, batch in enumerate(loader.epoch_batches(0)):
            cells += batch.num_cells
            distinct.append(batch.ucond.numel())
            if args.steps and i + 1 >= args.steps:
                break
        dt = time.perf_counter() - t0
        faults = minor_faults() - faults0
        halo = _halo(pert_index, plan, store, go_src, go_dst, go.num_nodes)
        processed = halo if args.sharding == "graph" and args.workers > 1 else go.num_nodes
        print(json.dumps({
            "rank": rank, "workers": args.workers, "sharding": args.sharding, "cells": cells,
            "cells_per_s": round(cells / dt), "genes": store.num_genes, "shard_cells": plan.num_cells,
            "shard_frac": round(plan.num_cells / plan.total_train_cells, 3),
            "mb_read": round((loader.bytes_read - setup_bytes) / 2**20, 1),
            "mb_per_1k_cells": round((loader.bytes_read - setup_bytes) / 2**20 / max(cells, 1) * 1000, 2),
            "max_buffered_cells": loader.max_buffered_cells,
            "window_rows": loader.window_rows,
            "distinct_conditions_per_batch": round(float(np.mean(distinct)), 2),
            "go_nodes_total": go.num_nodes, "go_nodes_halo": halo, "go_nodes_processed": processed,
            "peak_rss_mb": round(peak_rss_mb()), "minor_faults": faults, "load_avg_1m": load_avg()}), flush=True)


def _halo(pert_index, plan, store, src, dst, num_nodes: int) -> int:
    """GO nodes within one hop (edges into them) of the nodes perturbed by the shard's training cells."""
    import numpy as np

    codes = np.unique(_shard_codes(plan, store))
    wanted = pert_index[codes].ravel()
    mask = np.zeros(num_nodes, dtype=bool)
    mask[wanted[wanted >= 0]] = True
    into = mask[dst]
    mask[src[into]] = True
    return int(mask.sum())


def _shard_codes(plan, store):
    """Condition codes of the shard's rows (the plan's units, as the loader reads them)."""
    import numpy as np

    cond = np.asarray(store.root["obs/condition"][...])
    rows = [plan.unit_rows(u) for u in range(len(plan.unit_start))]
    return cond[np.concatenate(rows)] if rows else cond[:0]


if __name__ == "__main__":
    main()
