"""Export predictions and truth as AnnData in the layout cell-eval (Arc Institute) expects.

cell-eval (``pip install cell-eval``; ``cell-eval run -ap pred.h5ad -ar real.h5ad --control-pert ctrl
--pert-col target``) compares a predicted and a real AnnData that have the same genes in the same
order (``var_names``), an obs column naming each row's perturbation (``target`` by default) with
the same set of perturbations in both files, the control among them, and log1p-normalized values
(non-negative, below 15). It runs differential expression within each file, so each perturbation
needs several rows.

``mode="cells"`` (default) writes:

- ``real.h5ad``: observed cells of every exported condition and of the control (at most
  ``max_cells`` per condition, a reproducible sample; read from the store's X rows of those
  conditions only);
- ``pred.h5ad``: for each condition, as many control cells as real cells, each shifted by the
  predicted change over the control mean (the model predicts a mean response; this is how GEARS
  itself turns it into cells), clipped at 0 because log1p expression cannot be negative; the
  control rows are the control cells unchanged.

``mode="pseudobulk"`` writes one row per perturbation instead (observed mean vs predicted mean,
clipped at 0), the perturbation-level layout for mean-based metrics (cell-eval's DE metrics need
cells).
Memory: (conditions + 1) x max_cells x genes x 4 bytes at most.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

CELL_EVAL_PERT_COL = "target"


def _sample_rows(start: int, stop: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    n = stop - start
    if n <= cap:
        return np.arange(start, stop)
    return np.sort(rng.choice(np.arange(start, stop), cap, replace=False))


def _write(adata, path: pathlib.Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)


def export_cell_eval(store, names: Sequence[str], predictions: np.ndarray, out_dir: str | os.PathLike, *,
                     mode: str = "cells", max_cells: int = 100, control_name: str = "ctrl",
                     pert_col: str = CELL_EVAL_PERT_COL, categories: dict[str, Sequence[str]] | None = None,
                     predictor: str = "model", seed: int = 0) -> dict[str, pathlib.Path]:
    """Write real.h5ad and pred.h5ad for the conditions `names` (rows of `predictions`, predicted means)."""
    import anndata as ad
    import pandas as pd

    if mode not in ("cells", "pseudobulk"):
        raise ValueError(f"export mode {mode!r}: expected 'cells' or 'pseudobulk'")
    if max_cells < 2 and mode == "cells":
        raise ValueError(f"max_cells: cell-eval's DE needs >= 2 cells per perturbation, received {max_cells}")
    predictions = np.asarray(predictions, dtype=np.float64)
    names = list(names)
    if predictions.shape != (len(names), store.num_genes):
        raise ValueError(f"predictions have shape {predictions.shape}; expected ({len(names)}, {store.num_genes}) "
                         f"(one row per exported condition, one column per store gene)")
    all_names = store.condition_names
    index = {n: i for i, n in enumerate(all_names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"conditions not in the store: {missing[:10]}")
    is_ctrl = store.array("conditions/is_control")
    controls = [n for n, c in zip(all_names, is_ctrl) if c]
    if not controls:
        raise ValueError(f"store {str(store.path)!r} has no control condition to export")
    names = [n for n in names if not is_ctrl[index[n]]]
    if control_name in names:
        raise ValueError(f"control label {control_name!r} collides with a perturbation name; pass another label")
    starts = store.array("conditions/start")
    stops = store.array("conditions/stop")
    ctrl_mean = store.array("stats/control_mean").astype(np.float64)
    genes = pd.Index(store.genes, name="gene")
    cat_of = {n: c for c, ns in (categories or {}).items() for n in ns}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_of = {n: i for i, n in enumerate(names)}

    if mode == "pseudobulk":
        from gears_dist.evaluate.metrics import truth_from_store

        truth = truth_from_store(store, names) if names else None
        real_x = np.vstack([ctrl_mean[None]] + ([truth.mean] if names else []))
        pred_x = np.clip(np.vstack([ctrl_mean[None], predictions[[row_of[n] for n in names]]]), 0.0, None)
        labels = [control_name] + names
        real_labels = pred_labels = labels
    else:
        ctrl_rows = np.concatenate([np.arange(starts[index[c]], stops[index[c]]) for c in controls])
        ctrl_take = np.sort(rng.choice(ctrl_rows, min(max_cells, ctrl_rows.size), replace=False))
        real_blocks, real_labels = [store.read_x_cells(ctrl_take)], [control_name] * ctrl_take.size
        pred_blocks, pred_labels = [real_blocks[0].copy()], [control_name] * ctrl_take.size
        for n in names:
            rows = _sample_rows(int(starts[index[n]]), int(stops[index[n]]), max_cells, rng)
            real_blocks.append(store.read_x_cells(rows))
            real_labels += [n] * rows.size
            base = store.read_x_cells(np.sort(rng.choice(ctrl_rows, rows.size, replace=ctrl_rows.size < rows.size)))
            shifted = base.astype(np.float64) + (predictions[row_of[n]] - ctrl_mean)[None, :]
            pred_blocks.append(np.clip(shifted, 0.0, None).astype(np.float32))
            pred_labels += [n] * rows.size
        real_x = np.vstack(real_blocks)
        pred_x = np.vstack(pred_blocks)

    def frame(labels: list[str], prefix: str):
        return pd.DataFrame({pert_col: pd.Categorical(labels),
                             "category": pd.Categorical([cat_of.get(lbl, "control" if lbl == control_name else "")
                                                         for lbl in labels])},
                            index=[f"{prefix}{i}" for i in range(len(labels))])

    uns = {"gears_dist": {"store": str(store.path), "predictor": predictor, "mode": mode,
                          "control_pert": control_name, "pert_col": pert_col}}
    real = ad.AnnData(X=np.asarray(real_x, dtype=np.float32), obs=frame(list(real_labels), "real_"),
                      var=pd.DataFrame(index=genes), uns=uns)
    pred = ad.AnnData(X=np.asarray(pred_x, dtype=np.float32), obs=frame(list(pred_labels), "pred_"),
                      var=pd.DataFrame(index=genes), uns=uns)
    paths = {"real": out / "real.h5ad", "pred": out / "pred.h5ad"}
    _write(real, paths["real"])
    _write(pred, paths["pred"])
    return paths
