"""Metric functions vs independent computations on the real Norman subset.

Truth summaries are computed here straight from the h5ad (numpy/scipy on the cells), and every
metric is recomputed with separately written per-condition formulas (scipy.stats.pearsonr,
np.std over the cells). A second check runs the reference package's own evaluation functions
(cell-gears 0.1.2, installed in the test environment as an oracle) on the same predictions.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

from gears_dist.evaluate import metrics as M


def _canonical(name: str) -> str:
    if name in ("control", "ctrl"):
        return "ctrl"
    return "+".join(sorted(name.split("+")))


@pytest.fixture(scope="module")
def norman(norman_path):
    import anndata as ad

    adata = ad.read_h5ad(norman_path)
    X = sp.csr_matrix(adata.X).toarray().astype(np.float64)
    conds = np.array([_canonical(c) for c in adata.obs["condition"].astype(str)])
    names = sorted(set(conds) - {"ctrl"})
    ctrl_cells = X[conds == "ctrl"]
    ctrl_mean = ctrl_cells.mean(axis=0)
    cells = {n: X[conds == n] for n in names}
    means = np.stack([cells[n].mean(axis=0) for n in names])
    # DE ranking: Welch t vs control, ranked by |t| (NaN = no variance anywhere -> last).
    top_de, top_nd, ranks = [], [], {}
    for i, n in enumerate(names):
        with np.errstate(all="ignore"):
            t = scipy.stats.ttest_ind(cells[n], ctrl_cells, axis=0, equal_var=False).statistic
        score = np.where(np.isfinite(t), np.abs(t), -1.0)
        order = np.argsort(-score, kind="stable")
        ranks[n] = order
        top_de.append(order[:20])
        non_dropout = (means[i] != 0) | ((means[i] == 0) & (ctrl_mean == 0))
        nd = [g for g in order if non_dropout[g]][:20]
        top_nd.append(nd + [-1] * (20 - len(nd)))
    return {
        "adata": adata, "X": X, "conds": conds, "names": names, "cells": cells, "means": means,
        "ctrl_mean": ctrl_mean, "top_de": np.array(top_de), "top_nd": np.array(top_nd), "ranks": ranks,
        "genes": list(map(str, adata.var_names)),
    }


def _predictions(data) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    means, ctrl = data["means"], data["ctrl_mean"]
    names = data["names"]
    idx = {n: i for i, n in enumerate(names)}
    additive = []
    for n in names:
        genes = n.split("+")
        delta = np.zeros_like(ctrl)
        for g in genes:
            if g in idx and len(genes) > 1:
                delta += means[idx[g]] - ctrl
        additive.append(ctrl + delta)
    noisy = means + rng.normal(0, 0.3, size=means.shape)
    plain = noisy.copy()
    noisy[:, :7] = ctrl[:7]  # exact "no change" on some genes: sign 0 must not count as opposite
    return {
        "control": np.broadcast_to(ctrl, means.shape).copy(),
        "additive": np.array(additive),
        "noisy_truth": noisy,
        "noisy_plain": plain,
    }


def _truth(data) -> M.ConditionTruth:
    n_cells = np.array([data["cells"][n].shape[0] for n in data["names"]])
    var = np.stack([data["cells"][n].var(axis=0, ddof=1) for n in data["names"]])
    return M.ConditionTruth(names=data["names"], mean=data["means"],
                            std=M.std_from_unbiased_var(var, n_cells), top_de=data["top_de"],
                            top_de_non_dropout=data["top_nd"], control_mean=data["ctrl_mean"])


def _pearson0(a, b) -> float:
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    r = scipy.stats.pearsonr(a, b)[0]
    return 0.0 if np.isnan(r) else float(r)


def _independent(data, pred: np.ndarray) -> dict[str, np.ndarray]:
    ctrl = data["ctrl_mean"]
    out = {m: [] for m in M.METRICS}
    for i, n in enumerate(data["names"]):
        p, t = pred[i], data["means"][i]
        de = data["top_de"][i]
        nd = np.array([g for g in data["top_nd"][i] if g >= 0])
        out["mse"].append(np.mean((p - t) ** 2))
        out["pearson"].append(_pearson0(p, t))
        out["mse_de"].append(np.mean((p[de] - t[de]) ** 2))
        out["pearson_de"].append(_pearson0(p[de], t[de]))
        out["pearson_delta"].append(_pearson0(p - ctrl, t - ctrl))
        out["pearson_delta_de"].append(_pearson0(p[de] - ctrl[de], t[de] - ctrl[de]))
        out["mse_top20_de_non_dropout"].append(np.mean((p[nd] - t[nd]) ** 2))
        sp_, st_ = np.sign(p[nd] - ctrl[nd]), np.sign(t[nd] - ctrl[nd])
        out["frac_opposite_direction_top20_non_dropout"].append(np.mean(np.abs(sp_ - st_) == 2))
        sd = data["cells"][n][:, nd].std(axis=0)  # ddof=0 over the observed cells
        keep = sd > 0
        sig = np.abs(p[nd][keep] - t[nd][keep]) / sd[keep]
        out["frac_sigma_below_1_non_dropout"].append(np.mean(sig <= 1) if keep.any() else np.nan)
    return {k: np.array(v, dtype=float) for k, v in out.items()}


def test_metrics_match_independent_formulas_on_norman(norman):
    truth = _truth(norman)
    for label, pred in _predictions(norman).items():
        ours = M.condition_metrics(pred, truth)
        ref = _independent(norman, pred)
        for m in M.METRICS:
            np.testing.assert_allclose(ours[m], ref[m], rtol=1e-6, atol=1e-9, equal_nan=True,
                                       err_msg=f"{label}: {m}")
    # The no-change predictor has zero delta correlation by convention, and a perfect predictor the best scores.
    ctrl = M.condition_metrics(_predictions(norman)["control"], truth)
    assert np.all(ctrl["pearson_delta"] == 0) and np.all(ctrl["frac_opposite_direction_top20_non_dropout"] == 0)
    perfect = M.condition_metrics(norman["means"], truth)
    np.testing.assert_allclose(perfect["pearson_delta"], 1.0)
    np.testing.assert_allclose(perfect["mse"], 0.0, atol=1e-12)
    assert np.all(perfect["frac_sigma_below_1_non_dropout"] == 1.0)


def _load_reference_inference():
    spec = importlib.util.find_spec("gears")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("reference package cell-gears not installed (make install adds it as a test oracle)")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "inference.py"
    # Load the file alone: the package __init__ imports optional dependencies (dcor) not installed here.
    mod_spec = importlib.util.spec_from_file_location("_gears_reference_inference", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the test environment
        pytest.skip(f"reference inference module not importable: {exc}")
    return module


def test_metrics_match_reference_package(norman):
    """cell-gears' own deeper_analysis / non_dropout_analysis / compute_metrics on per-cell rows."""
    import anndata as ad
    import pandas as pd

    ref = _load_reference_inference()
    names, genes = norman["names"], norman["genes"]
    adata = ad.AnnData(X=sp.csr_matrix(norman["X"]),
                       obs=pd.DataFrame({"condition": norman["conds"], "condition_name": norman["conds"]},
                                        index=[str(i) for i in range(norman["X"].shape[0])]),
                       var=pd.DataFrame({"gene_name": genes}, index=genes))
    ranks = {n: np.array(genes)[norman["ranks"][n]] for n in names}
    adata.uns["rank_genes_groups_cov_all"] = ranks
    adata.uns["top_non_dropout_de_20"] = {n: np.array(genes)[[g for g in norman["top_nd"][i] if g >= 0]]
                                          for i, n in enumerate(names)}
    adata.uns["non_zeros_gene_idx"] = {n: np.where(norman["means"][i] != 0)[0] for i, n in enumerate(names)}
    adata.uns["non_dropout_gene_idx"] = {
        n: np.where((norman["means"][i] != 0) | (norman["ctrl_mean"] == 0))[0] for i, n in enumerate(names)}
    truth = _truth(norman)
    # (Not the variant with exact control values: averaging repeated rows there leaves 1-ulp deltas
    # whose sign the reference counts.)
    pred = _predictions(norman)["noisy_plain"]
    # Per-cell rows as the reference evaluates them: every observed cell, the prediction repeated.
    pert_cat = np.concatenate([[n] * norman["cells"][n].shape[0] for n in names])
    truth_rows = np.concatenate([norman["cells"][n] for n in names])
    pred_rows = np.concatenate([np.repeat(pred[i][None], norman["cells"][n].shape[0], 0)
                                for i, n in enumerate(names)])
    de_rows = np.concatenate([np.repeat(norman["top_de"][i][None], norman["cells"][n].shape[0], 0)
                              for i, n in enumerate(names)])
    res = {"pert_cat": pert_cat, "pred": pred_rows, "truth": truth_rows,
           "pred_de": np.take_along_axis(pred_rows, de_rows, 1),
           "truth_de": np.take_along_axis(truth_rows, de_rows, 1)}
    _, by_pert = ref.compute_metrics(res)
    deeper = ref.deeper_analysis(adata, res)
    non_dropout = ref.non_dropout_analysis(adata, res)
    ours = M.per_condition_table(pred, truth)
    expected = {
        "mse": [by_pert[n]["mse"] for n in names],
        "pearson": [by_pert[n]["pearson"] for n in names],
        "mse_de": [by_pert[n]["mse_de"] for n in names],
        "pearson_de": [by_pert[n]["pearson_de"] for n in names],
        "pearson_delta": [deeper[n]["pearson_delta"] for n in names],
        "pearson_delta_de": [deeper[n]["pearson_delta_de"] for n in names],
        "mse_top20_de_non_dropout": [non_dropout[n]["mse_top20_de_non_dropout"] for n in names],
        "frac_opposite_direction_top20_non_dropout": [
            non_dropout[n]["frac_opposite_direction_top20_non_dropout"] for n in names],
        "frac_sigma_below_1_non_dropout": [
            non_dropout[n].get("frac_sigma_below_1_non_dropout", np.nan) for n in names],
    }
    for m, values in expected.items():
        np.testing.assert_allclose(ours.loc[names, m].to_numpy(), np.array(values, dtype=float),
                                   rtol=1e-5, atol=1e-8, equal_nan=True, err_msg=m)


def test_rowwise_pearson_handles_constant_rows_and_masks():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 9.0, 9.0]])
    b = np.array([[2.0, 4.0, 6.0, 9.0], [1.0, 2.0, 3.0, 4.0], [3.0, 1.0, 0.0, -5.0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
    r = M.rowwise_pearson(a, b, mask)
    assert r[0] == pytest.approx(scipy.stats.pearsonr(a[0], b[0])[0])
    assert r[1] == 0.0  # constant row: undefined -> 0
    assert r[2] == pytest.approx(-1.0)  # two points
    assert M.rowwise_pearson(a[:1, :1], b[:1, :1])[0] == 0.0


def test_padding_and_bad_input():
    g = 5
    truth = M.ConditionTruth(names=["A"], mean=np.array([[1.0, 2, 3, 4, 5]]), std=np.ones((1, g)),
                             top_de=np.array([[4, 3, 2, -1]]), top_de_non_dropout=np.array([[0, -1, -1, -1]]),
                             control_mean=np.zeros(g))
    pred = np.array([[1.0, 2, 3, 4, 7]])
    out = M.condition_metrics(pred, truth)
    assert out["mse_de"][0] == pytest.approx(4.0 / 3)
    assert out["mse_top20_de_non_dropout"][0] == 0.0
    with pytest.raises(ValueError, match="shape"):
        M.condition_metrics(np.zeros((2, g)), truth)
    with pytest.raises(ValueError, match="NaN"):
        M.condition_metrics(np.full((1, g), np.nan), truth)
    with pytest.raises(ValueError, match="out of range"):
        M.ConditionTruth(names=["A"], mean=np.zeros((1, g)), std=np.zeros((1, g)), top_de=np.array([[9]]),
                         top_de_non_dropout=np.array([[0]]), control_mean=np.zeros(g))


def test_summarize_per_category():
    import pandas as pd

    df = pd.DataFrame({"mse": [1.0, 3.0, 5.0], "pearson": [0.5, np.nan, 1.0]}, index=["A", "B", "A+B"])
    s = M.summarize(df, {"single": ["A", "B", "Z"], "combo": ["A+B"], "empty": []})
    assert s.loc["single", "mse"] == 2.0 and s.loc["single", "num_conditions"] == 2
    assert s.loc["single", "pearson"] == 0.5  # NaN skipped
    assert s.loc["all", "mse"] == 3.0
    assert "empty" not in s.index
