"""MLflow tracking for a training run (rank 0 only).

The tracking URI is the config's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in
the run directory (MLflow 3 refuses the old file store). Only the resolved config is logged as
parameters, never environment variables; values of keys that look like credentials are redacted.
Tracking must never stop training: if MLflow becomes unreachable mid-run the tracker warns once and
goes quiet.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import time
import warnings
from typing import Any

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)


def resolve_tracking_uri(uri: str | None, run_dir: str | os.PathLike) -> str:
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = pathlib.Path(run_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'optim.lr': '0.001', ...}; credential-like keys redacted."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if _SECRET_KEY.search(str(k)):
                out[key] = "<redacted>"
            else:
                out.update(flatten_params(v, key))
    else:
        text = "" if data is None else str(data)
        out[prefix] = text[:6000]
    return out


class Tracker:
    """A thin, failure-tolerant wrapper over ``mlflow.MlflowClient`` for one run."""

    def __init__(self, enabled: bool, uri: str | None, run_dir: str | os.PathLike, experiment: str,
                 run_name: str | None = None, run_id: str | None = None):
        self.enabled = enabled
        self.run_id: str | None = run_id
        self.uri = resolve_tracking_uri(uri, run_dir) if enabled else None
        self._warned = False
        self._client = None
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
            if self.run_id is None:
                exp = self._client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
                run = self._client.create_run(exp_id, run_name=run_name)
                self.run_id = run.info.run_id
            else:
                self._client.update_run(self.run_id, status="RUNNING")
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if not self._warned:
            warnings.warn(f"MLflow tracking at {self.uri!r} failed ({type(exc).__name__}: {exc}); training goes on "
                          f"without tracking", stacklevel=3)
            self._warned = True
        self._client = None

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def _call(self, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._call(lambda batch: self._client.log_batch(self.run_id, params=batch), items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())
                 if isinstance(v, (int, float)) and not math.isnan(v)]
        if items:
            self._call(lambda: self._client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call(lambda: self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, name: str) -> None:
        self._call(lambda: self._client.log_text(self.run_id, text, name))

    def finish(self, status: str = "FINISHED") -> None:
        self._call(lambda: self._client.set_terminated(self.run_id, status=status))
