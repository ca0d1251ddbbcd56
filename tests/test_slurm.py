"""SLURM end to end: a real single-node SLURM (Debian's slurmctld, slurmd, munge, set up by
tools/ci_setup_slurm.sh), the project's sbatch script submitted with `sbatch` for a tiny training run,
COMPLETED with exit code 0, and the run's outputs on disk.

Runs wherever the set-up script can install and start SLURM (root with apt-get, as in CI); elsewhere
it skips and says why. A machine's own SLURM configuration is never touched (the script refuses).
The daemons are stopped again at the end if this test started them.
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

import pytest
from _cluster_support import REPO, cli_env, free_ports, processes_mentioning, tiny_store, write_tiny_config

SETUP = REPO / "tools" / "ci_setup_slurm.sh"
SBATCH_SCRIPT = REPO / "cluster" / "slurm" / "gears_dist.sbatch"


def _slurm_is_up() -> bool:
    proc = subprocess.run(["bash", str(SETUP), "status"], check=False, capture_output=True, text=True, timeout=60)
    return "node: idle" in proc.stdout


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed and installing it needs root (tools/ci_setup_slurm.sh)")
    was_up = shutil.which("sbatch") is not None and _slurm_is_up()
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SETUP), "up"], check=False, capture_output=True, text=True, timeout=900)
    if proc.returncode == 10:
        pytest.skip(f"SLURM cannot be installed here: {proc.stderr.strip().splitlines()[-1:]}")
    if proc.returncode == 3:
        pytest.skip("this machine has its own SLURM configuration; the test only uses the CI set-up "
                    "(tools/ci_setup_slurm.sh)")
    assert proc.returncode == 0, f"tools/ci_setup_slurm.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"SLURM set-up took {time.monotonic() - started:.1f} s: {proc.stderr.strip()}")
    yield
    if not was_up:
        subprocess.run(["bash", str(SETUP), "stop"], check=False, capture_output=True, text=True, timeout=120)


def _job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait(job_id: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        fields = _job_fields(job_id)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                      "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            return fields
        time.sleep(2)
    subprocess.run(["scancel", job_id], check=False, timeout=30)
    raise AssertionError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s (cancelled)")


def test_sbatch_script_trains_on_one_node(slurm, tmp_path, tmp_path_factory):
    import mlflow

    store = tiny_store(tmp_path_factory)
    config = write_tiny_config(tmp_path / "tiny.yaml", name="slurm")
    run_dir = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="gdsl", dir="/tmp")  # short: Ray's socket paths live under it
    port, dash = free_ports(2)
    env = cli_env(GEARS_STORE=str(store), GEARS_CONFIG=str(config), GEARS_RUN_DIR=str(run_dir),
                  RAY_PORT=str(port), RAY_DASHBOARD_PORT=str(dash), RAY_OBJECT_STORE_MB="128",
                  GEARS_RAY_TMP=ray_tmp)
    env.pop("MLFLOW_TRACKING_URI", None)  # the script's default: SQLite in the run directory
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--time=00:20:00", "--no-requeue",
         f"--output={tmp_path}/slurm-%j.out", f"--chdir={tmp_path}", "--export=ALL", str(SBATCH_SCRIPT)],
        env=env, check=False, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    fields = _wait(job_id, timeout=600)
    log = (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", (
        f"job {job_id}: {fields.get('JobState')} exit {fields.get('ExitCode')}\n{log[-6000:]}")
    assert "Ray head up" in log and "gears-dist train finished" in log, log[-3000:]

    # Outputs: checkpoint, model, MLflow run (default SQLite in the run dir), and the job's token removed.
    assert sorted((run_dir / "ray" / "slurm").glob("epoch_*")), log[-3000:]
    assert (run_dir / "model" / "model.pt").stat().st_size > 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])]
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert json.loads((run_dir / "summary.json").read_text()).get("mlflow_run_id") == runs[0].info.run_id
    assert not (run_dir / ".ray_auth_token").exists()
    # Ray went down with the job: nothing of this job's Ray (its private temp dir) is still running.
    leftover = processes_mentioning(f"{ray_tmp}/ray-{job_id}")
    assert not leftover, [p.cmdline() for p in leftover]
    assert not (pathlib.Path(ray_tmp) / f"ray-{job_id}").exists(), "the job's Ray temp dir was not removed"
    shutil.rmtree(ray_tmp, ignore_errors=True)
