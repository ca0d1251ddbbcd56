"""Paper model of multi-node data-parallel scaling for GEARS (gears_dist.model.GEARSModel).

    .venv/bin/python tools/scaling_model.py --measured .bench/genome/genome.jsonl   # BENCHMARKS.md, C14
    .venv/bin/python tools/scaling_model.py            # with the step times of BENCHMARKS.md, 2026-12-05 (DEFAULT_MEASURED)
    .venv/bin/python tools/scaling_model.py --step-ms 585 --batch 32 --genes 8000 --perts 13674

What it does (nothing here is measured on a cluster; only the inputs are measured, on one node):

1. Counts the parameters of the real module at the given sizes (G genes, P GO nodes, h hidden), by
   building it, so the count follows the code (per-gene maps gene_w1/gene_w2 and the three embeddings
   dominate: about G * (5h + 3) + P * h).
2. Communication per optimizer step, per worker, for DeepSpeed ZeRO stage 0/1/2 (fp32 gradients: fp32
   and bf16-autocast runs alike keep fp32 master weights, so gradients are reduced in fp32; --grad-bytes 2
   models communication_data_type bf16):
   - stage 0: one ring all-reduce of the gradients after the backward pass: 2 (N-1)/N * S bytes per worker;
   - stages 1 and 2 (DeepSpeed): reduce-scatter of the gradients to the optimizer-shard owners + all-gather
     of the updated fp32 weights: (N-1)/N * S + (N-1)/N * 4P, the same volume as stage 0 with fp32
     gradients (ZeRO paper, Rajbhandari et al. 2020); they shard memory, not traffic. Stage 1 reduces
     after the backward pass; stage 2 with overlap_comm reduces buckets during it (modelled as full overlap);
   plus the synchronized BatchNorm: one all-reduce forward and one backward per BatchNorm layer of
   (1 + 2 * features) floats, latency-bound.
3. Time of a collective (alpha-beta model, flat ring over one NIC per GPU): ring all-reduce
   2 (N-1) alpha + 2 (N-1)/N S / beta; reduce-scatter / all-gather (N-1) alpha + (N-1)/N S / beta.
   the BatchNorm all-reduces are latency-bound: the cheaper of a ring and a tree (2 log2 N hops).
4. Weak scaling (per-worker batch fixed): efficiency = t_compute / t_step with, for stages 0/1,
   t_step = t_compute + t_grad + t_bn, and for stage 2 t_step = max(t_compute, t_grad) + t_bn (BatchNorm
   collectives sit on the critical path).

Prints markdown tables (and --json for one JSON line per row).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

from _common import read_jsonl

# Defaults: single-node figures measured in this repository (BENCHMARKS.md, commands C6 and C11;
# 2-core CPU, fp32, batch 32 per step). Overridden by --measured or --step-ms.
DEFAULT_SHAPES = {
    "norman": {"genes": 5045, "perts": 5056},
    "genome": {"genes": 8000, "perts": 13674},
}
# Used when --measured has no row for a shape. norman: BENCHMARKS.md "Training cells/s vs the reference" (C6),
# 2026-12-05 (the per-worker loop, W=1, no Ray, fp32, batch 32, quiet 2-core CPU); genome: "Genome scale, time"
# (C11), the 2e6-cell W=1 row of the 2026-12-05 train-phase rerun (same machine, quiet).
DEFAULT_MEASURED = {
    "norman": {"step_ms": 232.6, "batch": 32, "source": "measured W=1 CPU, side-by-side table 2026-12-05"},
    "genome": {"step_ms": 424.3, "batch": 32, "source": "measured W=1 CPU, genome table 2026-12-05, 2e6 cells"},
}
LINKS_GBPS = (100.0, 400.0)
WORKERS = (8, 32, 128)


def count_parameters(num_genes: int, num_perts: int, hidden: int = 64) -> dict:
    """Parameters of the real GEARSModel (tiny ring graphs: edges do not change the count)."""
    import torch

    from gears_dist.model import GEARSModel
    from gears_dist.model.config import ModelConfig
    from gears_dist.model.layers import WeightedBatchNorm1d

    def ring(n: int) -> torch.Tensor:
        src = torch.arange(n)
        return torch.stack([src, (src + 1) % n])

    model = GEARSModel(ModelConfig(hidden_size=hidden, sync_batchnorm=True), num_genes, num_perts,
                       ring(num_perts), None, ring(num_genes), None)
    per_tensor = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(per_tensor.values())
    gene_level = sum(v for k, v in per_tensor.items()
                     if k.startswith(("gene_w", "gene_b", "gene_emb", "coexpr_emb", "pert_emb"))
                     or k.startswith("cross_gene.") and v >= num_genes * hidden)
    bns = [m for m in model.modules() if isinstance(m, WeightedBatchNorm1d)]
    return {"genes": num_genes, "perts": num_perts, "hidden": hidden, "params": total,
            "params_per_gene_and_embeddings": gene_level, "share_gene_level": gene_level / total,
            "largest": sorted(per_tensor.items(), key=lambda kv: -kv[1])[:6],
            "num_batchnorm": len(bns), "batchnorm_features": [int(m.weight.numel()) for m in bns]}


def ring_allreduce_s(nbytes: float, n: int, beta: float, alpha: float) -> float:
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / beta


def small_allreduce_s(nbytes: float, n: int, beta: float, alpha: float) -> float:
    """Latency-bound all-reduce: the cheaper of a ring and a binary tree (reduce + broadcast,
    2 log2(N) hops, full message per hop), as NCCL picks per message size."""
    tree = 2 * math.ceil(math.log2(max(n, 2))) * (alpha + nbytes / beta)
    return min(ring_allreduce_s(nbytes, n, beta, alpha), tree)


def ring_half_s(nbytes: float, n: int, beta: float, alpha: float) -> float:
    """reduce-scatter or all-gather."""
    return (n - 1) * alpha + (n - 1) / n * nbytes / beta


def comm_per_step(params: int, bn_features: list[int], stage: int, n: int, link_gbps: float, alpha_us: float,
                  grad_bytes: int = 4) -> dict:
    beta = link_gbps * 1e9 / 8  # bytes/s
    alpha = alpha_us * 1e-6
    s = params * grad_bytes
    if stage == 0:
        sent = 2 * (n - 1) / n * s
        t_grad = ring_allreduce_s(s, n, beta, alpha)
    elif stage in (1, 2):
        # reduce-scatter of the gradients to the optimizer-shard owners, all-gather of the updated fp32 weights
        sent = (n - 1) / n * s + (n - 1) / n * params * 4
        t_grad = ring_half_s(s, n, beta, alpha) + ring_half_s(params * 4, n, beta, alpha)
    else:
        raise ValueError(f"stage {stage}: expected 0, 1 or 2")
    t_bn = sum(2 * small_allreduce_s((1 + 2 * f) * 4, n, beta, alpha) for f in bn_features)
    return {"bytes_sent_per_worker": sent, "t_grad_s": t_grad, "t_bn_s": t_bn}


def optimizer_memory_bytes(params: int, stage: int, n: int) -> float:
    """fp32 weights (4) + fp32 grads (4) + Adam m, v (8) per parameter; ZeRO shards what its stage shards."""
    weights, grads, adam = 4 * params, 4 * params, 8 * params
    if stage >= 1:
        adam /= n
    if stage >= 2:
        grads /= n
    return weights + grads + adam


def efficiency(shape: dict, step_ms: float, stage: int, n: int, link: float, alpha_us: float,
               grad_bytes: int) -> dict:
    """Weak scaling: stage 0 and 1 reduce after the backward pass (no overlap); stage 2 with
    overlap_comm reduces gradient buckets during the backward pass (modelled as full overlap)."""
    c = comm_per_step(shape["params"], shape["batchnorm_features"], stage, n, link, alpha_us, grad_bytes)
    t = step_ms / 1e3
    step = (max(t, c["t_grad_s"]) if stage == 2 else t + c["t_grad_s"]) + c["t_bn_s"]
    return {**c, "efficiency": t / step, "t_step_s": step}


def break_even_ms(shape: dict, n: int, link: float, alpha_us: float, grad_bytes: int, target: float = 0.9) -> float:
    """Compute per step needed for `target` efficiency without overlap (stage 0)."""
    c = comm_per_step(shape["params"], shape["batchnorm_features"], 0, n, link, alpha_us, grad_bytes)
    t_comm = c["t_grad_s"] + c["t_bn_s"]
    return target / (1 - target) * t_comm * 1e3


def _measured_inputs(path: pathlib.Path) -> dict:
    """Steady-state W=1 step times from tools/bench_genome.py / bench_train.py JSON lines (largest store)."""
    best: dict = {}
    for row in read_jsonl(path):
        if row.get("phase", "train") == "train" and row.get("workers") == 1 and "step_time_ms" in row:
            key = "genome" if row.get("genes", 8000) > 6000 else "norman"
            if key not in best or row.get("num_cells", 0) >= best[key].get("num_cells", 0):
                best[key] = row
    return {k: {"step_ms": v["step_time_ms"], "batch": v["global_batch"],
                "source": f"measured W=1 CPU, {v.get('num_cells', 0):,} cells, load "
                          f"{v.get('load_avg_1m_start', '?')}-{v.get('load_avg_1m_end', '?')}"}
            for k, v in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measured", type=pathlib.Path, default=None, help="JSON lines from bench_genome/bench_train")
    p.add_argument("--step-ms", type=float, default=None, help="measured compute time per step (one worker)")
    p.add_argument("--batch", type=int, default=32, help="per-worker batch of that step")
    p.add_argument("--genes", type=int, default=None)
    p.add_argument("--perts", type=int, default=None)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--alpha-us", type=float, default=10.0, help="latency per ring hop (microseconds)")
    p.add_argument("--grad-bytes", type=int, default=4, choices=[2, 4], help="4: fp32 gradients; 2: bf16 reduce")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    shapes = dict(DEFAULT_SHAPES)
    if args.genes:
        shapes = {"custom": {"genes": args.genes, "perts": args.perts or args.genes}}
    counts = {k: count_parameters(v["genes"], v["perts"], args.hidden) for k, v in shapes.items()}

    inputs: dict = dict(DEFAULT_MEASURED)
    if args.measured is not None:
        inputs.update(_measured_inputs(args.measured))
    if args.step_ms is not None:
        inputs = {k: {"step_ms": args.step_ms, "batch": args.batch, "source": "--step-ms"} for k in shapes}

    print("### Parameters (counted on the real module)\n")
    print("| shape | G | P (GO nodes) | h | parameters | gene-level + embeddings | fp32 gradient MB | "
          "BatchNorm layers (synchronized) |")
    print("|---|---|---|---|---|---|---|---|")
    for k, c in counts.items():
        print(f"| {k} | {c['genes']:,} | {c['perts']:,} | {c['hidden']} | {c['params']:,} | "
              f"{c['params_per_gene_and_embeddings']:,} ({100 * c['share_gene_level']:.1f}%) | "
              f"{c['params'] * 4 / 2**20:.1f} | {c['num_batchnorm']} |")
    print()
    for k, c in counts.items():
        print(f"- {k}: largest tensors " + ", ".join(f"{n} {v:,}" for n, v in c["largest"]))
    print()

    print("### Communication and model-state memory per worker per optimizer step\n")
    print("| shape | ZeRO | workers | MB sent per worker | weights + grads + Adam MB per worker |")
    print("|---|---|---|---|---|")
    for k, c in counts.items():
        for stage in (0, 1, 2):
            for n in WORKERS:
                sent = comm_per_step(c["params"], c["batchnorm_features"], stage, n, 100.0, args.alpha_us,
                                     args.grad_bytes)["bytes_sent_per_worker"]
                print(f"| {k} | {stage} | {n} | {sent / 2**20:.1f} | "
                      f"{optimizer_memory_bytes(c['params'], stage, n) / 2**20:.1f} |")
    print()

    # Compute per step: the measured single-node figure (CPU), and the GPU target rate at a few
    # per-GPU batches -- a hypothesis, since no GPU step was measured here.
    target_rate = 200_000.0
    rows = []
    for k, c in counts.items():
        sources = []
        if k in inputs:
            sources.append((inputs[k]["source"], inputs[k]["step_ms"], inputs[k]["batch"]))
        for b in (32, 1024, 8192):
            sources.append(("GPU at the 200k cells/s target (not measured)", b / target_rate * 1e3, b))
        for label, step_ms, batch in sources:
            for link in LINKS_GBPS:
                row = {"shape": k, "compute": label, "step_ms": step_ms, "batch_per_worker": batch, "link_gbps": link}
                for n in WORKERS:
                    for stage in (0, 2):
                        e = efficiency(c, step_ms, stage, n, link, args.alpha_us, args.grad_bytes)
                        row[f"eff_z{stage}_n{n}"] = e["efficiency"]
                        row[f"t_comm_ms_z{stage}_n{n}"] = (e["t_grad_s"] + e["t_bn_s"]) * 1e3
                rows.append(row)
    print(f"### Weak-scaling efficiency (per-worker batch fixed; alpha {args.alpha_us:g} us per hop; "
          f"{args.grad_bytes}-byte gradients): ZeRO-0/1 (reduce after backward) / ZeRO-2 (overlapped)\n")
    print("| shape | compute per step (source) | per-worker batch | link | " + " | ".join(f"N={n}" for n in WORKERS) + " |")
    print("|---|---|---|---|" + "---|" * len(WORKERS))
    for r in rows:
        cells = " | ".join(f"{100 * r[f'eff_z0_n{n}']:.0f}% / {100 * r[f'eff_z2_n{n}']:.0f}%" for n in WORKERS)
        print(f"| {r['shape']} | {r['step_ms']:.2f} ms ({r['compute']}) | {r['batch_per_worker']} | "
              f"{r['link_gbps']:.0f} Gb/s | {cells} |")
    print()
    print("### Compute per step needed for 90% efficiency (ZeRO-0, no overlap)\n")
    print("| shape | link | " + " | ".join(f"N={n}" for n in WORKERS) + " |")
    print("|---|---|" + "---|" * len(WORKERS))
    for k, c in counts.items():
        for link in LINKS_GBPS:
            cells = " | ".join(f"{break_even_ms(c, n, link, args.alpha_us, args.grad_bytes):.1f} ms" for n in WORKERS)
            print(f"| {k} | {link:.0f} Gb/s | {cells} |")
    print()
    if args.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
