"""A real small search: Ray Tune (ASHA + Optuna) over Ray Train + DeepSpeed runs on the tiny store, in MLflow.

Four trials, one CPU worker each, run one at a time so that ASHA's decisions are deterministic: the first
three are fixed points (a sane lr, an absurd lr that ASHA must stop at the first rung, a split the store does
not have, which fails), the fourth comes from seeded Optuna TPE.
"""

import json
import math
import warnings

import pytest

from gears_dist.train.config import load_run_config
from gears_dist.train.loop import run_single
from gears_dist.tune import runs
from gears_dist.tune.config import tune_config_from_dict
from gears_dist.tune.search import format_table, run_search

MISSING_SPLIT = "no_such_split"
MAX_EPOCHS = 3


def _search_config(split: str):
    base = {"name": "tiny", "seed": 3, "train": {"log_every": 1000, "max_steps_per_epoch": 12},
            "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
            "model": {"hidden_size": 16}, "tracking": {"experiment": "tune_test"}}
    return tune_config_from_dict({
        "name": "tiny_search", "base": base,
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 1.0},
                  "data.split": {"type": "choice", "values": [split, MISSING_SPLIT]}},
        "num_trials": 4, "max_concurrent": 1, "searcher": "optuna", "seed": 0,
        "points_to_evaluate": [{"optim.lr": 3e-3, "data.split": split},
                               {"optim.lr": 1.0, "data.split": split},
                               {"optim.lr": 3e-3, "data.split": MISSING_SPLIT}],
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2, "max_epochs": MAX_EPOCHS},
        "resources": {"num_workers": 1, "cpus_per_worker": 1}})


@pytest.fixture(scope="module")
def fresh_ray():
    """A Ray instance of the search's own. Earlier tests' Ray Train runs can leave placement groups
    reserved on the shared session Ray (its cleaner needs the State API, which runs without the
    dashboard only partly), and 4 trials on 2 CPUs then wait for CPUs forever."""
    import ray

    from gears_dist.distributed.launcher import ensure_ray
    from gears_dist.train.config import RunConfig

    ray.shutdown()
    ensure_ray(None, RunConfig())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def search(tiny_train_store, fresh_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    tc = _search_config(tiny_train_store["split"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the store cannot be prepared for the missing split (expected)
        summary = run_search(tc, tiny_train_store["path"], out)
    return tc, out, summary


def _client(summary):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])


def _row(summary, lr, split_ok):
    rows = [r for r in summary["trials"] if math.isclose(r["params"]["optim.lr"], lr)
            and (r["params"]["data.split"] != MISSING_SPLIT) == split_ok]
    assert rows, summary["trials"]
    return rows[0]


def test_all_trials_are_child_runs_of_one_parent(search):
    _, _, summary = search
    client = _client(summary)
    exp = summary["experiment_id"]
    parents = client.search_runs([exp], filter_string="tags.`gears_dist.kind` = 'search'")
    assert [p.info.run_id for p in parents] == [summary["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len(children) == len(summary["trials"]) == 4
    by_trial = {c.data.tags[runs.TRIAL_TAG]: c for c in children}
    assert set(by_trial) == {r["trial_id"] for r in summary["trials"]}
    expected_status = {runs.COMPLETED: "FINISHED", runs.EARLY_STOPPED: "FINISHED", runs.FAILED: "FAILED"}
    for row in summary["trials"]:
        child = by_trial[row["trial_id"]]
        assert child.info.status == expected_status[row["status"]], (row, child.info)
        assert child.data.tags[runs.STATUS_TAG] == row["status"]
        assert math.isclose(float(child.data.params["optim.lr"]), row["params"]["optim.lr"], rel_tol=1e-6)
        assert child.data.params["data.split"] == row["params"]["data.split"]
        if row["status"] != runs.FAILED:
            history = sorted(client.get_metric_history(child.info.run_id, "val_mse_de"), key=lambda m: m.step)
            steps = [m.step for m in history]
            # Tune's stop reaches a trial asynchronously: its workers may finish (and log) one more epoch than
            # the ASHA rung it was stopped at. What Tune counted is logged, in order, from epoch 0.
            extra = 1 if row["status"] == runs.EARLY_STOPPED else 0
            assert steps[:row["epochs"]] == list(range(row["epochs"])) and len(steps) <= row["epochs"] + extra, row
            counted = [m.value for m in history if m.step < row["epochs"]]
            assert math.isclose(min(counted), row["best"], rel_tol=1e-9)


def test_asha_stopped_a_bad_trial_early(search):
    _, _, summary = search
    sane = _row(summary, 3e-3, split_ok=True)
    absurd = _row(summary, 1.0, split_ok=True)
    assert sane["status"] == runs.COMPLETED and sane["epochs"] == MAX_EPOCHS
    assert absurd["status"] == runs.EARLY_STOPPED and absurd["epochs"] < MAX_EPOCHS, absurd
    assert absurd["best"] > sane["best"]


def test_failed_trial_recorded_and_search_went_on(search):
    _, out, summary = search
    failed = _row(summary, 3e-3, split_ok=False)
    assert failed["status"] == runs.FAILED and MISSING_SPLIT in failed["error"]
    child = runs.find_child(_client(summary), summary["experiment_id"], summary["parent_run_id"], failed["trial_id"])
    assert child.info.status == "FAILED" and MISSING_SPLIT in child.data.tags[runs.ERROR_TAG]
    # the search went on: a trial started after the failed one had ended (the fourth, proposed by Optuna)
    client = _client(summary)
    later = [c for c in client.search_runs([summary["experiment_id"]],
                                           filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
             if c.info.start_time > child.info.end_time]
    assert later, "no trial started after the failure"
    assert json.loads((out / "summary.json").read_text())["num_trials"] == 4


def test_ranked_table_and_best_tagged(search):
    _, _, summary = search
    values = [r["best"] for r in summary["trials"] if r["status"] != runs.FAILED and r["best"] is not None]
    assert values == sorted(values)
    assert summary["trials"][-1]["status"] == runs.FAILED or all(r["status"] != runs.FAILED
                                                                 for r in summary["trials"])
    table = format_table(summary)
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["rank", "trial", "status"]
    assert [line.split()[1] for line in lines[3:3 + len(summary["trials"])]] == \
        [r["trial_id"] for r in summary["trials"]]
    best = summary["best"]
    assert best["trial_id"] == summary["trials"][0]["trial_id"]
    client = _client(summary)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["gears_dist.best_run_id"] == best["mlflow_run_id"]
    assert client.get_run(best["mlflow_run_id"]).data.tags[runs.BEST_TAG] == "true"
    assert math.isclose(parent.data.metrics["best_val_mse_de"], best["value"])


def test_best_config_exists_and_trains(search, tiny_train_store, tmp_path):
    _, out, _ = search
    best = json.loads((out / "best" / "best.json").read_text())
    cfg = load_run_config(out / "best" / "config.yaml")
    assert math.isclose(cfg.optim.lr, best["params"]["optim.lr"])
    assert cfg.data.split == best["params"]["data.split"]
    assert (out / "best" / "model" / "model.pt").is_file() or (out / "best" / "checkpoint").is_dir()
    cfg.train.epochs = 1
    cfg.tracking.enabled = False
    result = run_single(cfg, tiny_train_store["path"], tmp_path)
    assert len(result["history"]) == 1
    assert math.isfinite(result["final"]["val_mse_de"])


def test_resume_restores_the_search(search, tiny_train_store):
    tc, out, summary = search
    with pytest.raises(ValueError, match="already holds search"):
        run_search(tc, tiny_train_store["path"], out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = run_search(tc, tiny_train_store["path"], out, resume=True)
    assert {r["trial_id"]: r["status"] for r in again["trials"]} == \
        {r["trial_id"]: r["status"] for r in summary["trials"]}
    assert again["parent_run_id"] == summary["parent_run_id"]
    children = _client(summary).search_runs(
        [summary["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len(children) == 4
