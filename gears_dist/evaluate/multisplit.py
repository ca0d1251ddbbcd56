"""Multi-split evaluation: one config (or several variants of it) trained and evaluated on K splits.

With a handful of test conditions per category, one split is noise. ``run_multisplit`` makes K splits of one
kind (seeds), trains every variant on every split as parallel Ray tasks (one process each, the same
per-worker loop as ``gears-dist train``), evaluates each trained model and the baselines on that split's test
conditions, and reports the mean and standard deviation over splits per predictor, test category and metric.

Outputs in OUT: ``per_split.csv`` (one row per split x predictor x category), ``summary.csv`` /
``summary.json`` (mean, sd and number of splits), ``summary.png`` (pearson_delta and mse_de with error bars),
one run directory per (variant, seed) under ``runs/``, and MLflow: a parent run with the summary metrics and
one child run per (variant, seed) (tag ``mlflow.parentRunId``), in ``tracking.uri`` or ``OUT/mlflow.db``.
When the store has planted genetic interactions (a generated screen's truth), each split's test pairs are also
scored for GI precision@10 per type, for every model, the additive baseline (every pair ties: chance) and the
base rate: rows ``gi_<type>`` with column ``gi_precision_at_10`` in per_split.csv / summary.csv, ``gi.csv``.

Variants are named overrides of the config: ``reference`` (model.prior none, the reference architecture),
``prior`` (model.prior go, prior-anchored GEARS), or ``NAME:a.b=VALUE,c.d=VALUE``.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np

from gears_dist.config import deep_merge, to_dict

VARIANTS: dict[str, dict] = {"reference": {"model": {"prior": "none"}}, "prior": {"model": {"prior": "go"}}}
SUMMARY_METRICS = ("pearson_delta", "mse_de", "mse", "pearson_delta_de")
GI_K = 10
GI_TYPES = ("synergy", "suppression", "epistasis", "neomorphism")


def gi_rows(store, split, predictors: Mapping, chance: bool = False) -> list[dict]:
    """GI precision@GI_K per type on the split's test pairs (rows: predictor, category gi_<type>), or [] when the
    store has no planted truth. With no predictor, or with `chance`: also the additive baseline and the base rate
    (one GI evaluation for all)."""
    from gears_dist.evaluate.pipeline import gi_evaluation, load_gi_truth

    truth = load_gi_truth(store)
    pairs = [n for n in split.test if n.count("+") == 1 and n in truth]
    if not truth or not pairs:
        return []
    _, precision = gi_evaluation(store, pairs, predictors, truth=truth, k=GI_K)
    keep = list(predictors) + (["additive", "base_rate"] if chance or not predictors else [])
    return [{"predictor": src, "category": f"gi_{t}", "num_conditions": int(precision.loc[src, "num_pairs"]),
             f"gi_precision_at_{GI_K}": float(precision.loc[src, t])}
            for src in keep if src in precision.index for t in GI_TYPES if t in precision.columns]


def parse_variant(text: str) -> tuple[str, dict]:
    """'prior' / 'reference' / 'NAME:a.b=1,c.d=go' -> (name, nested overrides). Values are parsed as YAML."""
    import yaml

    if ":" not in text:
        if text not in VARIANTS:
            raise ValueError(f"variant {text!r}: expected one of {sorted(VARIANTS)} or NAME:key=value,... "
                             f"(e.g. 'wide:model.hidden_size=128,model.prior=go')")
        return text, copy.deepcopy(VARIANTS[text])
    name, _, body = text.partition(":")
    if not name or not body:
        raise ValueError(f"variant {text!r}: expected NAME:key=value[,key=value...]")
    out: dict = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"variant {text!r}: {item!r} is not key=value (dotted config field = value)")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            # PyYAML reads '1e-3' (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[leaf] = parsed
    return name, out


def _variant_config(base: dict, overrides: dict, split_kind: str, seed: int, name: str, tracking_uri: str) -> dict:
    cfg = deep_merge(copy.deepcopy(base), overrides)
    cfg = deep_merge(cfg, {"name": f"{base.get('name', 'gears')}_{name}_s{seed}",
                           "data": {"split": None, "split_kind": split_kind, "split_seed": seed},
                           "scaling": {"num_workers": 1},
                           "tracking": {"uri": tracking_uri, "run_name": f"{name} split {seed}"}})
    return cfg


def _train_and_evaluate(cfg_dict: dict, store_path: str, run_dir: str, keys: dict, parent_run_id: str | None
                        ) -> list[dict]:
    """One (variant, split): train in this process, then the model's test metrics per category (rows)."""
    import warnings

    from gears_dist.data.splits import load_split
    from gears_dist.evaluate.pipeline import evaluate_split
    from gears_dist.evaluate.predict import TrainedPredictor
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import run_worker

    cfg = run_config_from_dict(cfg_dict)
    # Ray's workers inherit the driver's environment: a MASTER_PORT set there (an earlier in-process run) would be
    # the same port for every parallel task. This process is this task's alone (max_calls=1): choose a fresh one.
    os.environ.pop("MASTER_PORT", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_worker(cfg, store_path, run_dir, 0, 1, keys=keys)
    if parent_run_id and summary.get("mlflow_run_id") and cfg.tracking.enabled:
        from gears_dist.train import tracking

        tracking.client(cfg.tracking.uri).set_tag(summary["mlflow_run_id"], tracking.PARENT_TAG, parent_run_id)
    model = TrainedPredictor.load(run_dir)
    split = load_split(model.store, keys["split"])
    ev = evaluate_split(model.store, split, {"model": model}, baselines=())
    best = summary.get("best") or {}
    rows = [{**row, "best_epoch": best.get("epoch")} for row in ev.table.to_dict("records")]
    return rows + [{k: v for k, v in r.items() if k != "predictor"} for r in gi_rows(model.store, split,
                                                                                      {"model": model})]


def summarize_splits(per_split) -> object:
    """Mean, sd (ddof 1) and number of splits per (predictor, category) for each metric."""
    metrics = [m for m in per_split.columns if m not in ("predictor", "category", "split_seed", "num_conditions",
                                                          "coverage", "best_epoch")]
    grouped = per_split.groupby(["predictor", "category"], sort=True)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" if s == "mean" else f"{m}_sd" for m, s in out.columns]
    out["num_splits"] = grouped.size()
    out["num_conditions"] = grouped["num_conditions"].sum()
    return out.reset_index()


def format_summary(summary, metrics: Sequence[str] = ("pearson_delta", "mse_de")) -> str:
    """Terminal table: per category, every predictor's mean +- sd, best mean per metric marked with *."""
    lines = []
    for cat in sorted(summary["category"].unique(), key=lambda c: (c == "all", c)):
        part = summary[summary["category"] == cat]
        n = int(part["num_splits"].max())
        lines.append(f"\n{cat} ({int(part['num_conditions'].max())} conditions over {n} splits)")
        best = {m: (part[f"{m}_mean"].idxmin() if m.startswith("mse") else part[f"{m}_mean"].idxmax()) for m in metrics}
        header = f"  {'predictor':<16}" + "".join(f"{m:>24}" for m in metrics)
        lines.append(header)
        for i, row in part.iterrows():
            cells = []
            for m in metrics:
                mark = "*" if best[m] == i else " "
                sd = row[f"{m}_sd"]
                cells.append(f"{row[f'{m}_mean']:>11.4f} ± {0.0 if np.isnan(sd) else sd:<8.4f}{mark}")
            lines.append(f"  {row['predictor']:<16}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def plot_summary(summary, path: pathlib.Path, metrics: Sequence[str] = ("pearson_delta", "mse_de")) -> pathlib.Path:
    from matplotlib.figure import Figure  # without pyplot: a notebook's backend stays as it is

    cats = sorted(summary["category"].unique(), key=lambda c: (c == "all", c))
    preds = list(dict.fromkeys(summary["predictor"]))
    fig = Figure(figsize=(5.5 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    width = 0.8 / max(1, len(preds))
    for ax, m in zip(axes[0], metrics):
        for j, p in enumerate(preds):
            part = summary[summary["predictor"] == p].set_index("category").reindex(cats)
            ax.bar(np.arange(len(cats)) + j * width, part[f"{m}_mean"], width, yerr=part[f"{m}_sd"].fillna(0),
                   label=p, capsize=2)
        ax.set_xticks(np.arange(len(cats)) + width * (len(preds) - 1) / 2, cats, rotation=30, ha="right")
        ax.set_title(f"{m} (mean ± sd over splits)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run_multisplit(store_path: str | os.PathLike, cfg, out: str | os.PathLike, *, seeds: Sequence[int] = (1, 2, 3, 4, 5),
                   variants: Mapping[str, dict] | Sequence[str] = ("reference", "prior"), split_kind: str = "simulation",
                   baselines: Sequence[str] | None = None, address: str | None = None,
                   max_parallel: int | None = None) -> dict:
    """Train and evaluate every variant of `cfg` (a RunConfig) on one split per seed; returns
    {'per_split': DataFrame, 'summary': DataFrame, 'files': {...}, 'mlflow_run_id': ...}."""
    import pandas as pd
    import ray

    from gears_dist.data.splits import load_split
    from gears_dist.data.store import open_store
    from gears_dist.distributed.launcher import ensure_ray, verbose
    from gears_dist.evaluate import baselines as B
    from gears_dist.evaluate.pipeline import evaluate_split
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import prepare_run
    from gears_dist.train.tracking import Tracker, resolve_tracking_uri

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct split seeds, received {seeds}")
    if not isinstance(variants, Mapping):
        variants = dict(parse_variant(v) for v in variants)
    if not variants:
        raise ValueError("variants: expected at least one (e.g. 'reference', 'prior')")
    baselines = list(B.BASELINES) if baselines is None else list(baselines)
    out = pathlib.Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = to_dict(cfg)
    uri = resolve_tracking_uri(cfg.tracking.uri, out)
    for name, over in variants.items():  # every variant's config must load before anything runs
        run_config_from_dict(_variant_config(base, over, split_kind, seeds[0], name, uri))

    t0 = time.perf_counter()
    # Splits and graphs are made here, once per seed: the tasks only read the store.
    keys = {}
    for seed in seeds:
        for name, over in variants.items():
            c = run_config_from_dict(_variant_config(base, over, split_kind, seed, name, uri))
            keys[name, seed] = prepare_run(c, store_path, 1)
    tracker = Tracker(cfg.tracking.enabled, uri, out, cfg.tracking.experiment,
                      run_name=f"multisplit {cfg.name} ({split_kind}, {len(seeds)} splits)")
    if tracker.active:
        tracker.set_tags({"multisplit": "parent", "split_kind": split_kind, "seeds": ",".join(map(str, seeds)),
                          "variants": ",".join(variants)})
        tracker.log_text(json.dumps({"config": base, "variants": variants}, indent=1, default=str), "multisplit.json")

    # each run's own lines stay in Ray's logs (--verbose shows them); the terminal gets one line per finished run
    ensure_ray(address, cfg, log_to_driver=verbose())
    parallel = max_parallel or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_calls=1)(_train_and_evaluate)
    jobs = [(name, seed) for seed in seeds for name in variants]
    print(f"gears-dist multisplit: {len(jobs)} training runs ({len(variants)} variant(s) x {len(seeds)} "
          f"{split_kind} splits), {parallel} at a time", flush=True)
    pending, refs, rows = list(jobs), {}, []
    while pending or refs:
        while pending and len(refs) < parallel:
            name, seed = pending.pop(0)
            c = _variant_config(base, variants[name], split_kind, seed, name, uri)
            run_dir = out / "runs" / f"{name}_s{seed}"
            refs[task.remote(c, str(pathlib.Path(store_path).resolve()), str(run_dir), keys[name, seed],
                             tracker.run_id if tracker.active else None)] = (name, seed)
        done, _ = ray.wait(list(refs), num_returns=1)
        name, seed = refs.pop(done[0])
        result = ray.get(done[0])
        rows += [{**r, "predictor": name, "split_seed": seed} for r in result]
        print(f"  {name} split {seed}: done ({len(jobs) - len(pending) - len(refs)}/{len(jobs)}, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)

    store = open_store(store_path)
    first = next(iter(variants))  # the split of a seed is the same for every variant
    for seed in seeds:
        split = load_split(store, keys[first, seed]["split"])
        ev = evaluate_split(store, split, {}, baselines=baselines)
        rows += [{**r, "split_seed": seed} for r in ev.table.to_dict("records")]
        rows += [{**r, "split_seed": seed} for r in gi_rows(store, split, {})]
    per_split = pd.DataFrame(rows)
    summary = summarize_splits(per_split)
    files = {"per_split": out / "per_split.csv", "summary": out / "summary.csv", "json": out / "summary.json"}
    per_split.to_csv(files["per_split"], index=False)
    summary.to_csv(files["summary"], index=False)
    files["json"].write_text(json.dumps({"split_kind": split_kind, "seeds": seeds, "variants": variants,
                                         "summary": summary.to_dict("records")}, indent=1, default=str))
    is_gi = summary["category"].str.startswith("gi_")
    if is_gi.any():
        files["gi"] = out / "gi.csv"
        summary[is_gi].dropna(axis=1, how="all").to_csv(files["gi"], index=False)
    files["figure"] = plot_summary(summary[~is_gi], out / "summary.png")
    if tracker.active:
        metrics = {}
        for r in summary.to_dict("records"):
            for m in (*SUMMARY_METRICS, f"gi_precision_at_{GI_K}"):
                if f"{m}_mean" in r:
                    metrics[f"{r['predictor']}/{r['category']}/{m}_mean"] = r[f"{m}_mean"]
                    metrics[f"{r['predictor']}/{r['category']}/{m}_sd"] = r[f"{m}_sd"]
        tracker.log_metrics({k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}, step=0)
        for p in files.values():
            tracker.log_artifact(p)
        tracker.finish()
    print(format_summary(summary[~is_gi]))
    if is_gi.any():
        print(format_summary(summary[is_gi], metrics=(f"gi_precision_at_{GI_K}",)))
    print(f"\ngears-dist multisplit: {len(jobs)} runs in {time.perf_counter() - t0:.0f} s; results {files['summary']}, "
          f"{files['figure']}" + (f"; MLflow parent run {tracker.run_id} at {uri}" if tracker.active else ""))
    return {"per_split": per_split, "summary": summary, "files": files,
            "mlflow_run_id": tracker.run_id if tracker.active else None}
