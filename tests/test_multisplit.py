"""Multi-split evaluation end to end on Ray: 2 splits x 2 variants, mean ± sd, files, MLflow parent + children."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gears_dist.evaluate.multisplit import parse_variant, summarize_splits


def test_parse_variant():
    assert parse_variant("prior") == ("prior", {"model": {"prior": "go"}})
    assert parse_variant("wide:model.hidden_size=32,model.prior=go,optim.lr=1e-3") == (
        "wide", {"model": {"hidden_size": 32, "prior": "go"}, "optim": {"lr": 1e-3}})
    with pytest.raises(ValueError, match="expected one of"):
        parse_variant("bogus")
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("x:model.hidden_size")


def test_summary_is_mean_and_sd_over_splits():
    import pandas as pd

    rows = [{"predictor": "m", "category": "all", "split_seed": s, "num_conditions": 3, "coverage": 1.0,
             "pearson_delta": v, "mse_de": 2 * v} for s, v in ((1, 0.2), (2, 0.4), (3, 0.9))]
    out = summarize_splits(pd.DataFrame(rows)).iloc[0]
    assert out["num_splits"] == 3 and out["num_conditions"] == 9
    assert out["pearson_delta_mean"] == pytest.approx(0.5)
    assert out["pearson_delta_sd"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))


def test_multisplit_two_splits_on_ray(ray_local, tiny_train_store, tmp_path, capsys):
    import mlflow

    from gears_dist.evaluate.multisplit import run_multisplit
    from gears_dist.train.config import run_config_from_dict

    store = tmp_path / "tiny.zarr"  # the fixture is shared read-only; splits 2 and graphs get written here
    shutil.copytree(tiny_train_store["path"], store)
    cfg = run_config_from_dict({"name": "ms", "seed": 0, "train": {"epochs": 1, "log_every": 1000},
                                "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
                                "model": {"hidden_size": 8}, "sharding": {"mode": "random"}})
    result = run_multisplit(store, cfg, tmp_path / "ms", seeds=[1, 2], variants=["reference", "prior"],
                            baselines=["train_mean", "additive", "go_prior"], max_parallel=2)
    summary = result["summary"]
    is_gi = summary["category"].str.startswith("gi_")
    assert set(summary[~is_gi]["predictor"]) == {"reference", "prior", "train_mean", "additive", "go_prior"}
    # The generated screen has planted interactions: each split's test pairs are scored for GI precision@10.
    gi = summary[is_gi]
    assert set(gi["predictor"]) == {"reference", "prior", "additive", "base_rate"}
    assert gi["gi_precision_at_10_mean"].between(0, 1).all() and result["files"]["gi"].is_file()
    overall = summary[summary["category"] == "all"]
    assert len(overall) == 5 and (overall["num_splits"] == 2).all()
    per_split = result["per_split"]
    assert sorted(per_split["split_seed"].unique()) == [1, 2]
    # each split's numbers are its own: the two seeds' test sets differ, so the sd is not 0 everywhere
    assert np.nanmax(summary["mse_sd"].to_numpy()) > 0
    for key in ("per_split", "summary", "json", "figure"):
        assert result["files"][key].is_file()
    assert json.loads(result["files"]["json"].read_text())["seeds"] == [1, 2]
    assert "± " in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ms' / 'mlflow.db'}")
    parent = client.get_run(result["mlflow_run_id"])
    assert "prior/all/pearson_delta_mean" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
