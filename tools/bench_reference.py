"""Side by side with the reference (cell-gears 0.1.2): data preparation, training steps, prediction.

One invocation measures both implementations back to back on the same GEARS-style h5ad, each step in its own
process (wall time, peak RSS, minor page faults), and prints the ours/reference ratios:

    export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184
    .venv/bin/python tools/bench_reference.py run --screen norman   # ~91k cells x 5,045 genes (tables 1-3; the
        # reference's whole-screen preparation is stopped after --ref-prepare-max-s = 900 s: lower bounds)
    .venv/bin/python tools/bench_reference.py run --screen subset   # the real Norman subset (3,275 x 500)
    .venv/bin/python tools/bench_reference.py memfit --cells 10000 30000   # reference prep memory vs cells
    .venv/bin/python tools/bench_reference.py memfit --cells 91000 --max-s 1200   # stopped at 20 min: lower bounds

Sides:
- reference: `tools/reference/run_reference.py all` in its own venv (`tools/reference/env.py`): PertData
  new_data_process + simulation split (seed 1) + dataloaders ("prepare"), GEARS.model_initialize (co-expression
  and GO graphs), N training steps with GEARS.train's loop body at batch 32, hidden 64, its loss_fct, and
  GEARS.predict of the split's test conditions -- one process, so its data are prepared once.
- ours: `gears-dist ingest` (h5ad -> store), then `prepare_run` (split + GO/co-expression graphs, as
  `gears-dist train` does it), then the per-worker loop (`gears_dist.train.loop.run_single`, configs/norman.yaml,
  no Ray) for 2 epochs of N steps in fp32 and in bf16 (the second epoch is timed), then
  `TrainedPredictor.predict_delta` of the same test conditions.
Peak RSS = max(polled RSS of the process tree every 0.1 s, the child's ru_maxrss); minor faults from wait4.
Results are appended as JSON lines to .bench/reference/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench" / "reference"
RESULTS = BENCH / "results.jsonl"
SUBSET_SRC = REPO / "tests" / "data" / "norman19_k562_subset.h5ad"
OURS_PY = REPO / ".venv" / "bin" / "python"
GIB = 2**30


# ------------------------------------------------------------------------------------------ measuring
def measure(cmd: list[str], label: str, env: dict | None = None, poll_s: float = 0.1,
            max_s: float | None = None) -> dict:
    """Run `cmd`, polling the RSS of its process tree; returns wall, peak RSS, minor faults, the last JSON line.
    With max_s, a run still going after max_s wall seconds is killed (SIGKILL, whole tree) and recorded with
    `timed_out`: its wall, CPU seconds and peak RSS are then lower bounds of what a full run needs, and
    `progress_tail` keeps the end of its stderr (the last stage it announced)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
    out_chunks: list[str] = []
    import threading

    def drain(stream, sink):
        for line in stream:
            sink.append(line)

    err_lines: list[str] = []
    threads = [threading.Thread(target=drain, args=(proc.stdout, out_chunks), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, err_lines), daemon=True)]
    for t in threads:
        t.start()
    peak = 0
    root = psutil.Process(proc.pid)
    timed_out = False
    while proc.poll() is None:
        if max_s is not None and time.perf_counter() - t0 > max_s:
            timed_out = True
            for p in [*root.children(recursive=True), root]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            proc.wait()
            break
        try:
            procs = [root, *root.children(recursive=True)]
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    # Popen reaped the child in poll(); its rusage (and its reaped descendants') is in RUSAGE_CHILDREN deltas.
    record = {"label": label, "cmd": " ".join(map(str, cmd)), "rc": proc.returncode, "wall_s": round(wall, 2),
              "peak_tree_rss_mb": round(peak / 2**20, 1)}
    record["result"] = _common.last_json_line("".join(out_chunks))
    if timed_out:
        record["timed_out"] = True
        record["max_s"] = max_s
        record["progress_tail"] = "".join(err_lines)[-600:]
        print(f"[bench] {label} stopped after {max_s} s (lower bounds recorded)", file=sys.stderr, flush=True)
    elif proc.returncode != 0:
        record["stderr_tail"] = "".join(err_lines[-30:])
        print(f"[bench] {label} FAILED rc={proc.returncode}\n{record['stderr_tail']}", file=sys.stderr, flush=True)
    return record


class ChildUsage:
    """Minor faults and CPU seconds of children reaped while in the block (getrusage(RUSAGE_CHILDREN) deltas)."""

    def __enter__(self):
        self.r0 = _common.usage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        r1 = _common.usage(resource.RUSAGE_CHILDREN)
        self.minor_faults = r1["minor_faults"] - self.r0["minor_faults"]
        self.cpu_s = r1["cpu_s"] - self.r0["cpu_s"]
        self.maxrss_mb = r1["maxrss_mb"]  # max over all children so far (only grows)


def run_measured(cmd: list[str], label: str, env: dict | None = None, max_s: float | None = None) -> dict:
    with ChildUsage() as u:
        rec = measure(cmd, label, env, max_s=max_s)
    rec["minor_faults"] = u.minor_faults
    rec["cpu_s"] = round(u.cpu_s, 1)
    rec["peak_rss_mb"] = rec["peak_tree_rss_mb"]
    rec["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(f"[bench] {label}: {rec['wall_s']} s, peak {rec['peak_rss_mb']:.0f} MB, {rec['minor_faults']} minor faults, "
          f"cpu {rec['cpu_s']} s, load {rec['load_avg'][0]}", file=sys.stderr, flush=True)
    _append({"kind": "step", **{k: v for k, v in rec.items() if k != "result"}, "result": rec.get("result")})
    return rec


def _append(obj: dict) -> None:
    _common.append_jsonl(RESULTS, obj, echo=False)


def bench_env() -> dict:
    env = _common.bench_env()
    env.setdefault("TQDM_DISABLE", "1")
    return env


def wait_for_memory(need_gib: float, max_wait_s: float) -> dict:
    import psutil

    t0 = time.perf_counter()
    avail = psutil.virtual_memory().available / GIB
    while avail < need_gib and time.perf_counter() - t0 < max_wait_s:
        print(f"[bench] {avail:.1f} GiB available < {need_gib} GiB needed; waiting", file=sys.stderr, flush=True)
        time.sleep(30)
        avail = psutil.virtual_memory().available / GIB
    return {"available_gib": round(avail, 1), "waited_s": round(time.perf_counter() - t0), "enough": avail >= need_gib}


# ------------------------------------------------------------------------------------------ inputs
def screen_h5ad(screen: str, cells: int | None = None) -> Path:
    env = bench_env()
    if screen == "subset":
        path = BENCH / "norman_subset.h5ad"
        cmd = [str(OURS_PY), "tools/reference/screens.py", "subset", str(SUBSET_SRC), str(path)]
    else:
        n = cells or 91000
        path = BENCH / f"norman_{n}.h5ad"
        cmd = [str(OURS_PY), "tools/reference/screens.py", "synthetic", str(path), "--cells", str(n)]
    if not path.exists():
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return path


def reference_python() -> Path:
    from reference.env import ensure_reference_env  # tools/reference/env.py (tools/ is this script's folder)

    # not resolve(): the venv python is a symlink to the base interpreter, which would lose the venv
    return Path(os.path.abspath(REPO / ensure_reference_env(REPO / ".bench" / "reference-venv")))


def reference_go_files(h5ad: Path, data_dir: Path) -> dict:
    """The reference's GO files (its downloads), written by us; timed but not part of its preparation."""
    return run_measured([str(OURS_PY), "tools/reference/go_files.py", str(data_dir), "--h5ad", str(h5ad)],
                        "reference GO files (ours, replaces its downloads)", bench_env())


def reference_prepare(py_ref: Path, h5ad: Path, data_dir: Path, out_json: Path, label: str, env: dict,
                      max_s: float | None, graphs: bool = False) -> dict:
    """The reference's data preparation (+ model_initialize with graphs) alone in its process, stopped after
    max_s wall seconds if given (then its record holds lower bounds)."""
    return run_measured([str(py_ref), "tools/reference/run_reference.py", "prepare", str(h5ad), str(data_dir),
                         *(["--graphs"] if graphs else []), "--out", str(out_json)], label, env, max_s=max_s)


# ------------------------------------------------------------------------------------------ our side (children)
def _cfg(precision: str, steps: int, epochs: int):
    from gears_dist.config import deep_merge
    from gears_dist.train.config import load_run_config

    over = {"name": "bench-reference", "tracking": {"enabled": False},
            "train": {"epochs": epochs, "max_steps_per_epoch": steps, "log_every": 10**6},
            "deepspeed": {"precision": precision, "zero_stage": 0},
            # every core, as the reference (torch's default); a worker uses scaling.cpus_per_worker threads
            "scaling": {"num_workers": 1, "max_failures": 0, "cpus_per_worker": os.cpu_count() or 1}}
    return load_run_config(REPO / "configs" / "norman.yaml", deep_merge({}, over))


def child_graphs(args) -> None:
    from gears_dist.train.loop import prepare_run

    t0 = time.perf_counter()
    keys = prepare_run(_cfg("fp32", 1, 1), args.store, 1)
    print(json.dumps({"keys": keys, "wall_s": time.perf_counter() - t0}))


def child_steps(args) -> None:
    from gears_dist.train.loop import run_single

    cfg = _cfg(args.precision, args.steps, 2)
    t0 = time.perf_counter()
    summary = run_single(cfg, args.store, args.out)
    hist = summary["history"]
    timed = hist[-1]
    print(json.dumps({"precision": args.precision, "steps_per_epoch": args.steps, "batch": 32,
                      "cells_per_s": timed["cells_per_s"], "step_time_ms": timed["step_time_ms"],
                      "cells_per_s_epochs": [h["cells_per_s"] for h in hist],
                      "worker_peak_rss_mb": timed.get("peak_rss_mb"), "fast_path": cfg.model.fast_path,
                      "wall_s": time.perf_counter() - t0}))


def child_predict(args) -> None:
    import torch

    from gears_dist.evaluate.predict import TrainedPredictor

    sets = json.loads(Path(args.sets).read_text())
    t0 = time.perf_counter()
    pred = TrainedPredictor.load(args.run, store=args.store)
    t1 = time.perf_counter()
    delta = pred.predict_delta(sets)
    t2 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred.predict_delta(sets)
    t3 = time.perf_counter()
    print(json.dumps({"num_conditions": len(sets), "load_s": t1 - t0, "predict_s": t2 - t1,
                      "predict_bf16_autocast_s": t3 - t2, "shape": list(delta.shape)}))


# ------------------------------------------------------------------------------------------ the run
def ours_name(gears_condition: str) -> str:
    genes = [g for g in gears_condition.split("+") if g != "ctrl"]
    return "+".join(genes)


def run_screen(args) -> dict:
    env = bench_env()
    h5ad = screen_h5ad(args.screen)
    tag = args.screen
    store = BENCH / f"{tag}.zarr"
    data_dir = BENCH / f"{tag}_data"
    runs = BENCH / f"{tag}_runs"
    out: dict = {"kind": "run", "screen": tag, "h5ad": str(h5ad), "steps": args.steps,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_start": os.getloadavg()}
    py_ref = reference_python()

    # (1) data preparation -- ours
    if args.resume_after_prepare:
        # an interrupted run: take our preparation steps from its records (the store is already built)
        steps = _common.read_jsonl(RESULTS)
        for key, label in (("ours_ingest", f"{tag}: ours ingest"),
                           ("ours_graphs", f"{tag}: ours split + graphs (prepare_run)")):
            out[key] = [r for r in steps if r.get("kind") == "step" and r.get("label") == label][-1]
            out[key]["resumed"] = True
    else:
        out["ours_ingest"] = run_measured([str(REPO / ".venv" / "bin" / "gears-dist"), "ingest", str(h5ad), str(store),
                                           "--overwrite"], f"{tag}: ours ingest", env)
        out["ours_graphs"] = run_measured([str(OURS_PY), __file__, "_graphs", str(store)],
                                          f"{tag}: ours split + graphs (prepare_run)", env)
    # (1) data preparation -- reference (+ model_initialize, steps, predict in the same process)
    if not (data_dir / "go_essential_all").exists() or not args.resume_after_prepare:
        out["go_files"] = reference_go_files(h5ad, data_dir)
    ref_h5ad, ref_data_dir, reuse = h5ad, data_dir, False
    if args.screen == "norman":
        out["memory_gate"] = gate = wait_for_memory(args.need_gib, args.max_wait_s)
        full_done = False
        if gate["available_gib"] >= args.min_gib:
            # Its whole-screen preparation (+ model_initialize), alone, stopped after --ref-prepare-max-s: at
            # Norman size it runs for well over half an hour here (its per-cell loop slows as the screen grows),
            # so a stopped run gives lower bounds, and the table still finishes in ~30 minutes.
            out["reference_prepare_full"] = rec = reference_prepare(
                py_ref, h5ad, data_dir, BENCH / f"{tag}_reference_prepare.json",
                f"{tag}: reference prepare + model_initialize (whole screen)", env, args.ref_prepare_max_s,
                graphs=True)
            full_done = not rec.get("timed_out") and rec.get("rc") == 0
        else:
            print(f"[bench] only {gate['available_gib']} GiB available (< {args.min_gib}): the reference's "
                  f"whole-screen preparation is not run", file=sys.stderr, flush=True)
        if full_done:
            reuse = True  # its steps and prediction on its own prepared screen (reloaded, load timed apart)
        else:
            # Its steps and prediction cost the same per cell on a smaller draw of the same screen (same genes and
            # conditions), which it prepares within minutes.
            n = args.fallback_cells
            out["reference_fallback_cells"] = n
            print(f"[bench] the reference's steps and prediction run on {n} cells of the same screen",
                  file=sys.stderr, flush=True)
            ref_h5ad = screen_h5ad("norman", n)
            ref_data_dir = BENCH / f"{tag}_{n}_data"
            out["go_files_fallback"] = reference_go_files(ref_h5ad, ref_data_dir)
    ref_json = BENCH / f"{tag}_reference_all.json"
    out["reference"] = run_measured([str(py_ref), "tools/reference/run_reference.py", "all", str(ref_h5ad),
                                     str(ref_data_dir), "--num-steps", str(args.ref_steps), "--out", str(ref_json),
                                     "--predict-max", str(args.predict_max)]
                                    + (["--reuse"] if reuse else []),
                                    f"{tag}: reference prepare+init+steps+predict", env)
    ref = out["reference"].get("result") or {}
    # (2) training -- ours fp32, bf16
    for precision in ("fp32", "bf16"):
        shutil.rmtree(runs / precision, ignore_errors=True)
        out[f"ours_steps_{precision}"] = run_measured(
            [str(OURS_PY), __file__, "_steps", str(store), "--precision", precision, "--steps", str(args.steps),
             "--out", str(runs / precision)], f"{tag}: ours {args.steps} steps x 2 epochs {precision}", env)
    # (3) prediction of the reference's test conditions -- ours
    test = (ref.get("predict") or {}).get("conditions") or []
    if test:
        sets_file = BENCH / f"{tag}_test_sets.json"
        sets_file.write_text(json.dumps([ours_name(c) for c in test if c != "ctrl"]))
        out["ours_predict"] = run_measured([str(OURS_PY), __file__, "_predict", str(runs / "fp32"), "--store",
                                            str(store), "--sets", str(sets_file)], f"{tag}: ours predict", env)
    out["load_avg_end"] = os.getloadavg()
    _append(out)
    print_tables(out)
    return out


def _ratio(a, b):
    return (a / b) if a and b else float("nan")


def print_tables(out: dict) -> None:
    ref = out["reference"].get("result") or {}
    ing, gr = out["ours_ingest"], out["ours_graphs"]
    ours_prep_s = ing["wall_s"] + gr["wall_s"]
    ours_prep_mb = max(ing["peak_rss_mb"], gr["peak_rss_mb"])
    full = out.get("reference_prepare_full")
    src = (full.get("result") or {}) if full and not full.get("timed_out") else ref
    rp = src.get("prepare", {})
    ri = src.get("model_initialize", {})
    ref_prep_s = (rp.get("wall_s") or 0) + (ri.get("wall_s") or 0)
    ref_prep_mb = ri.get("peak_rss_mb_after") or rp.get("peak_rss_mb_after")
    print(f"\n## {out['screen']}: ours {out['h5ad']}; the reference's steps and prediction on {ref.get('num_cells')} "
          f"cells x {ref.get('num_genes')} genes, {ref.get('num_conditions')} conditions; "
          f"load avg {out['load_avg_start']} -> {out['load_avg_end']}")
    print("\n(1) data preparation")
    print("| side | step | wall s | CPU s | peak RSS MB | minor faults |\n|---|---|---|---|---|---|")
    print(f"| ours | ingest | {ing['wall_s']} | {ing['cpu_s']} | {ing['peak_rss_mb']:.0f} | {ing['minor_faults']} |")
    print(f"| ours | split + graphs | {gr['wall_s']} | {gr['cpu_s']} | {gr['peak_rss_mb']:.0f} | {gr['minor_faults']} |")
    if full and full.get("timed_out"):
        # stopped unfinished: everything it had spent is a lower bound of what it needs
        print(f"| reference | whole screen, stopped after {full['max_s']:.0f} s | >= {full['wall_s']} | "
              f">= {full['cpu_s']} | >= {full['peak_rss_mb']:.0f} | >= {full['minor_faults']} |")
        ref_prep_s, ref_prep_mb, bound = full["wall_s"], full["peak_rss_mb"], ">= "
        cpu_ratio = f", CPU >= {_ratio(full['cpu_s'], ing['cpu_s'] + gr['cpu_s']):.1f}x"
    else:
        print(f"| reference | PertData processing + split + loaders | {rp.get('wall_s')} | {rp.get('cpu_s')} | "
              f"{rp.get('peak_rss_mb_after')} | {rp.get('minor_faults')} |")
        print(f"| reference | model_initialize (graphs) | {ri.get('wall_s')} | {ri.get('cpu_s')} | "
              f"{ri.get('peak_rss_mb_after')} | {ri.get('minor_faults')} |")
        bound, cpu_ratio = "", ""
    if not full and out.get("reference_fallback_cells"):
        print(f"(the reference rows are its preparation of the {out['reference_fallback_cells']}-cell draw)")
    print(f"ratio reference/ours: time {bound}{_ratio(ref_prep_s, ours_prep_s):.1f}x{cpu_ratio}, peak memory "
          f"{bound}{_ratio(ref_prep_mb, ours_prep_mb):.1f}x")
    st = ref.get("steps") or {}
    print("\n(2) training steps, batch 32, hidden 64")
    print("| side | cells/s | s/step | epoch s (extrapolated) |\n|---|---|---|---|")
    cells_epoch = st.get("train_cells_per_epoch")
    print(f"| reference fp32 | {st.get('cells_per_s', float('nan')):.1f} | {st.get('step_s_mean', float('nan')):.3f} |"
          f" {st.get('epoch_s_extrapolated', float('nan')):.0f} |")
    for p in ("fp32", "bf16"):
        r = (out.get(f"ours_steps_{p}") or {}).get("result") or {}
        cps = r.get("cells_per_s")
        print(f"| ours {p} | {cps} | {r.get('step_time_ms')} ms | "
              f"{(cells_epoch / cps) if cps and cells_epoch else float('nan'):.0f} | "
              f"ratio {_ratio(cps, st.get('cells_per_s')):.2f}x")
    pr = ref.get("predict") or {}
    op = (out.get("ours_predict") or {}).get("result") or {}
    print("\n(3) prediction of the test conditions")
    print(f"reference: {pr.get('wall_s')} s for {pr.get('num_conditions')}; ours: {op.get('predict_s')} s "
          f"(+ load {op.get('load_s')} s; bf16 autocast {op.get('predict_bf16_autocast_s')} s); "
          f"ratio {_ratio(pr.get('wall_s'), op.get('predict_s')):.0f}x")


def run_memfit(args) -> dict:
    """Reference data-preparation peak memory at several cell counts of the same screen; linear fit."""
    import numpy as np

    env = bench_env()
    py_ref = reference_python()
    points, lower_bounds = [], []
    for n in args.cells:
        h5ad = screen_h5ad("norman", n)
        data_dir = BENCH / f"memfit_{n}_data"
        reference_go_files(h5ad, data_dir)
        rec = reference_prepare(py_ref, h5ad, data_dir, BENCH / f"memfit_{n}.json",
                                f"memfit: reference prepare {n} cells", env, args.max_s)
        r = rec.get("result") or {}
        point = {"cells": n, "genes": r.get("num_genes"), "prepare_s": (r.get("prepare") or {}).get("wall_s"),
                 "peak_rss_mb": (r.get("prepare") or {}).get("peak_rss_mb_after"),
                 "tree_peak_mb": rec["peak_rss_mb"], "minor_faults": rec["minor_faults"], "cpu_s": rec["cpu_s"]}
        if rec.get("timed_out"):
            # Not finished: wall, CPU and peak so far are lower bounds, and no point for the fit.
            point.update(timed_out=True, wall_s_lower_bound=rec["wall_s"], progress_tail=rec["progress_tail"])
            lower_bounds.append(point)
            continue
        points.append(point)
    fit = {"kind": "memfit", "points": points, "lower_bounds": lower_bounds, "load_avg": os.getloadavg()}
    if points:
        x = np.array([p["cells"] for p in points], dtype=float)
        y = np.array([p["peak_rss_mb"] for p in points], dtype=float)
        slope, intercept = np.polyfit(x, y, 1) if len(points) > 1 else (y[0] / x[0], 0.0)
        genes = points[0]["genes"]
        per_cell_bytes = slope * 2**20
        fit.update(mb_per_cell=slope, intercept_mb=intercept,
                   bytes_per_cell_per_gene=per_cell_bytes / genes if genes else None)
        for cells, g in ((91000, genes), (2_000_000, 8000)):
            fit[f"extrapolated_{cells}x{g}_gb"] = (intercept + per_cell_bytes / genes * g * cells / 2**20) / 1024
    _append(fit)
    print(json.dumps(fit, indent=1))
    return fit


def run_prep_ours(args) -> list[dict]:
    """Our preparation (ingest + split + graphs) at the memfit cell counts, for the per-size comparison."""
    env = bench_env()
    out = []
    for n in args.cells:
        h5ad = screen_h5ad("norman", n)
        store = BENCH / f"norman_{n}.zarr"
        ing = run_measured([str(REPO / ".venv" / "bin" / "gears-dist"), "ingest", str(h5ad), str(store), "--overwrite"],
                           f"prep-ours {n}: ours ingest", env)
        gr = run_measured([str(OURS_PY), __file__, "_graphs", str(store)], f"prep-ours {n}: ours split + graphs", env)
        out.append({"cells": n, "wall_s": ing["wall_s"] + gr["wall_s"], "cpu_s": ing["cpu_s"] + gr["cpu_s"],
                    "peak_rss_mb": max(ing["peak_rss_mb"], gr["peak_rss_mb"])})
    _append({"kind": "prep-ours", "points": out})
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("run", help="tables 1-3 for one screen")
    s.add_argument("--screen", choices=["norman", "subset"], default="norman")
    s.add_argument("--steps", type=int, default=40, help="our steps per epoch (2 epochs, the second timed)")
    s.add_argument("--ref-steps", type=int, default=20, help="reference timed steps (after 2 warm-up steps)")
    s.add_argument("--need-gib", type=float, default=19.0, help="free memory to wait for before the reference")
    s.add_argument("--max-wait-s", type=float, default=300.0)
    s.add_argument("--min-gib", type=float, default=16.0,
                   help="below this much available memory after waiting, run the reference on --fallback-cells")
    s.add_argument("--fallback-cells", type=int, default=10000)
    s.add_argument("--ref-prepare-max-s", type=float, default=900.0,
                   help="norman: stop the reference's whole-screen preparation after this many wall seconds "
                        "(lower bounds recorded) and run its steps and prediction on --fallback-cells")
    s.add_argument("--resume-after-prepare", action="store_true",
                   help="reuse our store and preparation records of an interrupted run of the same screen")
    s.add_argument("--predict-max", type=int, default=0, help="reference: predict only the first N test conditions")
    s = sub.add_parser("memfit", help="reference preparation peak memory vs cells")
    s.add_argument("--cells", type=int, nargs="+", default=[10000, 30000])
    s.add_argument("--max-s", type=float, default=None,
                   help="stop a reference preparation after this many wall seconds and record lower bounds")
    s = sub.add_parser("prep-ours", help="our preparation at the memfit cell counts")
    s.add_argument("--cells", type=int, nargs="+", default=[10000, 30000])
    s = sub.add_parser("_graphs")
    s.add_argument("store")
    s = sub.add_parser("_steps")
    s.add_argument("store")
    s.add_argument("--precision", choices=["fp32", "bf16"], required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("_predict")
    s.add_argument("run")
    s.add_argument("--store", required=True)
    s.add_argument("--sets", required=True)
    args = p.parse_args(argv)
    {"run": run_screen, "memfit": run_memfit, "prep-ours": run_prep_ours, "_graphs": child_graphs, "_steps": child_steps,
     "_predict": child_predict}[args.cmd](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
