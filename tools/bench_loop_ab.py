"""A/B of the per-worker training loop (gears_dist.train.loop.train_epoch, DeepSpeed engine, streaming loader) with
the model's fused BatchNorm moments (gears_dist.model.layers.FUSED_MOMENTS) on and off, in one process, alternating
blocks of steps so that a shared CPU slows both alike; plus where a step's time goes (loader wait, forward, loss,
backward, DeepSpeed step, the loss read-back), minor page faults per step, and a plain-torch step (Adam +
clip_grad_value_, no DeepSpeed) of a copy of the same model on the same batches.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 DS_ACCELERATOR=cpu \\
    .venv/bin/python tools/bench_loop_ab.py STORE [--precision fp32|bf16] [--zero 1] [--blocks 4] [--block-steps 5]

STORE: a store with the split and graphs prepared (``prepare_run``; e.g. the synthetic ``norman`` preset written by
``gears_dist.data.synthetic.write_store`` with 20,000 cells). Batch 32, configs/norman.yaml otherwise.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import pathlib
import resource
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--blocks", type=int, default=4, help="blocks per variant (alternating)")
    p.add_argument("--block-steps", type=int, default=5)
    p.add_argument("--stages", type=int, default=8, help="steps timed stage by stage (and plain torch)")
    args = p.parse_args()
    import torch

    from gears_dist.config import deep_merge
    from gears_dist.model import gears_loss, layers
    from gears_dist.train import loop
    from gears_dist.train.config import load_run_config

    repo = pathlib.Path(__file__).resolve().parents[1]
    over = {"name": "bench", "train": {"epochs": 1, "max_steps_per_epoch": args.block_steps, "log_every": 10**6},
            "deepspeed": {"zero_stage": args.zero, "precision": args.precision}, "tracking": {"enabled": False}}
    cfg = load_run_config(repo / "configs" / "norman.yaml", deep_merge({}, over))
    keys = loop.prepare_run(cfg, args.store, 1)
    w = loop.setup_worker(cfg, args.store, 0, 1, keys)

    # 1. the loop itself, FUSED_MOMENTS on / off in alternating blocks (each block: train_epoch of block-steps steps)
    rates = {True: [], False: []}
    faults = {True: [], False: []}
    for block in range(2 * args.blocks + 2):
        fused = block % 2 == 0
        layers.FUSED_MOMENTS = fused
        f0 = _faults()
        stats = loop.train_epoch(w, block)
        if block >= 2:  # the first block of each variant warms up
            rates[fused].append(stats["cells_per_s"])
            faults[fused].append((_faults() - f0) / stats["train_steps"])
    layers.FUSED_MOMENTS = True

    # 2. one step stage by stage (live loader), and a plain torch step of a copy on the same batches
    plain = copy.deepcopy(w.engine.module)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3, weight_decay=5e-4)
    bf16 = args.precision == "bf16"
    stages = ["loader_wait", "forward", "loss", "backward", "ds_step", "loss_item"]
    times = {k: [] for k in [*stages, "ds_total", "plain_total"]}
    stage_faults = {k: [] for k in stages}
    w.engine.train()
    plain.train()
    it = w.loader.epoch_batches(10**4, 0)
    for i in range(args.stages):
        marks = [(time.perf_counter(), _faults())]
        b = next(it)
        marks.append((time.perf_counter(), _faults()))
        with loop._autocast(w):
            pred, _ = w.engine(b.x, b.perts, b.inverse)
        marks.append((time.perf_counter(), _faults()))
        loss = gears_loss(pred.float(), b.y, b.inverse, b.gene_mask, w.ctrl_mean, w.cfg.loss)
        marks.append((time.perf_counter(), _faults()))
        w.engine.backward(loss)
        marks.append((time.perf_counter(), _faults()))
        w.engine.step()
        marks.append((time.perf_counter(), _faults()))
        float(loss.detach())
        marks.append((time.perf_counter(), _faults()))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred, _ = plain(b.x, b.perts, b.inverse)
        loss = gears_loss(pred.float(), b.y, b.inverse, b.gene_mask, w.ctrl_mean, w.cfg.loss)
        loss.backward()
        torch.nn.utils.clip_grad_value_(plain.parameters(), 1.0)
        opt.step()
        if i >= 2:
            for k, (a, z) in zip(stages, itertools.pairwise(marks)):
                times[k].append(z[0] - a[0])
                stage_faults[k].append(z[1] - a[1])
            times["ds_total"].append(marks[-1][0] - marks[0][0])
            times["plain_total"].append(time.perf_counter() - t0)
    new, old = statistics.median(rates[True]), statistics.median(rates[False])
    print(json.dumps({
        "precision": args.precision, "zero": args.zero, "batch": cfg.data.loader.batch_size,
        "loop_cells_per_s": {"fused_moments": round(new, 1), "before": round(old, 1), "ratio": round(new / old, 3),
                             "blocks": {"fused": [round(r, 1) for r in rates[True]],
                                        "before": [round(r, 1) for r in rates[False]]}},
        "loop_minor_faults_per_step": {"fused": statistics.median(faults[True]),
                                       "before": statistics.median(faults[False])},
        "stage_ms": {k: round(1000 * statistics.median(v), 1) for k, v in times.items()},
        "stage_minor_faults": {k: statistics.median(v) for k, v in stage_faults.items()},
        "ds_over_plain": round(statistics.median(times["ds_total"]) / statistics.median(times["plain_total"]), 3),
        "load_average": os.getloadavg()[0], "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
