"""Security and safety: no code runs from loaded files, services stay local, secrets stay out of logs.

Also covered elsewhere: tests/test_train.py::test_unsafe_pickle_refused (safe_torch_load on a pickle
payload) and ::test_mlflow_run_recorded (no PATH/HOME among the MLflow params).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import re
import sqlite3
import subprocess
import sys

import pytest
import torch

from gears_dist.train import checkpoint as ckpt

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gears_dist"


# -- loading never runs code from a file -----------------------------------------------------------------
_UNSAFE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                   ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                   ("marshal", "loads"), ("shelve", "open")}


def _calls() -> list[tuple[str, int, str, ast.Call]]:
    """Every call in the package: (file, line, dotted callee, node). Parsed, so comments and docstrings
    that mention an unsafe call do not count."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    callee = f"{f.value.id}.{f.attr}"
                elif isinstance(f, ast.Name):
                    callee = f.id
                else:
                    callee = ""
                out.append((path.relative_to(REPO).as_posix(), node.lineno, callee, node))
    return out


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_unsafe_deserialization_in_the_package():
    found = []
    for name, line, callee, node in _calls():
        if tuple(callee.split(".")) in _UNSAFE_LOADERS:
            found.append(f"{name}:{line}: {callee}")
        if callee in ("eval", "exec"):
            found.append(f"{name}:{line}: {callee}")
        if _keyword(node, "allow_pickle") not in (None, False):
            found.append(f"{name}:{line}: {callee}(allow_pickle=...)")
    assert not found, found


def test_every_torch_load_uses_weights_only():
    loads = [(name, line, _keyword(node, "weights_only")) for name, line, callee, node in _calls()
             if callee == "torch.load"]
    assert loads, "expected the checkpoint loader's torch.load"
    assert all(w is True for _, _, w in loads), loads


class _Payload:
    """Unpickling this runs a shell command that creates a marker file (what an attacker would do)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: pathlib.Path, marker: pathlib.Path) -> None:
    torch.save({"module": {"weight": torch.zeros(2)}, "evil": _Payload(marker)}, path)


def _relist(checkpoint_dir: pathlib.Path) -> None:
    """An attacker who can write the checkpoint can also rewrite its file list: integrity checks are not
    the defence against code execution, safe loading is."""
    listing = checkpoint_dir / "files_rank0.json"
    entries = json.loads(listing.read_text())
    for e in entries:
        p = checkpoint_dir / e["path"]
        e["size"], e["sha256"] = p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()
    listing.write_text(json.dumps(entries))


def _run_cfg(epochs=2):
    from gears_dist.train.config import run_config_from_dict

    return run_config_from_dict({"name": "s", "seed": 1, "train": {"epochs": epochs, "log_every": 1000,
                                                                   "max_steps_per_epoch": 3},
                                 "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
                                 "model": {"hidden_size": 16}, "tracking": {"enabled": True}})


SECRETS = {"AWS_SECRET_ACCESS_KEY": "AKIA-s3cr3t-value-7f3a91", "MLFLOW_TRACKING_PASSWORD": "hunter2-mlflow-c0ffee",
           "MY_API_TOKEN": "tok-0123456789abcdef-secret"}


@pytest.fixture(scope="module")
def interrupted_run(tiny_train_store, tmp_path_factory):
    """A single-process run stopped after epoch 0's checkpoint, with secrets in the environment."""
    from gears_dist.train.loop import run_single

    run_dir = tmp_path_factory.mktemp("secure_run")
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            run_single(_run_cfg(), tiny_train_store["path"], run_dir, fail_at_epoch=0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return run_dir


def test_resume_from_a_poisoned_checkpoint_is_refused_without_running_it(interrupted_run, tiny_train_store,
                                                                         tmp_path):
    import shutil

    from gears_dist.train.loop import run_single

    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run, run_dir)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    marker = tmp_path / "PWNED"
    _plant(latest / "engine" / "state" / "mp_rank_00_model_states.pt", marker)
    _relist(latest)
    ckpt.verify_checkpoint(latest)  # the poisoned checkpoint passes the integrity check...
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        run_single(_run_cfg(), tiny_train_store["path"], run_dir)  # ...but is refused on load
    assert not marker.exists(), "the payload ran"


def test_predict_with_a_poisoned_model_file_is_refused_without_running_it(saved_model, tmp_path, capsys):
    import shutil

    from gears_dist.cli import main

    run = tmp_path / "run"
    shutil.copytree(saved_model[0], run)
    marker = tmp_path / "PWNED"
    _plant(run / "model" / "model.pt", marker)
    code = main(["predict", str(run), "--perts", saved_model[2][0], "--out", str(tmp_path / "p.csv")])
    assert code == 2
    assert "cannot be loaded safely" in capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "p.csv").exists()


def test_stores_hold_no_pickled_objects(tiny_train_store):
    """Zarr v3 has no pickle codec; every array of a store has a plain numeric, bool or string dtype."""
    import zarr

    def arrays(group):
        for _, member in group.members():
            if isinstance(member, zarr.Array):
                yield member
            else:
                yield from arrays(member)

    root = zarr.open_group(str(tiny_train_store["path"]), mode="r")
    kinds = {a.path: a.dtype for a in arrays(root)}
    assert kinds
    bad = {p: str(d) for p, d in kinds.items() if getattr(d, "kind", "O") not in "biufcUT"}
    assert not bad, bad


# -- services bind to 127.0.0.1 ----------------------------------------------------------------------------
def _command_lines(pattern: str) -> list[tuple[str, str]]:
    files = [REPO / "README.md", REPO / "Makefile", PACKAGE / "demo.py", PACKAGE / "tune" / "README_SECTION.md",
             REPO / "cluster" / "slurm" / "gears_dist.sbatch", REPO / "cluster" / "README.md"]
    out = []
    for f in files:
        if f.is_file():
            for line in f.read_text().splitlines():
                if re.search(pattern, line):
                    out.append((f.relative_to(REPO).as_posix(), line.strip()))
    return out


def test_documented_mlflow_ui_commands_bind_localhost():
    lines = _command_lines(r"mlflow (ui|server)\b")
    assert lines, "the README should show how to open the MLflow UI"
    exposed = [(f, line) for f, line in lines if "--host 127.0.0.1" not in line and "--host" in line]
    # `mlflow ui` without --host binds 127.0.0.1 (MLflow's default); any explicit host must be loopback
    assert not exposed, exposed


def test_ray_dashboards_bind_localhost_outside_kubernetes():
    lines = _command_lines(r"--dashboard-host")
    assert lines
    assert all("--dashboard-host 127.0.0.1" in line for _, line in lines), lines


def test_local_ray_has_no_dashboard(ray_local):
    """gears-dist train without --address starts Ray with include_dashboard=False (no web UI at all)."""
    node = ray_local._private.worker._global_node
    assert not node.address_info.get("webui_url"), node.address_info.get("webui_url")


def test_local_ray_listens_on_loopback_only(ray_local):
    """Every socket the local Ray listens on (gcs_server, raylet's node and object managers, the dashboard /
    runtime-env agents and their metrics ports, workers) is bound to loopback, not to all interfaces."""
    import psutil

    assert ray_local.util.get_node_ip_address() == "127.0.0.1"
    me = psutil.Process()
    mine = {me.pid} | {p.pid for p in me.children(recursive=True)}
    # Not Ray's: an in-process training test earlier in the session leaves torch.distributed's one-process
    # rendezvous store (TCPStore, which torch binds to all interfaces) listening in this process
    not_ray = set()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and os.environ.get("MASTER_PORT"):
        not_ray.add((me.pid, int(os.environ["MASTER_PORT"])))
    listening = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in mine and (c.pid, c.laddr.port) not in not_ray:
            try:
                listening.add((c.laddr.ip, psutil.Process(c.pid).name()))
            except psutil.NoSuchProcess:
                continue
    names = {name for _, name in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # Ray's own services are among those checked
    exposed = sorted(x for x in listening if x[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"))
    assert not exposed, exposed


def test_local_ray_refuses_clients_without_the_token(ray_local, tmp_path):
    """What does protect the ports: a client without the cluster's auth token is refused."""
    gcs = ray_local._private.worker._global_node.gcs_address
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="wrong-token-" + "0" * 20, HOME=str(tmp_path),
               # the local Ray listens on loopback only: without this, a client rewrites 127.0.0.1 in the address
               # to the machine's routable IP (as Ray does on Linux) and never reaches it (see launcher.ensure_ray)
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    code = ("import ray, sys\n"
            "try:\n    ray.init(address=sys.argv[1], log_to_driver=False)\n"
            "except Exception as e:\n    print(type(e).__name__, str(e)[:300]); sys.exit(3)\n"
            "print('CONNECTED'); sys.exit(0)\n")
    proc = subprocess.run([sys.executable, "-c", code, gcs], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert re.search(r"(?i)auth", proc.stdout + proc.stderr)


# -- secrets never reach logs or MLflow ---------------------------------------------------------------------
def test_worker_environment_forwards_no_credentials():
    from gears_dist.distributed import launcher
    from gears_dist.train import tracking

    assert not [k for k in launcher._WORKER_ENV if tracking._SECRET_KEY.search(k)]


def test_secrets_in_the_environment_appear_nowhere_in_the_run(interrupted_run):
    """The run was made with secrets in the environment: no file of the run directory (the MLflow
    database included: params, tags, metrics, artifacts) contains them."""
    db = interrupted_run / "mlflow.db"
    assert db.is_file()
    with sqlite3.connect(db) as con:
        logged = [str(v) for table in ("params", "tags", "metrics", "runs", "experiments")
                  for row in con.execute(f"SELECT * FROM {table}") for v in row]
    assert any("hidden_size" in v for v in logged)  # the config was logged
    files = [p for p in interrupted_run.rglob("*") if p.is_file()]
    assert len(files) > 5
    for name, value in SECRETS.items():
        assert not any(value in v for v in logged), f"{name} in the MLflow database"
        leaked = [p.name for p in files if value.encode() in p.read_bytes()]
        assert not leaked, f"{name} found in {leaked}"
        assert not any(name in v for v in logged), f"{name} (the variable's name) logged"
