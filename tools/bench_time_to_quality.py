"""Time to the reference's quality: wall time until OUR validation mse_de reaches the value the reference
(cell-gears 0.1.2) reaches after its 15 epochs, on the same data, split and seed; then the test metrics of both.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 \
        .venv/bin/python tools/bench_time_to_quality.py [--datasets norman_subset synthetic] [--variants ...]

One invocation per table (BENCHMARKS.md, rows "Time to the reference's quality", commands C9 and C10). Per dataset:

1. Input: one GEARS-style log1p h5ad that both implementations read (obs.condition 'ctrl' / 'A+ctrl' / 'A+B',
   obs.cell_type, var.gene_name): the real Norman subset (tests/data) relabelled, or a generated Norman-like
   screen (`gears_dist.data.synthetic`, preset 'norman' shrunk to `SYNTH_SPEC`, library-normalized + log1p).
2. The reference: its GO files from our GO table (tools/reference/go_files.py), then
   `tools/reference/run_reference.py train DATA_DIR --h5ad H5AD --epochs 15 --seed 1` in the reference venv.
   Its own `GEARS.train` runs (its data processing, simulation split seed 1, batch 32, Adam 1e-3, StepLR 0.5,
   per-epoch evaluation of train and val, best model by val mse_de, test). This tool only adds a pass-through
   observer of `gears.gears.evaluate` that saves the per-condition MEAN prediction of every evaluation
   (`_REF_DUMP_CODE`), so that both sides' metrics are computed by one function on the same kind of
   predictions (see "Metric" below).
3. Ours: ingest the same h5ad, save the reference's split (its set2conditions, read from the split file it
   writes before training) as the custom split `reference_seed1`, build the graphs once (timed), then, once
   the reference has finished (each side alone on the machine; `--side-by-side`: while the reference trains),
   each variant in a fresh process runs the per-worker loop
   (`gears_dist.train.loop.run_single`, 1 worker, no Ray, per-epoch validation, checkpoint per epoch) with a
   reporter that records wall and CPU seconds per epoch and the test predictions after every epoch (outside
   the timed wall). When the reference is done, its epoch-15 val mse_de is the threshold; each variant's time
   to it and its test metrics at that epoch, at its last epoch and at its best val epoch are computed.

Metric: both sides are scored by `gears_dist.evaluate.metrics.condition_metrics` on per-condition mean
predictions against the store's condition means and top-20 DE genes (`stats/top_de`, the scanpy Welch t-test
ranking the reference's `rank_genes_groups_cov_all` uses; the tool checks that the two top-20 sets agree).
The reference's prediction of a condition is the mean over its cells of (sampled control cell + delta), ours
is control mean + delta: that is each implementation's prediction of the condition's mean. The reference's
own reported numbers (its `compute_metrics` / `deeper_analysis`) are kept beside ours in the JSON.

Output: one JSON per dataset in --workdir (default .bench/ttq) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

from _common import minor_faults, peak_rss_mb

from gears_dist.config import deep_merge

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
NORMAN_SUBSET = REPO / "tests" / "data" / "norman19_k562_subset.h5ad"
BASE_CONFIG = REPO / "configs" / "time_to_quality.yaml"
REF_VENV = REPO / ".bench" / "reference-venv"
REF_SCRIPT = REPO / "tools" / "reference" / "run_reference.py"
REF_GO_SCRIPT = REPO / "tools" / "reference" / "go_files.py"
SPLIT_KEY = "reference_seed1"
METRICS = ("mse", "mse_de", "pearson_delta", "pearson_delta_de")
# A Norman-like screen (singles + doubles + ~7.7% controls) small enough for 15 reference epochs in under an
# hour on the shared 2-core machine (the reference ran at ~10 cells/s there under load 15-20; 10,000 cells x
# 2,000 genes would have taken several hours).
SYNTH_SPEC = {"num_cells": 2400, "num_genes": 500, "num_singles": 20, "num_doubles": 20, "seed": 0}

# Variants of ours, overrides on configs/time_to_quality.yaml (the reference's semantics), built from parts.
def _variant(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        out = deep_merge(out, part)
    return out


BF16 = {"deepspeed": {"precision": "bf16"}}
GROUP8 = {"data": {"loader": {"group_cells": 8}}}
B128 = {"data": {"loader": {"batch_size": 128}}}
COSINE_LR2E3 = {"optim": {"lr": 2e-3, "schedule": "cosine"}}
COSINE_LR3E3 = {"optim": {"lr": 3e-3, "schedule": "cosine"}}
# Evaluation with BatchNorm statistics averaged over 50 training batches (train.bn_recalibration_batches)
# instead of the momentum average of the last ~10 batches.
BN_RECAL50 = {"train": {"bn_recalibration_batches": 50}}


def _epochs(n: int) -> dict:
    return {"train": {"epochs": n}}


VARIANTS: dict[str, dict] = {
    "ref_fp32": {},
    "ref_bf16": BF16,
    "group8_bf16": _variant(BF16, GROUP8),
    "group8_bf16_cosine_lr2e-3": _variant(BF16, GROUP8, COSINE_LR2E3),
    "b128_group16_bf16_cosine_lr3e-3": _variant(BF16, B128, {"data": {"loader": {"group_cells": 16}}}, COSINE_LR3E3),
    "bf16_cosine_lr2e-3": _variant(BF16, COSINE_LR2E3),
    # batch 128 per cell, cosine over the base's 15 epochs (the reference's budget)
    "b128_bf16_cosine_lr3e-3": _variant(BF16, B128, COSINE_LR3E3),
    # Ablation of the test-quality gap on generated screens (git show e2b381c:BENCHMARKS.md): the reference's semantics with one
    # thing changed at a time -- the seed (our run-to-run spread), the loader's window (every training cell
    # shuffled together, as the reference's DataLoader does, instead of windows of 8 chunks).
    "ref_fp32_seed2": {"seed": 2},
    "ref_fp32_seed3": {"seed": 3},
    "ref_fp32_shuffle_all": {"data": {"loader": {"buffer_chunks": 1 << 20}}},
    # the loader's window before 2026-12-04: 8 chunks (since then: 256 MB of decoded cells, the whole shard here)
    "ref_fp32_window8": {"data": {"loader": {"buffer_chunks": 8}}},
    # the product's fast path: batches of 128 cells in runs of 8 of one condition (16 distinct sets per step,
    # each computed once), lr 3e-3 on a cosine over an 8-epoch budget; the same in bf16 autocast (only worth it
    # on a CPU with bf16 instructions: AVX512_BF16 / AMX), and over the base's 15 epochs
    "b128_group8_cosine8_lr3e-3": _variant(B128, GROUP8, COSINE_LR3E3, _epochs(8)),
    "b128_group8_bf16_cosine8_lr3e-3": _variant(BF16, B128, GROUP8, COSINE_LR3E3, _epochs(8)),
    "b128_group8_bf16_cosine15_lr3e-3": _variant(BF16, B128, GROUP8, COSINE_LR3E3),
    # the same batches per cell (no grouping), cosine over 6 epochs
    "b128_cosine6_lr3e-3": _variant(B128, COSINE_LR3E3, _epochs(6)),
    "ref_fp32_bn_recal50": BN_RECAL50,
    "bf16_cosine_lr2e-3_bn_recal50": _variant(BF16, COSINE_LR2E3, BN_RECAL50),
}


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _log(msg: str) -> None:
    print(f"[ttq {time.strftime('%H:%M:%S')} load {_load()}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ inputs
def gears_style_norman_subset(dest: pathlib.Path) -> pathlib.Path:
    """The Norman subset relabelled GEARS style (control -> ctrl, A -> A+ctrl; var.gene_name; cell_type)."""
    import anndata as ad

    if dest.exists():
        return dest
    a = ad.read_h5ad(NORMAN_SUBSET)
    cond = a.obs["condition"].astype(str)
    cond = cond.where(cond != "control", "ctrl")
    single = (cond != "ctrl") & ~cond.str.contains("+", regex=False)
    cond = cond.where(~single, cond + "+ctrl")
    out = ad.AnnData(X=a.X.astype("float32"), obs={"condition": cond.values, "cell_type": ["K562"] * a.n_obs},
                     var={"gene_name": a.var_names.values})
    out.obs_names, out.var_names = a.obs_names.values, a.var_names.values
    tmp = dest.with_name(dest.name + ".tmp.h5ad")
    out.write_h5ad(tmp)
    os.replace(tmp, dest)
    return dest


def synthetic_screen(dest: pathlib.Path) -> pathlib.Path:
    """A generated Norman-like screen, written as raw counts then library-normalized (1e4) + log1p."""
    import anndata as ad
    import numpy as np
    import scanpy as sc

    from gears_dist.data.synthetic import preset, write_h5ad

    spec_file = dest.with_name("synth_spec.json")
    if dest.exists():
        made = json.loads(spec_file.read_text()) if spec_file.exists() else {**SYNTH_SPEC, "num_cells": 2400,
                                                                                "num_genes": 500}
        if made != SYNTH_SPEC:
            raise ValueError(f"{dest} was generated with {made}, this run asks for {SYNTH_SPEC}: "
                             f"use another --workdir for another screen size")
        return dest
    spec_file.write_text(json.dumps(SYNTH_SPEC))
    raw = dest.with_name(dest.stem + ".raw.h5ad")
    write_h5ad(preset("norman", **SYNTH_SPEC), raw, overwrite=True)
    a = ad.read_h5ad(raw)
    a.uns = {}
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.uns = {}
    a.X = a.X.astype(np.float32)
    tmp = dest.with_name(dest.name + ".tmp.h5ad")
    a.write_h5ad(tmp)
    os.replace(tmp, dest)
    raw.unlink()
    return dest


DATASETS = {"norman_subset": gears_style_norman_subset, "synthetic": synthetic_screen}


# ------------------------------------------------------------------------------------------ the reference
# Run by the reference venv's python: a pass-through observer of gears.gears.evaluate (installed before
# run_reference.py wraps it again) that saves each evaluation's per-condition mean prediction and truth.
_REF_DUMP_CODE = r"""
import os, sys, time
import numpy as np
sys.path.insert(0, os.environ["TTQ_REF_DIR"])
import gears.gears as gg
import run_reference as rr
_orig = gg.evaluate
_orig_train = gg.GEARS.train
_calls = []
_cpu = {}
def _timed_train(self, *a, **k):
    _cpu["train_start"] = time.process_time()
    return _orig_train(self, *a, **k)
gg.GEARS.train = _timed_train
def _dumping_evaluate(loader, net, uncertainty, device):
    res = _orig(loader, net, uncertainty, device)
    cpu = time.process_time()
    cats, inv = np.unique(res["pert_cat"], return_inverse=True)
    n = np.bincount(inv).astype(np.float64)[:, None]
    def means(a):
        out = np.zeros((len(cats), a.shape[1]))
        np.add.at(out, inv, a)
        return (out / n).astype(np.float32)
    # CPU seconds of this process since GEARS.train started, less this observer's own earlier work
    spent = cpu - _cpu.get("train_start", cpu) - _cpu.get("observer", 0.0)
    _calls.append({"conditions": cats.astype(str), "pred": means(res["pred"]), "truth": means(res["truth"]),
                   "cpu_s": np.array([spent])})
    _cpu["observer"] = _cpu.get("observer", 0.0) + time.process_time() - cpu
    return res
gg.evaluate = _dumping_evaluate
code = rr.main(sys.argv[1:])
arrays = {}
for i, c in enumerate(_calls):
    for k, v in c.items():
        arrays[f"{i}/{k}"] = v
np.savez(os.environ["TTQ_REF_DUMP"], **arrays)
sys.exit(code)
"""


def start_reference(h5ad: pathlib.Path, work: pathlib.Path, epochs: int, seed: int) -> subprocess.Popen:
    """Start the reference's `train` in the background (its GO files first); returns the process."""
    ref_python = REF_VENV / "bin" / "python"
    if not ref_python.exists():
        raise SystemExit(f"no reference venv at {REF_VENV}: create it with '.venv/bin/python tools/reference/env.py'")
    data_dir = work / "reference_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in (work / "reference.json", work / "reference_predictions.npz"):
        stale.unlink(missing_ok=True)
    shutil.rmtree(data_dir / "screen", ignore_errors=True)
    subprocess.run([sys.executable, str(REF_GO_SCRIPT), str(data_dir), "--h5ad", str(h5ad)], check=True,
                   stdout=subprocess.DEVNULL)
    env = {**os.environ, "TTQ_REF_DIR": str(REF_SCRIPT.parent), "TTQ_REF_DUMP": str(work / "reference_predictions.npz")}
    (work / "reference_load_before.txt").write_text(_load() + "\n")
    logf = open(work / "reference.log", "w")  # noqa: SIM115 - the background process owns it
    return subprocess.Popen([str(ref_python), "-c", _REF_DUMP_CODE, "train", str(data_dir), "--h5ad", str(h5ad),
                             "--epochs", str(epochs), "--seed", str(seed), "--out", str(work / "reference.json")],
                            env=env, stdout=subprocess.DEVNULL, stderr=logf)


def reference_split(work: pathlib.Path, proc: subprocess.Popen | None, timeout_s: float = 3600) -> dict:
    """The reference's set2conditions, read from the split file its prepare_split writes (before training)."""
    import pickle

    splits = work / "reference_data" / "screen" / "splits"
    t0 = time.perf_counter()
    while True:
        found = sorted(p for p in splits.glob("*_simulation_*.pkl") if "subgroup" not in p.name) \
            if splits.exists() else []
        if found:
            time.sleep(1.0)  # written by pickle.dump in one call; let it close
            with open(found[0], "rb") as f:
                return {k: [str(c) for c in v] for k, v in pickle.load(f).items()}
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the reference exited ({proc.returncode}) before writing its split; see {work}/reference.log")
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"no reference split in {splits} after {timeout_s} s")
        time.sleep(5.0)


def wait_reference(work: pathlib.Path, proc: subprocess.Popen | None) -> dict:
    """Wait for the reference (ours or one started earlier in WORKDIR) to write its JSON and predictions."""
    out_json, dump = work / "reference.json", work / "reference_predictions.npz"
    while not (out_json.exists() and dump.exists()):
        if proc is not None and proc.poll() is not None and not (out_json.exists() and dump.exists()):
            raise RuntimeError(f"the reference failed ({proc.returncode}); see {work}/reference.log")
        time.sleep(10.0)
    if proc is not None:
        proc.wait()
    time.sleep(2.0)  # np.savez finishes the file before the process exits
    record = json.loads(out_json.read_text())
    before = work / "reference_load_before.txt"
    record["load_before"] = before.read_text().strip() if before.exists() else None
    record["load_after"] = _load()
    return record


def reference_evaluations(work: pathlib.Path, record: dict) -> tuple[list[dict], dict]:
    """Per-epoch val and final test per-condition mean predictions saved by the observer.

    GEARS.train evaluates train then val each epoch, then test once: val calls are those whose conditions
    are the split's val set; test the one on the test set."""
    import numpy as np

    data = np.load(work / "reference_predictions.npz")
    calls = sorted({int(k.split("/")[0]) for k in data.files})
    val_set, test_set = set(record["split"]["val"]), set(record["split"]["test"])
    vals, test = [], None
    for i in calls:
        c = {k: data[f"{i}/{k}"] for k in ("conditions", "pred", "truth")}
        if f"{i}/cpu_s" in data.files:  # CPU seconds of the reference process since GEARS.train started
            c["cpu_s"] = float(data[f"{i}/cpu_s"][0])
        names = set(c["conditions"].tolist())
        if names == val_set:
            vals.append(c)
        elif names == test_set:
            test = c
    if len(vals) != len(record["epochs"]):
        raise RuntimeError(f"found {len(vals)} reference val evaluations for {len(record['epochs'])} epochs")
    return vals, test


# ------------------------------------------------------------------------------------------ ours: data
def prepare_ours(h5ad: pathlib.Path, work: pathlib.Path, ref_split: dict) -> dict:
    """Ingest, the reference's split as a custom split, graphs (timed, each once)."""
    from gears_dist.data.conditions import canonicalize
    from gears_dist.data.ingest import ingest
    from gears_dist.data.splits import make_split, save_split
    from gears_dist.data.store import open_store
    from gears_dist.train.config import load_run_config
    from gears_dist.train.loop import prepare_run

    store_path = work / "store.zarr"
    out: dict = {}
    t0 = time.perf_counter()
    ingest(h5ad, store_path, overwrite=True)
    out["ingest_s"] = time.perf_counter() - t0
    custom = {s: sorted({canonicalize(c) for c in ref_split.get(s, [])} - {"ctrl"}) for s in ("train", "val", "test")}
    store = open_store(store_path, mode="r+")
    t0 = time.perf_counter()
    split = make_split(store.condition_names, "custom", 1, custom=custom)
    save_split(store, split, SPLIT_KEY, overwrite=True)
    cfg = load_run_config(BASE_CONFIG, {"data": {"split": SPLIT_KEY}})
    prepare_run(cfg, store_path, 1)
    out["split_graphs_s"] = time.perf_counter() - t0
    out["split"] = {s: len(getattr(split, s)) for s in ("train", "val", "test", "excluded")}
    out["test_categories"] = {k: len(v) for k, v in split.test_categories().items()}
    out["store"] = str(store_path)
    return out


def check_de_agreement(work: pathlib.Path, store_path: pathlib.Path) -> dict:
    """Do the reference's top-20 DE genes (rank_genes_groups_cov_all, what its mse_de uses) equal ours?"""
    import anndata as ad
    import numpy as np

    from gears_dist.data.conditions import canonicalize
    from gears_dist.data.store import open_store

    processed = work / "reference_data" / "screen" / "perturb_processed.h5ad"
    a = ad.read_h5ad(processed, backed="r")
    de = a.uns["rank_genes_groups_cov_all"]
    cond_of = dict(zip(a.obs["condition_name"].astype(str), a.obs["condition"].astype(str)))
    ref_genes = np.asarray(a.var["gene_name"]).astype(str)
    ref_symbol = dict(zip(a.var_names.astype(str), ref_genes))
    store = open_store(store_path)
    genes = np.asarray(store.genes)
    top = np.asarray(store.root["stats/top_de"][...])
    row = {n: i for i, n in enumerate(store.condition_names)}
    same = differ = 0
    examples = []
    for full, ranked in de.items():
        cond = canonicalize(cond_of[full])
        if cond == "ctrl" or cond not in row:
            continue
        ref_top = {ref_symbol.get(str(g), str(g)) for g in list(ranked)[:20]}
        ours = {str(genes[j]) for j in top[row[cond]] if j >= 0}
        if ref_top == ours:
            same += 1
        else:
            differ += 1
            examples.append({"condition": cond, "only_reference": sorted(ref_top - ours),
                             "only_ours": sorted(ours - ref_top)})
    return {"conditions_same_top20": same, "conditions_differ": differ, "examples": examples[:5]}


# ------------------------------------------------------------------------------------------ ours: training
def score(pred, names: list[str], store) -> dict[str, float]:
    """Mean over conditions of METRICS for per-condition mean predictions (rows aligned with names)."""
    import numpy as np

    from gears_dist.evaluate.metrics import condition_metrics, truth_from_store

    truth = truth_from_store(store, names)
    per = condition_metrics(np.asarray(pred, dtype=np.float64), truth)
    return {m: float(np.nanmean(per[m])) for m in METRICS}


def test_categories(work: pathlib.Path, store) -> dict[str, list[str]]:
    """The reference's own test subgroups (combo_seen0/1/2, unseen_single: 'seen' = the genes of its
    simulation split's seen set, which includes genes without a single in the data), canonical names; our
    split's categories (genes perturbed in train) if the reference wrote none."""
    import pickle

    from gears_dist.data.conditions import canonicalize
    from gears_dist.data.splits import load_split

    found = sorted((work / "reference_data" / "screen" / "splits").glob("*_subgroup.pkl"))
    if found:
        with open(found[0], "rb") as f:
            sub = pickle.load(f)["test_subgroup"]
        return {cat: [canonicalize(str(c)) for c in conds] for cat, conds in sub.items() if len(conds)}
    return load_split(store, SPLIT_KEY).test_categories()


def score_by_category(pred, names, store, categories: dict[str, list[str]]) -> dict[str, dict]:
    import numpy as np

    where = {n: i for i, n in enumerate(names)}
    out = {"all": {**score(pred, names, store), "n": len(names)}}
    for cat, conds in sorted(categories.items()):
        rows = [where[c] for c in conds if c in where]
        if rows:
            out[cat] = {**score(np.asarray(pred)[rows], [names[i] for i in rows], store), "n": len(rows)}
    return out


class TimingReporter:
    """Wraps the loop's LocalReporter: timestamps every epoch after its checkpoint and takes the model's test
    predictions (control mean + predicted delta per test condition) outside the timed wall (the time this
    takes is subtracted from later timestamps). With a threshold and `stop`, training ends at the first epoch
    whose val mse_de <= threshold."""

    class Stop(Exception):
        pass

    def __init__(self, run_dir, threshold: float | None, stop: bool, test_names: list[str]):
        from gears_dist.train.loop import LocalReporter

        self.inner = LocalReporter(run_dir)
        self.threshold, self.stop, self.test_names = threshold, stop, test_names
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.overhead = self.cpu_overhead = 0.0
        self.epochs: list[dict] = []
        self.test_pred: list = []

    def latest(self):
        return None

    def _test_predictions(self, w):
        import numpy as np
        import torch

        from gears_dist.train.loop import condition_indices

        rows = condition_indices(w.condition_names, self.test_names, "test")
        module = w.engine.module
        module.eval()  # one worker: no GO halo restriction; train_epoch sets train mode again
        with torch.no_grad(), torch.autocast(device_type=w.device.type, dtype=torch.bfloat16,
                                             enabled=w.cfg.deepspeed.precision == "bf16"):
            delta = module.predict_delta(torch.from_numpy(w.pert_index[rows]).to(w.device)).float().cpu().numpy()
        return (w.ctrl_mean.cpu().numpy()[None, :] + delta).astype(np.float32)

    def report(self, w, metrics, meta, loader_state, epoch, tensors):
        self.inner.report(w, metrics, meta, loader_state, epoch, tensors)
        now, cpu = time.perf_counter(), time.process_time()
        self.epochs.append({"epoch": epoch, "t_s": now - self.t0 - self.overhead,
                            "cpu_s": cpu - self.cpu0 - self.cpu_overhead,
                            "epoch_time_s": metrics["epoch_time_s"], "train_loss": metrics["train_loss"],
                            "cells_per_s": metrics["cells_per_s"], "lr": metrics.get("lr"),
                            "val_mse_de": metrics.get("val_mse_de"), "val_mse": metrics.get("val_mse"),
                            "val_pearson_delta": metrics.get("val_pearson_delta")})
        self.test_pred.append(self._test_predictions(w))
        self.overhead += time.perf_counter() - now
        self.cpu_overhead += time.process_time() - cpu
        v = metrics.get("val_mse_de")
        if self.stop and self.threshold is not None and v is not None and v <= self.threshold:
            raise TimingReporter.Stop()


def run_ours_variant(store_path: str, variant: str, overrides: dict, threshold: float | None, stop: bool,
                     epochs: int, run_dir: str, pred_path: str) -> dict:
    """One variant in this process: run_single with the timing reporter; returns the timeline (the per-epoch
    test predictions go to `pred_path`, an npz [epochs, test conditions, genes])."""
    import numpy as np

    from gears_dist.config import deep_merge
    from gears_dist.data.splits import load_split
    from gears_dist.data.store import open_store
    from gears_dist.train.config import load_run_config
    from gears_dist.train.loop import run_single

    # every core, as before workers took scaling.cpus_per_worker threads (the reference side uses torch's default)
    over = deep_merge({"name": f"ttq_{variant}", "data": {"split": SPLIT_KEY}, "train": {"epochs": epochs},
                       "scaling": {"cpus_per_worker": os.cpu_count() or 1}}, overrides)
    cfg = load_run_config(BASE_CONFIG, over)
    split = load_split(open_store(store_path), SPLIT_KEY)
    reporter = TimingReporter(run_dir, threshold, stop, list(split.test))
    t0 = time.perf_counter()
    reporter.t0, reporter.cpu0 = t0, time.process_time()
    try:
        run_single(cfg, store_path, run_dir, reporter=reporter)
        stopped = False
    except TimingReporter.Stop:
        stopped = True
    wall = time.perf_counter() - t0 - reporter.overhead
    ep = reporter.epochs
    np.savez(pred_path, pred=np.stack(reporter.test_pred), conditions=np.asarray(split.test))
    return {"variant": variant, "overrides": overrides, "config": dataclasses.asdict(cfg),
            "stopped_at_threshold": stopped, "wall_s": wall,
            "setup_s": ep[0]["t_s"] - ep[0]["epoch_time_s"] if ep else None, "epochs": ep}


def run_ours(store_path: pathlib.Path, work: pathlib.Path, variant: str, threshold: float | None, stop: bool,
             epochs: int) -> dict:
    """A fresh process per variant (its own heap, page faults and peak RSS)."""
    run_dir = work / f"ours_{variant}"
    shutil.rmtree(run_dir, ignore_errors=True)
    out_json, pred = work / f"ours_{variant}.json", work / f"ours_{variant}_test.npz"
    cmd = [sys.executable, __file__, "_variant", str(store_path), "--variant", variant, "--epochs", str(epochs),
           "--run-dir", str(run_dir), "--out", str(out_json), "--pred", str(pred)]
    if threshold is not None:
        cmd += ["--threshold", repr(threshold)]
    if stop:
        cmd.append("--stop-at-threshold")
    load0 = _load()
    t0 = time.perf_counter()
    with open(work / f"ours_{variant}.log", "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=False)
    shutil.rmtree(run_dir, ignore_errors=True)
    if proc.returncode != 0:
        return {"variant": variant, "failed": True, "returncode": proc.returncode,
                "log_tail": (work / f"ours_{variant}.log").read_text()[-2000:]}
    rec = json.loads(out_json.read_text())
    rec["process_wall_s"] = time.perf_counter() - t0
    rec["load_before"], rec["load_after"] = load0, _load()
    out_json.write_text(json.dumps(rec))
    return rec


def cmd_variant(args) -> int:
    overrides = json.loads(args.overrides) if args.overrides else VARIANTS[args.variant]
    rec = run_ours_variant(args.store, args.variant, overrides, args.threshold, args.stop_at_threshold,
                           args.epochs, args.run_dir, args.pred)
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["minor_faults"] = minor_faults()
    pathlib.Path(args.out).write_text(json.dumps(rec))
    return 0


def not_worse(ours: dict, ref: dict) -> bool:
    """Test quality not worse than the reference's on every one of METRICS."""
    return (ours["mse"] <= ref["mse"] and ours["mse_de"] <= ref["mse_de"]
            and ours["pearson_delta"] >= ref["pearson_delta"] and ours["pearson_delta_de"] >= ref["pearson_delta_de"])


def score_variant(rec: dict, work: pathlib.Path, threshold: float, store_path: pathlib.Path,
                  ref_test: dict | None = None) -> dict:
    """Time to the threshold (training wall, setup excluded, and including setup) and the test metrics of the
    model at that epoch, at the last epoch run and at the best val epoch. With the reference's test metrics
    (`ref_test`, all conditions) also, ex post, the first epoch whose test metrics are all not worse."""
    import numpy as np

    from gears_dist.data.store import open_store

    if rec.get("failed"):
        return rec
    store = open_store(store_path)
    cats = test_categories(work, store)
    data = np.load(work / f"ours_{rec['variant']}_test.npz")
    names = [str(c) for c in data["conditions"]]
    ep = rec["epochs"]
    hit = next((i for i, e in enumerate(ep) if e["val_mse_de"] is not None and e["val_mse_de"] <= threshold), None)
    rec["threshold"] = threshold
    rec["epoch_at_threshold"] = None if hit is None else ep[hit]["epoch"]
    rec["time_to_threshold_s"] = None if hit is None else ep[hit]["t_s"] - rec["setup_s"]
    rec["time_to_threshold_incl_setup_s"] = None if hit is None else ep[hit]["t_s"]
    if hit is not None:
        rec["at_threshold"] = {"epoch": ep[hit]["epoch"], "test": score_by_category(data["pred"][hit], names, store, cats)}
    rec["final"] = {"epoch": ep[-1]["epoch"], "test": score_by_category(data["pred"][-1], names, store, cats)}
    best = int(np.argmin([e["val_mse_de"] for e in ep]))
    rec["best_val"] = {"epoch": ep[best]["epoch"], "val_mse_de": ep[best]["val_mse_de"],
                       "test": score_by_category(data["pred"][best], names, store, cats)}
    rec["test_curve"] = [score(data["pred"][i], names, store) for i in range(len(ep))]
    if ref_test is not None:
        ok = next((i for i, t in enumerate(rec["test_curve"]) if not_worse(t, ref_test)), None)
        rec["epoch_test_not_worse"] = None if ok is None else ep[ok]["epoch"]
        rec["time_to_test_not_worse_s"] = None if ok is None else ep[ok]["t_s"] - rec["setup_s"]
        rec["at_threshold_test_not_worse"] = (hit is not None
                                              and not_worse(rec["at_threshold"]["test"]["all"], ref_test))
    return rec


# ------------------------------------------------------------------------------------------ the table
def reference_scores(work: pathlib.Path, record: dict, store_path: pathlib.Path) -> dict:
    """The reference's per-epoch val and final test metrics, computed by OUR function on its predictions."""
    import numpy as np

    from gears_dist.data.conditions import canonicalize
    from gears_dist.data.store import open_store

    store = open_store(store_path)
    vals, test = reference_evaluations(work, record)
    val_curve = []
    truth_gap = []
    for ep, v in zip(record["epochs"], vals):
        names = [canonicalize(c) for c in v["conditions"]]
        s = score(v["pred"], names, store)
        val_curve.append({"epoch": ep["epoch"], "elapsed_s": ep["elapsed_s"], "cpu_s": v.get("cpu_s"),
                          "val_mse_de": s["mse_de"],
                          "val_pearson_delta": s["pearson_delta"], "reported_val_mse_de": ep["val"]["mse_de"]})
        from gears_dist.evaluate.metrics import truth_from_store

        truth_gap.append(float(np.abs(truth_from_store(store, names).mean - v["truth"]).max()))
    out = {"val": val_curve, "max_abs_truth_mean_diff": max(truth_gap) if truth_gap else None}
    if test is not None:
        names = [canonicalize(c) for c in test["conditions"]]
        out["test"] = score_by_category(test["pred"], names, store, test_categories(work, store))
        out["reported_test"] = {k: record["test"]["overall"].get(k) for k in
                                ("mse", "mse_de", "pearson_delta", "pearson_delta_de")}
    return out


def bench_dataset(name: str, args) -> dict:
    """The reference first, alone (or, with --side-by-side, in the background while ours trains); then each
    variant of ours in turn; then both scored with one function."""
    work = pathlib.Path(args.workdir) / name
    work.mkdir(parents=True, exist_ok=True)
    h5ad = DATASETS[name](work / "input.h5ad")
    result: dict = {"dataset": name, "h5ad": str(h5ad), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "versions": _versions()}
    proc = None
    done = (work / "reference.json").exists() and (work / "reference_predictions.npz").exists()
    if args.reuse_reference and (done or args.attach):
        _log(f"{name}: using the reference run in {work} ({'finished' if done else 'running, attached'})")
    else:
        _log(f"{name}: starting the reference, {args.epochs} epochs, in the background")
        proc = start_reference(h5ad, work, args.epochs, args.seed)
    split = reference_split(work, proc)
    if not args.side_by_side:
        # each side alone on the machine: on 2 cores the reference's epochs took ~3x longer while ours ran
        # beside it (2026-11-25, git show e2b381c:BENCHMARKS.md), so the ratio depended on how long they overlapped
        _log(f"{name}: waiting for the reference before running ours (--side-by-side runs them together)")
        wait_reference(work, proc)
    _log(f"{name}: ours: ingest, the reference's split, graphs")
    prep = prepare_ours(h5ad, work, split)
    result["ours_prepare"] = prep
    store_path = pathlib.Path(prep["store"])
    ours = []
    for variant in args.variants:
        saved = work / f"ours_{variant}.json"
        if args.reuse_ours and saved.exists() and (work / f"ours_{variant}_test.npz").exists():
            _log(f"{name}: ours {variant}: reusing {saved}")
            ours.append(json.loads(saved.read_text()))
            continue
        _log(f"{name}: ours {variant}")
        ours.append(run_ours(store_path, work, variant, None, False, args.our_epochs))
    _log(f"{name}: waiting for the reference")
    ref = wait_reference(work, proc)
    result["reference_record"] = {k: ref.get(k) for k in ("prepare_s", "train_s", "wall_s", "peak_rss_mb",
                                                         "load_before", "load_after", "num_cells", "num_genes",
                                                         "num_go_nodes", "num_go_edges", "num_coexpr_edges",
                                                         "model_initialize", "reference", "torch",
                                                         "torch_threads", "patched")}
    result["reference_epochs"] = ref["epochs"]
    result["de_agreement"] = check_de_agreement(work, store_path)
    rs = reference_scores(work, ref, store_path)
    result["reference"] = rs
    threshold = rs["val"][-1]["val_mse_de"]
    result["threshold_val_mse_de"] = threshold
    result["reference_best_val_mse_de"] = min(v["val_mse_de"] for v in rs["val"])
    result["reference_15_epoch_train_s"] = sum(e["wall_s"] for e in ref["epochs"])
    ref_test = rs.get("test", {}).get("all")
    result["ours"] = [score_variant(r, work, threshold, store_path, ref_test) for r in ours]
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torch-geometric", "deepspeed", "numpy", "zarr"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, check=False).stdout.strip()
    except OSError:
        out["commit"] = None
    return out


def _fmt(v, nd=4):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(result: dict) -> str:
    """Markdown: the reference, then each variant of ours (time to the threshold, test at that epoch)."""
    ref_s = result["reference_15_epoch_train_s"]
    rt = result["reference"].get("test", {}).get("all", {})
    rr = result["reference"].get("reported_test", {})
    title = (f"### {result['dataset']} ({result['date']}; threshold = the reference's epoch-15 val mse_de "
             f"{result['threshold_val_mse_de']:.5f}, its best {result['reference_best_val_mse_de']:.5f}; "
             f"reference 15 epochs: {ref_s:.1f} s, load {result['reference_record'].get('load_before')} -> "
             f"{result['reference_record'].get('load_after')})")
    lines = [title, "",
             ("| run | epochs run | first epoch <= threshold | time to threshold s (incl. setup) | "
              "vs reference 15 epochs | test mse | test mse_de | test pearson_delta | test pearson_delta_de | "
              "test not worse there | first epoch with test not worse (s) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| reference cell-gears 0.1.2 (its best-val model of 15 epochs) | {len(result['reference']['val'])} | "
             f"- | {ref_s:.1f} (15 epochs) | 1.0x | " + " | ".join(_fmt(rt.get(m)) for m in METRICS) + " | | |",
             ("| (the reference's own report of the same test) | | | | | "
              + " | ".join(_fmt(rr.get(m)) for m in METRICS) + " | | |")]
    for rec in result["ours"]:
        if rec.get("failed"):
            lines.append(f"| ours {rec['variant']} | failed (rc {rec['returncode']}) | | | | | | | | | |")
            continue
        t = rec.get("time_to_threshold_s")
        snap = rec.get("at_threshold") or rec.get("final") or {}
        st = snap.get("test", {}).get("all", {})
        speed = "not reached" if t is None else f"{ref_s / t:.1f}x"
        when = "-" if t is None else f"{t:.1f} ({rec['time_to_threshold_incl_setup_s']:.1f})"
        ok = rec.get("epoch_test_not_worse")
        first_ok = "never" if ok is None else f"{ok} ({rec['time_to_test_not_worse_s']:.1f})"
        lines.append(f"| ours {rec['variant']} | {len(rec['epochs'])} | {_fmt(rec.get('epoch_at_threshold'))} | "
                     f"{when} | {speed} | " + " | ".join(_fmt(st.get(m)) for m in METRICS)
                     + f" | {'yes' if rec.get('at_threshold_test_not_worse') else 'no'} | {first_ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    v = sub.add_parser("_variant", help="(internal) one variant of ours in this process")
    v.add_argument("store")
    v.add_argument("--variant", required=True)
    v.add_argument("--overrides", default=None, help="JSON overrides instead of VARIANTS[variant]")
    v.add_argument("--threshold", type=float, default=None)
    v.add_argument("--epochs", type=int, default=15)
    v.add_argument("--run-dir", required=True)
    v.add_argument("--out", required=True)
    v.add_argument("--pred", required=True)
    v.add_argument("--stop-at-threshold", action="store_true")
    t = sub.add_parser("table", help="print the markdown table of saved results")
    t.add_argument("results", nargs="+")
    p.add_argument("--datasets", nargs="+", default=["norman_subset", "synthetic"], choices=sorted(DATASETS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    p.add_argument("--epochs", type=int, default=15, help="reference epochs")
    p.add_argument("--our-epochs", type=int, default=15, help="epoch budget of each of our variants")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reuse-reference", action="store_true",
                   help="reuse the reference run in WORKDIR/DATASET if it finished (or, with --attach, is running)")
    p.add_argument("--reuse-ours", action="store_true",
                   help="reuse WORKDIR/DATASET/ours_VARIANT.json (+ _test.npz) where present (rescoring)")
    p.add_argument("--attach", action="store_true", help="with --reuse-reference: wait for a reference run "
                   "already started in WORKDIR/DATASET instead of starting one")
    p.add_argument("--side-by-side", action="store_true",
                   help="run ours while the reference trains (shorter, but both slow each other down unequally); "
                        "by default the reference runs first, alone, then each variant of ours alone")
    p.add_argument("--workdir", default=str(REPO / ".bench" / "ttq"))
    p.add_argument("--synth-size", nargs=3, type=int, metavar=("CELLS", "GENES", "PER_KIND"), default=None,
                   help="the generated screen's cells, genes, and number of singles (= of doubles); default "
                        f"{SYNTH_SPEC['num_cells']} {SYNTH_SPEC['num_genes']} {SYNTH_SPEC['num_singles']}")
    args = p.parse_args(argv)
    if args.synth_size:
        cells, genes, per_kind = args.synth_size
        SYNTH_SPEC.update(num_cells=cells, num_genes=genes, num_singles=per_kind, num_doubles=per_kind)
    if args.command == "_variant":
        return cmd_variant(args)
    if args.command == "table":
        for path in args.results:
            print(table(json.loads(pathlib.Path(path).read_text())) + "\n")
        return 0
    for name in args.datasets:
        result = bench_dataset(name, args)
        print(table(result) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
