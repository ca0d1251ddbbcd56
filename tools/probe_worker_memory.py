"""Where a training worker's memory goes, stage by stage (one process, no Ray, W=1).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \
    .venv/bin/python tools/probe_worker_memory.py STORE [--steps 10] [--trace]

Runs what tools/bench_train.py runs at W=1 (same config: global batch 32, h=64, ZeRO-1, fp32) and prints one
JSON line per stage boundary inside `setup_worker` and after training / validation: VmRSS and VmHWM of this
process, glibc's heap in use and free (mallinfo2), and with --trace the Python/numpy heap (tracemalloc current and peak since the previous stage, and
the largest live allocation sites). Stages are marked by wrapping the functions setup_worker calls, so the
loop's own code runs unchanged. The store must be prepared (split, graphs), e.g. by tools/bench_genome.py.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import tempfile
import time
import tracemalloc

from _common import status_mb

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]


def _status_mb() -> dict:
    return {k: round(v) for k, v in status_mb("VmRSS", "VmHWM").items()}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_mb() -> dict:
    """glibc heap over all arenas: bytes in use vs free-but-kept (free grows = fragmentation, not data)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    m = fn()
    return {"heap_used_mb": round(m.uordblks / 2**20), "heap_free_mb": round(m.fordblks / 2**20)}


class Probe:
    def __init__(self, trace: bool):
        self.trace = trace
        self.t0 = time.perf_counter()

    def mark(self, stage: str) -> None:
        row = {"stage": stage, "t_s": round(time.perf_counter() - self.t0, 1), **_status_mb(), **_heap_mb()}
        if self.trace:
            cur, peak = tracemalloc.get_traced_memory()
            row["py_mb"], row["py_peak_mb"] = round(cur / 2**20, 1), round(peak / 2**20, 1)
            top = tracemalloc.take_snapshot().statistics("lineno")[:4]
            row["top"] = [f"{s.size / 2**20:.1f} MB {s.traceback[0].filename.split('/')[-1]}:{s.traceback[0].lineno}"
                          for s in top]
            tracemalloc.reset_peak()
        print(json.dumps(row), flush=True)

    def wrap(self, module, name: str, stage: str) -> None:
        original = getattr(module, name)

        def wrapper(*a, **k):
            result = original(*a, **k)
            self.mark(stage)
            return result

        setattr(module, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--trace", action="store_true", help="tracemalloc (slower)")
    p.add_argument("--coexpr-max-cells", type=int, default=200000,
                   help="graphs.coexpr.max_cells, as tools/bench_genome.py (reuses its graph); 0: every cell")
    args = p.parse_args()

    probe = Probe(args.trace)
    if args.trace:
        tracemalloc.start()
    import deepspeed  # noqa: F401 - imported before the first mark so that the baseline includes it

    from gears_dist.config import deep_merge
    from gears_dist.data import splits
    from gears_dist.graphs import build, graph
    from gears_dist.train import loop
    from gears_dist.train.config import load_run_config

    over = {"name": "probe", "train": {"epochs": 1, "max_steps_per_epoch": args.steps, "log_every": 10**6},
            "data": {"loader": {"batch_size": 32}}, "model": {"hidden_size": 64},
            "deepspeed": {"zero_stage": 1}, "sharding": {"mode": "graph"}, "tracking": {"enabled": False},
            "graphs": {"coexpr": {"max_cells": args.coexpr_max_cells or None}}}
    cfg = load_run_config(REPO / "configs" / "norman.yaml", deep_merge({}, over))
    probe.mark("imports")
    keys = loop.prepare_run(cfg, args.store, 1)
    probe.mark("prepare_run (components exist: loads only)")
    probe.wrap(loop, "open_store", "open_store")
    probe.wrap(splits, "load_split", "load_split")
    probe.wrap(build, "ensure_graphs", "graphs loaded")
    probe.wrap(graph, "perturbation_index", "perturbation_index")
    probe.wrap(loop, "plan_shard", "plan_shard")
    probe.wrap(loop, "ShardLoader", "ShardLoader (gene mask + control pool)")
    import deepspeed as ds

    probe.wrap(ds, "initialize", "deepspeed.initialize (model built before)")
    w = loop.setup_worker(cfg, args.store, 0, 1, keys)
    probe.mark("setup_worker done")
    stats = loop.train_epoch(w, 0)
    probe.mark(f"train {int(stats['train_steps'])} steps")
    loop.evaluate(w, w.val_conditions, "val")
    probe.mark("validation")
    with tempfile.TemporaryDirectory() as d:
        loop.finish_run(w, None, [], None, pathlib.Path(d), None)
    probe.mark("finish_run (val + test per category)")
    print(json.dumps({"store": args.store, "num_cells": w.store.num_cells, "units": int(w.loader.plan.unit_start.size),
                      "window_rows": w.loader.window_rows,
                      "window_mb": round(w.loader.window_rows * w.store.num_genes * 4 / 2**20, 1),
                      "load_avg": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
