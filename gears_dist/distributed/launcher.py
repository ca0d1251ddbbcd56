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
- What the terminal shows: rank 0 appends what gears_dist prints and warns to ``<run_dir>/train.log``.
  A local Ray started here runs with ``log_to_driver=False`` and the driver prints train.log's new lines
  as they come, so each progress line appears once and none of Ray's own output (controller and
  placement-group messages, ``TrainingReport`` dumps, library FutureWarnings) reaches the terminal; Ray's
  logs of that session are copied to ``<run_dir>/logs/ray/`` when the run ends. ``GEARS_DIST_VERBOSE=1``
  (``gears-dist --verbose``) forwards every worker's output instead, as Ray does by default. Joining a
  cluster keeps Ray's forwarding (the cluster's logs are Ray's: ``ray job logs``).
  Progress within an epoch (``gears_dist.progress``): with the driver relaying train.log, rank 0 writes its
  state to ``<run_dir>/progress.json`` (about once a second) and the driver shows it: a bar with ETA on a
  terminal or in Jupyter, a plain line a minute in a log, nothing for a short epoch. Without the relay, rank 0
  prints the plain lines itself (a worker has no terminal), into train.log and Ray's forwarding.
  Ray Train's print patch is off (``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` unless set): in Ray 2.60 it sends each
  ``print`` of a worker both to stdout and, through a logging handler, to stderr, so every line came twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import threading
import warnings
from typing import Any

from gears_dist import progress
from gears_dist.config import to_dict
from gears_dist.train.config import RunConfig, run_config_from_dict

# Ray Train's settings for the local Ray this process starts (defaults: the user's environment wins). Ray Train's
# controller polls its workers every 2 s and watches for node drains: on one machine that is ~5 s of idle waiting
# per run (the end of a run is noticed late, and the watcher is waited for at teardown), and a single-node Ray is
# never drained.
_LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Variables the workers need that a Ray cluster would not otherwise pass on.
_WORKER_ENV = ("DS_ACCELERATOR", "DS_BUILD_OPS", "MLFLOW_TRACKING_URI", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
               "OMP_NUM_THREADS", "GEARS_DIST_PROGRESS")


# Ray on Linux turns _node_ip_address="127.0.0.1" into the routable address (services.resolve_ip_for_localhost)
# unless it believes clusters are off, as it does by default on macOS / Windows; with the node's IP left at
# 127.0.0.1, gcs_server, raylet (node manager, object manager), the agents and the workers bind loopback.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")

VERBOSE_ENV = "GEARS_DIST_VERBOSE"
TRAIN_LOG = "train.log"  # in the run directory: what rank 0 printed and warned (gears_dist's lines only)
_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1])

# The local Ray this process started: its node and job (to recognise it later), its logs directory and whether
# the workers' output is forwarded to this driver.
_local_ray: dict[str, Any] = {}


def verbose() -> bool:
    """True when $GEARS_DIST_VERBOSE is set (not '' or '0'): Ray's own output goes to the terminal too."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _ours() -> dict[str, Any] | None:
    """What ensure_ray recorded, if the Ray this process is connected to is the local one it started."""
    import ray

    if not _local_ray or not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    return _local_ray if (ctx.get_node_id(), ctx.get_job_id()) == _local_ray["id"] else None


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


def ensure_ray(address: str | None, cfg: RunConfig, *, log_to_driver: bool = True) -> bool:
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray. Returns True if this call started it.

    The local Ray is private to this process and listens on 127.0.0.1 only; another process attaching to it
    (``ray status``, a test) needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` as well, or Ray rewrites the
    127.0.0.1 of the address it is given to the routable IP, where nothing listens.
    log_to_driver: for a local Ray, whether every worker's stdout / stderr is printed here (Ray's default); a
    cluster's always is."""
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
        env.update({k: os.environ.get(k, v) for k, v in _LOCAL_TRAIN_ENV.items()})
        # address="local": a new local instance, never a cluster some other process started on this machine
        with _ray_on_loopback():
            info = ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
                            include_dashboard=False, _node_ip_address="127.0.0.1",
                            object_store_memory=cfg.scaling.object_store_mb << 20, runtime_env=runtime_env,
                            configure_logging=False, log_to_driver=log_to_driver)
        ctx = ray.get_runtime_context()
        session = (getattr(info, "address_info", None) or {}).get("session_dir")
        _local_ray.clear()
        _local_ray.update(id=(ctx.get_node_id(), ctx.get_job_id()), log_to_driver=log_to_driver,
                          logs=pathlib.Path(session) / "logs" if session else None)
        node_ip = ray.util.get_node_ip_address()
        if node_ip not in _LOOPBACK:
            warnings.warn(f"the local Ray took node address {node_ip} instead of 127.0.0.1: its services listen "
                          f"beyond this machine, guarded by Ray's token authentication (RAY_AUTH_MODE=token)",
                          stacklevel=2)
    return True


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this machine's CPU computes bf16 natively (x86: avx512_bf16 or amx_bf16; Arm: bf16); None when
    /proc/cpuinfo cannot tell (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def warn_if_bf16_emulated(cfg: RunConfig, cpuinfo: str | None = None) -> bool:
    """deepspeed.precision bf16 training on a CPU without native bf16: warn and suggest fp32 (bf16 matmuls are
    emulated there: ~12x slower than fp32, BENCHMARKS.md). Returns True if it warned."""
    if cfg.deepspeed.precision != "bf16" or cfg.scaling.use_gpu or cfg.train.device == "cuda":
        return False
    if cfg.train.device == "auto":
        import torch

        if torch.cuda.is_available():
            return False
    if cpu_has_native_bf16(cpuinfo) is not False:
        return False
    warnings.warn("deepspeed.precision is bf16 but this CPU has no native bf16 (no avx512_bf16 / amx_bf16 in "
                  "/proc/cpuinfo): bf16 matmuls are emulated, several times slower than fp32; use "
                  "deepspeed.precision: fp32 on this machine", stacklevel=2)
    return True


class _RunLog:
    """Rank 0's sys.stdout while it trains: every write goes on to the process's stdout (Ray's worker log);
    what gears_dist code prints is also appended to the run's train.log. print() is C code, so the frame
    above write() is print's caller (Ray Train's print patch, when on, adds frames of its own: skipped).
    Anything else (fileno, encoding, isatty, ...) is the stream's."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        self._stream.write(text)
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("ray.train."):
            frame = frame.f_back
        if frame is not None and frame.f_globals.get("__name__", "").startswith("gears_dist"):
            self._log.write(text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()


@contextlib.contextmanager
def _rank0_log(run_dir: str | os.PathLike, record_progress: bool = False):
    """Rank 0 while it trains: gears_dist's prints, and one line per warning raised in gears_dist code (not
    FutureWarning / DeprecationWarning), are appended to <run_dir>/train.log as well. record_progress (the
    driver relays train.log): progress goes to <run_dir>/progress.json for the driver to show."""
    path = pathlib.Path(run_dir) / TRAIN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1, encoding="utf-8") as log:
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            shown(message, category, filename, lineno, file, line)
            if str(filename).startswith(_PACKAGE_DIR) and not issubclass(category, (FutureWarning,
                                                                                  DeprecationWarning)):
                log.write(f"gears-dist train: warning: {message}\n")

        stdout, sys.stdout, warnings.showwarning = sys.stdout, _RunLog(sys.stdout, log), showwarning
        try:
            with progress.record_to(path.with_name(progress.PROGRESS_FILE)) if record_progress else \
                    contextlib.nullcontext():
                yield
        finally:
            sys.stdout, warnings.showwarning = stdout, shown


class _Relay:
    """The driver, while a run trains on a local Ray that does not forward the workers' output: prints the
    lines rank 0 appends to <run_dir>/train.log (from where the file ended when the run started), and shows
    the progress rank 0 records in <run_dir>/progress.json (a bar on a terminal; never printed as text)."""

    def __init__(self, path: pathlib.Path, interval_s: float = 0.5, **progress_kwargs):
        self.path, self.interval_s = path, interval_s
        self.offset = path.stat().st_size if path.is_file() else 0
        self._partial = b""
        self.progress_path = path.with_name(progress.PROGRESS_FILE)
        self.progress_path.unlink(missing_ok=True)  # an earlier run's
        self.follower = progress.Follower(self.progress_path, **progress_kwargs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gears-dist-train-log", daemon=True)

    def _drain(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if final and self._partial:
            lines, self._partial = lines + [self._partial], b""
        for line in lines:
            progress.write(line.decode("utf-8", errors="replace"))

    def _poll(self) -> None:
        self.follower.poll()  # first: a bar that ended is gone before the lines that follow it
        self._drain()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def __enter__(self) -> _Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.follower.poll()
        self.follower.close()
        self._drain(final=True)
        self.progress_path.unlink(missing_ok=True)


def _keep_ray_logs(ours: dict[str, Any] | None, run_dir: pathlib.Path) -> None:
    """Copy the local Ray session's logs (every worker's stdout / stderr, Ray Train's controller and worker
    logs, raylet, GCS) to <run_dir>/logs/ray/: Ray's session directory is temporary."""
    src = (ours or {}).get("logs")
    if src is None or not src.is_dir():
        return
    try:
        shutil.copytree(src, run_dir / "logs" / "ray", dirs_exist_ok=True, ignore_dangling_symlinks=True)
    except (OSError, shutil.Error) as exc:
        warnings.warn(f"could not copy Ray's logs from {src} to {run_dir / 'logs' / 'ray'}: {exc}", stacklevel=3)


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

    import ray

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # which Ray node ran this rank: the run's own record of the placement (RUN/workers/rank<r>.json)
    node = {"ray_node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    if not config.get("verbose"):
        # e.g. torch's all_gather_into_tensor deprecation, from DeepSpeed, on every step: not the user's to act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!gears_dist\.)")
    cfg = run_config_from_dict(config["cfg"])
    rank0_log = _rank0_log(config["run_dir"], record_progress=config.get("relayed", False)) if rank == 0 else \
        contextlib.nullcontext()
    with rank0_log:
        if rank == 0:
            warn_if_bf16_emulated(cfg)
        resume_dir, copy = _starting_checkpoint(config, rank)
        fail_at = config.get("fail_at_epoch") if rank == world - 1 else None
        try:
            summary = run_worker(cfg, config["store"], config["run_dir"], rank, world, reporter=RayReporter(),
                                 keys=config["keys"], resume_from=resume_dir, fail_at_epoch=fail_at,
                                 worker_info=node)
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
    # Ray Train's print patch would send each line a worker prints to the terminal twice (module docstring)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ensure_ray(address, cfg, log_to_driver=verbose())
    ours = _ours()
    relayed = ours is not None and not ours["log_to_driver"]  # the driver shows train.log and progress.json

    s = cfg.scaling
    per_worker: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        per_worker["GPU"] = s.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "store": str(pathlib.Path(store_path).resolve()),
                           "run_dir": str(run_dir), "keys": keys, "fail_at_epoch": fail_at_epoch,
                           "resume_dir": str(start[0]) if start else None, "resume_epoch": start[1] if start else None,
                           "verbose": verbose(), "relayed": relayed},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=world, use_gpu=s.use_gpu, resources_per_worker=per_worker,
                                               placement_strategy=s.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=s.num_checkpoints_to_keep),
            callbacks=list(callbacks or [])),
    )
    relay = _Relay(run_dir / TRAIN_LOG) if relayed else None
    try:
        with relay or contextlib.nullcontext():
            result = trainer.fit()
    except BaseException:
        if relay is not None and ours.get("logs") is not None:
            print(f"gears-dist train: Ray's logs of this run: {run_dir / 'logs' / 'ray'}", file=sys.stderr)
        raise
    finally:
        _keep_ray_logs(ours, run_dir)
    if result.error is not None:
        raise result.error
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.setdefault("final_metrics", dict(result.metrics or {}))
    if result.checkpoint is not None:
        summary["checkpoint"] = result.checkpoint.path
    return summary


def cli_train(cfg: RunConfig, store: str, out: str | None = None, address: str | None = None,
              resume: bool = False) -> int:
    """``gears-dist train STORE --config C [--set F=V] [--out DIR] [--address A] [--resume]``."""
    out = pathlib.Path(out or pathlib.Path("runs") / cfg.name)
    summary = train_with_ray(cfg, store, out, address=address, resume=resume)
    # rank 0 printed the summary (format_summary): shown here through train.log, or Ray's log forwarding
    print(f"gears-dist train: run directory {out} (model in {out / 'model'}, summary.json, MLflow "
          f"run {summary.get('mlflow_run_id')})")
    return 0
