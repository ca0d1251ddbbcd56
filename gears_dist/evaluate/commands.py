"""`gears-dist evaluate` and `gears-dist predict`.

evaluate RUN_OR_CHECKPOINT: the trained model and every baseline on the split's test conditions,
per test category -> terminal table, OUT/metrics.{json,csv}, per-condition CSVs, figures (PNG),
genetic interactions (scores per pair, precision@10 per GI type when the store holds a planted
ground truth), a cell-eval export, and everything logged to the run's MLflow run.
Passing a STORE instead of a run evaluates the baselines alone (``--split`` required).
Every file is written into a staging directory beside OUT and moved into OUT only once everything
succeeded (`staged_output`): a failure midway leaves OUT as it was.

predict RUN_OR_CHECKPOINT: predicted mean expression and change per gene (optionally the
log-variance of the uncertainty head) for perturbation sets given as arguments, in a file, or as
all pairs of a gene list, written as AnnData (.h5ad) or CSV.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Iterator, Sequence

import numpy as np


def _is_store(path: pathlib.Path) -> bool:
    from gears_dist.data.store import MANIFEST

    return (path / MANIFEST).is_file() and (path / "X").exists()


def _run_dir_of(path: pathlib.Path) -> pathlib.Path | None:
    """The run directory that holds a model / checkpoint (for summary.json, mlflow.db)."""
    for p in (path, *path.parents[:3]):
        if (p / "summary.json").is_file() or (p / "checkpoints").is_dir():
            return p
    return None


def _history(run_dir: pathlib.Path | None, meta: dict) -> list[dict]:
    if run_dir is not None and (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text()).get("history", [])
    return list(meta.get("history", []))


def _mlflow_target(tracking_uri: str | None, mlflow_run_id: str | None, run_dir: pathlib.Path | None, meta: dict
                   ) -> tuple[str | None, str | None]:
    """(tracking URI, run id) to log to; (None, None) when there is nowhere to log."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    run_id = mlflow_run_id
    if run_dir is not None:
        summary = run_dir / "summary.json"
        if run_id is None and summary.is_file():
            run_id = json.loads(summary.read_text()).get("mlflow_run_id")
        run_id = run_id or meta.get("mlflow_run_id")
        if uri is None:
            cfg_uri = ((meta.get("config") or {}).get("tracking") or {}).get("uri")
            db = run_dir / "mlflow.db"
            uri = cfg_uri or (f"sqlite:///{db.resolve()}" if db.is_file() else None)
    return uri, run_id


@contextlib.contextmanager
def staged_output(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling of `out` to write into; move its files into `out` only once the block
    succeeded. A failure (or Ctrl-C) leaves `out` as it was: absent, or holding the previous results.

    `out` absent: the whole directory is renamed into place (atomic). `out` present: each file is
    moved in atomically, replacing the same-named file; other files there are never touched (the
    directory may be a run directory, or hold the user's own files).
    """
    from gears_dist.data.store import owned_temp_dir, release_temp_dir, remove_stale_temp_dirs

    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory; pass a directory for the results")
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out, "evaluating")
    stage = None
    try:
        stage = owned_temp_dir(out, "evaluating")
        yield stage
        if not out.exists():
            os.replace(stage, out)
        else:
            for src in sorted(stage.rglob("*")):
                if src.is_file():
                    dest = out / src.relative_to(stage)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dest)
    except BaseException:
        if stage is not None:
            release_temp_dir(stage)
            stage = None
        for p in created:  # the parents this call made, innermost first, if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    finally:
        if stage is not None:
            release_temp_dir(stage)  # after a success only the owner record is left to remove


DEFAULT_BASELINES = ("control_mean", "train_mean", "additive", "linear", "go_prior")
CELL_EVAL_MODES = ("cells", "pseudobulk")


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """What `evaluate_run` computes and writes besides the metrics table (the flags of ``gears-dist evaluate``)."""

    conditions: str = "test"
    gi: bool = True
    gi_k: int = 10
    gi_truth: str | None = None
    figures: bool = True
    num_plot_conditions: int = 2
    export_cell_eval: bool = False
    export_cell_eval_mode: str = "cells"
    export_cell_eval_max_cells: int | None = None
    export_cell_eval_max_control_cells: int | None = None

    def __post_init__(self):
        if self.conditions not in ("test", "val"):
            raise ValueError(f"conditions: expected 'test' or 'val', received {self.conditions!r}")
        if self.export_cell_eval_mode not in CELL_EVAL_MODES:
            raise ValueError(f"export_cell_eval_mode: expected one of {list(CELL_EVAL_MODES)}, received "
                             f"{self.export_cell_eval_mode!r}")
        if isinstance(self.gi_k, bool) or not isinstance(self.gi_k, int) or self.gi_k < 1:
            raise ValueError(f"gi_k: expected a positive integer, received {self.gi_k!r}")


def evaluate_run(target: str | os.PathLike, *, store: str | os.PathLike | None = None, split: str | None = None,
                 conditions: str = "test", baselines: Sequence[str] = DEFAULT_BASELINES,
                 out: str | os.PathLike | None = None, tracking_uri: str | None = None,
                 mlflow_run_id: str | None = None, mlflow: bool = True, gi: bool = True, gi_k: int = 10,
                 gi_truth: str | os.PathLike | None = None, figures: bool = True, num_plot_conditions: int = 2,
                 export_cell_eval: bool = False, export_cell_eval_mode: str = "cells",
                 export_cell_eval_max_cells: int | None = None, export_cell_eval_max_control_cells: int | None = None,
                 device: str = "cpu") -> dict:
    """``gears-dist evaluate``: a trained model (run directory, model directory or checkpoint) and `baselines` on
    the split's `conditions`, per category; or, when `target` is a store, the baselines alone on `split`.

    Prints the table (and the headline, GI precision, where the files went) and writes metrics.{json,csv},
    per-condition CSVs, GI scores, figures and the cell-eval export into `out` (default: RUN/evaluation),
    staged so that a failure leaves `out` as it was; logs them to MLflow unless `mlflow` is False.

    Returns ``{"table": DataFrame, "out": Path, "files": {...}, "figures": [Path], "mlflow_run_id": str | None}``.
    Raises ValueError / TypeError for bad arguments (a store without `split`, an unknown baseline, ...).
    """
    from gears_dist.data.splits import load_split
    from gears_dist.data.store import open_store
    from gears_dist.evaluate import report
    from gears_dist.evaluate.predict import TrainedPredictor

    if isinstance(baselines, str) or not all(isinstance(b, str) for b in baselines):
        raise TypeError(f"baselines: expected a list of baseline names, received {baselines!r}")
    opts = EvaluateOptions(conditions=conditions, gi=gi, gi_k=gi_k, gi_truth=None if gi_truth is None else str(gi_truth),
                           figures=figures, num_plot_conditions=num_plot_conditions, export_cell_eval=export_cell_eval,
                           export_cell_eval_mode=export_cell_eval_mode,
                           export_cell_eval_max_cells=export_cell_eval_max_cells,
                           export_cell_eval_max_control_cells=export_cell_eval_max_control_cells)
    t0 = time.perf_counter()
    target = pathlib.Path(target)
    predictors, meta, run_dir = {}, {}, None
    if target.exists() and _is_store(target):
        st = open_store(target)
        if not split:
            raise ValueError(f"{str(target)!r} is a store: pass --split KEY (has {sorted(st.components('splits'))}) "
                             f"to evaluate the baselines, or pass a run directory to evaluate a model")
        split_key = split
    else:
        model = TrainedPredictor.load(target, store=store, device=device)
        st, meta = model.store, model.meta
        predictors["gears"] = model
        split_key = split or meta.get("split")
        run_dir = _run_dir_of(target.resolve())
    the_split = load_split(st, split_key)
    baselines = [b for b in baselines if b]
    final = pathlib.Path(out) if out else ((run_dir or target.parent) / "evaluation")
    with staged_output(final) as stage:
        ev, files, artifacts, figure_paths, gi_metrics = _evaluate_into(stage, final, opts, st, the_split, split_key,
                                                                        predictors, meta, run_dir, target, baselines)
    # every output has landed in `final`: name those paths from now on
    files = {k: final / pathlib.Path(v).relative_to(stage) for k, v in files.items()}
    artifacts = [final / pathlib.Path(p).relative_to(stage) for p in artifacts]
    figure_paths = [final / pathlib.Path(p).relative_to(stage) for p in figure_paths]

    uri, run_id = _mlflow_target(tracking_uri, mlflow_run_id, run_dir, meta)
    logged = None
    if mlflow and uri:
        logged = run_id = report.log_to_mlflow(ev.table, artifacts, run_id=run_id, tracking_uri=uri,
                                               run_name=f"evaluate {split_key}", extra_metrics=gi_metrics,
                                               prefix=opts.conditions)
        print(f"\nMLflow: logged {len(artifacts)} files and the metrics to run {run_id} at {uri}")
    print(f"\nresults: {files['json']} , {files['csv']}")
    if figure_paths:
        print("figures:\n  " + "\n  ".join(str(p) for p in figure_paths))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return {"table": ev.table, "out": final, "files": files, "figures": figure_paths, "mlflow_run_id": logged}


def _evaluate_into(out: pathlib.Path, final: pathlib.Path, opts: EvaluateOptions, store, split, split_key: str,
                   predictors: dict, meta: dict, run_dir: pathlib.Path | None, target: pathlib.Path,
                   baselines: list[str]):
    """The evaluation proper, every file written under `out` (the staging directory; `final` is where
    they will land, for messages)."""
    from gears_dist.evaluate import export, pipeline, plots, report

    model = predictors.get("gears")
    ev = pipeline.evaluate_split(store, split, predictors, baselines=baselines, conditions=opts.conditions,
                                 go=getattr(model, "go_graph", None))
    title = (f"gears-dist evaluate: {opts.conditions} conditions of split {split_key!r} "
             f"({len(ev.truth.names)} conditions; mean over conditions per category)")
    print(report.format_table(ev.table, title=title))
    extra = {"split": split_key, "store": str(store.path), "model": str(target), "conditions": opts.conditions}
    if model is not None and opts.conditions == "test":
        # The headline is chosen on validation; test only says where the model loses.
        val_table = None
        if [n for n in split.val if n != "ctrl"]:
            val_table = pipeline.evaluate_split(store, split, predictors, baselines=baselines, conditions="val",
                                                go=getattr(model, "go_graph", None)).table
        text, extra["headline"] = report.headline(val_table, ev.table, "gears")
        print("\n" + text)
    files = report.write_results(ev.table, out, per_condition=ev.per_condition, extra=extra)
    artifacts = [files["json"], files["csv"]]

    # Genetic interactions: test pairs (the model never saw them), observed + additive + model.
    gi_metrics = {}
    truth = pipeline.load_gi_truth(opts.gi_truth) if opts.gi_truth else pipeline.load_gi_truth(store)
    pairs = [n for n in ev.truth.names if len(n.split("+")) == 2]
    figures = []
    if pairs and opts.gi:
        gi_pred = {k: v for k, v in predictors.items()}
        scores, precision = pipeline.gi_evaluation(store, pairs, gi_pred, truth=truth or None, k=opts.gi_k)
        from gears_dist.evaluate.gi import rank_gi

        for src, df in scores.items():
            p = out / f"gi_scores_{src}.csv"
            df.to_csv(p)
            ranked = out / f"gi_ranked_{src}.json"  # top pairs per GI type, by the type's rule
            ranked.write_text(json.dumps(rank_gi(df, top=opts.gi_k), indent=1))
            artifacts += [p, ranked]
            figures.append(plots.plot_gi_scatter(df, out / f"gi_scatter_{src}.png", truth=truth or None,
                                                 title=f"genetic interactions: {src} ({len(df)} test pairs)"))
        if len(precision):
            p = out / "gi_precision.csv"
            precision.to_csv(p)
            artifacts.append(p)
            print(f"\nGI precision@{opts.gi_k} per type (test pairs vs planted ground truth; base_rate = chance):")
            print(precision.to_string(float_format=lambda v: f"{v:.3f}"))
            for src, row in precision.iterrows():
                for t, v in row.items():
                    if t != "num_pairs" and not np.isnan(v):
                        gi_metrics[f"gi/precision_at_{opts.gi_k}/{src}/{t}"] = float(v)

    if opts.figures:
        history = _history(run_dir, meta)
        figures += pipeline.make_figures(store, ev, out / "figures", num_conditions=opts.num_plot_conditions,
                                         history=history or None)
    if opts.export_cell_eval:
        name = "gears" if "gears" in ev.predictions else next(iter(ev.predictions))
        exp = export.export_cell_eval(store, ev.truth.names, ev.predictions[name], out / "cell_eval",
                                      categories=ev.categories, predictor=name, mode=opts.export_cell_eval_mode,
                                      max_cells=opts.export_cell_eval_max_cells,
                                      max_control_cells=(opts.export_cell_eval_max_control_cells
                                                         or opts.export_cell_eval_max_cells))
        pred, real, check = (final / pathlib.Path(exp[k]).relative_to(out) for k in ("pred", "real", "metrics"))
        profile = " --profile anndata --skip-metrics pearson_edistance" if opts.export_cell_eval_mode == "pseudobulk" \
            else ""
        print(f"\ncell-eval export ({opts.export_cell_eval_mode}, predictor {name}): {pred} vs {real} (score with: "
              f"cell-eval run -ap {pred} -ar {real} --control-pert ctrl --pert-col target{profile}). Meaningful for "
              f"mean predictions: pearson_delta, mse, mae, mse_delta, mae_delta (not the DE metrics); the values "
              f"they will take, beside ours, per perturbation: {check}")
        artifacts.append(exp["metrics"])
    artifacts += figures
    return ev, files, artifacts, figures, gi_metrics


def predict_to_file(target: str | os.PathLike, sets: Sequence[str | Sequence[str]], out: str | os.PathLike, *,
                    store: str | os.PathLike | None = None, device: str = "cpu", uncertainty: bool = False
                    ) -> list[pathlib.Path]:
    """``gears-dist predict``: the model of `target` (run directory, model directory or checkpoint) on `sets`
    (``"A+B"`` strings or gene tuples), written to `out` (.h5ad: X = mean, layers delta (and logvar); .csv: one
    file per array). Every unknown gene is reported (ValueError) before any work. Prints one summary line;
    returns the files written."""
    from gears_dist.evaluate import predict as P

    if isinstance(sets, str):
        raise TypeError(f"sets: expected a list of perturbation sets, received the string {sets!r}")
    sets = list(sets)
    if not sets:
        raise ValueError("no perturbation sets given: pass --perts A A+B ..., --perts-file FILE or --all-pairs GENES")
    t0 = time.perf_counter()
    model = P.TrainedPredictor.load(target, store=store, device=device)
    sets = model.check_sets(sets)  # every problem reported before any work
    mean, delta, logvar = model.predict_mean(sets, return_logvar=uncertainty)
    seconds = time.perf_counter() - t0
    paths = P.write_predictions(sets, mean, delta, model.genes, out, logvar=logvar,
                                meta={"model": str(target), "store": str(model.store.path)})
    print(f"gears-dist predict: {len(sets)} perturbation set(s) x {len(model.genes)} genes in {seconds:.2f} s "
          f"-> " + ", ".join(str(p) for p in paths))
    return paths
