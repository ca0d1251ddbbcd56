"""The cell-eval export scores what our own metrics score (issue 21).

cell-eval's mean-based metrics are recomputed here from the exported files, the way cell-eval 0.8.2
computes them (metrics/_anndata.py): each perturbation's pseudobulk is the mean of its rows in that
file, its delta is taken against THAT file's control rows' mean; pearson_delta correlates the pred and
real deltas over all genes, mse / mae compare the pred and real pseudobulks. They must equal our
`evaluate` numbers (per_condition of `evaluate_split`) on the same conditions.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gears_dist.evaluate import export as E
from gears_dist.evaluate import pipeline as P


def _cell_eval_means(path_pred, path_real, names, pert_col=E.CELL_EVAL_PERT_COL, control="ctrl"):
    """Per-perturbation pearson_delta, mse, mae as cell-eval computes them from the two files."""
    import anndata as ad
    from scipy.stats import pearsonr

    def bulk(a, which):
        lab = a.obs[pert_col].astype(str).to_numpy()
        return np.stack([np.asarray(a.X[lab == n], dtype=np.float64).mean(axis=0) for n in which])

    pred, real = ad.read_h5ad(path_pred), ad.read_h5ad(path_real)
    pb, rb = bulk(pred, names), bulk(real, names)
    pc, rc = bulk(pred, [control])[0], bulk(real, [control])[0]
    with warnings.catch_warnings():  # a prediction with no change: constant input, undefined correlation
        warnings.simplefilter("ignore")
        r = np.array([pearsonr(p - pc, t - rc)[0] for p, t in zip(pb, rb)])
    return r, ((pb - rb) ** 2).mean(axis=1), np.abs(pb - rb).mean(axis=1)


@pytest.fixture(scope="module")
def tiny_eval(tiny_doubles_store):
    """The tiny synthetic screen (120 control cells, 42-99 cells per condition) and two baselines evaluated on it."""
    store, split = tiny_doubles_store
    return store, P.evaluate_split(store, split, baselines=["train_mean", "additive"])


@pytest.mark.parametrize("predictor", ["train_mean", "additive"])
@pytest.mark.parametrize("mode", ["cells", "pseudobulk"])
def test_cell_eval_mean_metrics_equal_ours(tiny_eval, tmp_path, predictor, mode):
    store, ev = tiny_eval
    names = ev.truth.names
    pred = ev.predictions[predictor].astype(np.float64)
    paths = E.export_cell_eval(store, names, pred, tmp_path, mode=mode)
    r, mse, mae = _cell_eval_means(paths["pred"], paths["real"], names)
    ours = ev.per_condition[predictor]
    # A prediction with no change at all: ours is 0 by convention, cell-eval's is undefined (noise). Compare the rest.
    changed = np.abs(pred - ev.truth.control_mean[None]).max(axis=1) > 1e-6
    assert changed.sum() >= 3
    np.testing.assert_allclose(r[changed], ours["pearson_delta"].to_numpy()[changed], atol=1e-3)
    # mse / mae: exact but for predicted means below 0, which a log1p file must hold as 0.
    clipped = np.clip(pred, 0.0, None)
    np.testing.assert_allclose(mse, ((clipped - ev.truth.mean) ** 2).mean(axis=1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(mse, ours["mse"].to_numpy(), rtol=0.05, atol=1e-4)
    np.testing.assert_allclose(mae, np.abs(clipped - ev.truth.mean).mean(axis=1), rtol=1e-4, atol=1e-6)
    # The export states the same numbers (gears_dist_metrics.csv), beside ours.
    import pandas as pd

    table = pd.read_csv(paths["metrics"], index_col=0)
    assert list(table.index) == names
    np.testing.assert_allclose(table["pearson_delta_files"].to_numpy()[changed], r[changed], atol=1e-5)
    np.testing.assert_allclose(table["pearson_delta_ours"], ours["pearson_delta"], atol=1e-6)
    np.testing.assert_allclose(table["mse_files"], mse, rtol=1e-5, atol=1e-9)


def test_cells_mode_layout_and_exact_means(tiny_eval, tmp_path):
    import anndata as ad

    store, ev = tiny_eval
    names = ev.truth.names
    pred = ev.predictions["additive"].astype(np.float64)
    paths = E.export_cell_eval(store, names, pred, tmp_path)
    real, pr = ad.read_h5ad(paths["real"]), ad.read_h5ad(paths["pred"])
    lab_r, lab_p = (a.obs[E.CELL_EVAL_PERT_COL].astype(str).to_numpy() for a in (real, pr))
    nc = store.array("conditions/num_cells")
    ic = store.array("conditions/is_control")
    # every control cell, identical in both files; every cell of each condition
    assert (lab_r == "ctrl").sum() == nc[ic].sum()
    np.testing.assert_array_equal(pr.X[lab_p == "ctrl"], real.X[lab_r == "ctrl"])
    np.testing.assert_allclose(real.X[lab_r == "ctrl"].mean(0), store.array("stats/control_mean"), atol=1e-5)
    for i, n in enumerate(names):
        assert (lab_r == n).sum() == (lab_p == n).sum() == nc[store.condition_names.index(n)]
        np.testing.assert_allclose(real.X[lab_r == n].astype(np.float64).mean(0), ev.truth.mean[i], atol=1e-5)
        np.testing.assert_allclose(pr.X[lab_p == n].astype(np.float64).mean(0), np.clip(pred[i], 0, None), atol=1e-5)
    assert pr.X.min() >= 0 and pr.X.max() < 15
    assert real.uns["gears_dist"]["control_mean_max_abs_diff"] < 1e-5


def test_shift_to_mean_is_exact_and_a_plain_shift_where_nothing_clips():
    rng = np.random.default_rng(0)
    x = np.where(rng.random((40, 60)) < 0.6, 0.0, rng.gamma(2.0, 0.5, (40, 60)))
    target = np.clip(x.mean(0) + rng.normal(0, 0.4, 60), 0, None)
    target[:3] = 0.0
    y = E.shift_to_mean(x, target)
    assert y.min() >= 0
    np.testing.assert_allclose(y.mean(0), target, atol=1e-12)
    np.testing.assert_allclose(E.shift_to_mean(x, x.mean(0) + 0.25), x + 0.25, atol=1e-12)
    with pytest.raises(ValueError, match=">= 0"):
        E.shift_to_mean(x, -np.ones(60))


def test_capped_sample_states_its_gap(tiny_eval, tmp_path):
    """With a sample of cells the files' numbers differ from ours; the export writes both, and the control
    sample's noise is kept out of the predicted delta (it must not read as agreement)."""
    import pandas as pd

    store, ev = tiny_eval
    names = ev.truth.names
    pred = ev.predictions["train_mean"].astype(np.float64)
    paths = E.export_cell_eval(store, names, pred, tmp_path, max_cells=10, max_control_cells=10)
    r, mse, _ = _cell_eval_means(paths["pred"], paths["real"], names)
    table = pd.read_csv(paths["metrics"], index_col=0)
    np.testing.assert_allclose(table["pearson_delta_files"], r, atol=1e-5)
    np.testing.assert_allclose(table["mse_files"], mse, rtol=1e-5)
    assert (table["n_real_cells"] == 10).all() and (table["real_mean_se_rms"] > 0).all()
    import anndata as ad

    a = ad.read_h5ad(paths["pred"])
    lab = a.obs[E.CELL_EVAL_PERT_COL].astype(str).to_numpy()
    pc = a.X[lab == "ctrl"].astype(np.float64).mean(0)
    # predicted delta in the file = ours exactly, whatever the control sample (where nothing was clipped at 0)
    target = pred + (pc - ev.truth.control_mean)[None]
    ok = (target >= 0).all(axis=0)
    for i, n in enumerate(names):
        d = a.X[lab == n].astype(np.float64).mean(0) - pc
        np.testing.assert_allclose(d[ok], (pred[i] - ev.truth.control_mean)[ok], atol=1e-5)


def test_an_export_over_the_memory_budget_is_refused_before_writing(tiny_eval, tmp_path):
    store, ev = tiny_eval
    with pytest.raises(ValueError, match="max-cells"):
        E.export_cell_eval(store, ev.truth.names, ev.predictions["additive"], tmp_path / "x", memory_budget_mb=0.01)
    assert not (tmp_path / "x" / "real.h5ad").exists()
    E.export_cell_eval(store, ev.truth.names, ev.predictions["additive"], tmp_path / "y", max_cells=5,
                       max_control_cells=5, memory_budget_mb=0.5)
