"""Benchmark: all pairs of a gene list with a trained model, batched vs one set per call; GI scoring.

    .venv/bin/python tools/bench_predict_pairs.py RUN_DIR [--genes 100] [--repeats 3] [--one-per-call 200]
    .venv/bin/python tools/bench_predict_pairs.py --synthetic 500 5045 [--dtypes bf16 fp32] [--repeats 3]

Prints wall times (median of repeats), sets/s, their ratio, and minor page faults, for
(a) TrainedPredictor.predict_delta on all n(n-1)/2 pairs in one call (chunked inside),
(b) a prefix of the same sets (--one-per-call, default 200) one call per set (what a per-perturbation loop does, still without the
    reference's 300 sampled control cells per query),
(c) GI scores of those pairs from the predictions: Huber IRLS (vectorized) vs Theil-Sen (sklearn,
    timed on 20 pairs and extrapolated).

--synthetic G...: no trained run; a GEARSModel (h=64, P=20,000 GO nodes, random GEARS-shaped graphs, BatchNorm
running statistics moved off their initial values) per gene count G; times predict_delta on all pairs of the
first --genes GO nodes with the folded decoder (fold=True, the default) and layer by layer (fold=False),
interleaved repeat by repeat so that a shared CPU slows both alike, in each of --dtypes (bf16 = autocast);
prints the time, the decoder work rate, the speed-up and the largest difference between the two.
--chunk-elements overrides predict_delta's chunk bound (elements of the widest set x gene activation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _common import minor_faults


def _timed(fn, repeats: int):
    times, faults = [], []
    for _ in range(repeats):
        f0, t0 = minor_faults(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    return out, statistics.median(times), int(statistics.median(faults))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=None)
    p.add_argument("--synthetic", type=int, nargs="+", default=None, metavar="G",
                   help="gene counts of untrained models to time fold=True vs fold=False on (no run needed)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--chunk-elements", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (1: CPU time least disturbed "
                   "by other jobs on a shared machine)")
    p.add_argument("--genes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one-per-call", type=int, default=200, help="sets timed one call each (a prefix)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.synthetic:
        return synthetic(args)
    if args.run is None:
        p.error("give a RUN_DIR or --synthetic G")
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


def synthetic(args) -> None:
    """fold=True vs fold=False on untrained models, interleaved (see the module docstring)."""
    import torch

    from gears_dist.model import GEARSModel, ModelConfig
    from gears_dist.model import gears as gears_module

    if args.chunk_elements:
        gears_module._PREDICT_CHUNK_ELEMENTS = args.chunk_elements
    hidden, num_perts, k = 64, 20000, 20
    gen = torch.Generator().manual_seed(0)

    def knn_like(n):
        src = torch.randint(0, n, (n * k,), generator=gen)
        dst = torch.arange(n).repeat_interleave(k)
        return torch.stack([src, dst]), torch.rand(n * k, generator=gen) * 0.9 + 0.1

    pairs = torch.combinations(torch.arange(args.genes), 2)
    n = pairs.shape[0]
    for num_genes in args.synthetic:
        torch.manual_seed(0)
        model = GEARSModel(ModelConfig(hidden_size=hidden), num_genes, num_perts, *knn_like(num_perts),
                           *knn_like(num_genes))
        with torch.no_grad():  # BatchNorm running statistics and affine maps away from the identity
            for name, buf in model.named_buffers():
                if name.endswith("running_mean"):
                    buf.normal_(0.0, 0.3)
                elif name.endswith("running_var"):
                    buf.uniform_(0.5, 2.0)
            for mlp in (model.recovery, model.cross_gene):
                for norm in mlp.norms:
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.normal_(0.0, 0.2)
        model.eval()
        # per (set, gene): recovery MLP h -> 2h -> h + per-gene map (the work fold=False does), as FLOPs
        flops = n * num_genes * 2 * (hidden * 2 * hidden * 2 + hidden)
        for dtype in args.dtypes:
            bf16 = dtype == "bf16"

            def predict(fold, bf16=bf16, model=model):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return model.predict_delta(pairs, fold=fold)

            predict(True)  # warm-up (allocator, kernels)
            predict(False)
            times = {True: [], False: []}
            cpu = {True: [], False: []}
            faults = {True: [], False: []}
            out = {}
            for _ in range(args.repeats):
                for fold in (True, False):
                    f0, c0, t0 = minor_faults(), time.process_time(), time.perf_counter()
                    out[fold] = predict(fold)
                    times[fold].append(time.perf_counter() - t0)
                    cpu[fold].append(time.process_time() - c0)
                    faults[fold].append(minor_faults() - f0)
            diff = float((out[True] - out[False]).abs().max())
            scale = float(out[False].abs().max())
            # Wall time: median; CPU time (both threads): minimum, the figure least disturbed by other jobs.
            t_f, t_p = statistics.median(times[True]), statistics.median(times[False])
            c_f, c_p = min(cpu[True]), min(cpu[False])
            for fold, t, c in ((False, t_p, c_p), (True, t_f, c_f)):
                print(f"G={num_genes:5d} {dtype} fold={fold!s:5s}: {t:7.3f} s wall, {c:7.3f} s CPU for {n} sets "
                      f"({flops / t / 1e9:6.1f} GFLOP/s of the unfolded decoder's work; "
                      f"minor faults {int(statistics.median(faults[fold]))})", flush=True)
            print(f"G={num_genes:5d} {dtype}: fold speed-up {t_p / t_f:.2f}x wall, {c_p / c_f:.2f}x CPU; "
                  f"max |fold - layer by layer| {diff:.2e} (max |delta| {scale:.2e}); "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
