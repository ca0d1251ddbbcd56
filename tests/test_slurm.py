"""SLURM end to end (slow): a real two-node SLURM (Debian's slurmctld, slurmd and munge, set up by
`tools/ci_setup_slurm.sh up2`: two slurmd, each in its own network namespace with its own address and host
name); the project's sbatch script submitted with `sbatch --nodes=2` for a tiny training run, a Ray node on each
SLURM node, one training worker on each; COMPLETED with exit code 0, and the run's outputs on disk (checkpoints,
model, the MLflow run). A single-node run of the same script was a test of its own until it was folded in here
to save CI ~2 minutes: every step it checked is checked on two nodes.

Runs wherever the set-up script can install and start SLURM (root with apt-get, as in CI; the two-node
set-up also needs network namespaces, veth and a bridge); elsewhere it skips and says why. A machine's own
SLURM configuration is never touched (the script refuses). The daemons (and the two-node set-up's
namespaces and bridge) are removed again at the end if this test started them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time

import psutil
import pytest
from _cluster_support import (
    REPO,
    TINY_SPLIT,
    check_worker_records,
    cli_env,
    processes_mentioning,
    tiny_store,
    write_tiny_config,
)

SETUP = REPO / "tools" / "ci_setup_slurm.sh"
SBATCH_SCRIPT = REPO / "cluster" / "slurm" / "gears_dist.sbatch"
# The two-node set-up (tools/ci_setup_slurm.sh up2): its own slurm.conf, its nodes and their addresses.
CONF2 = "/run/gears-dist-slurm2/slurm.conf"
NODES2 = {"gdn1": "10.77.0.11", "gdn2": "10.77.0.12"}


def _submit(tmp_path: pathlib.Path, env: dict, nodes: int, cpus: int) -> str:
    """sbatch the project's script on `nodes` nodes (`cpus` per task), output in tmp_path; returns the job id."""
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={nodes}", f"--cpus-per-task={cpus}", "--time=00:20:00", "--no-requeue",
         f"--output={tmp_path}/slurm-%j.out", f"--chdir={tmp_path}", "--export=ALL", str(SBATCH_SCRIPT)],
        env=env, check=False, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    return submit.stdout.strip().split(";")[0]


def _slurm_is_up() -> bool:
    proc = subprocess.run(["bash", str(SETUP), "status"], check=False, capture_output=True, text=True, timeout=60)
    return "node: idle" in proc.stdout


@pytest.fixture(scope="module")
def slurm2():
    """The two-node set-up; stopped again (daemons, every process left in its namespaces, the namespaces and
    the bridge) if this fixture started it."""
    if os.geteuid() != 0:
        pytest.skip("the two-node SLURM set-up needs root (network namespaces; tools/ci_setup_slurm.sh up2)")
    status = subprocess.run(["bash", str(SETUP), "status2"], check=False, capture_output=True, text=True, timeout=60)
    was_up = "nodes: gdn1 idle gdn2 idle" in status.stdout
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SETUP), "up2"], check=False, capture_output=True, text=True, timeout=900)
    if proc.returncode in (3, 4, 10):
        subprocess.run(["bash", str(SETUP), "stop2"], check=False, capture_output=True, text=True, timeout=120)
        pytest.skip(f"the two-node SLURM cannot run here (exit {proc.returncode}): "
                    f"{proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0, f"tools/ci_setup_slurm.sh up2 failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"two-node SLURM set-up took {time.monotonic() - started:.1f} s: {proc.stderr.strip()}")
    yield
    if not was_up:
        proc = subprocess.run(["bash", str(SETUP), "stop2"], check=False, capture_output=True, text=True, timeout=180)
        print(f"two-node SLURM stopped: {proc.stderr.strip()}")


def _job_fields(job_id: str, env: dict[str, str] | None = None) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True, text=True,
                         timeout=30, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait(job_id: str, timeout: float, env: dict[str, str] | None = None) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        fields = _job_fields(job_id, env)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                      "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            return fields
        time.sleep(2)
    subprocess.run(["scancel", job_id], check=False, timeout=30, env=env)
    raise AssertionError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s (cancelled)")


def _netns_pids(name: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", name], check=False, capture_output=True, text=True, timeout=30)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.slow
def test_sbatch_script_trains_on_two_nodes_one_worker_each(slurm2, tmp_path, tmp_path_factory):
    import mlflow

    store = tiny_store(tmp_path_factory)
    config = write_tiny_config(tmp_path / "tiny2.yaml", name="slurm2", num_workers=2,
                               placement_strategy="STRICT_SPREAD")
    run_dir = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="gdsl2", dir="/tmp")  # short: Ray's socket paths live under it
    slurmd = {node: _netns_pids(node) for node in NODES2}  # what lives in the namespaces before the job
    # SLURM_CONF: this set-up's clients, here and (through --export=ALL) srun and scontrol inside the job.
    env = cli_env(SLURM_CONF=CONF2, GEARS_STORE=str(store), GEARS_CONFIG=str(config), GEARS_RUN_DIR=str(run_dir),
                  RAY_OBJECT_STORE_MB="128", GEARS_RAY_TMP=ray_tmp)
    env.pop("MLFLOW_TRACKING_URI", None)
    for name in ("RAY_HEAD_IP", "RAY_PORT", "RAY_DASHBOARD_PORT"):
        env.pop(name, None)  # the script's defaults: the head's address found from SLURM, ports from the job id
    started = time.monotonic()
    try:
        job_id = _submit(tmp_path, env, nodes=2, cpus=1)
        fields = _wait(job_id, timeout=900, env=env)
        print(f"two-node job {job_id}: {fields.get('JobState')} in {time.monotonic() - started:.0f} s "
              f"(RunTime {fields.get('RunTime')}, nodes {fields.get('NodeList')})")
        log = (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")
        assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", (
            f"job {job_id}: {fields.get('JobState')} exit {fields.get('ExitCode')}\n{log[-6000:]}")
        assert fields.get("NodeList") == "gdn[1-2]", fields.get("NodeList")
        head = fields.get("BatchHost")
        assert head in NODES2, head
        # The head's address came from SLURM (NodeAddr), not `hostname --ip-address`; both Ray nodes joined.
        assert f"head {head} at {NODES2[head]}:" in log, log[:3000]
        assert "all 2 Ray nodes up" in log and "gears-dist train finished" in log, log[-3000:]

        # One worker on each node: two Ray nodes, at the two namespaces' addresses, on the two hosts; the shards
        # disjoint, each worker reading its own only.
        records = check_worker_records(run_dir, {"path": store, "split": TINY_SPLIT}, 2)
        assert len({r["ray_node_id"] for r in records}) == 2, records
        assert sorted(r["node_ip"] for r in records) == sorted(NODES2.values()), [r["node_ip"] for r in records]
        assert sorted(r["host"] for r in records) == sorted(NODES2), [r["host"] for r in records]
        assert {r["host"]: r["node_ip"] for r in records} == NODES2
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["world_size"] == 2
        # Outputs: checkpoints, model, the MLflow run (the script's default: SQLite in the run directory), and
        # the job's token removed.
        assert sorted((run_dir / "ray" / "slurm2").glob("epoch_*")), log[-3000:]
        assert (run_dir / "model" / "model.pt").stat().st_size > 0
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        runs = [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])]
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert summary.get("mlflow_run_id") == runs[0].info.run_id
        assert not (run_dir / ".ray_auth_token").exists()

        # Ray went down with the job on both nodes: none of its processes left (its private temp dir), nothing
        # left in the namespaces but the slurmd that were there before, the head's temp dir removed.
        deadline = time.monotonic() + 30
        while True:
            leftover = processes_mentioning(f"{ray_tmp}/ray-{job_id}")
            extra = {node: _netns_pids(node) - before for node, before in slurmd.items()}
            if (not leftover and not any(extra.values())) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert not leftover, [p.cmdline() for p in leftover]
        assert not any(extra.values()), {n: [psutil.Process(p).cmdline() for p in pids if psutil.pid_exists(p)]
                                         for n, pids in extra.items()}
        assert not (pathlib.Path(ray_tmp) / f"ray-{job_id}").exists(), "the job's Ray temp dir was not removed"
    finally:
        for p in processes_mentioning(ray_tmp):  # only after a failure: this job's Ray, by its private temp dir
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
