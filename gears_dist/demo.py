"""`gears-dist demo`: the whole pipeline on a generated screen, on this machine, in a few minutes.

simulate (the 'demo' preset: real gene symbols, GO-structured effects, planted interactions)
-> ingest into a Zarr store -> simulation split -> GO + co-expression graphs and METIS partitions
-> train with 2 local Ray workers + DeepSpeed (configs/demo.yaml), tracked in MLflow (SQLite)
-> evaluate the model beside the baselines, per test category, with figures.

Each step is skipped when its output already exists, so a second `make demo` only trains and
evaluates again (into a fresh run directory).

The terminal gets a short account (under 60 lines): each step, the training's progress lines and summary, and
one metric per test category beside the baselines. The rest is in the run directory: the full evaluation
report (evaluation/report.txt: every metric, GI precision, the figures' paths), rank 0's lines (train.log),
Ray's logs (logs/ray/).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import time

from gears_dist.config import CONFIGS


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(out: str | pathlib.Path, config: str | pathlib.Path | None = None) -> int:
    """The whole pipeline through the Python API (``gears_dist.api``: what a notebook would call), with a short
    account of each step on the terminal. Returns 0."""
    from gears_dist import api as gd
    from gears_dist.data import synthetic
    from gears_dist.data.store import StoreError
    from gears_dist.evaluate.commands import evaluate_run
    from gears_dist.train.loop import resolve_split_key

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = gd.resolve_config(pathlib.Path(config) if config else CONFIGS / "demo.yaml")
    h5ad, store_path = out / "screen.h5ad", out / "screen.zarr"

    t = _step(f"1/5 simulate a screen (preset 'demo') -> {h5ad}")
    if h5ad.exists():
        print("   exists, reusing")
    else:
        # the file a user brings, with the ground truth beside it (gears-dist simulate)
        synthetic.write_screen(h5ad, "demo", num_workers=1)
        print(f"   {time.perf_counter() - t:.1f} s")

    t = _step(f"2/5 ingest -> {store_path}")
    try:
        store = gd.open_store(store_path)
        print("   exists, reusing")
    except StoreError:
        store = gd.ingest(h5ad, store_path, overwrite=True)
        print(f"   {store.num_cells} cells x {store.num_genes} genes, "
              f"{len(store.condition_names)} conditions, {time.perf_counter() - t:.1f} s")

    key = resolve_split_key(cfg)
    t = _step(f"3/5 split {key} and graphs")
    split = store.split(cfg.data.split_kind, cfg.data.split_seed, name=key)
    print(f"   train {len(split.train)}, val {len(split.val)}, test {len(split.test)} conditions; test: "
          + ", ".join(f"{c} {len(n)}" for c, n in sorted(split.test_categories().items())))
    bundle = store.build_graphs(cfg, split=split)
    print(f"   GO graph: {len(bundle.go.nodes)} nodes, {bundle.go.edge_index.shape[1]} edges; "
          f"co-expression: {bundle.coexpr.edge_index.shape[1]} edges ({time.perf_counter() - t:.1f} s)")

    run_dir = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    t = _step(f"4/5 train ({cfg.scaling.num_workers} Ray workers, DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, "
              f"{cfg.train.epochs} epochs) -> {run_dir}")
    run = gd.train(store, cfg, out=run_dir)
    import ray

    ray.shutdown()  # frees Ray's memory for the evaluation (and, with --verbose, flushes the workers' lines now,
    # not in the middle of the evaluation)
    print(f"   {time.perf_counter() - t:.1f} s; MLflow run {run.mlflow_run_id}")

    t = _step("5/5 evaluate: the model beside the baselines, per test category")
    report = io.StringIO()  # evaluate's full account (every metric per category, GI, figures) goes to a file
    try:
        with contextlib.redirect_stdout(report):
            evaluate_run(run_dir)  # what `gears-dist evaluate RUN` does
    except BaseException:
        print(report.getvalue())
        raise
    _print_evaluation(run_dir / "evaluation", report.getvalue(), time.perf_counter() - t)
    print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{(run_dir / 'mlflow.db').resolve()} "
          f"--host 127.0.0.1")
    return 0


def _where_beaten(record: dict) -> str:
    """One line: per test category, the baselines that beat the model there (details in report.txt)."""
    losses = record.get("beaten_on_test") or {}
    if not losses:
        return "on test the model is at least as good as every baseline in every category (pearson_delta, mse_de)"
    parts = []
    for cat, items in losses.items():
        by: dict[str, list[str]] = {}
        for item in items:
            by.setdefault(item["predictor"], []).append(item["metric"])
        parts.append(f"{cat}: " + ", ".join(f"{n} ({'/'.join(ms)})" for n, ms in by.items()))
    return "where a baseline beats the model on test: " + "; ".join(parts)


def _print_evaluation(out: pathlib.Path, text: str, seconds: float) -> None:
    """mse_de per test category for the model and every baseline, the headline (chosen on validation), and
    where the rest is; `text` (what `gears-dist evaluate` printed: also where a baseline beats the model on
    test) is kept as out/report.txt."""
    import pandas as pd

    from gears_dist.evaluate.report import format_by_category

    (out / "report.txt").write_text(text)
    print(format_by_category(pd.read_csv(out / "metrics.csv"), "mse_de"))
    print(*(line for line in text.splitlines() if line.startswith("headline:")), sep="\n")
    print(_where_beaten(json.loads((out / "metrics.json").read_text()).get("headline", {})))
    figures = sorted(out.rglob("*.png"))
    print(f"every metric, GI precision and {len(figures)} figures: {out / 'report.txt'} ({seconds:.1f} s)")
