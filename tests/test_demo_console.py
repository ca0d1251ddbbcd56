"""What a person sees: `gears-dist demo` without a terminal (as `make demo | tee`, CI, a notebook's `!`).

The demo's own path (simulate -> ingest -> split, graphs -> 2 Ray workers -> evaluate), with a small training
config: at most 60 lines, each progress line and the summary once, none of Ray's own output (it is in the run
directory's logs instead), no library FutureWarning; a bf16 run on a CPU without native bf16 warns once.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from gears_dist.config import deep_merge
from gears_dist.distributed.launcher import cpu_has_native_bf16, warn_if_bf16_emulated
from gears_dist.train.config import RunConfig, run_config_from_dict

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 60
EPOCHS = 2
# what Ray, Ray Train, DeepSpeed, torch and MLflow print on their own (seen in `make demo` before it was quiet)
NOISE = re.compile(r"\(\w+ pid=\d+|PlacementGroupCleaner|TrainController|RayTrainWorker|TrainingReport|"
                   r"Checkpoint successfully created|Reporting training result|FutureWarning|all_gather_into_tensor|"
                   r"core_worker\.cc|Ray deduplicates|repeated \d+x across cluster|built successfully|"
                   r"INFO mlflow|Traceback|\x1b\[")
# the bf16 check is part of this run: rank 0 warns once when this CPU would emulate bf16
SMALL = {"name": "demo_console", "model": {"hidden_size": 8},
         "train": {"epochs": EPOCHS, "max_steps_per_epoch": 2},
         "data": {"loader": {"control_pool_cells": 256}},
         "deepspeed": {"precision": "bf16"},
         "scaling": {"object_store_mb": 128}}


def _env() -> dict[str, str]:
    drop = ("GEARS_DIST_VERBOSE", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_TRAIN_ENABLE_PRINT_PATCH", "MASTER_ADDR",
            "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def test_demo_prints_a_short_readable_account(tmp_path):
    cfg_path = tmp_path / "demo_console.yaml"
    cfg = deep_merge(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()), SMALL)
    assert cfg["scaling"]["num_workers"] == 2  # the demo's 2 Ray workers
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "gears_dist.cli", "demo", "--out", str(out), "--config",
                           str(cfg_path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO, timeout=400, check=False)
    text = proc.stdout
    lines = text.splitlines()
    assert proc.returncode == 0, text[-6000:]

    noise = [line for line in lines if NOISE.search(line)]
    assert not noise, "Ray / library output reached the terminal:\n" + "\n".join(noise[:20])
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{text}"
    for epoch in range(EPOCHS):
        assert len([x for x in lines if x.startswith(f"epoch {epoch}: train_loss")]) == 1, text
    for once in ("gears-dist train: summary", "prior only (before training)", "headline:", "MLflow UI:"):
        assert len([x for x in lines if x.startswith(once)]) == 1, (once, text)
    bf16 = [x for x in lines if "no native bf16" in x]
    assert len(bf16) == (1 if cpu_has_native_bf16() is False else 0), text

    # what the terminal did not show is kept in the run directory
    (run_dir,) = (out / "runs").iterdir()
    assert "epoch 0: train_loss" in (run_dir / "train.log").read_text()
    ray_logs = run_dir / "logs" / "ray"
    kept = "".join(p.read_text(errors="replace") for p in ray_logs.rglob("*") if p.is_file() and p.stat().st_size)
    assert "Reporting training result" in kept and "TrainingReport" in kept
    assert "mse_de" in (run_dir / "evaluation" / "report.txt").read_text()

    # the demo trains through the API: its run is a gd.Run, whose evaluation is the summary's
    import gears_dist as gd

    run = gd.load_run(run_dir)
    assert run.mlflow_run_id and f"MLflow run {run.mlflow_run_id}" in text
    table = run.evaluate(baselines=[]).set_index(["predictor", "category"])
    assert table.loc[("gears", "all"), "mse"] == pytest.approx(run.summary["final"]["test_mse"], rel=1e-3)


def test_bf16_on_a_cpu_without_native_bf16_warns_and_suggests_fp32(recwarn):
    bf16 = run_config_from_dict({"deepspeed": {"precision": "bf16"}, "train": {"device": "cpu"}})
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n"
    assert cpu_has_native_bf16(avx2) is False and cpu_has_native_bf16(zen4) is True
    assert cpu_has_native_bf16("") is None  # not Linux: nothing to tell, no warning
    assert warn_if_bf16_emulated(bf16, avx2)
    assert len(recwarn) == 1 and "deepspeed.precision: fp32" in str(recwarn[0].message)
    assert not warn_if_bf16_emulated(bf16, zen4)
    assert not warn_if_bf16_emulated(RunConfig(), avx2)  # fp32
    assert not warn_if_bf16_emulated(bf16, "")
    assert len(recwarn) == 1
