"""Ray Train launcher: the per-worker loop of gears_dist.train on W workers, local Ray or a cluster.

- No ``--address`` and no ``RAY_ADDRESS``: start a local Ray whose services (gcs_server, raylet and its
  object manager, dashboard / runtime-env agents and their metrics ports, workers' Ray ports) listen on
  127.0.0.1 only, dashboard off, a small object store (the loop streams from the Zarr store; nothing big
  goes through Ray's object store). Not Ray's: rank 0's torch.distributed rendezvous store (TCPStore)
  binds all interfaces while a run trains (torch offers no bind address for it).
  An address: join that cluster (``ray job submit -- gears-dist train ...`` sets RAY_ADDRESS).
- ``TorchTrainer`` (gloo on CPU, nccl on GPU) with ``FailureConfig(max_failures)`` and a
  ``CheckpointConfig``; every rank reports its part of each epoch's checkpoint (Ray merges them into
  one directory ``<run_dir>/ray/<name>/epoch_NNNN``); a restarted worker group resumes from
  ``ray.train.get_checkpoint()``.
- Re-running with ``--resume`` continues the same Ray run from the newest checkpoint directory on disk
  that verifies (every file's SHA-256), not only from the one Ray's controller had recorded: the
  controller's ``checkpoint_manager_snapshot.json`` lags the checkpoints the workers already wrote, so
  after an interrupted driver it may name an older checkpoint, or none.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import warnings
from typing import Any

from gears_dist.config import to_dict
from gears_dist.train.config import RunConfig, load_run_config, run_config_from_dict

# Variables the workers need that a Ray cluster would not otherwise pass on.
_WORKER_ENV = ("DS_ACCELERATOR", "DS_BUILD_OPS", "MLFLOW_TRACKING_URI", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
               "OMP_NUM_THREADS")


# Ray on Linux turns _node_ip_address="127.0.0.1" into the routable address (services.resolve_ip_for_localhost)
# unless it believes clusters are off, as it does by default on macOS / Windows; with the node's IP left at
# 127.0.0.1, gcs_server, raylet (node manager, object manager), the agents and the workers bind loopback.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@contextlib.contextmanager
def _ray_on_loopback():
    """While a local Ray starts: its node IP stays 127.0.0.1. The variable reaches the processes Ray spawns
    (they read it on import); this process may have imported ray already, so its constant is set too."""
    from ray._private import ray_constants  # private: if this changes, ensure_ray's check below warns

    saved_env, saved_const = os.environ.get(_CLUSTER_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_const is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved_env


def ensure_ray(address: str | None, cfg: RunConfig) -> bool:
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray. Returns True if this call started it.

    The local Ray is private to this process and listens on 127.0.0.1 only; another process attaching to it
    (``ray status``, a test) needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` as well, or Ray rewrites the
    127.0.0.1 of the address it is given to the routable IP, where nothing listens."""
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
        with _ray_on_loopback():
            ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1), include_dashboard=False,
                     _node_ip_address="127.0.0.1", object_store_memory=cfg.scaling.object_store_mb << 20,
                     runtime_env=runtime_env, configure_logging=False, log_to_driver=True)
        node_ip = ray.util.get_node_ip_address()
        if node_ip not in _LOOPBACK:
            warnings.warn(f"the local Ray took node address {node_ip} instead of 127.0.0.1: its services listen "
                          f"beyond this machine, guarded by Ray's token authentication (RAY_AUTH_MODE=token)",
                          stacklevel=2)
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


_EPOCH_DIR = re.compile(r"epoch_(\d+)$")


def _epoch_of(name: str) -> int | None:
    m = _EPOCH_DIR.search(name.rstrip("/"))
    return int(m.group(1)) if m else None


def newest_verified_checkpoint(experiment_dir: str | os.PathLike) -> tuple[pathlib.Path, int] | None:
    """The newest ``epoch_NNNN`` checkpoint under a Ray Train run directory whose files all verify (sizes
    and SHA-256 against every rank's file list) and its epoch; None when there is none. Incomplete ones
    (a driver or worker stopped while Ray was storing it) are skipped with a warning."""
    from gears_dist.train import checkpoint as ckpt

    found = [(e, p) for p in pathlib.Path(experiment_dir).glob("epoch_*")
             if p.is_dir() and (e := _epoch_of(p.name)) is not None]
    for epoch, path in sorted(found, reverse=True):
        try:
            meta = ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError as exc:
            warnings.warn(f"--resume: skipping checkpoint {path.name} ({exc})", stacklevel=2)
            continue
        return path, int(meta.get("epoch", epoch))
    return None


def _set_aside_damaged_ray_snapshot(experiment_dir: pathlib.Path) -> None:
    """Ray writes checkpoint_manager_snapshot.json in place: a driver killed mid-write leaves it truncated,
    and Ray's controller would then refuse the run. The checkpoints on disk are what --resume uses, so a
    damaged snapshot is moved aside (Ray starts its bookkeeping afresh) with a warning."""
    path = experiment_dir / "checkpoint_manager_snapshot.json"
    if not path.is_file():
        return
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        warnings.warn(f"--resume: Ray's {path.name} is damaged (the driver stopped while writing it); moved to "
                      f"{aside.name}, resuming from the checkpoints on disk", stacklevel=3)


def _starting_checkpoint(config: dict, rank: int) -> tuple[str | None, str | None]:
    """(checkpoint directory to resume from, temporary copy to delete afterwards). The newer of Ray's
    (``get_checkpoint()``: what Ray recorded, or what this run reported before Ray restarted the
    workers) and the newest verified one found on disk when ``--resume`` started."""
    import ray.train

    restored = ray.train.get_checkpoint()
    on_disk, disk_epoch = config.get("resume_dir"), config.get("resume_epoch")
    if on_disk is not None and not os.path.isdir(on_disk):
        # a multi-node run whose storage this node does not see: Ray's own checkpoint is all there is
        print(f"gears-dist train: rank {rank} cannot see {on_disk}; resuming from Ray's checkpoint", flush=True)
        on_disk = None
    if restored is not None:
        ray_epoch = _epoch_of(restored.path)
        if on_disk is None or ray_epoch is None or ray_epoch > disk_epoch:
            copy = tempfile.mkdtemp(prefix=f"gears-resume-r{rank}-")
            restored.to_directory(copy)
            return copy, copy
    return on_disk, None


def _train_loop_per_worker(config: dict) -> None:
    import ray.train

    from gears_dist.train.loop import run_worker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = run_config_from_dict(config["cfg"])
    resume_dir, copy = _starting_checkpoint(config, rank)
    fail_at = config.get("fail_at_epoch") if rank == world - 1 else None
    try:
        summary = run_worker(cfg, config["store"], config["run_dir"], rank, world, reporter=RayReporter(),
                             keys=config["keys"], resume_from=resume_dir, fail_at_epoch=fail_at)
    finally:
        if copy:
            shutil.rmtree(copy, ignore_errors=True)
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
    start = None
    if resume:
        _set_aside_damaged_ray_snapshot(storage / cfg.name)
        start = newest_verified_checkpoint(storage / cfg.name)
    if start is not None:
        print(f"gears-dist train: --resume: newest complete checkpoint {start[0]} (epoch {start[1]})", flush=True)
    ensure_ray(address, cfg)

    s = cfg.scaling
    per_worker: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        per_worker["GPU"] = s.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "store": str(pathlib.Path(store_path).resolve()),
                           "run_dir": str(run_dir), "keys": keys, "fail_at_epoch": fail_at_epoch,
                           "resume_dir": str(start[0]) if start else None, "resume_epoch": start[1] if start else None},
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
