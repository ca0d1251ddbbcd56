"""MLflow tracking for a training run (rank 0 only).

The tracking URI is the config's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in
the run directory (MLflow 3 refuses the old file store). Only the resolved config is logged as
parameters, never environment variables; values of keys that look like credentials are redacted.
Tracking must never stop training: if MLflow becomes unreachable mid-run the tracker warns once and
goes quiet.

What a training run holds in MLflow (``Tracker.start_training`` / ``log_epoch`` / ``finish_training``):

- a description (the ``mlflow.note.content`` tag, shown on the run page): config name, model kind, store,
  split, workers; at the end, the best epoch and the final validation / test metrics;
- tags: ``config_name``, ``model_kind``, ``store``, ``split``, ``world_size``, ``sharding``, ``direction_term``;
- params: the flattened resolved config (``optim.lr``, ``model.hidden_size``, ...);
- metrics: per epoch (step = epoch: ``train_loss``, ``val_mse_de``, ``lr``, ``cells_per_s``, ...) and
  ``final_*`` (step = number of epochs);
- artifacts: ``config.json``, ``split.txt``, ``model/`` (model.pt, model.json), ``summary.json`` and the
  figures training made (``figures/learning_curves.png``). ``gears-dist evaluate`` adds its metrics and
  ``evaluation/`` (tables, figures) to the same run through ``log_to_run``.

This is the one module of gears_dist that imports MLflow: the search (``gears_dist.tune.runs``) and the
multi-split evaluation get their client from `client` and log through `log_batch` (plain dicts in, MLflow
entities built here); a child run names its parent with the tag `PARENT_TAG`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import time
import warnings
from typing import Any

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description
PARENT_TAG = "mlflow.parentRunId"  # MLflow nests a run carrying it under that parent in the UI


def client(uri: str):
    """An ``mlflow.MlflowClient`` for the tracking URI `uri`. A new SQLite store starts as a copy of an empty,
    fully migrated database (see `_seed_sqlite`)."""
    import mlflow

    _seed_sqlite(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def _sqlite_path(uri: str | None) -> pathlib.Path | None:
    """The database file of a ``sqlite:///PATH[?options]`` URI; None for any other URI."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return pathlib.Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _schema_template() -> pathlib.Path | None:
    """An empty SQLite database with MLflow's whole schema, made once per MLflow version in the user's cache.

    MLflow creates a new SQLite store by replaying its ~60 schema migrations (2.7 s on a quiet 2-core VM, 7 s under
    load), paid by every new run directory (a training run, a search, a multi-split evaluation). The template
    holds the tables and the schema revision only, no experiment: MLflow adds the default experiment on first
    open, with the artifact root of the store that opens it. None when the cache cannot be written (the caller
    then lets MLflow migrate)."""
    import mlflow
    from mlflow.store.db import utils as db_utils

    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "gears_dist"
    template = cache / f"mlflow-{mlflow.__version__}-schema.db"
    if template.is_file():
        return template
    tmp = cache / f".{template.name}.{os.getpid()}.tmp"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        engine = db_utils.create_sqlalchemy_engine_with_retry(f"sqlite:///{tmp}")
        try:
            db_utils._initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(tmp, template)  # whole or absent: a concurrent maker writes the same content
        return template
    except Exception:  # noqa: BLE001 -- an optimization only: any failure leaves the store to MLflow's own migration
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return None


def _seed_sqlite(uri: str) -> None:
    """Create the SQLite store of `uri`, if it does not exist yet, as a copy of `_schema_template`. The copy
    appears under its name complete or not at all (a hard link of a finished copy, which fails if another
    process created the store first; that store is then kept)."""
    path = _sqlite_path(uri)
    # a database file only: not an in-memory store, and not a URI with options (left to MLflow as given)
    if path is None or "?" in uri or str(path) in ("", ":memory:") or path.exists():
        return
    template = _schema_template()
    if template is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, tmp)
        os.link(tmp, path)
    except OSError:
        pass  # created meanwhile, or a file system without hard links: MLflow creates or opens it as usual
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def log_batch(mlflow_client, run_id: str, *, params: dict | None = None, metrics: dict | None = None,
              tags: dict | None = None, step: int = 0, batch: int = 100) -> None:
    """Log plain dicts to a run, `batch` entries per request: params and tags (values as str), metrics (floats,
    at `step`, timestamped now)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    entries = {"params": [Param(k, str(v)) for k, v in sorted((params or {}).items())],
               "metrics": [Metric(k, float(v), now, int(step)) for k, v in sorted((metrics or {}).items())],
               "tags": [RunTag(k, str(v)) for k, v in (tags or {}).items()]}
    for kind, items in entries.items():
        for i in range(0, len(items), batch):
            mlflow_client.log_batch(run_id, **{kind: items[i:i + batch]})


def resolve_tracking_uri(uri: str | None, run_dir: str | os.PathLike) -> str:
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = pathlib.Path(run_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def experiment_id(client, name: str, uri: str | None) -> str:
    """The experiment's id, created if missing. With a SQLite store, a new experiment keeps its artifacts beside
    the database (DB_DIR/mlartifacts), not in ./mlruns of whatever directory the process runs in."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    db = _sqlite_path(uri)
    if db is not None:
        location = (db.resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


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


def model_kind(model_cfg: dict) -> str:
    """A short name for the model a config trains, e.g. 'GEARS + GO prior (hidden 64)'."""
    kind = "GEARS + GO prior" if model_cfg.get("prior") == "go" else "GEARS"
    extras = [f"hidden {model_cfg.get('hidden_size')}"]
    if model_cfg.get("uncertainty"):
        extras.append("uncertainty")
    if model_cfg.get("coexpr_mode") == "parity":
        extras.append("reference-parity co-expression")
    return f"{kind} ({', '.join(extras)})"


def describe_run(cfg: dict, *, store: str, split: str, split_summary: str | None = None,
                 store_shape: str | None = None, world_size: int = 1, result: dict | None = None) -> str:
    """The run's description (Markdown): what was trained on what; with `result` (the training summary),
    how it ended."""
    name = cfg.get("name", "?")
    train, sharding = cfg.get("train") or {}, cfg.get("sharding") or {}
    headline = (f"**{name}**: {model_kind(cfg.get('model') or {})}, {train.get('epochs', '?')} epoch(s) on "
                f"{world_size} worker(s) (sharding {sharding.get('mode', '?')}).")
    lines = [headline, "",
             f"- config: `{name}` (all fields under Parameters; the file: artifact config.json)",
             f"- store: `{store}`" + (f" ({store_shape})" if store_shape else ""),
             f"- split: `{split}`" + (f": {split_summary.splitlines()[0]}" if split_summary else "")]
    if result:
        best = result.get("best") or {}
        if best.get("epoch") == -1:
            lines.append(f"- best: the GO prior alone (val mse_de {best.get('score'):.4g})")
        elif best:
            lines.append(f"- best: epoch {best.get('epoch')} (val mse_de {best.get('score'):.4g})")
        final = result.get("final") or {}
        shown = [f"{k} {final[k]:.4g}" for k in ("val_mse_de", "test_mse", "test_mse_de", "test_pearson_delta")
                 if isinstance(final.get(k), (int, float)) and not math.isnan(final[k])]
        if shown:
            lines.append("- final: " + ", ".join(shown))
    lines.append("- artifacts: model/, config.json, split.txt, summary.json, figures/ "
                 "(`gears-dist evaluate RUN_DIR` adds evaluation/)")
    return "\n".join(lines)


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
            self._client = client(self.uri)
            if self.run_id is None:
                run = self._client.create_run(experiment_id(self._client, experiment, self.uri), run_name=run_name)
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
        self._call(lambda: log_batch(self._client, self.run_id, params=params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        items = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        if items:
            self._call(lambda: log_batch(self._client, self.run_id, metrics=items, step=step, batch=1000))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call(lambda: log_batch(self._client, self.run_id, tags=tags))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, name: str) -> None:
        self._call(lambda: self._client.log_text(self.run_id, text, name))

    def set_description(self, text: str) -> None:
        self.set_tags({DESCRIPTION_TAG: text})

    def log_figures(self, paths, artifact_path: str = "figures") -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)

    # --- a training run, start to end (the loop calls these on rank 0) ---

    def start_training(self, cfg: dict, *, store: str, split: str, split_summary: str, world_size: int,
                       store_shape: str | None = None) -> None:
        """A new training run: params (the flattened config), description, tags, config.json, split.txt."""
        if not self.active:
            return
        self.log_params(flatten_params(cfg))
        self.set_tags({"config_name": cfg.get("name", ""), "model_kind": model_kind(cfg.get("model") or {}),
                       "store": store, "split": split, "world_size": world_size,
                       "sharding": (cfg.get("sharding") or {}).get("mode", ""),
                       "direction_term": (cfg.get("loss") or {}).get("direction", ""),
                       DESCRIPTION_TAG: describe_run(cfg, store=store, split=split, split_summary=split_summary,
                                                     store_shape=store_shape, world_size=world_size)})
        self.log_text(split_summary + "\n", "split.txt")
        self.log_text(json.dumps(cfg, indent=1), "config.json")

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

    def finish_training(self, summary: dict, *, model_files=(), files=(), figures=(), description: str | None = None,
                        status: str = "FINISHED") -> None:
        """The end of a training run: final_* metrics, the model files (under model/), other files, figures
        (under figures/), the description with the result, and the run's status."""
        if not self.active:
            return
        self.log_metrics({f"final_{k}": v for k, v in (summary.get("final") or {}).items()},
                         step=len(summary.get("history") or []))
        for path in model_files:
            self.log_artifact(path, "model")
        for path in files:
            self.log_artifact(path)
        self.log_figures(figures)
        if description:
            self.set_description(description)
        self.finish(status)

    def finish(self, status: str = "FINISHED") -> None:
        self._call(lambda: self._client.set_terminated(self.run_id, status=status))


def log_to_run(metrics: dict[str, float], artifacts=(), *, run_id: str | None = None, tracking_uri: str | None = None,
               experiment: str = "gears_dist-evaluate", run_name: str | None = None,
               artifact_path: str | None = "evaluation", step: int = 0) -> str:
    """Log metrics (at `step`) and files (under `artifact_path`) to an existing run, or to a new, finished one in
    `experiment`; return the run id. For commands asked to log (evaluation): errors propagate, unlike Tracker.

    The tracking URI defaults to $MLFLOW_TRACKING_URI (MLflow 3 refuses the file store: use
    ``sqlite:///path/mlflow.db``)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no MLflow tracking URI: pass --tracking-uri (e.g. sqlite:///runs/x/mlflow.db) or set "
                         "MLFLOW_TRACKING_URI")
    mlflow_client = client(uri)
    if run_id is None:
        run_id = mlflow_client.create_run(experiment_id(mlflow_client, experiment, uri), run_name=run_name).info.run_id
        created = True
    else:
        mlflow_client.get_run(run_id)  # fails clearly on an unknown id
        created = False
    log_batch(mlflow_client, run_id, metrics=metrics, step=step, batch=500)
    for path in artifacts:
        mlflow_client.log_artifact(run_id, str(path), artifact_path)
    if created:
        mlflow_client.set_terminated(run_id)
    return run_id
