"""Two Ray nodes on this machine: a head and a second node started by separate `ray start` processes, each
with its own CPU and a resource naming it. Training runs one worker per node (placement STRICT_SPREAD) with
graph-partitioned shards, on a store and run directory both nodes see; then the second node is lost mid-epoch
(its raylet SIGKILLed), the run waits, a new second node joins, and the run finishes with the metrics of the
uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import yaml
from _cluster_support import (
    check_worker_records,
    cli_env,
    free_ports,
    processes_mentioning,
    stop_process_tree,
    tool,
)

pytestmark = pytest.mark.slow

_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("NODES " + json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]))
"""
# Ray may print its own lines on stdout (under load: "raylet has lagging heartbeats ..."): take ours by the prefix


class TwoNodes:
    """`ray start --head` (resource gd_head) and `ray start --address` (resource gd_second), both blocking
    children of this test, sharing a short temp dir (Ray's Unix sockets must fit in 107 bytes)."""

    def __init__(self):
        self.ray = tool("ray")
        self.temp_dir = tempfile.mkdtemp(prefix="gdmn", dir="/tmp")
        (self.gcs_port,) = free_ports(1)
        self.address = f"127.0.0.1:{self.gcs_port}"
        # Node death is noticed after period x threshold: ~3 s instead of Ray's default ~15 s.
        self.env = cli_env(RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                           RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        self.procs: list[subprocess.Popen] = []
        self.head = self._start(["--head", "--port", str(self.gcs_port), "--include-dashboard", "false",
                                 "--temp-dir", self.temp_dir], "gd_head", "head")
        self.wait_for(1)
        self.second = self.start_second()

    def _start(self, args: list[str], resource: str, name: str) -> subprocess.Popen:
        log = pathlib.Path(self.temp_dir) / f"{name}-{len(self.procs)}.log"
        with log.open("w") as fh:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [self.ray, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                 "--resources", json.dumps({resource: 1}), "--object-store-memory", str(96 << 20),
                 "--disable-usage-stats", *args],
                env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = log
        self.procs.append(proc)
        return proc

    def start_second(self) -> subprocess.Popen:
        proc = self._start(["--address", self.address], "gd_second", "second")
        self.wait_for(2)
        return proc

    def nodes(self) -> list[dict]:
        out = subprocess.run([sys.executable, "-c", _NODES, self.address], env=self.env, capture_output=True,
                             text=True, timeout=120, check=False)
        ours = [line[len("NODES "):] for line in out.stdout.splitlines() if line.startswith("NODES ")]
        return json.loads(ours[-1]) if out.returncode == 0 and ours else []

    def wait_for(self, count: int, timeout: float = 180) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None and p is not getattr(self, "lost", None):
                    pytest.fail(f"ray start exited {p.returncode}:\n{p.log.read_text()[-4000:]}")
            nodes = self.nodes()
            if len(nodes) == count:
                return nodes
            if time.monotonic() > deadline:
                pytest.fail(f"expected {count} live Ray nodes within {timeout} s, found {nodes}")
            time.sleep(1)

    def kill_second_raylet(self) -> int:
        """SIGKILL the raylet of the current second node (found by its gd_second resource); returns its pid."""
        for p in processes_mentioning(self.temp_dir):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "raylet" in p.name() and "gd_second" in cmd:
                p.send_signal(signal.SIGKILL)
                self.lost = self.second
                return p.pid
        raise AssertionError(f"no raylet with resource gd_second among {processes_mentioning(self.temp_dir)}")

    def close(self) -> None:
        killed = []
        for p in reversed(self.procs):
            killed += stop_process_tree(p, self.temp_dir)
        left = processes_mentioning(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of the test cluster survived: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def two_nodes():
    cluster = TwoNodes()
    try:
        yield cluster
    finally:
        cluster.close()


def _config(path: pathlib.Path, name: str) -> pathlib.Path:
    cfg = {"name": name, "seed": 4, "train": {"epochs": 3, "log_every": 1000},
           "data": {"loader": {"batch_size": 16, "buffer_chunks": 4, "control_pool_cells": 256}},
           "model": {"hidden_size": 16, "sync_batchnorm": True}, "optim": {"lr": 3e-3},
           "deepspeed": {"zero_stage": 1}, "tracking": {"enabled": False},
           "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1,
                       "placement_strategy": "STRICT_SPREAD"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cluster: TwoNodes, store, cfg: pathlib.Path, out: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([tool("gears-dist"), "train", str(store["path"]), "--config", str(cfg), "--out", str(out),
                             "--address", cluster.address], env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, marker: str, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_tree(proc, marker)
        out, _ = proc.communicate()
        pytest.fail(f"training did not finish in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(two_nodes, tiny_train_store, tmp_path_factory) -> pathlib.Path:
    """The two-node run without faults: its run directory."""
    root = tmp_path_factory.mktemp("two_nodes")
    out = root / "run"
    _finish(_train(two_nodes, tiny_train_store, _config(root / "run.yaml", "mn"), out), str(out))
    return out


def test_one_worker_per_node_each_reading_its_own_shard(two_nodes, tiny_train_store, uninterrupted):
    records = check_worker_records(uninterrupted, tiny_train_store, 2)
    nodes = {n["id"]: n["resources"] for n in two_nodes.nodes()}
    placed = [r["ray_node_id"] for r in records]
    assert len(set(placed)) == 2, f"both workers ran on node {placed[0]}"
    assert set(placed) == set(nodes), (placed, nodes)
    assert sorted(next(k for k in nodes[p] if k.startswith("gd_")) for p in placed) == ["gd_head", "gd_second"]


def test_second_node_lost_mid_epoch_then_replaced_matches_the_uninterrupted_run(two_nodes, tiny_train_store,
                                                                                   uninterrupted, tmp_path_factory):
    clean = json.loads((uninterrupted / "summary.json").read_text())
    root = tmp_path_factory.mktemp("node_loss")
    out = root / "run"
    proc = _train(two_nodes, tiny_train_store, _config(root / "run.yaml", "mn"), out)
    try:
        deadline = time.monotonic() + 400
        while not list((out / "ray" / "mn").glob("epoch_0000")):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no first checkpoint within 400 s"
            time.sleep(0.2)
        before = {n["id"] for n in two_nodes.nodes()}
        killed = two_nodes.kill_second_raylet()
        two_nodes.wait_for(1)  # the head sees the node die; the run now waits for a second node
        two_nodes.second = two_nodes.start_second()
        replacement = {n["id"] for n in two_nodes.nodes()} - before
    except BaseException:
        stop_process_tree(proc, str(out))
        raise
    output = _finish(proc, str(out))
    lost = json.loads((out / "summary.json").read_text())
    print(f"killed raylet {killed}; final test_mse clean {clean['final']['test_mse']} vs after node loss "
          f"{lost['final']['test_mse']}")
    assert [h["epoch"] for h in lost["history"]] == [0, 1, 2], output[-3000:]
    records = check_worker_records(out, tiny_train_store, 2)
    placed = {r["ray_node_id"] for r in records}
    assert len(placed) == 2 and replacement <= placed and len(replacement) == 1, (placed, replacement)
    # bit for bit: every epoch's loss and every final metric
    assert [h["train_loss"] for h in lost["history"]] == [h["train_loss"] for h in clean["history"]]
    assert lost["final"] == clean["final"]
