"""A training run as a person sees it in MLflow: a real ``mlflow server`` (SQLite backend, artifacts served from a
local folder, 127.0.0.1, a free port), a tiny real training logging to it over HTTP, and the run read back through
the server's REST API with plain HTTP: description, params, per-epoch metric history, artifacts (model, config,
summary, figures)."""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from gears_dist.train.config import run_config_from_dict
from gears_dist.train.loop import run_single

EPOCHS = 2
CFG = {"name": "server_run", "seed": 3, "train": {"epochs": EPOCHS, "log_every": 1000},
       "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
       "model": {"hidden_size": 8}, "optim": {"lr": 3e-3}}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` in its own process group (it starts uvicorn as a child), always ended by the fixture."""

    def __init__(self, root: pathlib.Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner (7 huey consumers): a 2-core CI
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", self.artifacts.as_uri()]
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def wait_ready(self, timeout: float = 120.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
            time.sleep(0.3)
        pytest.fail(f"mlflow server did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def get(self, endpoint: str, **query) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            pytest.fail(f"GET {url}: HTTP {exc.code} {exc.read()[:500]!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this test started: mlflow + its uvicorn
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # any child left behind once mlflow itself exited
        self._log_file.close()


@pytest.fixture
def mlflow_server(tmp_path):
    server = Server(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore:1 of 12 perturbed genes are not among the measured:UserWarning")
def test_training_run_read_back_through_the_rest_api(mlflow_server, request, tmp_path):
    # the store is built (if no earlier test built it) while the server starts
    store = request.getfixturevalue("tiny_train_store")
    mlflow_server.wait_ready()
    cfg = run_config_from_dict({**CFG, "tracking": {"enabled": True, "uri": mlflow_server.url,
                                                    "experiment": "server_test"}})
    summary = run_single(cfg, store["path"], tmp_path / "run")
    run_id = summary["mlflow_run_id"]
    assert run_id, f"training did not log to {mlflow_server.url}:\n{mlflow_server.log_tail()}"

    run = mlflow_server.get("runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
    assert params["name"] == "server_run"
    assert float(params["optim.lr"]) == 3e-3
    assert params["model.hidden_size"] == "8" and params["train.epochs"] == str(EPOCHS)
    assert params["data.loader.batch_size"] == "32"
    tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    description = tags.get("mlflow.note.content", "")
    for fact in ("server_run", "GEARS", str(store["path"]), store["split"], "best: epoch"):
        assert fact in description, (fact, description)
    assert tags["split"] == store["split"] and tags["config_name"] == "server_run"
    assert tags["store"] == str(store["path"]) and tags["model_kind"].startswith("GEARS")

    for key in ("train_loss", "val_mse_de", "lr", "cells_per_s"):
        history = mlflow_server.get("metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        assert sorted(m["step"] for m in history) == list(range(EPOCHS)), (key, history)
    losses = [m["value"] for m in sorted(mlflow_server.get("metrics/get-history", run_id=run_id,
                                                           metric_key="train_loss")["metrics"],
                                         key=lambda m: m["step"])]
    assert losses == pytest.approx([h["train_loss"] for h in summary["history"]])
    final = {m["key"]: m for m in run["data"].get("metrics", []) if m["key"].startswith("final_")}
    assert final["final_test_mse"]["step"] == EPOCHS

    def listing(path=None):
        query = {"run_id": run_id, **({"path": path} if path else {})}
        return {f["path"]: f for f in mlflow_server.get("artifacts/list", **query).get("files", [])}

    root = listing()
    assert {"config.json", "split.txt", "summary.json", "model", "figures"} <= set(root), sorted(root)
    assert root["model"]["is_dir"] and root["figures"]["is_dir"]
    assert {"model/model.pt", "model/model.json"} <= set(listing("model"))
    figures = listing("figures")
    assert int(figures["figures/learning_curves.png"].get("file_size", 0)) > 1000, figures
    # the files went through the server into its artifact folder, not beside the run
    stored = {p.name for p in mlflow_server.artifacts.rglob("*") if p.is_file()}
    assert {"config.json", "learning_curves.png", "model.pt", "summary.json"} <= stored, sorted(stored)
    assert (tmp_path / "run" / "figures" / "learning_curves.png").is_file()
    assert not (tmp_path / "run" / "mlflow.db").exists()
