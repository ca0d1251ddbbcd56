"""Store-level evaluation: baselines vs truth per category, GI on a planted screen, files, figures, MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gears_dist.evaluate import export as E
from gears_dist.evaluate import pipeline as P
from gears_dist.evaluate import plots
from gears_dist.evaluate import report as R
from gears_dist.evaluate.metrics import METRICS


@pytest.fixture(scope="module")
def tiny(tiny_doubles_store):
    return tiny_doubles_store


def test_evaluate_split_table_and_oracle(tiny):
    store, split = tiny

    def oracle(perts):  # reads the truth itself: must score perfectly
        names = ["+".join(p) for p in perts]
        return P.truth_from_store(store, names).mean

    ev = P.evaluate_split(store, split, predictors={"oracle": oracle})
    t = ev.table
    assert set(t["predictor"]) == {"oracle", "control_mean", "train_mean", "additive", "linear", "go_prior"}
    cats = set(ev.categories)
    assert set(t["category"]) == (cats | {"all"})
    assert cats <= {"combo_seen0", "combo_seen1", "combo_seen2", "unseen_single"}
    o = t[t.predictor == "oracle"].set_index("category")
    np.testing.assert_allclose(o["mse"], 0.0, atol=1e-10)
    np.testing.assert_allclose(o["pearson_delta"], 1.0)
    c = t[t.predictor == "control_mean"].set_index("category")
    np.testing.assert_allclose(c["pearson_delta"], 0.0)
    # Coverage of the additive baseline: only sets whose singles all trained.
    add_cov = ev.coverage["additive"]
    assert add_cov.get("unseen_single", 0.0) == 0.0 and add_cov.get("combo_seen0", 0.0) == 0.0
    if "combo_seen2" in add_cov:
        assert add_cov["combo_seen2"] == 1.0
    # Baselines are fitted on train only: the held-out conditions' truth never reaches them.
    assert not set(split.test) & set(split.train)
    text = R.format_table(ev.table, title="tiny")
    assert "[all]" in text and "additive" in text and "r_delta" in text
    with pytest.raises(ValueError, match="no perturbed"):
        P.evaluate_split(store, type(split)(**{**split.__dict__, "test": []}))


def test_results_files(tiny, tmp_path):
    import pandas as pd

    store, split = tiny
    ev = P.evaluate_split(store, split, baselines=["control_mean", "additive"])
    paths = R.write_results(ev.table, tmp_path, extra={"split": split.kind}, per_condition=ev.per_condition)
    doc = json.loads(paths["json"].read_text())
    assert doc["split"] == "simulation" and len(doc["metrics"]) == len(ev.table)
    back = pd.read_csv(paths["csv"])
    assert list(back.columns[:4]) == ["predictor", "category", "num_conditions", "coverage"]
    np.testing.assert_allclose(back["mse"], ev.table["mse"])
    per = pd.read_csv(paths["per_condition_additive"], index_col=0)
    assert set(per.index) == set(ev.truth.names)
    flat = R.mlflow_metrics(ev.table)
    assert flat["test/all/additive/pearson_delta"] == pytest.approx(
        float(ev.table.set_index(["predictor", "category"]).loc[("additive", "all"), "pearson_delta"]))
    # (Logging to a real MLflow run is tested end to end in test_evaluate_cli.py.)
    import os

    env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with pytest.raises(ValueError, match="tracking URI"):
            R.log_to_mlflow(ev.table)
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def test_gi_on_planted_screen(tiny):
    store, _ = tiny
    truth = P.load_gi_truth(store)
    doubles = [n for n in store.condition_names if "+" in n]
    assert set(truth) == set(doubles)
    scores, precision = P.gi_evaluation(store, doubles, truth=truth, k=5)
    assert set(scores) == {"observed", "additive"}
    assert set(scores["observed"].index) == set(doubles)
    # Additive predicts no interaction: every pair ties, so its precision is the base rate.
    for t in precision.columns:
        if t == "num_pairs":
            continue
        assert precision.loc["additive", t] == pytest.approx(precision.loc["base_rate", t])
    np.testing.assert_allclose(scores["additive"]["magnitude"], np.sqrt(2), rtol=1e-6)
    # Planted synergies have the largest observed magnitudes on average.
    obs = scores["observed"]
    syn = [p for p in obs.index if truth[p] == "synergy"]
    add = [p for p in obs.index if truth[p] == "additive"]
    if syn and add:
        assert obs.loc[syn, "magnitude"].mean() > obs.loc[add, "magnitude"].mean()


def test_figures_are_written(tiny, tmp_path):
    store, split = tiny
    ev = P.evaluate_split(store, split, baselines=["train_mean", "additive", "linear"])
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_pearson_delta": 0.1 * e} for e in range(5)]
    paths = P.make_figures(store, ev, tmp_path, num_conditions=1, history=history)
    names = {p.name for p in paths}
    assert {"delta_scatter.png", "learning_curves.png"} <= names
    assert any(n.startswith("top_de_") for n in names)
    truth = P.load_gi_truth(store)
    scores, _ = P.gi_evaluation(store, [n for n in store.condition_names if "+" in n], truth=truth)
    paths.append(plots.plot_gi_scatter(scores["observed"], tmp_path / "gi.png", truth=truth))
    for p in paths:
        assert p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plots.plot_learning_curves([], tmp_path / "x.png")


@pytest.mark.parametrize("mode", ["cells", "pseudobulk"])
def test_cell_eval_export(tiny, tmp_path, mode):
    import anndata as ad

    store, split = tiny
    ev = P.evaluate_split(store, split, baselines=["additive"])
    paths = E.export_cell_eval(store, ev.truth.names, ev.predictions["additive"], tmp_path, mode=mode,
                               max_cells=30, categories=ev.categories)
    real, pred = ad.read_h5ad(paths["real"]), ad.read_h5ad(paths["pred"])
    expected = set(ev.truth.names) | {"ctrl"}
    for a in (real, pred):
        assert a.shape[1] == store.num_genes
        assert list(a.var_names) == store.genes
        assert set(a.obs[E.CELL_EVAL_PERT_COL].astype(str)) == expected
        assert a.X.min() >= 0 and a.X.max() < 15  # cell-eval's log1p range check
    counts_r = real.obs[E.CELL_EVAL_PERT_COL].value_counts()
    counts_p = pred.obs[E.CELL_EVAL_PERT_COL].value_counts()
    assert counts_r.to_dict() == counts_p.to_dict()
    if mode == "cells":
        assert counts_r.max() <= 30 and counts_r.min() >= 2
        # Observed rows are the store's cells of that condition: their mean approaches the stored mean.
        name = ev.truth.names[0]
        sel = (real.obs[E.CELL_EVAL_PERT_COL] == name).to_numpy()
        start = int(store.array("conditions/start")[store.condition_names.index(name)])
        stop = int(store.array("conditions/stop")[store.condition_names.index(name)])
        if stop - start <= 30:
            np.testing.assert_allclose(real.X[sel].mean(0), ev.truth.mean[0], atol=1e-5)
        # The control rows of pred are the real control cells, unchanged.
        c = (pred.obs[E.CELL_EVAL_PERT_COL] == "ctrl").to_numpy()
        np.testing.assert_array_equal(pred.X[c], real.X[c])
    else:
        i = list(pred.obs[E.CELL_EVAL_PERT_COL]).index(ev.truth.names[0])
        np.testing.assert_allclose(pred.X[i], np.clip(ev.predictions["additive"][0], 0, None), rtol=1e-6)
        np.testing.assert_allclose(real.X[i], ev.truth.mean[0], rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        E.export_cell_eval(store, ev.truth.names, ev.predictions["additive"][:1], tmp_path / "bad")


def test_metric_names_are_complete():
    assert set(R.SHORT_NAMES) == set(METRICS)
