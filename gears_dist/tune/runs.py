"""MLflow bookkeeping of a search: one parent run, one child run per trial.

Children carry the tags ``mlflow.parentRunId`` (MLflow nests them under the parent in the UI) and
``gears_dist.trial_id`` (the Tune trial id); a trial finds its own child run again by those tags when it is
restarted (resumed search). Final states: ``FINISHED`` with tag ``gears_dist.trial_status`` = ``completed``
or ``early_stopped`` (stopped by the scheduler), and ``FAILED`` with ``failed`` and the error's first line.

The functions take a client from ``gears_dist.train.tracking.client`` (the one module that imports MLflow).
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any

from gears_dist.train.tracking import PARENT_TAG, log_batch

TRIAL_TAG = "gears_dist.trial_id"
STATUS_TAG = "gears_dist.trial_status"
BEST_TAG = "gears_dist.best_trial"
ERROR_TAG = "gears_dist.error"
COMPLETED, EARLY_STOPPED, FAILED = "completed", "early_stopped", "failed"


def create_parent(mlflow_client, exp_id: str, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
    run = mlflow_client.create_run(exp_id, run_name=name, tags={"gears_dist.kind": "search", **tags})
    log_batch(mlflow_client, run.info.run_id, params=params, tags=tags)
    return run.info.run_id


def find_child(mlflow_client, exp_id: str, parent_id: str, trial_id: str):
    """The child run of `trial_id` under `parent_id`, or None."""
    runs = mlflow_client.search_runs(
        [exp_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_id}'",
        max_results=5)
    return runs[0] if runs else None


def get_or_create_child(mlflow_client, exp_id: str, parent_id: str, trial_id: str, trial_name: str,
                        params: dict[str, Any]) -> tuple[str, bool]:
    """(run id, created) of the trial's child run; a found run is set RUNNING again (restarted trial)."""
    found = find_child(mlflow_client, exp_id, parent_id, trial_id)
    if found is not None:
        mlflow_client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, False
    tags = {PARENT_TAG: parent_id, TRIAL_TAG: trial_id, "gears_dist.kind": "trial",
            "gears_dist.searched": ",".join(sorted(params))}
    run = mlflow_client.create_run(exp_id, run_name=trial_name, tags=tags)
    return run.info.run_id, True


def finish_child(mlflow_client, run_id: str, status: str, error: str | None = None,
                 extra_tags: dict[str, Any] | None = None) -> None:
    tags = {STATUS_TAG: status, **(extra_tags or {})}
    if error:
        tags[ERROR_TAG] = error.strip().splitlines()[0][:4000] if error.strip() else "error"
    log_batch(mlflow_client, run_id, tags=tags)
    mlflow_client.set_terminated(run_id, status="FAILED" if status == FAILED else "FINISHED")


def safely(fn, *args, what: str = "MLflow", **kwargs):
    """Run an MLflow call; a tracking failure warns instead of stopping the search."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - tracking must not stop the search
        warnings.warn(f"{what} failed ({type(exc).__name__}: {exc}); the search goes on", stacklevel=2)
        return None


def log_artifact(mlflow_client, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    if pathlib.Path(path).exists():
        mlflow_client.log_artifact(run_id, str(path), artifact_path)
