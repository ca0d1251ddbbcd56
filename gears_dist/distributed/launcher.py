"""Ray Train launcher: the per-worker loop of gears_dist.train on W workers, local Ray or a cluster.

- No ``--address`` and no ``RAY_ADDRESS``: start a local Ray bound to 127.0.0.1, dashboard off, a small
  object store (the loop streams from the Zarr store; nothing big goes through Ray's object store).
  An address: join that cluster (``ray job submit -- gears-dist train ...`` sets RAY_ADDRESS).
- ``TorchTrainer`` (gloo on CPU, nccl on GPU) with ``FailureConfig(max_failures)`` and a
  ``CheckpointConfig``; every rank reports its part of each epoch's checkpoint (Ray merges them into
  one directory in ``<run_dir>/ray/<name>``); a restarted worker group resumes from
  ``ray.train.get_checkpoint()``. Re-running with ``--resume`` continues the same Ray run.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

from gears_dist.config import to_dict
from gears_dist.train.config import RunConfig, load_run_config, run_config_from_dict

# Variables the workers need that a Ray cluster would not otherwise pass on.
_WORKER_ENV = ("DS_ACCELERATOR", "DS_BUILD_OPS", "MLFLOW_TRACKING_URI", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
               "OMP_NUM_THREADS")


def ensure_ray(address: str | None, cfg: RunConfig) -> bool:
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray. Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    env.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    runtime_env = {"env_vars": env}
    if address:
        # Inside `ray job submit` the job already carries a runtime env; Ray refuses to merge two that set
        # the same variable, so leave the job's own values (e.g. MLFLOW_TRACKING_URI) to the job.
        job_cfg = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_env = (job_cfg.get("runtime_env") or {}).get("env_vars") or {}
        runtime_env = {"env_vars": {k: v for k, v in env.items() if k not in job_env}}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
        # address="local": a new local instance, never a cluster some other process started on this machine
        ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1", object_store_memory=cfg.scaling.object_store_mb << 20,
                 runtime_env=runtime_env, configure_logging=False, log_to_driver=True)
    return True


class RayReporter:
    """Per-epoch checkpoint: each rank writes its part to a local temp dir; Ray merges and stores them."""

    def report(self, w, metrics: dict, meta: dict | None, loader_state: dict, epoch: int,
               tensors: dict[str, dict]) -> None:
        import ray.train

        from gears_dist.train import checkpoint as ckpt

        tmp = tempfile.mkdtemp(prefix=f"gears-ckpt-r{w.rank}-")
        try:
            ckpt.write_checkpoint(w.engine, tmp, rank=w.rank, meta=meta, loader_state=loader_state, tensors=tensors)
            ray.train.report({k: float(v) for k, v in metrics.items()},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _train_loop_per_worker(config: dict) -> None:
    import ray.train

    from gears_dist.train.loop import run_worker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = run_config_from_dict(config["cfg"])
    resume_dir = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        resume_dir = tempfile.mkdtemp(prefix=f"gears-resume-r{rank}-")
        restored.to_directory(resume_dir)
    fail_at = config.get("fail_at_epoch") if rank == world - 1 else None
    try:
        summary = run_worker(cfg, config["store"], config["run_dir"], rank, world, reporter=RayReporter(),
                             keys=config["keys"], resume_from=resume_dir, fail_at_epoch=fail_at)
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
    final = {f"final_{k}": float(v) for k, v in summary["final"].items()}
    ray.train.report(final)


def train_with_ray(cfg: RunConfig, store_path: str | os.PathLike, run_dir: str | os.PathLike, *,
                   address: str | None = None, resume: bool = False, fail_at_epoch: int | None = None,
                   callbacks: list | None = None) -> dict:
    """Train with Ray Train; returns the run summary (also written to ``run_dir/summary.json``).

    callbacks: Ray Train ``UserCallback`` objects run on the controller (``gears_dist.tune`` passes one that
    forwards each epoch's metrics to Ray Tune and its MLflow child run)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from gears_dist.train.loop import prepare_run

    run_dir = pathlib.Path(run_dir).resolve()
    storage = run_dir / "ray"
    if (storage / cfg.name).exists() and not resume:
        raise ValueError(f"run directory {str(run_dir)!r} already holds run {cfg.name!r}; pass --resume to continue "
                         f"it, or choose another --out")
    if resume and not (storage / cfg.name).exists():
        raise ValueError(f"--resume: no run {cfg.name!r} under {str(storage)!r} to continue; drop --resume to start")
    world = cfg.scaling.num_workers
    keys = prepare_run(cfg, store_path, world)  # validates the store first: a bad one leaves no run directory
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    ensure_ray(address, cfg)

    s = cfg.scaling
    per_worker: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        per_worker["GPU"] = s.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "store": str(pathlib.Path(store_path).resolve()),
                           "run_dir": str(run_dir), "keys": keys, "fail_at_epoch": fail_at_epoch},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=world, use_gpu=s.use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=s.num_checkpoints_to_keep),
            callbacks=list(callbacks or [])),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.setdefault("final_metrics", dict(result.metrics or {}))
    if result.checkpoint is not None:
        summary["checkpoint"] = result.checkpoint.path
    return summary


def cli_train(args) -> int:
    """``gears-dist train STORE --config C [--out DIR] [--address A] [--resume]``."""
    cfg = load_run_config(args.config)
    out = pathlib.Path(args.out or pathlib.Path("runs") / cfg.name)
    summary = train_with_ray(cfg, args.store, out, address=args.address, resume=args.resume)
    from gears_dist.train.loop import format_summary

    if summary.get("final"):
        print(format_summary(summary))
    print(f"gears-dist train: run directory {out} (model in {out / 'model'}, summary.json, MLflow "
          f"run {summary.get('mlflow_run_id')})")
    return 0
