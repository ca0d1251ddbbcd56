"""Benchmark: all pairs of a gene list with a trained model, batched vs one set per call; GI scoring.

    .venv/bin/python tools/bench_predict_pairs.py RUN_DIR [--genes 100] [--repeats 3] [--one-per-call 200]

Prints wall times (median of repeats), sets/s, their ratio, and minor page faults, for
(a) TrainedPredictor.predict_delta on all n(n-1)/2 pairs in one call (chunked inside),
(b) a prefix of the same sets (--one-per-call, default 200) one call per set (what a per-perturbation loop does, still without the
    reference's 300 sampled control cells per query),
(c) GI scores of those pairs from the predictions: Huber IRLS (vectorized) vs Theil-Sen (sklearn,
    timed on 20 pairs and extrapolated).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn, repeats: int):
    times, faults = [], []
    for _ in range(repeats):
        f0, t0 = _faults(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        faults.append(_faults() - f0)
    return out, statistics.median(times), int(statistics.median(faults))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--genes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one-per-call", type=int, default=200, help="sets timed one call each (a prefix)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    from gears_dist.evaluate import gi
    from gears_dist.evaluate.predict import TrainedPredictor, all_pairs

    model = TrainedPredictor.load(args.run)
    genes = model.nodes[: args.genes]
    pairs = all_pairs(genes)
    n = len(pairs)
    print(f"model: {len(model.nodes)} GO nodes, {len(model.genes)} genes; {len(genes)} genes -> {n} pairs")
    batched, t_b, f_b = _timed(lambda: model.predict_delta(pairs), args.repeats)
    m1 = min(args.one_per_call, n)  # one set per call is slow: time a prefix, report per-set rates
    one, t_o, f_o = _timed(lambda: np.concatenate([model.predict_delta([s]) for s in pairs[:m1]]), 1)
    err = float(np.abs(batched[:m1] - one).max())
    print(f"batched     : {t_b:8.3f} s for {n} sets  {n / t_b:10.0f} sets/s  minor faults {f_b}")
    print(f"one per call: {t_o:8.3f} s for {m1} sets  {m1 / t_o:10.0f} sets/s  minor faults {f_o}")
    print(f"ratio of rates batched / one-per-call: {(n / t_b) / (m1 / t_o):.1f}x   max |difference| {err:.2e}")

    singles = {g: i for i, g in enumerate(genes)}
    sd = model.predict_delta([(g,) for g in genes])
    sel = gi.well_expressed_genes(model.control_mean)
    da = sd[[singles[a] for a, _ in pairs]][:, sel]
    db = sd[[singles[b] for _, b in pairs]][:, sel]
    dab = batched[:, sel]
    _, t_h, f_h = _timed(lambda: gi.gi_scores(da, db, dab, method="huber", with_dcor=False), args.repeats)
    _, t_d, _ = _timed(lambda: gi.gi_scores(da, db, dab, method="huber", with_dcor=True), 1)
    m = min(20, n)
    _, t_t, _ = _timed(lambda: gi.gi_scores(da[:m], db[:m], dab[:m], method="theilsen", with_dcor=False), 1)
    print(f"GI on {sel.size} well-expressed genes: huber {t_h:.3f} s for {n} pairs (faults {f_h}); "
          f"+ distance correlations {t_d:.2f} s; theilsen {t_t:.2f} s for {m} pairs "
          f"(~{t_t / m * n:.0f} s for {n}, {t_t / m * n / t_h:.0f}x huber)")


if __name__ == "__main__":
    main()
