"""Prior-anchored GEARS vs the reference architecture: training step time and the prior's memory.

Interleaved in one process (a shared, noisy CPU slows both alike; the ratio is the figure): one training step
(forward + loss + backward + clipping + Adam) of GEARSModel with model.prior 'none' and 'go', same weights'
shapes, same batches, at Norman size (G = 5,045, P = 20,000 GO nodes, 100 training singles) and genome size
(G = 8,000, P = 20,000, 10,000 training singles: the prior then keeps a rank-256 factorization). Also
reports the prior's buffers in MB and the time to fit it. Uses tools/bench_model.py's graphs and batches.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/bench_prior.py \
        --scales norman genome --dtypes fp32 --batch 32 --steps 6
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import statistics
import sys
import time

import bench_model as BM

SINGLES = {"norman": 100, "genome": 10000}
# training pairs of trained singles: what the combination and linear candidates and the pair gains are fitted on
DOUBLES = {"norman": 131, "genome": 1000}


def build(scale: str, prior: str, batch: int, steps: int, dtype: str):
    import numpy as np
    import torch

    from gears_dist.graphs.graph import GeneGraph
    from gears_dist.model import GEARSModel, LossConfig, ModelConfig, gears_loss
    from gears_dist.model.prior import SetPrior, fit_go_prior

    num_genes, num_perts = BM.SCALES[scale]
    (go_i, go_w), (co_i, co_w) = BM._graphs(num_genes, num_perts)
    torch.manual_seed(0)
    model = GEARSModel(ModelConfig(hidden_size=BM.HIDDEN, fast_path="off", prior=prior), num_genes, num_perts,
                       go_i, go_w, co_i, co_w).train()
    info = {}
    if prior == "go":
        rng = np.random.default_rng(0)
        nodes = [f"g{i}" for i in range(num_perts)]
        singles = [nodes[i] for i in rng.permutation(num_perts)[:SINGLES[scale]]]
        deltas = rng.normal(size=(len(singles), num_genes)).astype(np.float32)
        pick = rng.choice(len(singles), size=(DOUBLES[scale], 2))
        pick = pick[pick[:, 0] != pick[:, 1]]
        doubles = [(singles[a], singles[b]) for a, b in pick]
        double_deltas = 0.8 * (deltas[pick[:, 0]] + deltas[pick[:, 1]]) + 0.3 * rng.normal(size=(len(pick), num_genes))
        everything = np.concatenate([deltas, double_deltas])
        # the noise of the means, so the fit also runs the pair gains, and GO terms per node, which they read
        # (libraries from before either lack the argument)
        pair_args = {}
        if "single_noise" in inspect.signature(fit_go_prior).parameters:
            pair_args = dict(single_noise=np.zeros(deltas.shape), control_noise=np.zeros(num_genes))
        if "pair_terms" in inspect.signature(fit_go_prior).parameters:
            # GO-like annotations: 3-40 terms per gene out of 8,000, a few terms annotating many genes
            popularity = 1.0 / (np.arange(8000) + 10.0)
            pair_args["pair_terms"] = [frozenset(rng.choice(8000, size=rng.integers(3, 41), replace=False,
                                                        p=popularity / popularity.sum()).tolist())
                                   for _ in nodes]
        t = time.perf_counter()
        fit = fit_go_prior(GeneGraph(nodes, go_i.numpy(), go_w.numpy()), singles, deltas, everything.mean(0),
                           doubles, double_deltas, **pair_args)
        info["fit_s"] = time.perf_counter() - t
        info["combo_source"] = getattr(fit, "combo_source", "-")  # "-": a prior from before the candidates
        info["fit_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        p = SetPrior(fit)
        info["prior_mb"] = sum(b.numel() * b.element_size() for b in p.buffers()) / 2**20
        info["lowrank"] = fit.basis is not None
        model.attach_prior(p)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    ctrl = torch.rand(num_genes)
    loss_cfg = LossConfig()
    batches = BM._batches(num_genes, BM._conditions(num_perts), batch, None, steps)
    bf16 = dtype == "bf16"

    def step(b):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred, logvar = model(b["x"], b["perts"], b["inverse"])
            loss = gears_loss(pred.float(), b["y"], b["inverse"], b["mask"], ctrl, loss_cfg, logvar)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()

    return step, batches, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", default=["norman", "genome"], choices=sorted(BM.SCALES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    rows = []
    for scale in args.scales:
        for dtype in args.dtypes:
            n = args.warmup + args.steps
            runners = {p: build(scale, p, args.batch, n, dtype) for p in ("none", "go")}
            times = {p: [] for p in runners}
            for i in range(n):
                for p, (step, batches, _) in runners.items():
                    t = time.perf_counter()
                    step(batches[i])
                    if i >= args.warmup:
                        times[p].append(time.perf_counter() - t)
            med = {p: statistics.median(v) for p, v in times.items()}
            ratios = [g / r for g, r in zip(times["go"], times["none"])]
            row = {"scale": scale, "dtype": dtype, "batch": args.batch, "step_s_none": med["none"],
                   "step_s_go": med["go"], "ratio_median_of_rounds": statistics.median(ratios),
                   **runners["go"][2]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| scale | dtype | B | s/step reference arch. | s/step prior-anchored | ratio (median per round) | "
          "prior buffers MB | prior fit s | rows in sets of trained genes | peak RSS after fit MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']} | {r['dtype']} | {r['batch']} | {r['step_s_none']:.3f} | {r['step_s_go']:.3f} | "
              f"{r['ratio_median_of_rounds']:.3f} | {r['prior_mb']:.1f}{' (rank 256)' if r['lowrank'] else ''} | "
              f"{r['fit_s']:.1f} | {r['combo_source']} | {r['fit_peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
