"""`gears-dist predict` / `gears-dist evaluate` end to end with a real GEARSModel saved as training saves it.

The default tests use an untrained model (random weights) saved in the training's model/ layout (the
`saved_model` fixture of conftest.py), so they exercise loading, GO-graph vocabularies, batching, outputs
and errors in seconds; the slow test trains one epoch with the real loop first.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from gears_dist.evaluate import predict as P


def test_parse_sets_and_files(tmp_path):
    assert P.parse_set("B+A") == ("A", "B")
    assert P.parse_set("A, B C") == ("A", "B", "C")
    assert P.parse_set("A+ctrl") == ("A",)
    for bad, msg in (("", "empty"), ("ctrl", "empty"), ("A+A", "more than once")):
        with pytest.raises(ValueError, match=msg):
            P.parse_set(bad)
    f = tmp_path / "sets.txt"
    f.write_text("# my sets\nA\n\nB+A  # pair\n")
    assert P.read_sets_file(f) == [("A",), ("A", "B")]
    f.write_text("A\nB+B\n")
    with pytest.raises(ValueError, match=r"sets.txt:2"):
        P.read_sets_file(f)
    assert len(P.all_pairs([f"G{i}" for i in range(100)])) == 4950
    with pytest.raises(ValueError, match="at least 2"):
        P.all_pairs(["A", "A"])


def test_predict_batched_equals_one_by_one_and_errors(saved_model):
    run, store, nodes = saved_model
    model = P.TrainedPredictor.load(run)
    genes = [g for g in nodes if g in set(store.genes)][:12]
    never = min(set(nodes) - {g for gs in store.condition_genes() for g in gs})  # never perturbed anywhere
    sets = P.all_pairs(genes) + [(never,), (genes[0], genes[1], genes[2])]
    batched = model.predict_delta(sets, chunk=7)
    single = np.concatenate([model.predict_delta([s]) for s in sets])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    assert batched.shape == (len(sets), store.num_genes) and np.isfinite(batched).all()
    means = model(sets[:3])
    np.testing.assert_allclose(means - model.control_mean, batched[:3], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\['NOT_A_GENE1', 'NOT_A_GENE2'\]"):
        model.check_sets(["NOT_A_GENE2+" + genes[0], "NOT_A_GENE1"])
    with pytest.raises(ValueError, match="uncertainty"):
        model.predict_delta(sets[:1], return_logvar=True)
    with pytest.raises(ValueError, match="no trained model"):
        P.TrainedPredictor.load(run / "..")


def test_predict_cli_outputs(saved_model, tmp_path):
    import anndata as ad
    import pandas as pd

    from gears_dist.cli import main

    run, store, nodes = saved_model
    genes = [g for g in nodes if g in set(store.genes)][:5]
    assert main(["predict", str(run), "--perts", genes[0], f"{genes[1]}+{genes[0]}", "--all-pairs", *genes[2:5],
                 "--out", str(tmp_path / "p.h5ad")]) == 0
    a = ad.read_h5ad(tmp_path / "p.h5ad")
    assert a.shape == (5, store.num_genes) and list(a.var_names) == store.genes
    assert a.obs_names[1] == "+".join(sorted([genes[0], genes[1]]))
    np.testing.assert_allclose(a.X - store.array("stats/control_mean")[None], a.layers["delta"], atol=1e-5)
    assert main(["predict", str(run), "--perts", genes[0], "--out", str(tmp_path / "p.csv")]) == 0
    df = pd.read_csv(tmp_path / "p.csv", index_col=0)
    assert df.shape == (1, store.num_genes) and (tmp_path / "p.delta.csv").is_file()
    assert main(["predict", str(run), "--perts", "NOPE_GENE", "--out", str(tmp_path / "x.h5ad")]) == 2
    assert not (tmp_path / "x.h5ad").exists()


def test_evaluate_cli_end_to_end(saved_model, tmp_path, capsys):
    import mlflow

    from gears_dist.cli import main

    run, store, _ = saved_model
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    rc = main(["evaluate", str(run), "--out", str(out), "--tracking-uri", uri, "--num-plot-conditions", "1",
               "--export-cell-eval"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "gears" in text and "additive" in text and "[all]" in text and "figures:" in text
    doc = json.loads((out / "metrics.json").read_text())
    preds = {r["predictor"] for r in doc["metrics"]}
    assert preds == {"gears", "control_mean", "train_mean", "additive", "linear", "go_prior"}
    # the headline is decided on validation and names where the model loses on test
    assert "headline:" in text and doc["headline"]["model"] == "gears"
    assert doc["headline"].get("best_on_val") in preds and "beaten_on_test" in doc["headline"]
    assert (out / "figures" / "delta_scatter.png").is_file() and (out / "figures" / "learning_curves.png").is_file()
    assert (out / "cell_eval" / "pred.h5ad").is_file()
    # The synthetic truth (sidecar of the ingested h5ad) gives GI precision for observed / additive / model.
    prec = (out / "gi_precision.csv")
    if prec.is_file():
        import pandas as pd

        assert {"observed", "additive", "gears", "base_rate"} <= set(pd.read_csv(prec, index_col=0).index)
    client = mlflow.MlflowClient(uri)
    (mrun,) = client.search_runs([client.get_experiment_by_name("gears_dist-evaluate").experiment_id])
    want = {(r["predictor"], r["category"]): r for r in doc["metrics"]}[("gears", "all")]["pearson_delta"]
    assert mrun.data.metrics["test/all/gears/pearson_delta"] == pytest.approx(want)
    arts = {a.path for a in client.list_artifacts(mrun.info.run_id, "evaluation")}
    assert {"evaluation/metrics.csv", "evaluation/delta_scatter.png"} <= arts
    # A store instead of a run: baselines only, the split named.
    assert main(["evaluate", str(store.path), "--no-mlflow", "--no-figures", "--out", str(tmp_path / "b")]) == 2
    split = json.loads((out / "metrics.json").read_text())["split"]
    assert main(["evaluate", str(store.path), "--split", split, "--no-mlflow", "--no-figures",
                 "--out", str(tmp_path / "b")]) == 0
    assert "gears" not in {r["predictor"] for r in json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]}


@pytest.mark.slow
def test_train_then_evaluate_and_predict(tiny_train_store, tmp_path):
    """The real training loop (1 epoch), then the commands on its run directory."""
    from gears_dist.cli import main
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import run_single

    cfg = run_config_from_dict({"name": "t", "seed": 3, "train": {"epochs": 1, "log_every": 1000},
                                "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
                                "model": {"hidden_size": 16}, "tracking": {"enabled": True}})
    run = tmp_path / "run"
    summary = run_single(cfg, tiny_train_store["path"], run)
    assert main(["evaluate", str(run), "--num-plot-conditions", "1"]) == 0
    doc = json.loads((run / "evaluation" / "metrics.json").read_text())
    ours = {(r["predictor"], r["category"]): r for r in doc["metrics"]}
    # Two implementations of the same metric (training's streaming evaluation and ours) agree.
    assert ours[("gears", "all")]["mse"] == pytest.approx(summary["final"]["test_mse"], rel=1e-3)
    assert main(["predict", str(run), "--perts-file", str(_sets_file(tmp_path, run)),
                 "--out", str(tmp_path / "p.h5ad")]) == 0


def _sets_file(tmp_path, run) -> pathlib.Path:
    meta = json.loads((run / "model" / "model.json").read_text())
    genes = meta["go_nodes"][:4]
    f = tmp_path / "sets.txt"
    f.write_text("\n".join([genes[0], f"{genes[0]}+{genes[1]}", f"{genes[1]}+{genes[2]}+{genes[3]}"]))
    return f
