"""Export predictions and truth as AnnData in the layout cell-eval (Arc Institute) expects.

cell-eval (``pip install cell-eval``; ``cell-eval run -ap pred.h5ad -ar real.h5ad --control-pert ctrl
--pert-col target``) compares a predicted and a real AnnData that have the same genes in the same
order (``var_names``), an obs column naming each row's perturbation (``target`` by default) with
the same set of perturbations in both files, the control among them, and log1p-normalized values
(it rejects negative values and values >= 15).

What cell-eval's mean-based metrics compute (0.8.2, ``metrics/_anndata.py``): each file is
pseudobulked (the mean of each perturbation's rows); ``pearson_delta`` correlates
(pred mean - pred file's control-row mean) with (real mean - real file's control-row mean) over all
genes; ``mse`` / ``mae`` compare the pred and real means; ``mse_delta`` / ``mae_delta`` the deltas.
Our ``evaluate`` (``metrics.py``) computes the same quantities against the store's truth: the mean of
ALL the condition's cells and the control mean over ALL control cells. This export is built so that
the two agree:

- the control rows are the same cells in both files: ALL the store's control cells by default, so
  each file's control mean is the store's control mean;
- the real rows of a condition are ALL its cells by default, so their mean is the store's mean;
- the predicted rows of a condition have a mean equal to the prediction exactly: control cells of
  the file (as many as the condition's real rows) shifted per gene, the shift chosen so that the
  mean after clipping at 0 (log1p expression is never negative) is the predicted mean, not the
  predicted mean bent by the clipping. Where a gene's shift does not push any cell below 0 this is
  the plain shift by the predicted change.

With those defaults cell-eval's pearson_delta / mse / mae (and the *_delta variants) equal ours up to
float32 rounding, except (1) where the predicted mean itself is negative for a gene: the file holds
0 there (counted in ``uns["gears_dist"]["clipped_pred_values"]``), and (2) a prediction with no change
at all (the control_mean baseline, a set with nothing learned): ours is 0 by convention, cell-eval
correlates float32 rounding noise (or returns NaN). ``max_cells`` / ``max_control_cells`` cap the rows
(a reproducible sample, for memory); the sample's mean is then not the store's, and the export states
the resulting gap: every number cell-eval's mean-based metrics will compute is recomputed from the
written files and written beside ours to ``gears_dist_metrics.csv`` (per perturbation), with the
largest gaps in ``uns["gears_dist"]``. A capped control is compensated on the predicted side (the
predicted rows' mean is the file's control mean + the predicted change), so the control sample's
noise enters only the real delta and never reads as agreement between the two files.

Which cell-eval metrics mean something for our predictions: GEARS and the baselines predict a MEAN
per gene and no cell-to-cell spread, so only the metrics computed from per-perturbation means are
meaningful: pearson_delta, mse, mae, mse_delta, mae_delta, discrimination_score_* and
clustering_agreement (pseudobulk effects). The metrics computed from cells are not: the DE metrics
(overlap_at_N, precision_at_N, de_spearman_*, de_direction_match, de_sig_genes_recall,
de_nsig_counts, pr_auc, roc_auc) and pearson_edistance. The predicted cells are copies of control
cells moved by a deterministic shift: they carry the control's spread, not a predicted one, and a
shift of a gene that is 0 in most control cells separates every predicted cell from the control's
zeros, so a rank test calls almost every gene with a nonzero predicted change significant however
small that change; how significant depends on how many rows the export writes, not on the model.
(The uncertainty head's log-variance is not a per-cell spread the export could sample from; it is
not used here.)

``mode="cells"`` (default) writes cells as above. ``mode="pseudobulk"`` writes one row per
perturbation (the store's observed mean; the predicted mean clipped at 0; the control row the
store's control mean): the smallest files for the mean-based metrics, run with
``cell-eval run ... --profile anndata --skip-metrics pearson_edistance`` (DE needs cells).
Memory (cells mode): 2 x (cells written) x genes x 4 bytes, the cells written being the exported
conditions' cells (at most ``max_cells`` each) and the control cells (at most ``max_control_cells``)
— with no caps, 2 x (those conditions' cells + all control cells) x genes x 4 bytes.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

CELL_EVAL_PERT_COL = "target"
METRICS_FILE = "gears_dist_metrics.csv"


def _sample_rows(rows: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or rows.size <= cap:
        return rows
    return np.sort(rng.choice(rows, cap, replace=False))


def _write(adata, path: pathlib.Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)


def shift_to_mean(base: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Cells [n, G] = max(base + s, 0) with the per-gene shift s chosen so that each column's mean is
    exactly `target` (>= 0): the plain shift target - base mean where no cell would go below 0,
    otherwise the shift that makes the clipped cells' mean the target (the lowest cells become 0).

    Solved exactly per gene: with the column sorted in decreasing order x_1 >= ... >= x_n and k cells
    left positive, the mean is (x_1 + ... + x_k + k s) / n; k is the number of breakpoints s = -x_j
    at which the clipped mean is still below the target.
    """
    x = np.asarray(base, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if np.any(t < 0):
        raise ValueError("shift_to_mean: targets must be >= 0 (log1p expression)")
    n = x.shape[0]
    xs = -np.sort(-x, axis=0)                          # decreasing per column
    csum = np.cumsum(xs, axis=0)                       # S_j, sum of the j largest
    j = np.arange(1, n + 1, dtype=np.float64)[:, None]
    at_break = (csum - j * xs) / n                     # clipped mean at s = -x_j, nondecreasing in j
    k = np.maximum((at_break < t[None, :]).sum(axis=0), 1)
    s = (n * t - np.take_along_axis(csum, (k - 1)[None, :], axis=0)[0]) / k
    out = np.maximum(x + s[None, :], 0.0)
    out[:, t <= 0] = 0.0
    return out


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from gears_dist.evaluate.metrics import rowwise_pearson

    return rowwise_pearson(a, b)


def export_cell_eval(store, names: Sequence[str], predictions: np.ndarray, out_dir: str | os.PathLike, *,
                     mode: str = "cells", max_cells: int | None = None, max_control_cells: int | str | None = "max_cells",
                     control_name: str = "ctrl", pert_col: str = CELL_EVAL_PERT_COL,
                     categories: dict[str, Sequence[str]] | None = None, predictor: str = "model",
                     seed: int = 0, memory_budget_mb: float = 4096.0) -> dict[str, pathlib.Path]:
    """Write real.h5ad, pred.h5ad and gears_dist_metrics.csv for the conditions `names` (rows of
    `predictions`, predicted means); returns their paths (keys real, pred, metrics).

    max_cells / max_control_cells: None (default) writes every cell of each condition / of the control,
    which makes cell-eval's mean-based metrics equal ours; a number caps them (reproducible sample,
    `seed`), and gears_dist_metrics.csv states the gap that the sample makes. max_control_cells="max_cells"
    (default) caps the control as the conditions (all, unless max_cells is given). memory_budget_mb: cells
    mode refuses (before reading anything) an export whose two files would need more memory than this.
    """
    import anndata as ad
    import pandas as pd

    from gears_dist.evaluate.metrics import truth_from_store

    if mode not in ("cells", "pseudobulk"):
        raise ValueError(f"export mode {mode!r}: expected 'cells' or 'pseudobulk'")
    if max_control_cells == "max_cells":
        max_control_cells = max_cells
    elif isinstance(max_control_cells, str):
        raise ValueError(f"max_control_cells: expected a number, None or 'max_cells', received {max_control_cells!r}")
    for label, cap in (("max_cells", max_cells), ("max_control_cells", max_control_cells)):
        if cap is not None and cap < 2 and mode == "cells":
            raise ValueError(f"{label}: cell-eval's DE needs >= 2 cells per perturbation, received {cap}")
    predictions = np.asarray(predictions, dtype=np.float64)
    names = list(names)
    if predictions.shape != (len(names), store.num_genes):
        raise ValueError(f"predictions have shape {predictions.shape}; expected ({len(names)}, {store.num_genes}) "
                         f"(one row per exported condition, one column per store gene)")
    if not np.all(np.isfinite(predictions)):
        raise ValueError("predictions contain NaN/inf; a predictor must return finite values")
    all_names = store.condition_names
    index = {n: i for i, n in enumerate(all_names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"conditions not in the store: {missing[:10]}")
    is_ctrl = store.array("conditions/is_control")
    controls = [n for n, c in zip(all_names, is_ctrl) if c]
    if not controls:
        raise ValueError(f"store {str(store.path)!r} has no control condition to export")
    row_of = {n: i for i, n in enumerate(names)}
    names = [n for n in names if not is_ctrl[index[n]]]
    if control_name in names:
        raise ValueError(f"control label {control_name!r} collides with a perturbation name; pass another label")
    pred = predictions[[row_of[n] for n in names]] if names else np.zeros((0, store.num_genes))
    starts = store.array("conditions/start")
    stops = store.array("conditions/stop")
    ctrl_mean = store.array("stats/control_mean").astype(np.float64)
    truth = truth_from_store(store, names)
    genes = pd.Index(store.genes, name="gene")
    cat_of = {n: c for c, ns in (categories or {}).items() for n in ns}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts: dict[str, tuple[int, int]] = {}  # name -> (cells written, cells in the store)
    real_se = np.zeros(len(names))           # RMS over genes of the standard error of a sampled real mean

    if mode == "pseudobulk":
        ctrl_file = ctrl_mean
        target = pred
        real_x = np.vstack([ctrl_mean[None], truth.mean])
        pred_x = np.vstack([ctrl_mean[None], np.clip(pred, 0.0, None)])
        real_labels = pred_labels = [control_name] + names
        clipped = int((pred < 0).sum())
    else:
        ctrl_rows = np.concatenate([np.arange(starts[index[c]], stops[index[c]]) for c in controls])
        ctrl_take = _sample_rows(ctrl_rows, max_control_cells, rng)
        num_rows = ctrl_take.size + sum(min(int(stops[index[n]] - starts[index[n]]), max_cells or np.inf)
                                        for n in names)
        need_mb = 2 * num_rows * store.num_genes * 4 / 2**20
        if need_mb > memory_budget_mb:
            raise ValueError(f"cell-eval export of {int(num_rows):,} cells x {store.num_genes:,} genes needs ~{need_mb:,.0f} MB "
                             f"(two files), over the {memory_budget_mb:,.0f} MB budget; pass --export-cell-eval-max-cells N "
                             f"(a sample; gears_dist_metrics.csv states the gap it makes) or --export-cell-eval-mode "
                             f"pseudobulk")
        ctrl_x = store.read_x_cells(ctrl_take)
        # The predicted rows' target: the file's control mean + the predicted change (= the prediction when
        # the whole control is written), so the predicted delta inside the file is ours exactly.
        ctrl_file = ctrl_x.astype(np.float64).mean(axis=0)
        target = pred + (ctrl_file - ctrl_mean)[None, :]
        clipped = int((target < 0).sum())
        target = np.clip(target, 0.0, None)
        real_blocks, real_labels = [ctrl_x], [control_name] * ctrl_take.size
        pred_blocks, pred_labels = [ctrl_x.copy()], [control_name] * ctrl_take.size
        for i, n in enumerate(names):
            rows_all = np.arange(int(starts[index[n]]), int(stops[index[n]]))
            rows = _sample_rows(rows_all, max_cells, rng)
            counts[n] = (rows.size, rows_all.size)
            if rows.size < rows_all.size:  # n of N cells without replacement: se^2 = sd^2 (N - n) / (n (N - 1))
                big_n, n_ = rows_all.size, rows.size
                real_se[i] = float(np.sqrt(np.mean(truth.std[i] ** 2) * (big_n - n_) / (n_ * (big_n - 1))))
            real_blocks.append(store.read_x_cells(rows))
            real_labels += [n] * rows.size
            # base: distinct control rows of the file (all of them, repeated, when the condition has more cells)
            reps, extra = divmod(rows.size, ctrl_take.size)
            pick = np.concatenate([np.tile(np.arange(ctrl_take.size), reps),
                                   np.sort(rng.choice(ctrl_take.size, extra, replace=False))])
            pred_blocks.append(shift_to_mean(ctrl_x[pick], target[i]).astype(np.float32))
            pred_labels += [n] * rows.size
        real_x = np.vstack(real_blocks)
        pred_x = np.vstack(pred_blocks)

    real_x = np.asarray(real_x, dtype=np.float32)
    pred_x = np.asarray(pred_x, dtype=np.float32)

    # What cell-eval's mean-based metrics will compute from these files, beside ours from the store.
    def bulk(x: np.ndarray, labels: list[str], which: list[str]) -> np.ndarray:
        lab = np.asarray(labels)
        return np.stack([x[lab == n].astype(np.float64).mean(axis=0) for n in which]) if which \
            else np.zeros((0, x.shape[1]))

    real_b, pred_b = bulk(real_x, list(real_labels), names), bulk(pred_x, list(pred_labels), names)
    real_c, pred_c = (bulk(real_x, list(real_labels), [control_name])[0],
                      bulk(pred_x, list(pred_labels), [control_name])[0])
    table = pd.DataFrame({
        "n_real_cells": [counts.get(n, (1, 1))[0] for n in names],
        "n_store_cells": [counts.get(n, (1, 1))[1] for n in names],
        "pearson_delta_ours": _pearson_rows(pred - ctrl_mean, truth.mean - ctrl_mean),
        "pearson_delta_files": _pearson_rows(pred_b - pred_c, real_b - real_c),
        "mse_ours": ((pred - truth.mean) ** 2).mean(axis=1),
        "mse_files": ((pred_b - real_b) ** 2).mean(axis=1),
        "mae_ours": np.abs(pred - truth.mean).mean(axis=1),
        "mae_files": np.abs(pred_b - real_b).mean(axis=1),
        "real_mean_se_rms": real_se,
        "no_predicted_change": ~np.any(np.abs(pred - ctrl_mean) > 1e-6 * np.maximum(np.abs(ctrl_mean), 1e-3),
                                       axis=1),
    }, index=pd.Index(names, name=pert_col))
    # pearson_delta of a prediction with no change is 0 by our convention and undefined for cell-eval: left out
    changed = table[~table["no_predicted_change"]]
    gaps = {f"max_abs_gap_{m}": float(np.nanmax(np.abs(t[f"{m}_files"] - t[f"{m}_ours"]))) if len(t) else 0.0
            for m, t in (("pearson_delta", changed), ("mse", table), ("mae", table))}
    gaps["num_no_predicted_change"] = int(table["no_predicted_change"].sum())
    info = {"store": str(store.path), "predictor": predictor, "mode": mode, "control_pert": control_name,
            "pert_col": pert_col, "max_cells": -1 if max_cells is None else int(max_cells),
            "max_control_cells": -1 if max_control_cells is None else int(max_control_cells),
            "num_control_cells": int(sum(lbl == control_name for lbl in real_labels)),
            "control_mean_max_abs_diff": float(np.abs(ctrl_file - ctrl_mean).max()),
            "clipped_pred_values": clipped, **gaps}

    def frame(labels: list[str], prefix: str):
        return pd.DataFrame({pert_col: pd.Categorical(labels),
                             "category": pd.Categorical([cat_of.get(lbl, "control" if lbl == control_name else "")
                                                         for lbl in labels])},
                            index=[f"{prefix}{i}" for i in range(len(labels))])

    uns = {"gears_dist": info}
    real = ad.AnnData(X=real_x, obs=frame(list(real_labels), "real_"), var=pd.DataFrame(index=genes), uns=uns)
    pred_ad = ad.AnnData(X=pred_x, obs=frame(list(pred_labels), "pred_"), var=pd.DataFrame(index=genes), uns=uns)
    paths = {"real": out / "real.h5ad", "pred": out / "pred.h5ad", "metrics": out / METRICS_FILE}
    _write(real, paths["real"])
    _write(pred_ad, paths["pred"])
    tmp = paths["metrics"].with_name(f".{METRICS_FILE}.tmp")
    table.to_csv(tmp)
    os.replace(tmp, paths["metrics"])
    return paths
