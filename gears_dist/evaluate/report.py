"""Results out: a readable terminal table, JSON + CSV files, and an MLflow run.

The results table is long-format: one row per (predictor, category) with ``num_conditions``,
``coverage`` (fraction of the category's conditions the predictor has the information it is meant
to use for; 1 for the model) and one column per metric.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

from gears_dist.evaluate.metrics import HIGHER_IS_BETTER, METRICS

SHORT_NAMES = {
    "mse": "mse", "pearson": "r", "mse_de": "mse_de", "pearson_de": "r_de", "pearson_delta": "r_delta",
    "pearson_delta_de": "r_delta_de", "mse_top20_de_non_dropout": "mse_nd",
    "frac_opposite_direction_top20_non_dropout": "opp_nd", "frac_sigma_below_1_non_dropout": "sig1_nd",
}
CATEGORY_ORDER = ("combo_seen0", "combo_seen1", "combo_seen2", "unseen_single", "seen_single", "all")


def category_sort_key(c: str) -> tuple[int, str]:
    return (CATEGORY_ORDER.index(c) if c in CATEGORY_ORDER else len(CATEGORY_ORDER) - 1, c)


def format_table(table, metrics: Sequence[str] = METRICS, title: str | None = None) -> str:
    """Fixed-width text: one block per category, predictors in rows, the best value per column starred."""
    lines = []
    if title:
        lines.append(title)
    cols = [m for m in metrics if m in table.columns]
    head = f"{'predictor':<14}{'n':>5}{'cover':>7}" + "".join(f"{SHORT_NAMES.get(m, m):>11}" for m in cols)
    for cat in sorted(table["category"].unique(), key=category_sort_key):
        sub = table[table["category"] == cat]
        lines.append("")
        lines.append(f"[{cat}]")
        lines.append(head)
        best = {}
        for m in cols:
            vals = sub[m].astype(float)
            if vals.notna().any():
                best[m] = vals.max() if HIGHER_IS_BETTER.get(m, True) else vals.min()
        for _, row in sub.iterrows():
            cells = []
            for m in cols:
                v = float(row[m])
                text = "nan" if math.isnan(v) else f"{v:.4f}"
                star = "*" if m in best and not math.isnan(v) and math.isclose(v, best[m], rel_tol=1e-9, abs_tol=1e-12) \
                    and len(sub) > 1 else " "
                cells.append(f"{text + star:>11}")
            cover = row.get("coverage", float("nan"))
            cover_s = "" if cover is None or (isinstance(cover, float) and math.isnan(cover)) else f"{cover:.2f}"
            lines.append(f"{str(row['predictor'])[:13]:<14}{int(row['num_conditions']):>5}{cover_s:>7}" + "".join(cells))
    lines.append("")
    lines.append("columns: " + ", ".join(f"{SHORT_NAMES.get(m, m)}={m}" for m in cols)
                 + "; * best in its category; cover = share of conditions a baseline fully covers")
    return "\n".join(lines)


def format_by_category(table, metric: str = "mse_de") -> str:
    """One metric, predictors in rows and categories in columns, the best per column starred: the short view
    (`gears-dist demo`); format_table has every metric."""
    cats = sorted(table["category"].unique(), key=category_sort_key)
    lower = not HIGHER_IS_BETTER.get(metric, True)
    values = {(r["predictor"], r["category"]): float(r[metric]) for _, r in table.iterrows()}
    best = {}
    for c in cats:
        col = [v for (_, cat), v in values.items() if cat == c and not math.isnan(v)]
        if len(col) > 1:
            best[c] = min(col) if lower else max(col)
    lines = [f"{metric} ({'lower' if lower else 'higher'} is better; * best in its column)",
             f"{'predictor':<14}" + "".join(f"{c:>14}" for c in cats)]
    for p in dict.fromkeys(table["predictor"]):
        cells = []
        for c in cats:
            v = values.get((p, c), float("nan"))
            star = "*" if c in best and not math.isnan(v) and math.isclose(v, best[c], rel_tol=1e-9, abs_tol=1e-12) \
                else " "
            cells.append(f"{('nan' if math.isnan(v) else f'{v:.4f}') + star:>14}")
        lines.append(f"{str(p)[:13]:<14}" + "".join(cells))
    return "\n".join(lines)


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def write_results(table, out_dir: str | os.PathLike, extra: Mapping | None = None,
                  per_condition: Mapping[str, object] | None = None, stem: str = "metrics") -> dict[str, pathlib.Path]:
    """Write STEM.json (table + extra), STEM.csv and per-condition CSVs; return their paths."""
    from gears_dist.data.store import atomic_write_text

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    records = [{k: _clean(v) for k, v in r.items()} for r in table.to_dict(orient="records")]
    doc = {"metrics": records, **({k: v for k, v in extra.items()} if extra else {})}
    paths["json"] = out / f"{stem}.json"
    atomic_write_text(paths["json"], json.dumps(doc, indent=1, default=_clean, allow_nan=False))
    paths["csv"] = out / f"{stem}.csv"
    atomic_write_text(paths["csv"], table.to_csv(index=False))
    for name, df in (per_condition or {}).items():
        p = out / f"per_condition_{name}.csv"
        atomic_write_text(p, df.to_csv())
        paths[f"per_condition_{name}"] = p
    return paths


def mlflow_metrics(table, prefix: str = "test") -> dict[str, float]:
    """Flat MLflow metric names: {prefix}/{category}/{predictor}/{metric}."""
    out = {}
    for _, row in table.iterrows():
        for m in list(METRICS) + ["coverage"]:
            if m in row and row[m] is not None and not (isinstance(row[m], float) and math.isnan(row[m])):
                out[f"{prefix}/{row['category']}/{row['predictor']}/{m}"] = float(row[m])
    return out


def log_to_mlflow(table, artifacts: Sequence[str | os.PathLike] = (), *, run_id: str | None = None,
                  tracking_uri: str | None = None, experiment: str = "gears_dist-evaluate", run_name: str | None = None,
                  prefix: str = "test", extra_metrics: Mapping[str, float] | None = None,
                  artifact_path: str = "evaluation") -> str:
    """Log the table's metrics (``mlflow_metrics``) and files to an MLflow run (an existing one by id, e.g. the
    training run, or a new one); return the run id. The MLflow calls: gears_dist.train.tracking.log_to_run.

    The tracking URI defaults to $MLFLOW_TRACKING_URI (MLflow 3 refuses the file store: use
    ``sqlite:///path/mlflow.db``). Errors propagate: unlike training, evaluation was asked to log.
    """
    from gears_dist.train.tracking import log_to_run

    metrics = mlflow_metrics(table, prefix)
    metrics.update({k: float(v) for k, v in (extra_metrics or {}).items() if v is not None and not math.isnan(float(v))})
    return log_to_run(metrics, artifacts, run_id=run_id, tracking_uri=tracking_uri, experiment=experiment,
                      run_name=run_name, artifact_path=artifact_path)


def headline(val_table, test_table, model: str, metric: str = "mse_de") -> tuple[str, dict]:
    """Which predictor to believe, decided on validation (never on test), and where the model loses on test.

    Returns (text, record): the predictor with the best validation `metric` over all validation conditions,
    the model's value beside it, and per test category the baselines that beat the model on pearson_delta or
    mse_de (mean over the category's conditions)."""
    record: dict = {"model": model, "metric": metric}
    lines = []
    if val_table is not None and len(val_table):
        val = val_table[val_table["category"] == "all"].set_index("predictor")[metric].astype(float).dropna()
        if model in val.index and len(val) > 1:
            lower = not HIGHER_IS_BETTER.get(metric, True)
            best = val.idxmin() if lower else val.idxmax()
            if _same(val[best], val[model]):
                best = model  # a tie (e.g. the model kept its prior alone) goes to the model
            record.update({"best_on_val": best, "val": {k: float(v) for k, v in val.items()}})
            if best == model:
                runner = val.drop(model)
                second = runner.idxmin() if lower else runner.idxmax()
                how = "ties with" if _same(val[second], val[model]) else "next"
                lines.append(f"headline: the model ({model}) is the best predictor on validation ({metric} "
                             f"{val[model]:.4g}; {how} {second} {val[second]:.4g})")
            else:
                lines.append(f"headline: {best} is better than the model on validation ({metric} {val[best]:.4g} vs "
                             f"{val[model]:.4g}): on this split the model adds nothing over {best}; prefer it")
    else:
        lines.append("headline: no validation conditions, so no predictor is chosen (test is never used to choose)")
    losses = {}
    for cat in sorted(test_table["category"].unique(), key=category_sort_key):
        sub = test_table[test_table["category"] == cat].set_index("predictor")
        if model not in sub.index:
            continue
        beaten = []
        for m, higher in (("pearson_delta", True), ("mse_de", False)):
            mine = float(sub.loc[model, m])
            for p, v in sub[m].astype(float).items():
                if p != model and not math.isnan(v) and not _same(v, mine) and (v > mine if higher else v < mine):
                    beaten.append({"predictor": p, "metric": m, "value": v, "model": mine})
        if beaten:
            losses[cat] = beaten
    record["beaten_on_test"] = losses
    if losses:
        lines.append("where a baseline beats the model on test: " + "; ".join(
            f"{cat}: " + ", ".join(f"{b['predictor']} ({b['metric']} {b['value']:.4g} vs {b['model']:.4g})" for b in bs)
            for cat, bs in losses.items()))
    else:
        lines.append("on test the model is at least as good as every baseline in every category "
                     "(pearson_delta and mse_de)")
    return "\n".join(lines), record


def _same(a: float, b: float) -> bool:
    """Equal up to float rounding (the model that kept its prior and the go_prior baseline compute the same sum
    in different orders)."""
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
