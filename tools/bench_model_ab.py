"""A/B benchmark of one GEARS training step (per-cell path): two versions of the model package in one process,
steps interleaved with each other and with the decoder's matmuls alone (the "matmul floor"), so that a shared,
noisy CPU slows all of them alike. Ratios are the result.

The "before" version is a copy of the gears_dist package importable under another name, e.g.

    mkdir -p /tmp/before && git archive HEAD gears_dist | tar -x -C /tmp/before
    mv /tmp/before/gears_dist /tmp/before/gears_dist_before
    grep -rl gears_dist /tmp/before/gears_dist_before | xargs sed -i 's/\\bgears_dist\\b/gears_dist_before/g'
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/bench_model_ab.py \\
        --before-path /tmp/before --batch 32 --steps 8

Both versions get the same initial parameters (same seed) and the same batches; the losses of their first
step are printed, as a check that they compute the same function. --after-option NAME=VALUE sets a ModelConfig
field of the "after" model only (e.g. an opt-in option).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

from bench_model import (
    HIDDEN,
    SCALES,
    _batches,
    _conditions,
    _graphs,
    decoder_flops_per_cell,
    decoder_matmuls,
)


def build(package: str, scale: str, batch: int, dtype: str, steps: int, options: dict, seed: int = 0):
    import torch

    mod = importlib.import_module(package)
    num_genes, num_perts = SCALES[scale]
    (go_i, go_w), (co_i, co_w) = _graphs(num_genes, num_perts)
    torch.manual_seed(seed)
    model = mod.GEARSModel(mod.ModelConfig(hidden_size=HIDDEN, fast_path="off", **options), num_genes, num_perts,
                           go_i, go_w, co_i, co_w).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    loss_cfg = mod.LossConfig()
    ctrl = torch.rand(num_genes, generator=torch.Generator().manual_seed(seed))
    bf16 = dtype == "bf16"

    def step(b):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred, logvar = model(b["x"], b["perts"], b["inverse"])
            loss = mod.gears_loss(pred, b["y"], b["inverse"], b["mask"], ctrl, loss_cfg, logvar)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    step.model = model  # for callers that change the model before timing
    return step, _batches(num_genes, _conditions(num_perts), batch, None, steps)


def parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-path", required=True, help="folder holding the renamed copy of gears_dist")
    parser.add_argument("--before-package", default="gears_dist_before.model")
    parser.add_argument("--after-package", default="gears_dist.model")
    parser.add_argument("--after-option", nargs="*", default=[], help="ModelConfig NAME=VALUE for 'after' only")
    parser.add_argument("--scale", default="norman", choices=sorted(SCALES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is less disturbed by other jobs on a shared CPU")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sys.path.insert(0, args.before_path)
    import torch
    total = args.warmup + args.steps
    runners = {}
    for dtype in args.dtypes:
        runners[f"before {dtype}"] = build(args.before_package, args.scale, args.batch, dtype, total, {})
        runners[f"after {dtype}"] = build(args.after_package, args.scale, args.batch, dtype, total,
                                          parse_options(args.after_option))
        runners[f"matmul {dtype}"] = (decoder_matmuls(args.batch * SCALES[args.scale][0], dtype)[0], [None] * total)
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    first_loss = {}
    t_start = time.time()
    for i in range(total):
        for name, (step, batches) in runners.items():
            t, c = time.perf_counter(), time.process_time()
            loss = step(batches[i])
            elapsed, cpu_s = time.perf_counter() - t, time.process_time() - c
            if i == 0 and loss is not None:
                first_loss[name] = loss
            if i >= args.warmup:
                times[name].append(elapsed)
                cpu[name].append(cpu_s)
    print(f"load average at the end: {os.getloadavg()}; {time.time() - t_start:.0f} s; scale {args.scale} "
          f"(G={SCALES[args.scale][0]}), B={args.batch}, {args.steps} timed rounds, "
          f"{torch.get_num_threads()} threads")
    flops = decoder_flops_per_cell(SCALES[args.scale][0]) * args.batch
    for dtype in args.dtypes:
        b, a, m = (statistics.median(times[f"{k} {dtype}"]) for k in ("before", "after", "matmul"))
        bmin, amin, mmin = (min(times[f"{k} {dtype}"]) for k in ("before", "after", "matmul"))
        print(f"{dtype}: median s/step before {b:.3f}, after {a:.3f} (after/before {a / b:.3f}; speed-up "
              f"{b / a:.2f}x); matmul floor {m:.3f} s ({flops / m / 1e9:.1f} GFLOP/s): before {b / m:.2f}x, "
              f"after {a / m:.2f}x the floor | min: before {bmin:.3f} after {amin:.3f} floor {mmin:.3f} "
              f"({bmin / mmin:.2f}x / {amin / mmin:.2f}x)")
        cb, ca, cm = (min(cpu[f"{k} {dtype}"]) for k in ("before", "after", "matmul"))
        print(f"   CPU time (min over rounds): before {cb:.3f} s, after {ca:.3f} s (after/before {ca / cb:.3f}), "
              f"floor {cm:.3f} s: before {cb / cm:.2f}x, after {ca / cm:.2f}x the floor")
        rounds = [x / y for x, y in zip(times[f"after {dtype}"], times[f"before {dtype}"])]
        print(f"   per-round after/before: {[round(r, 3) for r in rounds]} (median {statistics.median(rounds):.3f})")
        print(f"   first-step loss before {first_loss[f'before {dtype}']:.8f} after {first_loss[f'after {dtype}']:.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
