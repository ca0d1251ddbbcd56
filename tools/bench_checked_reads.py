"""Cost of the checked store reads on the loader's hot path: `ShardLoader._read_units` over every unit
of a store, with `read_checked` (damaged chunks reported as StoreError) and with bare Zarr reads,
alternating rounds in one process so that both see the same machine load.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \
    .venv/bin/python tools/bench_checked_reads.py STORE [--rounds 7]

Prints one JSON line: median seconds per pass and cells/s for each variant, their ratio, the minor page
faults of each variant's passes, and the wrapper's own cost per read (measured on a NumPy array, where a
read costs almost nothing) with its share of a pass. Small chunks are the worst case (most reads per cell).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit

from _common import minor_faults


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    import numpy as np

    from gears_dist.data import loader as L
    from gears_dist.data.store import open_store, read_checked

    def bare(array, selection=Ellipsis, *, orthogonal=False):
        return array.oindex[selection] if orthogonal else array[selection]

    store = open_store(args.store)
    is_ctrl = store.array("conditions/is_control").astype(bool)
    plan = L.plan_shard(store, np.flatnonzero(~is_ctrl), 0, 1)
    pert_index = np.full((is_ctrl.size, 1), -1, np.int64)
    loader = L.ShardLoader(store, plan, pert_index, L.LoaderConfig(batch_size=32), seed=0)
    units = np.arange(plan.unit_start.size)
    variants = {"checked": read_checked, "bare": bare}
    times: dict[str, list[float]] = {k: [] for k in variants}
    faults = dict.fromkeys(variants, 0)
    loader._read_units(units)  # warm-up: page cache, allocator, Zarr's metadata
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):  # alternate who goes first
            L.read_checked = variants[name]
            f0 = minor_faults()
            t0 = time.perf_counter()
            loader._read_units(units)
            times[name].append(time.perf_counter() - t0)
            faults[name] += minor_faults() - f0
    L.read_checked = read_checked
    med = {k: statistics.median(v) for k, v in times.items()}
    # The wrapper's own cost, free of Zarr's and the machine's noise: on a NumPy array (a read that
    # costs almost nothing), checked minus bare per call; a pass makes 3 reads per unit (X, condition, type).
    tiny = np.zeros((64, 8), np.float32)
    sel = slice(0, 16)
    n = 200_000
    wrapped = min(timeit.repeat(lambda: read_checked(tiny, sel), number=n, repeat=5)) / n
    plain = min(timeit.repeat(lambda: tiny[sel], number=n, repeat=5)) / n  # the inline read it replaces
    wrapper_s = max(wrapped - plain, 0.0)
    print(json.dumps({
        "store": args.store, "cells": plan.num_cells, "units": int(units.size), "chunk_cells": store.chunk_cells,
        "rounds": args.rounds, **{f"s_per_pass_{k}": round(v, 4) for k, v in med.items()},
        **{f"cells_per_s_{k}": round(plan.num_cells / v) for k, v in med.items()},
        "checked_over_bare": round(med["checked"] / med["bare"], 3),
        **{f"minor_faults_{k}": v for k, v in faults.items()},
        "wrapper_ns_per_read": round(wrapper_s * 1e9, 1),
        "wrapper_share_of_pass": float(f"{wrapper_s * 3 * units.size / med['bare']:.2g}"),
    }))


if __name__ == "__main__":
    main()
