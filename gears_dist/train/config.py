"""Typed configuration of a training run (the YAML presets in configs/).

A run's YAML has one block per component; every key is checked at load (unknown keys and bad
values raise ConfigError naming the dotted field)::

    name: demo
    seed: 0
    data:      {split: simulation_seed1, loader: {batch_size: 32, buffer_mb: 256, ...}}
    graphs:    GraphConfig (gears_dist.graphs)
    model:     ModelConfig (gears_dist.model)
    loss:      LossConfig (gears_dist.model)
    train:     {epochs: 20, device: auto, ...}
    optim:     {optimizer: adam, lr: 1e-3, weight_decay: 5e-4, schedule: step, ...}
    deepspeed: {zero_stage: 0, precision: fp32, grad_accum_steps: 1, grad_clip: 1.0}
    sharding:  {mode: graph, partition: metis, halo: true}
    scaling:   {num_workers: 2, use_gpu: false, cpus_per_worker: 1, max_failures: 1}
    tracking:  {enabled: true, uri: null, experiment: gears_dist}
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Literal

from gears_dist.config import ConfigError, from_dict, load_config, require, to_dict
from gears_dist.data.loader import LoaderConfig
from gears_dist.graphs.config import GraphConfig
from gears_dist.model.config import LossConfig, ModelConfig


@dataclasses.dataclass
class DataConfig:
    """split: key of a split saved in the store; when it is absent from the store, the launcher makes
    one of `split_kind` with `split_seed` (simulation_seed1 is GEARS' default)."""

    split: str | None = None
    split_kind: str = "simulation"
    split_seed: int = 1
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)

    def validate(self) -> None:
        self.loader.validate()


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 20
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 50                 # steps between progress lines / step metrics
    eval_batch_conditions: int = 256    # conditions predicted per forward pass in validation
    max_steps_per_epoch: int | None = None  # cap (quick runs, benchmarks); None: the full epoch
    # Before each validation, re-estimate every BatchNorm's running statistics as the plain average over this
    # many training batches (forward only, weights untouched) instead of the momentum-0.1 average of the last
    # ~10 batches. Evaluation uses running statistics, so without it the validation score moves from epoch to
    # epoch with the composition of the last few batches even once the learning rate is ~0. 0: off (the
    # reference's behaviour).
    bn_recalibration_batches: int = 0

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", f"expected >= 1, received {self.epochs}")
        require(self.bn_recalibration_batches >= 0, "bn_recalibration_batches",
                f"expected >= 0 (0 = off), received {self.bn_recalibration_batches}")
        require(self.log_every >= 1, "log_every", f"expected >= 1, received {self.log_every}")
        require(self.eval_batch_conditions >= 1, "eval_batch_conditions",
                f"expected >= 1, received {self.eval_batch_conditions}")
        require(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch",
                f"expected >= 1 or null, received {self.max_steps_per_epoch}")


@dataclasses.dataclass
class OptimConfig:
    """Reference: Adam lr 1e-3, weight decay 5e-4, StepLR gamma 0.5 every epoch."""

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    schedule: Literal["step", "cosine", "constant"] = "step"
    step_gamma: float = 0.5
    step_epochs: int = 1
    min_lr_ratio: float = 0.0           # cosine: final lr / lr

    def validate(self) -> None:
        require(self.lr > 0, "lr", f"expected > 0, received {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"expected >= 0, received {self.weight_decay}")
        require(0 < self.step_gamma <= 1, "step_gamma", f"expected in (0, 1], received {self.step_gamma}")
        require(self.step_epochs >= 1, "step_epochs", f"expected >= 1, received {self.step_epochs}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"expected in [0, 1], received {self.min_lr_ratio}")


@dataclasses.dataclass
class DeepSpeedConfig:
    """extra: merged into the generated DeepSpeed JSON config last (expert settings)."""

    zero_stage: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"expected 0, 1, 2 or 3, received {self.zero_stage}")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", f"expected >= 1, received {self.grad_accum_steps}")
        require(self.grad_clip >= 0, "grad_clip", f"expected >= 0 (0 = off), received {self.grad_clip}")


@dataclasses.dataclass
class ShardingConfig:
    """mode graph: each worker owns the conditions of one part of the GO graph (partition method
    metis / contiguous (store order) / random conditions) and runs the GO GNN on its halo; mode
    random: cells dealt to workers at random (the baseline; every worker reads every chunk)."""

    mode: Literal["graph", "random"] = "graph"
    partition: Literal["metis", "contiguous", "random"] = "metis"
    halo: bool = True
    partition_seed: int = 0


@dataclasses.dataclass
class ScalingConfig:
    """Ray Train workers. num_workers=1 and no address: the loop still runs under a local Ray."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0             # CPUs Ray reserves for a worker; on CPU also its torch threads
    gpus_per_worker: float | None = None
    max_failures: int = 0
    num_checkpoints_to_keep: int = 2
    object_store_mb: int = 256          # local Ray only (small for 2-core / 24 GB machines)
    # Ray's placement of the workers' bundles: PACK (default) fills a node first; STRICT_SPREAD puts each
    # worker on its own node (a run then needs num_workers nodes and waits for them).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def validate(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"expected >= 1, received {self.num_workers}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"expected > 0, received {self.cpus_per_worker}")
        require(self.max_failures >= -1, "max_failures", f"expected >= -1 (-1 = retry forever), "
                f"received {self.max_failures}")
        require(self.num_checkpoints_to_keep >= 1, "num_checkpoints_to_keep",
                f"expected >= 1, received {self.num_checkpoints_to_keep}")
        require(self.object_store_mb >= 64, "object_store_mb", f"expected >= 64, received {self.object_store_mb}")
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        require(self.placement_strategy in strategies, "placement_strategy",
                f"expected one of {list(strategies)}, received {self.placement_strategy!r}")


@dataclasses.dataclass
class TrackingConfig:
    """uri: MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "gears_dist"
    run_name: str | None = None


@dataclasses.dataclass
class RunConfig:
    name: str = "gears"
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    graphs: GraphConfig = dataclasses.field(default_factory=GraphConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name",
                f"expected a plain run name without '/', received {self.name!r}")


def load_run_config(path: str | pathlib.Path, overrides: dict | None = None) -> RunConfig:
    return load_config(RunConfig, path, overrides)


def run_config_from_dict(data: dict) -> RunConfig:
    return from_dict(RunConfig, data)


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config derived from the typed run config."""
    ds = cfg.deepspeed
    micro = cfg.data.loader.batch_size
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": micro * ds.grad_accum_steps * world_size,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        # bf16 runs as torch.autocast around the forward pass (fp32 master weights and optimizer state):
        # the model keeps some fp32 graph tensors that DeepSpeed's whole-module bf16 cast would not convert.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        # small models: keep every parameter resident after the first gather
        out["zero_optimization"].update({"stage3_param_persistence_threshold": 1 << 20})
    from gears_dist.config import deep_merge

    return deep_merge(out, ds.extra)


__all__ = [
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "OptimConfig",
    "RunConfig",
    "ScalingConfig",
    "ShardingConfig",
    "TrackingConfig",
    "TrainConfig",
    "deepspeed_config",
    "load_run_config",
    "run_config_from_dict",
    "to_dict",
]
