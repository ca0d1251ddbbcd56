"""Typed configuration of the GEARS model and its loss (the `model:` and `loss:` YAML sections)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gears_dist.config import require


@dataclass
class ModelConfig:
    """Architecture of GEARS (Roohani et al. 2023; the computation: gears_dist/model/gears.py).

    `recovery_hidden_sizes` / `cross_gene_hidden_sizes` are the hidden layers of the shared decoder MLP
    ([h, *recovery_hidden, h]; reference: [2h]) and of the cross-gene MLP ([G, *cross_gene_hidden, h];
    reference: [h]). None means the reference sizes for the chosen hidden size.

    `coexpr_mode`: 'intended' applies the co-expression GNN to every cell; 'parity' reproduces the reference's
    batching defect (only the first cell of each batch gets neighbour aggregation), for comparisons.
    `fast_path`: 'on' computes F(S) once per distinct perturbation set of the batch (BatchNorm statistics
    weighted by multiplicity; same numbers as per cell), 'off' computes per cell, 'auto' picks 'on' when the
    batch has fewer distinct sets than cells by a margin (a shape test, no host sync).
    `sync_batchnorm`: all-reduce BatchNorm batch statistics across torch.distributed ranks when a process
    group is initialized, so every worker normalizes with the global batch (needed for graph-partitioned shards).
    `prior`: 'none' is the reference architecture (delta = the network's output); 'go' is prior-anchored GEARS:
    delta = prior(S) + the network's output, prior(S) the GO-neighbour prior fitted on the training split
    (gears_dist/model/prior.py), cross-fitted while training, with the network's last layer initialized to
    zero so that training starts exactly at the prior. `prior_max_exact_mb`: above this many MB of training
    singles' deltas (T x G float32) the prior keeps a rank-`prior_rank` factorization of them instead.
    `prior_crossfit_pairs`: in each training step, this fraction of the multi-gene sets whose singles all trained
    get the prior (and the "estimated" input) of a set none of whose genes trained, so the residual also learns
    the combo_seen0 case (0: never).
    `prior_gain` (prior 'go' only): the network also learns a gain per gene of a set on that gene's part of the
    prior (delta_S = sum_g (1 + gain_g(S)) prior_g + residual), from the genes' GO embeddings and how their
    prior deltas relate: synergy, suppression and dominance of a pair are such gains. Starts at zero.
    `prior_residual` (prior 'go' only): 'observed' (default) adds the network's output only to
    sets none of whose genes has a GO-estimated prior (every gene's single trained, or its delta derived from
    training combinations): the network is trained on the training combinations alone (a training single's
    prior is a GO estimate) and learns how genes combine; sets with unseen genes get the prior. 'all' adds it
    to every set (measured on 5 Norman splits: worse than 'observed' in every test category, RESULTS.md).
    """

    hidden_size: int = 64
    num_go_layers: int = 1
    num_coexpr_layers: int = 1
    recovery_hidden_sizes: list[int] | None = None
    cross_gene_hidden_sizes: list[int] | None = None
    coexpr_scale: float = 0.2
    uncertainty: bool = False
    coexpr_mode: Literal["intended", "parity"] = "intended"
    fast_path: Literal["auto", "on", "off"] = "auto"
    sync_batchnorm: bool = False
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    prior: Literal["none", "go"] = "none"
    prior_max_exact_mb: float = 64.0
    prior_rank: int = 256
    prior_crossfit_pairs: float = 0.0
    prior_gain: bool = False
    prior_residual: Literal["all", "observed"] = "observed"

    def validate(self) -> None:
        require(self.hidden_size >= 1, "hidden_size", f"expected a positive integer, received {self.hidden_size}")
        require(self.num_go_layers >= 1, "num_go_layers", f"expected >= 1, received {self.num_go_layers}")
        require(self.num_coexpr_layers >= 1, "num_coexpr_layers", f"expected >= 1, received {self.num_coexpr_layers}")
        for name in ("recovery_hidden_sizes", "cross_gene_hidden_sizes"):
            sizes = getattr(self, name)
            require(sizes is None or all(s >= 1 for s in sizes), name,
                    f"expected a list of positive integers (or null for the reference sizes), received {sizes}")
        require(self.coexpr_scale >= 0.0, "coexpr_scale", f"expected >= 0, received {self.coexpr_scale}")
        require(0.0 <= self.bn_momentum <= 1.0, "bn_momentum", f"expected in [0, 1], received {self.bn_momentum}")
        require(self.bn_eps > 0.0, "bn_eps", f"expected > 0, received {self.bn_eps}")
        require(self.prior in ("none", "go"), "prior", f"expected 'none' (the reference architecture) or 'go' "
                f"(prior-anchored), received {self.prior!r}")
        require(self.prior_max_exact_mb >= 0.0, "prior_max_exact_mb", f"expected >= 0, received "
                f"{self.prior_max_exact_mb}")
        require(self.prior_rank >= 1, "prior_rank", f"expected a positive integer, received {self.prior_rank}")
        require(self.prior_residual in ("all", "observed"), "prior_residual",
                f"expected 'all' or 'observed', received {self.prior_residual!r}")
        require(not self.prior_gain or self.prior == "go", "prior_gain",
                "a gain on the prior needs a prior: set model.prior: go (or prior_gain: false)")
        require(0.0 <= self.prior_crossfit_pairs <= 1.0, "prior_crossfit_pairs",
                f"expected a fraction in [0, 1], received {self.prior_crossfit_pairs}")

    @property
    def recovery_sizes(self) -> list[int]:
        h = self.hidden_size
        hidden = [2 * h] if self.recovery_hidden_sizes is None else list(self.recovery_hidden_sizes)
        return [h, *hidden, h]

    def cross_gene_sizes(self, num_genes: int) -> list[int]:
        h = self.hidden_size
        hidden = [h] if self.cross_gene_hidden_sizes is None else list(self.cross_gene_hidden_sizes)
        return [num_genes, *hidden, h]


@dataclass
class LossConfig:
    """GEARS loss: autofocus |pred - y|^(2 + gamma) + direction_lambda * direction term, per condition.

    `direction`: 'sign' is the reference's term (sign(y - ctrl) - sign(pred - ctrl))^2, which has zero
    gradient almost everywhere (it only shifts the reported loss); 'tanh' replaces sign(d) by
    tanh(direction_tanh_scale * d), which is differentiable. Defaults follow the reference trainer
    (GEARS.model_initialize: direction_lambda=0.1, uncertainty_reg=1).
    `uncertainty_reg` weights the reference's uncertainty term reg * exp(-logvar) * |pred - y|^(2 + gamma)
    (used only when the model has its uncertainty head).
    """

    gamma: float = 2.0
    direction_lambda: float = 0.1
    direction: Literal["sign", "tanh"] = "sign"
    direction_tanh_scale: float = 10.0
    uncertainty_reg: float = 1.0

    def validate(self) -> None:
        require(self.gamma >= 0.0, "gamma", f"expected >= 0, received {self.gamma}")
        require(self.direction_lambda >= 0.0, "direction_lambda", f"expected >= 0, received {self.direction_lambda}")
        require(self.direction_tanh_scale > 0.0, "direction_tanh_scale",
                f"expected > 0, received {self.direction_tanh_scale}")
        require(self.uncertainty_reg >= 0.0, "uncertainty_reg", f"expected >= 0, received {self.uncertainty_reg}")
