"""The per-worker training loop: store shard -> streaming loader -> DeepSpeed engine -> validation.

Runnable on its own (one process, no Ray: ``python -m gears_dist.train``) and launched unchanged by
Ray Train on every worker (``gears_dist.distributed.launcher``): Ray owns the processes and the
process group, this module owns the training. Every worker:

1. opens the store, loads the split, the graphs and (graph sharding) the partition prepared by the
   driver (``prepare_run``), plans its shard and builds its ``ShardLoader``;
2. builds GEARSModel (same seed everywhere; DeepSpeed broadcasts rank 0's weights), restricted to
   the k-hop GO halo of its own perturbations when sharding by graph, and ``deepspeed.initialize``;
3. per epoch: trains ``steps_per_epoch`` steps (equal on all workers), validates with per-perturbation
   prediction (val conditions dealt round-robin to workers, sums all-reduced), keeps the best model
   by val mse_de, and checkpoints (engine + loader + config + vocabularies) through a `reporter`;
4. at the end: restores the best weights, evaluates val and test (per category) and writes the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import pathlib
import resource
import socket
import time
import warnings
from typing import Any

import numpy as np
import torch

from gears_dist.config import to_dict
from gears_dist.data.loader import ShardLoader, plan_shard
from gears_dist.data.store import Store, atomic_write_text, open_store
from gears_dist.progress import progress
from gears_dist.train import checkpoint as ckpt
from gears_dist.train.config import RunConfig, deepspeed_config
from gears_dist.train.tracking import Tracker, describe_run

log = logging.getLogger("gears_dist.train")

MODEL_FILE = "model.pt"
MODEL_META = "model.json"
BEST_FILE = "best_model.pt"


# ------------------------------------------------------------------------------------------------
# driver-side preparation (once per run, before workers start)


def resolve_split_key(cfg: RunConfig) -> str:
    if cfg.data.split:
        return cfg.data.split
    from gears_dist.data.splits import split_key

    return split_key(cfg.data.split_kind, cfg.data.split_seed)


def prepare_run(cfg: RunConfig, store_path: str | os.PathLike, world_size: int) -> dict:
    """Make sure the split, graphs and partition the workers need exist in the store (built once,
    here, so workers only read). Returns their keys."""
    from gears_dist.graphs.build import ensure_graphs, ensure_partition

    store = open_store(store_path, mode="r+")
    key = resolve_split_key(cfg)
    if not store.has_component("splits", key):
        if cfg.data.split:
            raise ValueError(f"data.split: the store has no split {key!r} (has {sorted(store.components('splits'))});"
                             f" create it with 'gears-dist split {store_path}' or set data.split to null")
        from gears_dist.data.splits import make_and_save_split

        key = make_and_save_split(store_path, kind=cfg.data.split_kind, seed=cfg.data.split_seed)
        store = open_store(store_path, mode="r+")
    bundle = ensure_graphs(store, cfg.graphs, key)
    keys = {"split": key, "go": bundle.keys["go"], "coexpr": bundle.keys["coexpr"], "partition": None}
    if cfg.sharding.mode == "graph" and world_size > 1:
        _, keys["partition"] = ensure_partition(store, bundle.go, bundle.keys["go"], world_size,
                                                method=cfg.sharding.partition, seed=cfg.sharding.partition_seed,
                                                split_key=key)
    return keys


# ------------------------------------------------------------------------------------------------
# distributed helpers


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_process_group_single(backend: str = "gloo") -> None:
    """A one-process group so that DeepSpeed runs without a launcher."""
    if _dist():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    chosen = "MASTER_PORT" not in os.environ
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    for attempt in range(5):
        if chosen:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
            return
        except RuntimeError as exc:
            # A free port found here can be taken by another process before the rendezvous binds it (several
            # single-process runs starting at once, e.g. multisplit's tasks): pick another one.
            if not chosen or attempt == 4 or "address already in use" not in str(exc).lower():
                raise


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def _device(cfg: RunConfig) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------
# setup


@dataclasses.dataclass
class Worker:
    """Everything one worker holds during a run."""

    cfg: RunConfig
    store: Store
    rank: int
    world_size: int
    device: torch.device
    keys: dict
    engine: Any
    loader: ShardLoader
    ctrl_mean: torch.Tensor        # [G] on device
    condition_names: list[str]
    nodes: list[str]               # GO graph nodes (perturbation vocabulary)
    pert_index: np.ndarray         # (C, K)
    split: Any
    val_conditions: np.ndarray
    go_nodes_used: int
    steps_per_opt_epoch: int
    shard_conditions: np.ndarray | None = None  # training conditions this worker owns (graph sharding)


class LrFactor:
    """lr multiplier per optimizer step: StepLR(gamma) per `step_epochs` epochs, cosine, or constant.

    Holds plain data only, so LambdaLR's state dict (saved in checkpoints) stays safely loadable."""

    def __init__(self, schedule: str, opt_steps_per_epoch: int, epochs: int, gamma: float = 0.5,
                 step_epochs: int = 1, min_ratio: float = 0.0):
        self.schedule, self.per_epoch, self.epochs = schedule, max(1, int(opt_steps_per_epoch)), int(epochs)
        self.gamma, self.step_epochs, self.min_ratio = float(gamma), int(step_epochs), float(min_ratio)

    def __call__(self, step: int) -> float:
        if self.schedule == "step":
            return self.gamma ** ((step // self.per_epoch) // self.step_epochs)
        if self.schedule == "cosine":
            total = self.per_epoch * self.epochs
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return 1.0


def condition_indices(names: list[str], wanted: list[str], what: str) -> np.ndarray:
    where = {n: i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in where]
    if missing:
        raise ValueError(f"split {what} names {len(missing)} condition(s) not in the store, e.g. {missing[:5]}; "
                         f"the split belongs to another store: re-create it with 'gears-dist split'")
    return np.asarray([where[n] for n in wanted], dtype=np.int64)


def setup_worker(cfg: RunConfig, store_path: str | os.PathLike, rank: int, world_size: int,
                 keys: dict | None = None) -> Worker:
    """Open data, build the model and the DeepSpeed engine for one worker."""
    import deepspeed

    from gears_dist.data.splits import load_split
    from gears_dist.graphs.build import load_graph, load_partition
    from gears_dist.graphs.graph import perturbation_index
    from gears_dist.model.build import build_model

    device = _device(cfg)
    if device.type == "cpu":
        # A worker computes with the CPUs reserved for it, whether Ray runs it or not: torch otherwise sizes its
        # thread pool when first imported (every core, or Ray's OMP_NUM_THREADS if Ray set it first), and the
        # thread count changes reduction order, so the same command would not give the same numbers twice, nor
        # the API's in-process run the CLI's.
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    if world_size > 1 and not cfg.model.sync_batchnorm:
        warnings.warn("model.sync_batchnorm is off with several workers: each worker's BatchNorm statistics then "
                      "come from its own shard (graph parts differ), and only rank 0's running statistics are "
                      "checkpointed; set model.sync_batchnorm: true", stacklevel=2)
    if not _dist():
        if world_size != 1:
            raise ValueError(f"world_size {world_size} needs an initialized process group (launch with Ray)")
        init_process_group_single("nccl" if device.type == "cuda" else "gloo")
    if keys is None:
        keys = prepare_run(cfg, store_path, world_size)
    store = open_store(store_path)
    split = load_split(store, keys["split"])
    names = store.condition_names
    train_idx = condition_indices(names, split.train, "train")
    val_idx = condition_indices(names, split.val, "val")
    # prepare_run (the driver) built them: a worker only reads.
    go, coexpr = load_graph(store, keys["go"]), load_graph(store, keys["coexpr"])
    pert_index = perturbation_index(go.nodes, store.condition_genes())

    part_of = None
    if cfg.sharding.mode == "graph" and world_size > 1:
        part_of = load_partition(store, keys["partition"]).part_of_condition
    plan = plan_shard(store, train_idx, rank, world_size, sharding=cfg.sharding.mode, part_of_condition=part_of,
                      include_controls=cfg.data.loader.include_controls, seed=cfg.seed)
    shard = train_idx if part_of is None else train_idx[part_of[train_idx] == rank]
    loader = ShardLoader(store, plan, pert_index, cfg.data.loader, seed=cfg.seed, device=device)

    fit = None
    if cfg.model.prior == "go":
        # Fitted on the training conditions' means alone, deterministically: every worker gets the same prior.
        from gears_dist.model.prior import fit_from_store

        fit = fit_from_store(store, split.train, go, cfg.model.prior_max_exact_mb, cfg.model.prior_rank)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, store.num_genes, go, coexpr, prior_fit=fit)
    if fit is not None and rank == 0:
        print(f"gears-dist train: {fit.summary()}", flush=True)
    go_nodes_used = go.num_nodes
    if cfg.sharding.mode == "graph" and cfg.sharding.halo and world_size > 1:
        # the nodes this worker's training cells and its share of validation conditions perturb
        own_val = val_idx[rank::world_size]
        wanted = np.concatenate([pert_index[shard].ravel(), pert_index[own_val].ravel()])
        wanted = np.unique(wanted[wanted >= 0])
        go_nodes_used = int(model.restrict_go(torch.from_numpy(wanted)).numel())

    # The schedule counts the steps an epoch really takes (a max_steps_per_epoch cap shortens it), so that a
    # cosine schedule ends at the last step and a step schedule decays per trained epoch.
    steps_per_epoch = loader.steps_per_epoch
    if cfg.train.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    opt_steps = max(1, steps_per_epoch // cfg.deepspeed.grad_accum_steps)
    optim_cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    optimizer = optim_cls(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    o = cfg.optim
    factor = LrFactor(o.schedule, opt_steps, cfg.train.epochs, o.step_gamma, o.step_epochs, o.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world_size))
    ctrl_mean = torch.from_numpy(np.asarray(store.root["stats/control_mean"][...], np.float32)).to(device)
    return Worker(cfg, store, rank, world_size, device, keys, engine, loader, ctrl_mean, names, list(go.nodes),
                  pert_index, split, val_idx, go_nodes_used, opt_steps, shard)


# ------------------------------------------------------------------------------------------------
# train / evaluate


def _autocast(w: Worker):
    """bf16: autocast the forward pass (matmuls in bf16, fp32 master weights); fp32: nothing."""
    enabled = w.cfg.deepspeed.precision == "bf16"
    return torch.autocast(device_type=w.device.type, dtype=torch.bfloat16, enabled=enabled)


def train_epoch(w: Worker, epoch: int, start_step: int = 0) -> dict[str, float]:
    """Train the epoch's remaining steps; returns mean loss (over workers), cells/s and step time."""
    from gears_dist.model import gears_loss

    w.engine.train()
    torch.manual_seed(hash((w.cfg.seed, epoch, w.rank)) % (1 << 31))
    max_steps = w.cfg.train.max_steps_per_epoch
    loss_sum = torch.zeros((), dtype=torch.float64, device=w.device)
    steps = cells = 0
    t0 = time.perf_counter()
    total = w.loader.steps_per_epoch if max_steps is None else min(w.loader.steps_per_epoch, max_steps)
    # rank 0's bar (gears_dist.progress): cells/s is rank 0's rate times the workers, the loss rank 0's last
    bar = progress(max(total - start_step, 0), f"epoch {epoch}", "step", enabled=w.rank == 0)
    with bar:
        for batch in w.loader.epoch_batches(epoch, start_step):
            with _autocast(w):
                pred, logvar = w.engine(batch.x, batch.perts, batch.inverse)
            loss = gears_loss(pred.float(), batch.y, batch.inverse, batch.gene_mask, w.ctrl_mean, w.cfg.loss,
                              logvar=None if logvar is None else logvar.float())
            w.engine.backward(loss)
            w.engine.step()
            loss_sum += loss.detach().to(torch.float64)
            steps += 1
            cells += batch.num_cells
            bar.update(1, lambda loss=loss, cells=cells: {  # called only when shown (float() syncs a GPU)
                "loss": float(loss.detach()), "cells/s": cells * w.world_size / max(time.perf_counter() - t0, 1e-9)})
            if w.rank == 0 and steps % w.cfg.train.log_every == 0 and not bar.draws:
                log.info("epoch %d step %d/%d loss %.5f", epoch, start_step + steps, w.loader.steps_per_epoch,
                         float(loss.detach()))
            if max_steps is not None and start_step + steps >= max_steps:
                break
    elapsed = time.perf_counter() - t0
    totals = all_reduce_sum(torch.tensor([float(loss_sum), steps, cells, elapsed], dtype=torch.float64))
    n_workers = w.world_size
    return {"train_loss": float(totals[0] / max(totals[1], 1)),
            "cells_per_s": float(totals[2] / max(totals[3] / n_workers, 1e-9)),
            "step_time_ms": float(1000 * totals[3] / max(totals[1], 1)),
            "train_steps": float(totals[1] / n_workers)}


@torch.no_grad()
def recalibrate_batchnorm(w: Worker, epoch: int) -> int:
    """Replace every BatchNorm's running statistics by the average over the first
    ``train.bn_recalibration_batches`` training batches of `epoch` (forward passes in train mode, no gradient,
    weights untouched): batch k is given momentum 1 / (k + 1), so after K batches the running mean and variance
    are the plain means of the K batches' statistics. Every worker runs the same number of batches (collectives
    of synchronized BatchNorm line up). The loader's position is restored. Returns the number of batches."""
    from gears_dist.model.layers import WeightedBatchNorm1d

    num = w.cfg.train.bn_recalibration_batches
    if num <= 0:
        return 0
    norms = [m for m in w.engine.module.modules() if isinstance(m, WeightedBatchNorm1d)]
    momenta = [m.momentum for m in norms]
    position = (w.loader.epoch, w.loader.step)
    used = 0
    w.engine.train()
    try:
        # closing(): the prefetch thread stops when we stop reading, not at garbage collection
        with contextlib.closing(w.loader.epoch_batches(epoch, 0)) as batches:
            for used, batch in enumerate(itertools.islice(batches, num), start=1):
                for m in norms:
                    m.momentum = 1.0 / used
                with _autocast(w):
                    w.engine(batch.x, batch.perts, batch.inverse)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        w.loader.epoch, w.loader.step = position
    return used


def _metric_sums(pred: torch.Tensor, truth: torch.Tensor, ctrl: torch.Tensor, top_de: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """Per-condition mse, mse_de (top-DE genes) and pearson_delta, summed with `weight` (0 = padding)."""
    err = (pred - truth) ** 2
    mse = err.mean(dim=1)
    de = torch.gather(err, 1, top_de.clamp(min=0))
    de_valid = (top_de >= 0).to(err.dtype)
    mse_de = (de * de_valid).sum(1) / de_valid.sum(1).clamp(min=1)
    dp = pred - ctrl
    dt = truth - ctrl
    dp = dp - dp.mean(1, keepdim=True)
    dt = dt - dt.mean(1, keepdim=True)
    pearson = (dp * dt).sum(1) / (dp.norm(dim=1) * dt.norm(dim=1)).clamp(min=1e-12)
    return torch.stack([(mse * weight).sum(), (mse_de * weight).sum(), (pearson * weight).sum(), weight.sum()])


def _gathered(w: Worker):
    """predict_delta is not a module forward, so ZeRO-3's gather hooks do not fire: gather explicitly
    (the model is small; every rank calls this the same number of times)."""
    if w.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(w.engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(w: Worker, conditions: np.ndarray, prefix: str = "val") -> dict[str, float]:
    """Per-perturbation prediction (control mean + predicted delta) vs the store's condition means.

    Conditions are dealt round-robin to workers; every worker makes the same number of forward calls
    (padding with weight 0) so that collective operations inside the model line up."""
    conditions = np.asarray(conditions, dtype=np.int64)
    if conditions.size == 0:
        return {}
    w.engine.eval()
    mine = conditions[w.rank::w.world_size]
    per_call = w.cfg.train.eval_batch_conditions
    num_calls = math.ceil(math.ceil(conditions.size / w.world_size) / per_call)
    mean = w.store.root["stats/mean"]
    top_de = w.store.root["stats/top_de"]
    sums = torch.zeros(4, dtype=torch.float64, device=w.device)
    model = w.engine.module
    for i in range(num_calls):
        chunk = mine[i * per_call:(i + 1) * per_call]
        weight = torch.ones(chunk.size, dtype=torch.float64, device=w.device)
        if chunk.size == 0:  # padding call: predict something, count nothing
            chunk = conditions[:1]
            weight = torch.zeros(1, dtype=torch.float64, device=w.device)
        rows = np.sort(chunk)
        perts = torch.from_numpy(w.pert_index[rows]).to(w.device)
        with _gathered(w), _autocast(w):
            delta = model.predict_delta(perts).double()
        truth = torch.from_numpy(np.asarray(mean.oindex[rows], np.float64)).to(w.device)
        top = torch.from_numpy(np.asarray(top_de.oindex[rows], np.int64)).to(w.device)
        ctrl = w.ctrl_mean.double()
        # Clipped at 0 as every prediction is (TrainedPredictor.predict_mean): expression is never negative.
        sums += _metric_sums((ctrl + delta).clamp_min(0.0), truth, ctrl, top, weight)
    sums = all_reduce_sum(sums)
    n = max(float(sums[3]), 1.0)
    return {f"{prefix}_mse": float(sums[0]) / n, f"{prefix}_mse_de": float(sums[1]) / n,
            f"{prefix}_pearson_delta": float(sums[2]) / n, f"{prefix}_num_conditions": float(sums[3])}


# ------------------------------------------------------------------------------------------------
# model state


def full_state_dict(w: Worker) -> dict[str, torch.Tensor]:
    """A CPU copy of the whole model's parameters and buffers (gathered under ZeRO-3)."""
    module = w.engine.module
    if w.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() if not v.is_floating_point() else v.detach().float().cpu().clone()
            for k, v in module.state_dict().items()}


def load_full_state_dict(w: Worker, state: dict[str, torch.Tensor]) -> None:
    module = w.engine.module

    def _load():
        own = module.state_dict()
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})

    if w.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            _load()
    else:
        _load()


def save_model(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict) -> None:
    """model.pt (tensors only) + model.json (config, vocabularies, metrics), each written atomically."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{MODEL_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / MODEL_FILE)
    atomic_write_text(path / MODEL_META, json.dumps(meta, indent=1, sort_keys=True, default=str))


def load_model_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Safe load of a saved model directory: (state dict, metadata)."""
    path = pathlib.Path(path)
    if not (path / MODEL_FILE).is_file() or not (path / MODEL_META).is_file():
        raise ckpt.CheckpointError(f"{str(path)!r} holds no saved model ({MODEL_FILE} + {MODEL_META}); point at a "
                                   f"run directory's model/ folder")
    state = ckpt.safe_torch_load(path / MODEL_FILE, map_location="cpu")
    meta = json.loads((path / MODEL_META).read_text())
    return state, meta


# ------------------------------------------------------------------------------------------------
# the run


def _vocab_meta(w: Worker) -> dict:
    return {"genes": w.store.genes, "conditions": w.condition_names, "go_nodes": w.nodes,
            "split": w.keys["split"], "graph_keys": w.keys, "store": str(w.store.path.resolve())}


class LocalReporter:
    """Standalone (no Ray) checkpointing into ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = pathlib.Path(run_dir) / "checkpoints"

    def latest(self) -> pathlib.Path | None:
        return ckpt.latest_checkpoint(self.root)

    def report(self, w: Worker, metrics: dict, meta: dict | None, loader_state: dict, epoch: int,
               tensors: dict[str, dict]) -> None:
        ckpt.save_checkpoint(w.engine, self.root, f"epoch_{epoch:04d}", rank=w.rank, meta=meta,
                             loader_state=loader_state, tensors=tensors)


def run_worker(cfg: RunConfig, store_path: str | os.PathLike, run_dir: str | os.PathLike, rank: int = 0,
               world_size: int = 1, *, reporter: Any = None, keys: dict | None = None,
               resume_from: str | os.PathLike | None = None, fail_at_epoch: int | None = None,
               worker_info: dict | None = None) -> dict:
    """Train one worker's share of the run; returns the final summary (the same on every rank).

    reporter: where checkpoints go (default: ``LocalReporter(run_dir)``, which also resumes from
    ``run_dir/checkpoints/latest``). resume_from: a checkpoint directory to start from.
    fail_at_epoch: test hook; raises once, after that epoch's checkpoint, if no checkpoint was resumed.
    """
    run_dir = pathlib.Path(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    reporter = reporter or LocalReporter(run_dir)
    if resume_from is None and hasattr(reporter, "latest"):
        resume_from = reporter.latest()
    w = setup_worker(cfg, store_path, rank, world_size, keys)
    cfg_dict = to_dict(cfg)

    start_epoch, start_step, history, best, run_id = 0, 0, [], None, None
    best_state: dict | None = None
    if resume_from is not None:
        meta, loader_state = ckpt.load_checkpoint(w.engine, resume_from, rank=rank, world_size=world_size)
        w.loader.load_state_dict(loader_state)
        start_epoch, start_step = w.loader.epoch, w.loader.step
        history, best, run_id = meta.get("history", []), meta.get("best"), meta.get("mlflow_run_id")
        best_path = pathlib.Path(resume_from) / BEST_FILE
        if best_path.is_file():
            best_state = ckpt.safe_torch_load(best_path, map_location="cpu")
        if rank == 0:
            print(f"gears-dist train: resumed from {resume_from} at epoch {start_epoch} step {start_step}", flush=True)

    tracker = None
    if rank == 0:
        tracker = Tracker(cfg.tracking.enabled, cfg.tracking.uri, run_dir, cfg.tracking.experiment,
                          run_name=cfg.tracking.run_name or cfg.name, run_id=run_id)
        if tracker.active and run_id is None:
            tracker.start_training(cfg_dict, **_run_facts(w))
        run_id = tracker.run_id
        if run_id:
            print(f"gears-dist train: MLflow run {run_id} at {tracker.uri}", flush=True)
    run_id_box = [run_id]

    if cfg.model.prior == "go" and resume_from is None:
        # The prior alone (the network's output layer starts at zero) is the first candidate for the best model:
        # training keeps the network's residual only where it helps on validation.
        val = evaluate(w, w.val_conditions, "val")
        if val:
            best = {"score": val["val_mse_de"], "epoch": -1}
            best_state = full_state_dict(w)
            if rank == 0:
                print("prior only (before training): " + " ".join(
                    f"{k} {v:.4g}" for k, v in val.items() if k in ("val_mse", "val_mse_de", "val_pearson_delta")),
                      flush=True)

    for epoch in range(start_epoch, cfg.train.epochs):
        t_epoch = time.perf_counter()
        stats = train_epoch(w, epoch, start_step if epoch == start_epoch else 0)
        recalibrate_batchnorm(w, epoch)
        val = evaluate(w, w.val_conditions, "val")
        metrics = {"epoch": epoch, **stats, **val, "lr": float(w.engine.get_lr()[0]),
                   "epoch_time_s": time.perf_counter() - t_epoch, "peak_rss_mb": _peak_rss_mb(),
                   "go_nodes_used": float(w.go_nodes_used), "bytes_read_mb": w.loader.bytes_read / 2**20}
        score = val.get("val_mse_de", stats["train_loss"])
        improved = best is None or score < best["score"]
        state = full_state_dict(w) if improved else None
        if improved:
            best = {"score": score, "epoch": epoch}
            best_state = state
        history.append({k: float(v) for k, v in metrics.items()})
        if rank == 0:
            print(f"epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                 if k in ("train_loss", "val_mse", "val_mse_de",
                                                          "val_pearson_delta", "cells_per_s")), flush=True)
            if tracker is not None:
                tracker.log_epoch(metrics, epoch)
        w.loader.epoch, w.loader.step = epoch + 1, 0
        meta = None
        if rank == 0:
            meta = {"epoch": epoch, "world_size": world_size, "config": cfg_dict, "history": history, "best": best,
                    "mlflow_run_id": run_id_box[0], "steps_per_epoch": w.loader.steps_per_epoch, **_vocab_meta(w)}
        tensors = {BEST_FILE: best_state} if rank == 0 and best_state is not None else {}
        reporter.report(w, metrics, meta, w.loader.state_dict(), epoch, tensors)
        if fail_at_epoch is not None and epoch == fail_at_epoch and resume_from is None:
            (run_dir / f"injected_failure_rank{rank}.txt").write_text(f"epoch {epoch}\n")
            raise RuntimeError(f"injected failure after epoch {epoch} (test hook)")

    summary = finish_run(w, best_state, history, best, run_dir, tracker)
    write_worker_record(w, run_dir, worker_info)
    return summary


WORKERS_DIR = "workers"


def write_worker_record(w: Worker, run_dir: pathlib.Path, worker_info: dict | None = None) -> pathlib.Path:
    """``RUN/workers/rank<r>.json``: where this rank ran (host, pid, and the launcher's `worker_info`, e.g. the
    Ray node) and what it read: the training conditions of its shard and those whose cells its loader read
    (since this process started), so a run shows its own placement and that no worker read another's shard."""
    names = w.condition_names
    is_ctrl = np.asarray(w.store.array("conditions/is_control"), dtype=bool)
    read = np.flatnonzero(w.loader.conditions_read & ~is_ctrl)
    record = {"rank": w.rank, "world_size": w.world_size, "host": socket.gethostname(), "pid": os.getpid(),
              **(worker_info or {}), "sharding": w.cfg.sharding.mode,
              "shard_conditions": None if w.shard_conditions is None else [names[i] for i in w.shard_conditions],
              "shard_cells": w.loader.plan.num_cells, "conditions_read": [names[i] for i in read],
              "bytes_read": int(w.loader.bytes_read), "go_nodes_used": int(w.go_nodes_used)}
    path = run_dir / WORKERS_DIR / f"rank{w.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)  # every rank: a rank on another node may be first
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def finish_run(w: Worker, best_state: dict | None, history: list, best: dict | None, run_dir: pathlib.Path,
               tracker: Tracker | None) -> dict:
    """Restore the best weights, evaluate val and test per category, write model/ and summary.json."""
    if w.world_size > 1 and _dist():
        # Every rank evaluates with, and rank 0 saves, one model: rank 0's. The ranks' copies can differ (without
        # sync_batchnorm each rank's BatchNorm statistics come from its own shard; a rank restarted from a
        # checkpoint holds rank 0's copy), and the final metrics must be those of the saved model, whether or
        # not the run was restarted.
        state = best_state if best_state is not None else full_state_dict(w)  # ZeRO-3: a collective gather
        box = [state if w.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        best_state = box[0]
    if best_state is not None:
        load_full_state_dict(w, best_state)
    w.engine.module.restrict_go(None)  # test conditions lie outside a worker's training halo
    final = evaluate(w, w.val_conditions, "val")
    names = w.condition_names
    test = condition_indices(names, w.split.test, "test")
    final.update(evaluate(w, test, "test"))
    for cat, conds in sorted(w.split.test_categories().items()):
        final.update(evaluate(w, condition_indices(names, conds, f"test/{cat}"), f"test_{cat}"))
    summary = {"best": best, "final": final, "history": history, "world_size": w.world_size,
               "mlflow_run_id": tracker.run_id if tracker is not None else None, "split": w.keys["split"]}
    if w.rank == 0:
        model_dir = run_dir / "model"
        meta = {"config": to_dict(w.cfg), "metrics": final, "best": best, **_vocab_meta(w)}
        save_model(model_dir, full_state_dict(w) if best_state is None else best_state, meta)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
        figures = training_figures(history, run_dir / "figures")
        if tracker is not None:
            tracker.finish_training(summary, model_files=[model_dir / MODEL_FILE, model_dir / MODEL_META],
                                    files=[run_dir / "summary.json"], figures=figures,
                                    description=describe_run(to_dict(w.cfg), result=summary, **_run_facts(w)))
        print(format_summary(summary), flush=True)
    return summary


def _run_facts(w: Worker) -> dict:
    """What the run's MLflow description and tags say about its data."""
    return {"store": str(w.store.path), "split": w.keys["split"], "split_summary": w.split.summary(),
            "world_size": w.world_size,
            "store_shape": f"{w.store.num_cells} cells x {w.store.num_genes} genes, {len(w.condition_names)} conditions"}


def training_figures(history: list, out: pathlib.Path) -> list[pathlib.Path]:
    """The figures training makes (rank 0, at the end): the learning curves, ``out/learning_curves.png``.
    A figure that fails warns and is left out: figures never stop a run that trained."""
    if not history:
        return []
    try:
        from gears_dist.train.figures import plot_learning_curves

        return [plot_learning_curves(history, out / "learning_curves.png")]
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"the learning-curve figure failed ({type(exc).__name__}: {exc}); the run is saved without it",
                      stacklevel=2)
        return []


def format_summary(summary: dict) -> str:
    lines = ["gears-dist train: summary"]
    best = summary.get("best") or {}
    if best and best.get("epoch") == -1:
        lines.append(f"  best: the GO prior alone (val mse_de {best.get('score'):.5g}); no epoch of training improved "
                     f"it on validation, so the network's residual is left out")
    elif best:
        lines.append(f"  best epoch {best.get('epoch')} (val mse_de {best.get('score'):.5g})")
    for k, v in sorted(summary.get("final", {}).items()):
        if not k.endswith("num_conditions"):
            lines.append(f"  {k:<40} {v:.5g}")
    if summary.get("mlflow_run_id"):
        lines.append(f"  MLflow run {summary['mlflow_run_id']}")
    return "\n".join(lines)


setup_model = setup_worker  # the name the design notes use
save_checkpoint = ckpt.save_checkpoint
load_checkpoint = ckpt.load_checkpoint


def run_single(cfg: RunConfig, store_path: str | os.PathLike, run_dir: str | os.PathLike, **kwargs) -> dict:
    """One process, no Ray: prepare the store's components, then train."""
    keys = prepare_run(cfg, store_path, 1)
    return run_worker(cfg, store_path, run_dir, 0, 1, keys=keys, **kwargs)
