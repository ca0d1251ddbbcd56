"""Shared pieces of the cluster end-to-end tests (ray job submit, SLURM): a tiny store made through the
CLI, a tiny training config and search, free ports, and killing exactly the processes a test started."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent  # the venv's bin: gears-dist and ray live beside python


def tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"{name} not found beside {sys.executable}: install the project into this environment")
    return str(path)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for the CLI subprocesses: the venv first on PATH, CPU DeepSpeed, Ray token auth."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["RAY_AUTH_MODE"] = "token"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def tiny_store(tmp_path_factory) -> pathlib.Path:
    """simulate tiny -> ingest -> split -> graph, through the CLI; built once per pytest session."""
    root = tmp_path_factory.getbasetemp() / "cluster_tiny_data"
    store = root / "tiny.zarr"
    done = root / "done"
    if done.is_file():
        return store
    root.mkdir(parents=True, exist_ok=True)
    gd, env = tool("gears-dist"), cli_env()
    h5ad = root / "tiny.h5ad"
    run([gd, "simulate", str(h5ad), "--preset", "tiny", "--seed", "3", "--overwrite"], 300, env=env)
    run([gd, "ingest", str(h5ad), str(store), "--overwrite"], 300, env=env)
    run([gd, "split", str(store), "--kind", "simulation", "--seed", "1"], 300, env=env)
    run([gd, "graph", str(store)], 300, env=env)
    done.write_text("ok")
    return store


TINY_SPLIT = "simulation_seed1"  # the split tiny_store makes and write_tiny_config names


def write_tiny_config(path: pathlib.Path, name: str, num_workers: int = 1,
                      placement_strategy: str | None = None) -> pathlib.Path:
    """A training config small enough for a 2-core CI machine: one worker (or `num_workers`, 1 CPU each,
    placed by `placement_strategy`, e.g. STRICT_SPREAD: one per node), one short epoch."""
    cfg = {
        "name": name,
        "seed": 0,
        "data": {"split": TINY_SPLIT, "loader": {"batch_size": 16}},
        "model": {"hidden_size": 8},
        "train": {"epochs": 1, "max_steps_per_epoch": 3},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": 1, "object_store_mb": 128},
    }
    if placement_strategy is not None:
        cfg["scaling"]["placement_strategy"] = placement_strategy
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_search_config(name: str, experiment: str) -> dict:
    """A Tune search small enough for CI: one random trial of one short epoch on the tiny store's split."""
    return {
        "name": name,
        "base": {"name": "tiny", "seed": 3, "train": {"log_every": 1000, "max_steps_per_epoch": 6},
                 "data": {"split": TINY_SPLIT,
                          "loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
                 "model": {"hidden_size": 8}, "tracking": {"experiment": experiment}},
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        "num_trials": 1, "max_concurrent": 1, "searcher": "random", "seed": 0,
        "scheduler": {"kind": "fifo", "max_epochs": 1},
        "resources": {"num_workers": 1, "cpus_per_worker": 1}}


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def processes_mentioning(marker: str) -> list[psutil.Process]:
    """Live processes whose command line contains `marker` (a test's private temp dir)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def stop_process_tree(proc: subprocess.Popen, marker: str, grace: float = 30.0) -> list[int]:
    """SIGTERM the session `proc` leads (started with start_new_session=True), then SIGKILL what is left of it
    and of any process naming `marker`. Returns the PIDs that had to be killed."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    survivors = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        survivors = [p for p in processes_mentioning(marker) if p.pid != os.getpid()]
        survivors += [p for p in psutil.process_iter() if _group_of(p.pid) == proc.pid and p not in survivors]
        if not survivors:
            return []
        time.sleep(0.5)
    killed = []
    for p in survivors:
        try:
            p.kill()
            killed.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()
    return killed


def check_worker_records(run_dir, store, world):
    """The run's RUN/workers/rank<r>.json: disjoint shards that cover the training conditions, and each
    worker read training cells of its own shard's conditions only. Returns the records."""
    from gears_dist.data.splits import load_split
    from gears_dist.data.store import open_store

    opened = open_store(store["path"])
    controls = {n for n, g in zip(opened.condition_names, opened.condition_genes()) if not g}
    train = set(load_split(opened, store["split"]).train) - controls
    records = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in range(world)]
    assert [r["rank"] for r in records] == list(range(world))
    shards = [set(r["shard_conditions"]) for r in records]
    assert set().union(*shards) == train
    assert sum(len(s) for s in shards) == len(train), "shards overlap"
    for r, shard in zip(records, shards):
        assert r["conditions_read"], r
        assert set(r["conditions_read"]) <= shard, (r["rank"], sorted(set(r["conditions_read"]) - shard))
    return records
