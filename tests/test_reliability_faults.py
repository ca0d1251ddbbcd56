"""Faults survived, nothing lost: processes killed at awkward moments, services vanishing mid-run.

Already covered elsewhere (referenced from RELIABILITY.md, not repeated here):
- a Ray worker failing after a checkpoint, FailureConfig restarting the group, the run completing:
  tests/test_distributed.py::test_two_workers_graph_sharded_with_failure_recovery
- resume after a failure equals the uninterrupted run (single process, DeepSpeed):
  tests/test_train.py::test_resume_after_failure_equals_uninterrupted_run
- a damaged / incomplete checkpoint is detected: tests/test_train.py::test_corrupted_or_missing_checkpoint_errors
- MLflow unreachable from the start: tests/test_train.py::test_unreachable_mlflow_warns_once_and_trains
- a Tune trial that always fails: tests/test_tune.py::test_failed_trial_recorded_and_search_went_on
- an exception or Ctrl-C inside the ingest: tests/test_ingest_bad_input.py::test_failure_mid_write_*

This file adds the cases where the process is killed outright (SIGKILL: no cleanup code runs) or
interrupted (SIGINT/SIGTERM), and MLflow disappearing after the run has started.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

from gears_dist.data.store import StoreError, open_store

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable
GEARS_DIST = [PYTHON, "-m", "gears_dist.cli"]


# set in this process by earlier in-process training (torch.distributed rendezvous): a child must pick its own
_INHERITED_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_DIST_VARS}
    return {**env, "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1", **extra}


def store_digest(path: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every array of a store (its data, not its files: chunk encoding may differ)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {}
    for key in sorted(_array_keys(root)):
        data = np.asarray(root[key][...])
        h = hashlib.sha256(str(data.dtype).encode() + str(data.shape).encode())
        if data.dtype.kind in "OUST":  # strings: their text, whatever the string dtype
            h.update("\x00".join(map(str, data.ravel().tolist())).encode())
        else:
            h.update(np.ascontiguousarray(data).tobytes())
        out[key] = h.hexdigest()
    out["attrs"] = hashlib.sha256(json.dumps(dict(root.attrs), sort_keys=True, default=str).encode()).hexdigest()
    return out


def _array_keys(group, prefix: str = "") -> list[str]:
    import zarr

    keys = []
    for name, member in group.members():
        full = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            keys.append(full)
        else:
            keys += _array_keys(member, full + "/")
    return keys


# -- ingest killed at several points ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def screen_h5ad(tmp_path_factory) -> pathlib.Path:
    """A synthetic screen whose ingest takes ~2 s with small chunks (scPerturb naming: cells not in store
    order, so the ingest goes through its spill-and-sort path)."""
    from gears_dist.cli import main

    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    assert main(["simulate", str(path), "--preset", "demo", "--num-cells", "5000", "--num-genes", "600",
                 "--style", "scperturb", "--seed", "4"]) == 0
    return path


INGEST_ARGS = ["--chunk-cells", "16", "--memory-budget-mb", "32"]
# seconds after the temporary build directory appears (None: kill before it exists, while importing)
KILL_POINTS = [None, 0.0, 0.1, 0.25, 0.45, 0.7]


def _ingest_cmd(src, dest) -> list[str]:
    return [*GEARS_DIST, "ingest", str(src), str(dest), *INGEST_ARGS]


def _kill_ingest_at(src: pathlib.Path, dest: pathlib.Path, after: float | None) -> str:
    """Start an ingest, SIGKILL it at the given point; return where the kill landed."""
    proc = subprocess.Popen(_ingest_cmd(src, dest), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        if after is None:
            time.sleep(0.5)
        else:
            deadline = time.monotonic() + 60
            while not list(dest.parent.glob(f".{dest.name}.building-*")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            time.sleep(after)
        alive = proc.poll() is None
        building = bool(list(dest.parent.glob(f".{dest.name}.building-*")))
        renamed = dest.exists()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    if not alive:
        return "finished before the kill"
    if renamed:
        return "after the rename"
    return "mid-build" if building else "before the build"


def test_ingest_killed_at_several_points_never_leaves_a_valid_looking_store(screen_h5ad, tmp_path):
    reference = tmp_path / "reference.zarr"
    subprocess.run(_ingest_cmd(screen_h5ad, reference), env=_env(), check=True, capture_output=True)
    expected = store_digest(reference)
    assert len(expected) > 20

    landed = []
    for i, after in enumerate(KILL_POINTS):
        dest = tmp_path / f"killed{i}" / "screen.zarr"
        dest.parent.mkdir()
        where = _kill_ingest_at(screen_h5ad, dest, after)
        landed.append(where)
        if where in ("finished before the kill", "after the rename"):
            # the store was complete: it opens and holds exactly the uninterrupted ingest's arrays
            open_store(dest)
            assert store_digest(dest) == expected
            continue
        assert not dest.exists(), f"kill {where} (+{after} s) left {dest}"
        with pytest.raises(StoreError, match="does not exist"):
            open_store(dest)
        # the same command again completes and gives the same arrays as an uninterrupted ingest
        subprocess.run(_ingest_cmd(screen_h5ad, dest), env=_env(), check=True, capture_output=True)
        assert store_digest(dest) == expected, f"rerun after a kill {where} differs"
    stale = sorted(p.name for p in tmp_path.glob("killed*/.screen.zarr.building-*"))
    print(f"ingest kills landed: {landed}; stale temporary build directories left by SIGKILL: {len(stale)}")
    assert landed.count("mid-build") >= 3, landed


# -- a crash while a checkpoint is being written ------------------------------------------------------------
def _train_cfg_dict(epochs: int = 2) -> dict:
    return {"name": "f", "seed": 5, "train": {"epochs": epochs, "log_every": 1000},
            "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
            "model": {"hidden_size": 16}, "optim": {"lr": 3e-3}, "tracking": {"enabled": False}}


# Run in a child process: train, and SIGKILL ourselves half-way through writing epoch 1's checkpoint
# (after DeepSpeed wrote its files, before the file list that completes the checkpoint).
_KILL_DURING_CHECKPOINT = textwrap.dedent("""
    import json, os, signal, sys
    from gears_dist.train import checkpoint as ckpt
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import run_single

    original = ckpt._write_file_list
    def write_then_die(directory, rank):
        if "epoch_0001" in str(directory):
            os.kill(os.getpid(), signal.SIGKILL)
        original(directory, rank)
    ckpt._write_file_list = write_then_die
    run_single(run_config_from_dict(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])
""")


def _engine_params(run_dir: pathlib.Path, tag: str) -> dict:
    from gears_dist.train import checkpoint as ckpt

    path = run_dir / "checkpoints" / tag / "engine" / "state" / "mp_rank_00_model_states.pt"
    return ckpt.safe_torch_load(path)["module"]


def test_kill_during_checkpoint_write_keeps_previous_and_resume_uses_it(tiny_train_store, tmp_path):
    import torch

    from gears_dist.train import checkpoint as ckpt
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import run_single

    cfg = _train_cfg_dict(epochs=2)
    clean = run_single(run_config_from_dict(cfg), tiny_train_store["path"], tmp_path / "clean")

    run_dir = tmp_path / "killed"
    proc = subprocess.run([PYTHON, "-c", _KILL_DURING_CHECKPOINT, json.dumps(cfg), str(tiny_train_store["path"]),
                           str(run_dir)], check=False, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = run_dir / "checkpoints"
    assert (root / ".epoch_0001.partial").is_dir()  # the kill really happened mid-write
    assert not (root / "epoch_0001").exists()
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "epoch_0000"
    assert ckpt.verify_checkpoint(latest)["epoch"] == 0  # intact: every file matches its SHA-256

    resumed = run_single(run_config_from_dict(cfg), tiny_train_store["path"], run_dir)
    assert ckpt.latest_checkpoint(root).name == "epoch_0001"
    assert not (root / ".epoch_0001.partial").exists()
    a, b = _engine_params(tmp_path / "clean", "epoch_0001"), _engine_params(run_dir, "epoch_0001")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    np.testing.assert_allclose([h["train_loss"] for h in resumed["history"]],
                               [h["train_loss"] for h in clean["history"]], rtol=1e-5)


# -- MLflow server going away mid-run ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_server_dies_mid_run_training_goes_on_and_warns_once(tiny_train_store, tmp_path):
    """A real `mlflow server` (127.0.0.1) is killed once epoch 0's checkpoint exists: training finishes,
    one warning says tracking stopped, and what was logged before stays in the server's database."""
    import mlflow

    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import run_single

    port = _free_port()
    db = tmp_path / "server.db"
    server = subprocess.Popen([PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root",
                               str(tmp_path / "artifacts"), "--workers", "1"],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                mlflow.MlflowClient(uri).search_experiments()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)

        run_dir = tmp_path / "run"

        def kill_after_first_checkpoint():
            while not (run_dir / "checkpoints" / "epoch_0000").is_dir():
                time.sleep(0.01)
            os.killpg(server.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
        killer.start()
        cfg = {**_train_cfg_dict(epochs=4), "tracking": {"enabled": True, "uri": uri}}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run_single(run_config_from_dict(cfg), tiny_train_store["path"], run_dir)
        killer.join(timeout=5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)

    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3]
    assert (run_dir / "model" / "model.pt").is_file()
    tracking = [w for w in caught if "MLflow tracking" in str(w.message)]
    assert len(tracking) == 1, [str(w.message) for w in tracking]
    assert "training goes on" in str(tracking[0].message)
    # what reached the server before it died is still there
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    run_id = summary["mlflow_run_id"]
    assert run_id is not None
    assert client.get_run(run_id).data.params["optim.lr"] == "0.003"


# -- the driver interrupted, then `--resume` ------------------------------------------------------------------
RESUME_EPOCHS = 12  # 0.3-1 s each: room for the epochs a worker completes while the driver stops (1-3 seen on
# an AVX2 VM; all 6 of 6 once on an AVX-512 one, whose epochs are faster)


def _driver_cfg(tmp: pathlib.Path) -> pathlib.Path:
    """One worker, no restarts (the driver's interrupt is what is tested), MLflow off."""
    path = tmp / "run.yaml"
    path.write_text(json.dumps({**_train_cfg_dict(epochs=RESUME_EPOCHS), "name": "drv",
                                "scaling": {"num_workers": 1, "max_failures": 0}}))
    return path


def _train_cmd(store: pathlib.Path, cfg_path: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [*GEARS_DIST, "train", str(store), "--config", str(cfg_path), "--out", str(out)]


def _complete_checkpoints(storage: pathlib.Path) -> dict[int, dict]:
    """{epoch: metadata} of every checkpoint directory whose files all verify (one Ray was still storing
    when the driver stopped does not count)."""
    from gears_dist.train import checkpoint as ckpt

    out = {}
    for path in storage.glob("epoch_*"):
        try:
            meta = ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError:
            continue
        assert path.name == f"epoch_{meta['epoch']:04d}", path
        out[meta["epoch"]] = meta
    return out


def _trained_epochs(output: str) -> list[int]:
    return sorted({int(e) for e in re.findall(r"\bepoch (\d+): train_loss", output)})


@pytest.fixture(scope="module")
def uninterrupted_driver_run(tiny_train_store, tmp_path_factory) -> dict:
    """The same command run to the end without interruption: the reference for a resumed run."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "run"
    done = subprocess.run(_train_cmd(tiny_train_store["path"], _driver_cfg(tmp), out), check=False, env=_env(),
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _trained_epochs(done.stdout + done.stderr) == list(range(RESUME_EPOCHS))
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_driver_interrupted_then_resume_continues(tiny_train_store, uninterrupted_driver_run, tmp_path, sig):
    """`gears-dist train` stopped by SIGINT / SIGTERM once its first checkpoint exists; the same command with
    --resume trains only the epochs after the newest complete checkpoint on disk (whatever Ray's controller
    had recorded in checkpoint_manager_snapshot.json), keeps the completed epochs' losses, and ends with the
    final metrics of an uninterrupted run."""
    cmd = _train_cmd(tiny_train_store["path"], _driver_cfg(tmp_path), tmp_path / "run")
    storage = tmp_path / "run" / "ray" / "drv"
    log = tmp_path / "interrupted.log"  # a file, not a pipe: a full pipe would stall the driver
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not _complete_checkpoints(storage):
            assert proc.poll() is None, f"train ended before its first checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gears-dist train did not stop within 120 s of {sig.name}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, log.read_text()[-3000:]
    complete = _complete_checkpoints(storage)
    last = max(complete)
    assert last < RESUME_EPOCHS - 1, f"the interrupt came after the last epoch: {sorted(complete)}"
    before = {h["epoch"]: h["train_loss"] for h in complete[last]["history"]}
    assert sorted(before) == list(range(last + 1))
    snapshot = storage / "checkpoint_manager_snapshot.json"
    ray_knows = sorted(set(re.findall(r"epoch_\d{4}", snapshot.read_text()))) if snapshot.is_file() else []

    # a leftover Ray session of the interrupted driver must not be joined: the rerun starts its own
    rerun = subprocess.run([*cmd, "--resume"], check=False, env=_env(), capture_output=True, text=True, timeout=500)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-6000:]
    print(f"{sig.name}: complete checkpoints on disk {sorted(complete)}; Ray's checkpoint_manager_snapshot.json "
          f"listed {ray_knows}; rerun trained epochs {_trained_epochs(output)}")
    # continues from the newest complete checkpoint: only the epoch in progress at the interrupt is redone
    assert re.search(rf"resumed from \S*epoch_{last:04d} at epoch {last + 1} step 0", output), output[-3000:]
    assert _trained_epochs(output) == list(range(last + 1, RESUME_EPOCHS))

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == list(range(RESUME_EPOCHS))
    assert _complete_checkpoints(storage)[RESUME_EPOCHS - 1]["epoch"] == RESUME_EPOCHS - 1
    # nothing lost: the epochs completed before the interrupt are kept as they were
    for h in summary["history"][:last + 1]:
        assert h["train_loss"] == before[h["epoch"]]
    # and the run is the uninterrupted one, bit for bit: every epoch's loss, every final metric
    reference = uninterrupted_driver_run
    assert [h["train_loss"] for h in summary["history"]] == [r["train_loss"] for r in reference["history"]]
    assert summary["final"] == reference["final"]


# -- a Ray Train worker SIGKILLed mid-run ---------------------------------------------------------------------
def _train_workers(root_pid: int) -> list:
    """The Ray Train worker processes of one `gears-dist train` (descendants of that driver only: other
    Ray instances on the machine are left alone)."""
    import psutil

    try:
        tree = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in tree:
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) or p.name().startswith("ray::RayTrainWorker"):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
def test_ray_worker_sigkilled_mid_run_restarts_and_matches_an_uninterrupted_run(tiny_train_store, tmp_path):
    """2 workers, FailureConfig(max_failures=1): one worker is SIGKILLed after epoch 0's checkpoint; Ray
    restarts the group from that checkpoint, the run completes, and its final metrics equal those of an
    uninterrupted run with the same seed (loader position and RNG state are part of the checkpoint)."""
    cfg = {**_train_cfg_dict(epochs=3), "name": "wk", "seed": 7,
           "data": {"loader": {"batch_size": 16, "buffer_chunks": 4, "control_pool_cells": 256}},
           "deepspeed": {"zero_stage": 1}, "scaling": {"num_workers": 2, "max_failures": 1}}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(cfg))

    def cmd(out):
        return [*GEARS_DIST, "train", str(tiny_train_store["path"]), "--config", str(cfg_path), "--out", str(out)]

    clean = subprocess.run(cmd(tmp_path / "clean"), check=False, env=_env(), capture_output=True, text=True, timeout=500)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 400
        while not list((out / "ray" / "wk").glob("epoch_0000")):
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.1)
        workers = _train_workers(proc.pid)
        assert len(workers) == 2, workers
        killed = workers[-1].pid
        os.kill(killed, signal.SIGKILL)
        output, _ = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    a = json.loads((tmp_path / "clean" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert [h["epoch"] for h in b["history"]] == [0, 1, 2]
    print(f"SIGKILLed worker pid {killed}; final test_mse clean {a['final']['test_mse']} vs "
          f"restarted {b['final']['test_mse']}")
    # bit for bit: every epoch's loss and every final metric
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]]
    assert b["final"] == a["final"]
