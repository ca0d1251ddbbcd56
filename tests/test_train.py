"""Single-process training loop (real DeepSpeed, gloo, CPU): learning, checkpoints, exact resume, MLflow."""

import json
import pathlib
import shutil
import warnings

import numpy as np
import pytest
import torch

from gears_dist.config import ConfigError
from gears_dist.train import checkpoint as ckpt
from gears_dist.train.config import load_run_config, run_config_from_dict
from gears_dist.train.loop import load_model_state, run_single

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(**over):
    base = {"name": "t", "seed": 3, "train": {"epochs": 3, "log_every": 1000},
            "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
            "model": {"hidden_size": 16}, "optim": {"lr": 3e-3}, "tracking": {"enabled": True}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return run_config_from_dict(base)


def _engine_params(run_dir, epoch):
    path = pathlib.Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}" / "engine" / "state" / "mp_rank_00_model_states.pt"
    return ckpt.safe_torch_load(path)["module"]


@pytest.fixture(scope="module")
def full_run(tiny_train_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full_run")
    summary = run_single(_cfg(), tiny_train_store["path"], run_dir)
    return run_dir, summary


def test_trains_and_writes_model_and_summary(full_run):
    run_dir, summary = full_run
    losses = [h["train_loss"] for h in summary["history"]]
    assert len(losses) == 3
    assert losses[-1] < losses[0], losses
    for key in ("val_mse", "val_mse_de", "val_pearson_delta", "test_mse", "test_pearson_delta"):
        assert np.isfinite(summary["final"][key]), key
    assert any(k.startswith(("test_unseen_single", "test_combo")) for k in summary["final"])
    state, meta = load_model_state(run_dir / "model")
    assert meta["genes"] and meta["go_nodes"] and meta["conditions"]
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"] == summary["mlflow_run_id"]


def test_mlflow_run_recorded(full_run):
    import mlflow

    run_dir, summary = full_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["optim.lr"]) == 3e-3
    assert run.data.params["data.loader.batch_size"] == "32"
    assert not any("PATH" in k or "HOME" in k for k in run.data.params)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1, 2]
    for key in ("val_mse_de", "cells_per_s", "step_time_ms", "peak_rss_mb"):
        assert key in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "config.json", "split.txt", "summary.json", "figures"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/learning_curves.png"]
    description = run.data.tags["mlflow.note.content"]
    assert "**t**: GEARS (hidden 16)" in description and "best: epoch" in description, description
    assert run.data.tags["config_name"] == "t" and run.data.tags["split"] == summary["split"]
    meta = ckpt.read_meta(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    assert meta["mlflow_run_id"] == summary["mlflow_run_id"]


def test_resume_after_failure_equals_uninterrupted_run(full_run, tiny_train_store, tmp_path):
    run_dir, summary = full_run
    with pytest.raises(RuntimeError, match="injected failure"):
        run_single(_cfg(), tiny_train_store["path"], tmp_path, fail_at_epoch=0)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "epoch_0000"
    resumed = run_single(_cfg(), tiny_train_store["path"], tmp_path)
    a, b = _engine_params(run_dir, 2), _engine_params(tmp_path, 2)
    assert a.keys() == b.keys()
    for k in a:  # bit for bit
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in summary["history"]]
    assert resumed["final"] == summary["final"]
    assert resumed["mlflow_run_id"] == json.loads((tmp_path / "summary.json").read_text())["mlflow_run_id"]


def test_corrupted_or_missing_checkpoint_errors(full_run, tmp_path):
    run_dir, _ = full_run
    good = ckpt.latest_checkpoint(run_dir / "checkpoints")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    ckpt.verify_checkpoint(bad)
    target = next(p for p in (bad / "engine").rglob("*.pt"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.verify_checkpoint(bad)
    target.unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.verify_checkpoint(bad)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.verify_checkpoint(bad)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.verify_checkpoint(tmp_path / "nowhere")
    # a 'latest' pointer to a vanished checkpoint
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("epoch_0007")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.latest_checkpoint(tmp_path / "ck")
    # an interrupted write (a .partial directory) is never taken for a checkpoint
    (tmp_path / "ck2" / ".epoch_0001.partial").mkdir(parents=True)
    assert ckpt.latest_checkpoint(tmp_path / "ck2") is None


def test_resuming_a_run_directory_of_another_model_names_the_fix(full_run, tiny_train_store, tmp_path):
    """A run directory reused with another config (here a wider model) would resume a checkpoint of other shapes:
    the error names the checkpoint and what to do, not PyTorch's list of tensors; the checkpoint is untouched."""
    run_dir, _ = full_run
    reused = tmp_path / "reused"
    shutil.copytree(run_dir, reused)
    latest = ckpt.latest_checkpoint(reused / "checkpoints")
    before = {p: p.read_bytes() for p in latest.rglob("*") if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match="another shape.*new output directory"):
        run_single(_cfg(model={"hidden_size": 24}), tiny_train_store["path"], reused)
    assert {p: p.read_bytes() for p in latest.rglob("*") if p.is_file()} == before


def test_unsafe_pickle_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        ckpt.safe_torch_load(tmp_path / "evil.pt")


def test_unreachable_mlflow_warns_once_and_trains(tiny_train_store, tmp_path):
    cfg = _cfg(train={"epochs": 1}, tracking={"uri": "http://127.0.0.1:9"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_single(cfg, tiny_train_store["path"], tmp_path)
    mlflow_warnings = [w for w in caught if "MLflow tracking" in str(w.message)]
    assert len(mlflow_warnings) == 1
    assert summary["mlflow_run_id"] is None
    assert (tmp_path / "model" / "model.pt").is_file()


@pytest.mark.parametrize("preset", ["demo", "norman", "replogle_k562", "replogle_gw"])
def test_presets_load(preset):
    cfg = load_run_config(REPO / "configs" / f"{preset}.yaml")
    assert cfg.name


def test_bad_config_names_field(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-3\n  learning_rate: 2\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_run_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("deepspeed:\n  zero_stage: 5\n")
    with pytest.raises(ConfigError, match="zero_stage"):
        load_run_config(tmp_path / "d.yaml")


def test_schedule_follows_capped_epochs(tiny_train_store, tmp_path):
    # With max_steps_per_epoch the epoch is shorter than the loader's; the schedule must count the steps trained,
    # so cosine over 2 epochs x 2 steps is at half the lr after epoch 0 and at min_lr_ratio after epoch 1.
    cfg = _cfg(train={"epochs": 2, "max_steps_per_epoch": 2}, optim={"schedule": "cosine", "min_lr_ratio": 0.0},
               tracking={"enabled": False})
    summary = run_single(cfg, tiny_train_store["path"], tmp_path)
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs == pytest.approx([0.5 * 3e-3, 0.0], abs=1e-9), lrs


def test_bn_recalibration_sets_running_statistics_to_the_average_of_k_batches(tiny_train_store):
    """recalibrate_batchnorm: every BatchNorm's running mean / variance become the plain average of what K
    training batches give one by one (each measured here with momentum 1), whatever they were before; the
    loader's position and the momenta are restored."""
    import itertools

    from gears_dist.model.layers import WeightedBatchNorm1d
    from gears_dist.train.loop import recalibrate_batchnorm, setup_worker

    k = 3
    cfg = _cfg(train={"epochs": 1, "log_every": 1000, "bn_recalibration_batches": k}, tracking={"enabled": False})
    w = setup_worker(cfg, tiny_train_store["path"], 0, 1)
    model = w.engine.module.train()
    norms = [m for m in model.modules() if isinstance(m, WeightedBatchNorm1d)]
    assert len(norms) >= 8
    stream = w.loader.epoch_batches(0, 0)
    batches = list(itertools.islice(stream, k))
    stream.close()
    per_batch = []
    with torch.no_grad():
        for b in batches:
            for m in norms:
                m.momentum = 1.0
            model(b.x, b.perts, b.inverse)
            per_batch.append([(m.running_mean.clone(), m.running_var.clone()) for m in norms])
    for m in norms:
        m.momentum = 0.1
        m.running_mean.fill_(5.0)
        m.running_var.fill_(7.0)
    w.loader.epoch, w.loader.step = 1, 0

    assert recalibrate_batchnorm(w, 0) == k
    assert (w.loader.epoch, w.loader.step) == (1, 0)
    for i, m in enumerate(norms):
        assert m.momentum == 0.1
        mean = torch.stack([stats[i][0] for stats in per_batch]).mean(0)
        var = torch.stack([stats[i][1] for stats in per_batch]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
    # the batches really differ (else any single batch would pass)
    assert max(float((per_batch[0][i][0] - per_batch[1][i][0]).abs().max()) for i in range(len(norms))) > 1e-3


def test_bn_recalibration_batches_must_not_be_negative():
    with pytest.raises(ConfigError, match="bn_recalibration_batches"):
        _cfg(train={"bn_recalibration_batches": -1})
