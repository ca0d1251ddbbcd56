"""Benchmark one GEARS training step: ours (per-cell path fp32/bf16, exact fast path) vs the reference model.

One run measures, side by side on the same machine, for each scale (genes G, GO nodes P) and batch size B:
  (a) ours, per-cell path (fast_path='off'), fp32 and bf16 (torch.autocast cpu bf16);
  (b) ours, exact fast path on batches of B cells drawn from U distinct perturbation sets;
  (c) the reference cell-gears 0.1.2 GEARS_Model with its own batching (a PyG Batch) and its loss_fct;
  (d) the matmul rate of this CPU at the decoder's shapes (the floor for the work that remains);
plus prediction of all 4,950 pairs of 100 genes with predict_delta.
A step = forward + loss + backward + gradient clipping + Adam step. Every configuration runs in a fresh
subprocess (so peak RSS and minor page faults are its own); batches are built before timing.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/bench_model.py --out bench_model.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _common import minor_faults, peak_rss_mb, rss_mb

SCALES = {"norman": (5045, 20000), "genome": (8000, 20000)}
NUM_CONDITIONS = 300  # ~ Norman: singles and pairs of ~100 genes
HIDDEN = 64


# ---------------------------------------------------------------------------------------------- helpers
def _usage():
    return minor_faults(), peak_rss_mb()


def _graphs(num_genes: int, num_perts: int, k: int = 20, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)

    def knn_like(n):
        # k random neighbours per node plus a self-loop, weights in (0.1, 1]: the shape of GEARS's graphs.
        src = torch.randint(0, n, (n * k,), generator=gen)
        dst = torch.arange(n).repeat_interleave(k)
        nodes = torch.arange(n)
        index = torch.stack([torch.cat([src, nodes]), torch.cat([dst, nodes])])
        return index, torch.cat([torch.rand(n * k, generator=gen) * 0.9 + 0.1, torch.ones(n)])

    return knn_like(num_perts), knn_like(num_genes)


def _conditions(num_perts: int, seed: int = 1):
    """Condition 0 = control; then singles and pairs over 100 GO nodes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    genes = torch.randperm(num_perts, generator=gen)[:100]
    sets = [()]
    sets += [(int(g),) for g in genes[:100]]
    while len(sets) < NUM_CONDITIONS:
        a, b = torch.randint(0, 100, (2,), generator=gen).tolist()
        if a != b:
            sets.append(tuple(sorted((int(genes[a]), int(genes[b])))))
    return sets


def _batches(num_genes, sets, batch, distinct, steps, seed=2):
    """Batches of `batch` cells; distinct=None: cells from uniformly random conditions (reference semantics),
    else exactly `distinct` sets per batch. Returns dicts with perts [U, K], inverse [B], x, y, mask."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        if distinct is None:
            cond = torch.randint(0, len(sets), (batch,), generator=gen)
        else:
            chosen = torch.randperm(len(sets), generator=gen)[:distinct]
            cond = chosen[torch.arange(batch) % distinct]
        uniq, inverse = torch.unique(cond, return_inverse=True)
        perts = torch.full((len(uniq), 2), -1, dtype=torch.long)
        for row, c in enumerate(uniq.tolist()):
            perts[row, : len(sets[c])] = torch.tensor(sets[c], dtype=torch.long)
        x = torch.rand(batch, num_genes, generator=gen)
        y = x + 0.1 * torch.randn(batch, num_genes, generator=gen)
        mask = torch.rand(len(uniq), num_genes, generator=gen) > 0.2
        out.append(dict(cond=cond, uniq=uniq, perts=perts, inverse=inverse, x=x, y=y, mask=mask))
    return out


def _time_steps(step, batches, warmup):
    for b in batches[:warmup]:
        step(b)
    flt0, _ = _usage()
    times = []
    for b in batches[warmup:]:
        t = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t)
    flt1, peak = _usage()
    return times, (flt1 - flt0) / max(1, len(times)), peak


# ---------------------------------------------------------------------------------------------- one config
def build_ours(cfg):
    """(step function, batches) for our model; cfg: scale, batch, distinct (None = random), dtype."""
    import torch

    from gears_dist.model import GEARSModel, LossConfig, ModelConfig, gears_loss

    num_genes, num_perts = SCALES[cfg["scale"]]
    (go_i, go_w), (co_i, co_w) = _graphs(num_genes, num_perts)
    fast = "on" if cfg["distinct"] is not None else "off"
    model = GEARSModel(ModelConfig(hidden_size=HIDDEN, fast_path=fast), num_genes, num_perts,
                       go_i, go_w, co_i, co_w).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    loss_cfg = LossConfig()
    ctrl = torch.rand(num_genes)
    bf16 = cfg["dtype"] == "bf16"
    sets = _conditions(num_perts)
    batches = _batches(num_genes, sets, cfg["batch"], cfg["distinct"], cfg["warmup"] + cfg["steps"])

    def step(b):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred, logvar = model(b["x"], b["perts"], b["inverse"])
            loss = gears_loss(pred, b["y"], b["inverse"], b["mask"], ctrl, loss_cfg, logvar)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()

    return step, batches


def build_reference(cfg):
    """(step function, batches) for the reference GEARS_Model with PyG batches and its loss_fct."""
    import numpy as np
    import torch
    from gears.model import GEARS_Model
    from gears.utils import loss_fct
    from torch_geometric.data import Batch, Data

    num_genes, num_perts = SCALES[cfg["scale"]]
    (go_i, go_w), (co_i, co_w) = _graphs(num_genes, num_perts)
    args = dict(num_genes=num_genes, num_perts=num_perts, hidden_size=HIDDEN, uncertainty=False,
                num_go_gnn_layers=1, decoder_hidden_size=16, num_gene_gnn_layers=1, no_perturb=False,
                G_coexpress=co_i, G_coexpress_weight=co_w, G_go=go_i, G_go_weight=go_w, device="cpu")
    model = GEARS_Model(args).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    ctrl = torch.rand(num_genes)
    sets = _conditions(num_perts)
    names = ["ctrl" if not s else "+".join(map(str, s)) for s in sets]
    raw = _batches(num_genes, sets, cfg["batch"], None, cfg["warmup"] + cfg["steps"])
    batches = []
    for b in raw:
        cond = b["cond"].tolist()
        dict_filter = {names[c]: np.where(b["mask"][r].numpy())[0] for r, c in enumerate(b["uniq"].tolist())}
        data = [Data(x=b["x"][i].reshape(-1, 1), y=b["y"][i].reshape(1, -1), pert_idx=list(sets[c]) or [-1],
                     pert=names[c]) for i, c in enumerate(cond)]
        batches.append(dict(batch=Batch.from_data_list(data), dict_filter=dict_filter))

    def step(b):
        opt.zero_grad(set_to_none=True)
        batch = b["batch"]
        pred = model(batch)
        loss = loss_fct(pred, batch.y, batch.pert, ctrl=ctrl, dict_filter=b["dict_filter"], direction_lambda=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()

    return step, batches


def run_ours(cfg):
    step, batches = build_ours(cfg)
    base_rss = rss_mb()
    times, faults, peak = _time_steps(step, batches, cfg["warmup"])
    return dict(times=times, minor_faults_per_step=faults, peak_rss_mb=peak, base_rss_mb=base_rss)


def run_reference(cfg):
    step, batches = build_reference(cfg)
    base_rss = rss_mb()
    times, faults, peak = _time_steps(step, batches, cfg["warmup"])
    return dict(times=times, minor_faults_per_step=faults, peak_rss_mb=peak, base_rss_mb=base_rss)


def run_interleaved(cfg):
    """Several models in one process, their steps alternating (reference, ours per-cell fp32 and bf16, ours
    fast path on batches of U distinct sets), so that a shared, noisy CPU slows all of them alike: the
    ratios are the robust figures. Minor page faults are counted per model step."""
    common = dict(scale=cfg["scale"], batch=cfg["batch"], distinct=None, warmup=cfg["warmup"], steps=cfg["steps"])
    runners = {}
    if cfg["reference"]:
        runners["reference"] = build_reference(common)
    runners["ours fp32"] = build_ours(dict(common, dtype="fp32"))
    runners["ours bf16"] = build_ours(dict(common, dtype="bf16"))
    for u in cfg["distinct"]:
        runners[f"ours bf16 fast U={u}"] = build_ours(dict(common, dtype="bf16", distinct=u))
    runners[f"ours fp32 fast U={cfg['distinct'][0]}"] = build_ours(dict(common, dtype="fp32",
                                                                        distinct=cfg["distinct"][0]))
    times = {name: [] for name in runners}
    faults = {name: [] for name in runners}
    for i in range(cfg["warmup"] + cfg["steps"]):
        for name, (step, batches) in runners.items():
            f0, _ = _usage()
            t = time.perf_counter()
            step(batches[i])
            elapsed = time.perf_counter() - t
            f1, _ = _usage()
            if i >= cfg["warmup"]:
                times[name].append(elapsed)
                faults[name].append(f1 - f0)
    return dict(interleaved=times, faults=faults)


def decoder_flops_per_cell(num_genes: int, hidden: int = HIDDEN) -> float:
    """Multiply-add work of one training step per cell for the per-(cell, gene) decoder of our per-cell
    path: recovery MLP h -> 2h -> h plus the per-gene map, forward (x1) and backward (x2), as FLOPs."""
    forward = 2 * (hidden * 2 * hidden + 2 * hidden * hidden + hidden)
    cross = 2 * num_genes * hidden  # cross-gene first layer, per cell (per gene: 2h)
    return 3 * (num_genes * forward + cross)


def decoder_matmuls(rows: int, dtype: str):
    """The decoder's recovery-MLP matmuls (forward, grad-input, grad-weight of h -> 2h -> h) at `rows` rows:
    a function that runs them once (the "matmul floor" of a step at rows = B * G), and their FLOPs."""
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    h = HIDDEN
    shapes = [(h, 2 * h), (2 * h, h)]
    ops = []
    for k, n in shapes:
        a, w, g = torch.randn(rows, k).to(dt), torch.randn(n, k).to(dt), torch.randn(rows, n).to(dt)
        ops += [lambda a=a, w=w: torch.nn.functional.linear(a, w), lambda g=g, w=w: g @ w,
                lambda g=g, a=a: g.t() @ a]

    def run(_batch=None):
        for op in ops:
            op()

    return run, 3 * sum(2 * rows * k * n for k, n in shapes)


def run_matmul(cfg):
    """This CPU's rate on the decoder's matmuls (forward, grad-input, grad-weight) at N = B * G rows."""
    run, flops = decoder_matmuls(cfg["batch"] * SCALES[cfg["scale"]][0], cfg["dtype"])
    run()
    times = []
    for _ in range(cfg["steps"]):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return dict(times=times, gflops=flops / statistics.median(times) / 1e9)


def run_predict(cfg):
    """predict_delta for all 4,950 pairs of 100 genes (eval mode)."""
    import torch

    from gears_dist.model import GEARSModel, ModelConfig

    num_genes, num_perts = cfg["genes"], SCALES["norman"][1]
    (go_i, go_w), (co_i, co_w) = _graphs(num_genes, num_perts)
    model = GEARSModel(ModelConfig(hidden_size=HIDDEN), num_genes, num_perts, go_i, go_w, co_i, co_w).eval()
    genes = torch.arange(100)
    pairs = torch.combinations(genes, 2)
    bf16 = cfg["dtype"] == "bf16"
    times = []
    for _ in range(cfg["steps"] + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            delta = model.predict_delta(pairs)
        times.append(time.perf_counter() - t)
    assert delta.shape == (4950, num_genes)
    _, peak = _usage()
    return dict(times=times[1:], peak_rss_mb=peak, pairs=int(pairs.shape[0]),
                flops=float(pairs.shape[0] * num_genes * 2 * (HIDDEN * 2 * HIDDEN * 2 + HIDDEN)))


RUNNERS = {"ours": run_ours, "reference": run_reference, "matmul": run_matmul, "predict": run_predict,
           "interleaved": run_interleaved}


# ---------------------------------------------------------------------------------------------- driver
def plan(args):
    configs = []
    for scale in args.scales:
        for batch in args.batches:
            common = dict(scale=scale, batch=batch, warmup=args.warmup, steps=args.steps)
            distinct = args.distinct or sorted({4, 16, batch // 4} - {batch})
            configs.append(dict(kind="interleaved", reference=batch <= args.reference_max_batch,
                                distinct=distinct, **common))
            for dtype in ("fp32", "bf16"):
                configs.append(dict(kind="matmul", dtype=dtype, **common))
            if args.memory:
                # Peak RSS and page faults of one configuration alone (its own process).
                mem = dict(common, warmup=1, steps=1)
                if batch <= args.reference_max_batch:
                    configs.append(dict(kind="reference", dtype="fp32", distinct=None, **mem))
                for dtype in ("fp32", "bf16"):
                    configs.append(dict(kind="ours", dtype=dtype, distinct=None, **mem))
                configs.append(dict(kind="ours", dtype="bf16", distinct=4, **mem))
    for genes, dtype in ((500, "fp32"), (500, "bf16"), (SCALES["norman"][0], "bf16")):
        configs.append(dict(kind="predict", genes=genes, dtype=dtype, steps=1))
    return configs


def run_child(config: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return dict(config, error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return dict(config, **json.loads(proc.stdout.strip().splitlines()[-1]))


def summarize(results: list[dict]) -> str:
    header = ("| scale | B | model | distinct sets U | dtype | s/step (median) | cells/s | peak RSS MB | "
              "step RSS MB | minor faults/step | vs reference |")
    lines = [header, "|" + "---|" * 11]
    ref_speed = {}
    for r in results:
        if r["kind"] == "reference" and "times" in r:
            ref_speed[(r["scale"], r["batch"])] = r["batch"] / statistics.median(r["times"])
    matmul = {(r["scale"], r["batch"], r["dtype"]): r["gflops"] for r in results
              if r["kind"] == "matmul" and "gflops" in r}
    notes = []
    for r in results:
        if r["kind"] not in ("ours", "reference"):
            continue
        if "error" in r:
            lines.append(f"| {r['scale']} | {r['batch']} | {r['kind']} | {r.get('distinct')} | {r['dtype']} | "
                         f"error: {r['error']} |||||")
            continue
        med = statistics.median(r["times"])
        speed = r["batch"] / med
        ref = ref_speed.get((r["scale"], r["batch"]))
        ratio = f"{speed / ref:.2f}x" if ref else "n/a"
        u = "B (random)" if r.get("distinct") is None else str(r["distinct"])
        lines.append(f"| {r['scale']} | {r['batch']} | {r['kind']} | {u} | {r['dtype']} | {med:.3f} | {speed:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['base_rss_mb']:.0f} | "
                     f"{r['minor_faults_per_step']:.0f} | {ratio} |")
        if r["kind"] == "ours" and r.get("distinct") is None:
            genes = SCALES[r["scale"]][0]
            achieved = decoder_flops_per_cell(genes) * r["batch"] / med / 1e9
            rate = matmul.get((r["scale"], r["batch"], r["dtype"]))
            if rate:
                notes.append(f"- {r['scale']} B={r['batch']} {r['dtype']}: decoder work {achieved:.1f} GFLOP/s "
                             f"achieved vs {rate:.1f} GFLOP/s measured matmul rate at these shapes "
                             f"(step time = {rate / achieved:.2f}x the matmul floor)")
    for r in results:
        if r["kind"] == "interleaved" and "interleaved" in r:
            med = {name: statistics.median(t) for name, t in r["interleaved"].items()}
            base = med.get("reference")
            notes.append(f"- interleaved steps, {r['scale']} (G={SCALES[r['scale']][0]}) B={r['batch']}:")
            for name, m in med.items():
                ratio = f", {base / m:.2f}x the reference" if base else ""
                flt = statistics.median(r["faults"][name])
                line = f"  - {name}: {m:.2f} s/step, {r['batch'] / m:.1f} cells/s{ratio}, {flt:.0f} minor faults/step"
                dtype = "bf16" if "bf16" in name else "fp32"
                rate = matmul.get((r["scale"], r["batch"], dtype))
                if rate and "fast" not in name and name != "reference":
                    achieved = decoder_flops_per_cell(SCALES[r["scale"]][0]) * r["batch"] / m / 1e9
                    line += (f"; decoder work {achieved:.1f} GFLOP/s vs matmul rate {rate:.1f} GFLOP/s at these "
                             f"shapes (step = {rate / achieved:.2f}x the matmul floor)")
                notes.append(line)
    for r in results:
        if r["kind"] == "predict":
            if "error" in r:
                notes.append(f"- predict_delta G={r['genes']} {r['dtype']}: error {r['error']}")
                continue
            med = statistics.median(r["times"])
            notes.append(f"- predict_delta, all {r['pairs']} pairs of 100 genes, G={r['genes']}, {r['dtype']}: "
                         f"{med:.3f} s ({r['flops'] / med / 1e9:.1f} GFLOP/s decoder work; "
                         f"peak RSS {r['peak_rss_mb']:.0f} MB)")
    return "\n".join(lines + [""] + notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", default=["norman", "genome"], choices=sorted(SCALES))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reference-max-batch", type=int, default=32,
                        help="largest batch to run the reference at (its memory grows ~5 KB per cell x gene)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="kinds to run (interleaved, ours, reference, matmul, predict)")
    parser.add_argument("--distinct", nargs="*", type=int, default=None,
                        help="numbers of distinct sets U for the fast-path runs (default 4, 16, B/4)")
    parser.add_argument("--memory", action="store_true",
                        help="also run single configurations in their own process for peak RSS")
    parser.add_argument("--out", default=None, help="write all raw results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        cfg = json.loads(args.child)
        print(json.dumps(RUNNERS[cfg["kind"]](cfg)))
        return 0
    results = []
    for cfg in plan(args):
        if args.only and cfg["kind"] not in args.only:
            continue
        res = run_child(cfg)
        results.append(res)
        print(json.dumps(res), flush=True)
    print(summarize(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
