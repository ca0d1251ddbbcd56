"""GEARS, vectorized: gene-level work once per step, per-perturbation-set computation, exact fast path.

What it computes is the reference architecture (Roohani et al. 2023, cell-gears 0.1.2); how it computes it:

* Gene level (gene embedding, co-expression GNN, gene MLP) runs once per step on G rows; its BatchNorm
  statistics count every row B times, which is what the reference's B-fold repetition gives.
* Perturbation level (GO GNN) runs once per step on the P GO nodes, or on the k-hop halo of a worker's
  perturbations after `restrict_go` (exact for those perturbations).
* Everything before the final `+ x` depends on a cell only through its perturbation set S (and batch
  statistics), so the cell x gene part runs once per *group* of cells with the same S, BatchNorm rows
  weighted by the group's size. With one group per cell this is the per-cell computation; with one group
  per distinct set it is the exact fast path (same numbers, U/B of the work).
* The BatchNorm after "gene base + perturbation" is computed from gene-level and set-level moments
  (rows are sums of a gene term and a set term), and the decoder's last BatchNorm is folded into the
  per-gene linear map, so neither needs its own pass over the U x G x h tensor.
* In eval (predict_delta) the recovery MLP's BatchNorms are folded into their Linears and its last Linear +
  BatchNorm into the per-gene map (`_eval_decoder_maps`): per (set, gene) only the first Linear runs.

With ``cfg.prior == 'go'`` (prior-anchored GEARS) the GO-neighbour prior of the set (``SetPrior``, attached with
``attach_prior``) is added to the network's delta; in training mode with the cross-fitted table.

In 'parity' co-expression mode the first cell of the batch is its own group whose gene base has the
co-expression aggregation and every other cell's has none (the reference's batching defect).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gears_dist.model.config import ModelConfig
from gears_dist.model.layers import (
    MLP,
    Propagation,
    WeightedBatchNorm1d,
    activation_dtype,
    gcn_normalized_edges,
    group_sums,
    native_batch_norm_ok,
)
from gears_dist.model.prior import SetPrior


def renormalized(weight: Tensor, max_norm: float = 1.0) -> Tensor:
    """Rescale (in place, no grad) the rows of an embedding table whose L2 norm exceeds max_norm, as
    nn.Embedding(max_norm=...) does to the rows it looks up; vectorized (torch's CPU kernel loops per row
    with a host sync each). Returns the table."""
    with torch.no_grad():
        norm = weight.norm(dim=1, keepdim=True)
        weight.mul_(torch.where(norm > max_norm, max_norm / (norm + 1e-7), torch.ones_like(norm)))
    return weight


def _folded_layers(mlp: MLP, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """An eval-mode MLP's (weight, bias) per layer with its BatchNorm (running statistics) folded in:
    BN(W x + b) = (s W) x + (s b + t). Computed in `dtype` (float32 or float64), outside autocast."""
    out = []
    with torch.no_grad(), torch.autocast(mlp.linears[0].weight.device.type, enabled=False):
        for linear, norm in zip(mlp.linears, mlp.norms):
            scale, shift = norm.scale_shift(norm.running_mean, norm.running_var, dtype)
            out.append((linear.weight.to(dtype) * scale.unsqueeze(1), linear.bias.to(dtype) * scale + shift))
    return out


def _apply_folded(x: Tensor, layers: list[tuple[Tensor, Tensor]], relu_last: bool = False) -> Tensor:
    """Folded layers with ReLU between them (and after the last one when relu_last); matmuls in the dtype
    autocast gives x's device (else x's dtype)."""
    act = activation_dtype(x.device, x.dtype)
    for i, (weight, bias) in enumerate(layers):
        x = torch.nn.functional.linear(x.to(act), weight.to(act), bias.to(act))
        if relu_last or i < len(layers) - 1:
            x = torch.relu_(x)
    return x


class _GeneMap(torch.autograd.Function):
    """Per-gene linear map u[g, u] = x[g, u] . w[g] (x [G, U, h], w [G, h]) as one batched matvec over genes.

    autograd's own bmm backward forms dw as bmm(x^T, du), which reads x transposed (strided: 2.7x / 4.3x slower
    in bf16 / fp32 on this project's CPU at G = 5,045, B = 32, one thread); here dw = bmm(du, x), the same sums
    in x's natural layout."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return torch.bmm(x, w.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        # The incoming gradient is the transpose of a [U, G] tensor. Given that layout, fp32 bmm falls back to one
        # clone per gene (5,045 small copies: 39 ms of a 280 ms step at Norman size; contiguous: ~1 ms).
        grad = grad.to(x.dtype).contiguous()
        dx = torch.bmm(grad.unsqueeze(-1), w.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(grad.unsqueeze(1), x).squeeze(1) if ctx.needs_input_grad[1] else None
        return dx, dw


# Upper bound on elements of the widest cell x gene activation per chunk in predict_delta (memory bound).
_PREDICT_CHUNK_ELEMENTS = 1 << 25


class GEARSModel(nn.Module):
    """GEARS perturbation-response model.

    forward(x [B, G] control expression, perts [U, K] GO-node ids padded with -1 (a control row is all -1),
    inverse [B] in [0, U) mapping each cell to its set) -> (pred [B, G], logvar [B, G] or None).
    """

    def __init__(self, cfg: ModelConfig, num_genes: int, num_perts: int, go_edge_index: Tensor,
                 go_edge_weight: Tensor | None, coexpr_edge_index: Tensor, coexpr_edge_weight: Tensor | None):
        super().__init__()
        cfg.validate()
        if num_genes < 1 or num_perts < 1:
            raise ValueError(f"num_genes and num_perts must be positive, received {num_genes} and {num_perts}")
        self.cfg = cfg
        self.num_genes = num_genes
        self.num_perts = num_perts
        h = cfg.hidden_size
        eps, mom = cfg.bn_eps, cfg.bn_momentum

        self.gene_emb = nn.Embedding(num_genes, h, max_norm=1.0)
        self.coexpr_emb = nn.Embedding(num_genes, h, max_norm=1.0)
        self.coexpr_layers = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.num_coexpr_layers))
        self.bn_gene = WeightedBatchNorm1d(h, eps, mom)
        self.gene_mlp = MLP([h, h, h], eps, mom)

        self.pert_emb = nn.Embedding(num_perts, h, max_norm=1.0)
        self.go_layers = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.num_go_layers))
        self.pert_fuse = MLP([h, h, h], eps, mom)

        self.bn_pert_base = WeightedBatchNorm1d(h, eps, mom)
        self.recovery = MLP(cfg.recovery_sizes, eps, mom)
        self.gene_w1 = nn.Parameter(torch.empty(num_genes, h))
        self.gene_b1 = nn.Parameter(torch.empty(num_genes))
        self.cross_gene = MLP(cfg.cross_gene_sizes(num_genes), eps, mom)
        self.gene_w2 = nn.Parameter(torch.empty(num_genes, h + 1))
        self.gene_b2 = nn.Parameter(torch.empty(num_genes))
        self.uncertainty_head = MLP([h, 2 * h, h, 1], eps, mom) if cfg.uncertainty else None
        self._init_gene_maps()

        go_target, go_source, go_weight = gcn_normalized_edges(go_edge_index, go_edge_weight, num_perts)
        co_target, co_source, co_weight = gcn_normalized_edges(coexpr_edge_index, coexpr_edge_weight, num_genes)
        # The full normalized GO graph stays on the host for restrict_go (halo extraction).
        self._go_edges = (go_target, go_source, go_weight)
        self.go_prop = Propagation(go_target, go_source, go_weight, num_perts, num_perts)
        self.coexpr_prop = Propagation(co_target, co_source, co_weight, num_genes, num_genes)
        self.go_halo: Propagation | None = None
        self.register_buffer("halo_ids", None, persistent=False)
        self.register_buffer("halo_local", None, persistent=False)
        self.prior: SetPrior | None = None
        # Prior-anchored only: added to a set's summed GO embeddings once per gene whose prior is a GO estimate (not
        # its observed single), so the residual can tell "correct an estimate" from "add an interaction".
        self.estimated_emb = nn.Parameter(torch.randn(h) / math.sqrt(h)) if cfg.prior == "go" else None
        # Prior-anchored with prior_gain: a gain per gene of the set on its part of the prior, from the gene's and
        # the other genes' GO embeddings and how their prior deltas relate (Norman et al.'s model of a pair,
        # delta_AB = c_a delta_A + c_b delta_B: synergy, suppression and dominance are gains). Starts at zero.
        self.gain_mlp = (nn.Sequential(nn.Linear(3 * h + 3, h), nn.ReLU(), nn.Linear(h, 1))
                         if cfg.prior == "go" and cfg.prior_gain else None)
        self._zero_gain()

    def attach_prior(self, prior: SetPrior) -> None:
        """Anchor the model at `prior` (cfg.prior 'go'): the network's output layer is set to zero, so the model's
        delta is exactly prior(S) until training moves it. (Loading saved weights afterwards restores them.)"""
        if self.cfg.prior != "go":
            raise ValueError(f"attach_prior: model.prior is {self.cfg.prior!r}; set model.prior: go")
        if prior.mean_delta.shape != (self.num_genes,) or prior.eval_index.shape[0] != self.num_perts:
            raise ValueError(f"attach_prior: the prior covers {tuple(prior.mean_delta.shape)} genes and "
                             f"{prior.eval_index.shape[0]} GO nodes; the model has {self.num_genes} and {self.num_perts}")
        self.prior = prior.to(self.gene_w2.device)
        with torch.no_grad():
            self.gene_w2.zero_()
            self.gene_b2.zero_()
        self._zero_gain()

    def _zero_gain(self) -> None:
        if self.gain_mlp is not None:
            with torch.no_grad():
                self.gain_mlp[-1].weight.zero_()
                self.gain_mlp[-1].bias.zero_()

    def _with_prior(self, delta: Tensor, perts: Tensor, as_unseen: Tensor | None = None,
                    go_table: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        if self.cfg.prior == "none":
            return delta
        if self.prior is None:
            raise RuntimeError("model.prior is 'go' but no prior is attached: call attach_prior(SetPrior(fit)) "
                               "(training and TrainedPredictor.load do)")
        if self.cfg.prior_residual == "observed":
            # The network's part only for sets of observed genes (no GO estimate in the set): while training those
            # are the combinations of trained genes, so the network learns interactions, not GO corrections.
            observed = ~self.prior.estimated(perts, self.training, as_unseen).any(1)
            delta = delta * observed.unsqueeze(1).to(delta.dtype)
        if self.gain_mlp is None:
            return delta + self.prior(perts, cross_fit=self.training, as_unseen=as_unseen)
        parts = self.prior.members(perts, cross_fit=self.training, as_unseen=as_unseen)   # [U, K, G]
        # Gains act downstream only: a target's own expression is set by its perturbation, whatever its partners do
        # (and it would dominate the features: the perturbed gene's own change is the largest of its profile).
        own = self.prior.own_columns(perts, parts.shape[-1])
        downstream = parts * (~own).unsqueeze(1).to(parts.dtype)
        gains = self._prior_gains(perts, downstream, as_unseen, go_table)
        if self.cfg.prior_residual == "observed":
            gains = gains * observed.unsqueeze(1).to(gains.dtype)
        return delta + parts.sum(1) + (gains.unsqueeze(-1) * downstream).sum(1)

    def _prior_gains(self, perts: Tensor, parts: Tensor, as_unseen: Tensor | None,
                     go_table: tuple[Tensor, Tensor | None] | None) -> Tensor:
        """[U, K] gain of each gene's downstream part of the prior (0 for padding)."""
        emb, valid = self._member_embeddings(perts, go_table)
        emb = emb.float()
        others = emb.sum(1, keepdim=True) - emb
        rest = parts.sum(1, keepdim=True) - parts
        own_norm, rest_norm = parts.norm(dim=-1), rest.norm(dim=-1)
        cos = (parts * rest).sum(-1) / (own_norm * rest_norm).clamp_min(1e-12)
        ratio = torch.log((own_norm + 1e-6) / (rest_norm + 1e-6))
        ratio = torch.where(rest_norm > 0, ratio, torch.zeros_like(ratio))
        estimated = self.prior.estimated(perts, self.training, as_unseen).float()
        feats = torch.cat([emb, others, emb * others, cos.unsqueeze(-1), ratio.unsqueeze(-1),
                           estimated.unsqueeze(-1)], dim=-1)
        return self.gain_mlp(feats).squeeze(-1) * valid.to(emb.dtype)

    def _draw_unseen_sets(self, perts: Tensor) -> Tensor | None:
        """Training only: which multi-gene sets of trained genes are cross-fitted this step as if none of their
        genes were trained (model.prior_crossfit_pairs), so the residual also learns the unseen-pair case."""
        if not self.training or self.prior is None or self.cfg.prior_crossfit_pairs <= 0:
            return None
        return self.prior.trained_sets(perts) & (
            torch.rand(perts.shape[0], device=perts.device) < self.cfg.prior_crossfit_pairs)

    def _init_gene_maps(self) -> None:
        # Xavier-normal with the fan-in/fan-out the reference's parameter shapes imply:
        # w1 [G, h, 1], b1 [G, 1], w2 [1, G, h + 1], b2 [1, G].
        g, h = self.num_genes, self.cfg.hidden_size
        with torch.no_grad():
            self.gene_w1.normal_(0.0, math.sqrt(2.0 / (h + g)))
            self.gene_b1.normal_(0.0, math.sqrt(2.0 / (1 + g)))
            self.gene_w2.normal_(0.0, math.sqrt(2.0 / (g * (h + 1) + (h + 1))))
            self.gene_b2.normal_(0.0, math.sqrt(2.0 / (g + 1)))

    # ------------------------------------------------------------------ graph partitioning
    def restrict_go(self, node_ids: Tensor | None) -> Tensor | None:
        """Compute the GO GNN only on the k-hop in-neighbourhood (k = num_go_layers) of `node_ids`.

        Outputs for `node_ids` stay exact (edge weights keep their full-graph normalization); perturbations
        outside the halo must not be passed to forward afterwards (they would be treated as absent).
        None restores the full graph. Returns the halo's node ids (sorted) or None.
        """
        if node_ids is None:
            self.go_halo, self.halo_ids, self.halo_local = None, None, None
            return None
        device = self.pert_emb.weight.device
        owned = torch.as_tensor(node_ids, dtype=torch.long).cpu().reshape(-1)
        if owned.numel() and (int(owned.min()) < 0 or int(owned.max()) >= self.num_perts):
            raise ValueError(f"restrict_go: node ids must lie in [0, {self.num_perts}), "
                             f"received min {int(owned.min())}, max {int(owned.max())}")
        target, source, weight = self._go_edges
        halo = torch.unique(owned)
        for _ in range(self.cfg.num_go_layers):
            halo = torch.unique(torch.cat([halo, source[torch.isin(target, halo)]]))
        local = torch.full((self.num_perts,), -1, dtype=torch.long)
        local[halo] = torch.arange(halo.numel())
        keep = (local[target] >= 0) & (local[source] >= 0)
        self.go_halo = Propagation(local[target[keep]], local[source[keep]], weight[keep],
                                   halo.numel(), halo.numel()).to(device)
        self.halo_ids = halo.to(device)
        self.halo_local = local.to(device)
        return halo

    # ------------------------------------------------------------------ pieces of the forward pass
    def _sync(self) -> bool:
        return self.cfg.sync_batchnorm

    def _gene_base(self, variant_weight: Tensor, total_weight: Tensor) -> Tensor:
        """Gene embeddings before the perturbation is added: [G, V, h] for V gene-base variants
        (intended: 1; parity: 0 = without, 1 = with co-expression aggregation)."""
        sync = self._sync()
        emb = renormalized(self.gene_emb.weight)
        base = torch.relu(self.bn_gene(emb.unsqueeze(1), total_weight.reshape(1), sync))
        pos = renormalized(self.coexpr_emb.weight)
        if self.cfg.coexpr_mode == "parity":
            pos = torch.stack([self._coexpr_gnn(pos, aggregate=False), self._coexpr_gnn(pos, aggregate=True)], 1)
        else:
            pos = self._coexpr_gnn(pos, aggregate=True).unsqueeze(1)
        return self.gene_mlp(base + self.cfg.coexpr_scale * pos, variant_weight, sync)

    def _coexpr_gnn(self, x: Tensor, aggregate: bool) -> Tensor:
        # aggregate=False is a cell whose nodes have only their self-loop in the reference's batched graph.
        last = len(self.coexpr_layers) - 1
        for i, layer in enumerate(self.coexpr_layers):
            x = layer(self.coexpr_prop(x) if aggregate else x)
            if i < last:
                x = torch.relu(x)
        return x

    def _go_table(self) -> tuple[Tensor, Tensor | None]:
        """GO-GNN perturbation embeddings for all P nodes, or the halo (with the global -> local map)."""
        table = renormalized(self.pert_emb.weight)
        if self.go_halo is None:
            x, prop, local = table, self.go_prop, None
        else:
            x, prop, local = table.index_select(0, self.halo_ids), self.go_halo, self.halo_local
        last = len(self.go_layers) - 1
        for i, layer in enumerate(self.go_layers):
            x = layer(prop(x))
            if i < last:
                x = torch.relu(x)
        return x, local

    def _member_embeddings(self, perts: Tensor, go_table: tuple[Tensor, Tensor | None] | None = None
                           ) -> tuple[Tensor, Tensor]:
        """GO embeddings of each set's genes [U, K, h] (zero for padding and genes outside the halo), and the
        mask of those present [U, K]."""
        table, local = self._go_table() if go_table is None else go_table
        valid = perts >= 0
        index = perts.clamp_min(0)
        if local is not None:
            index = local[index]
            valid = valid & (index >= 0)
            index = index.clamp_min(0)
        return table[index] * valid.unsqueeze(-1).to(table.dtype), valid

    def _set_shift(self, perts: Tensor, group_weight: Tensor,
                   go_table: tuple[Tensor, Tensor | None] | None = None, as_unseen: Tensor | None = None) -> Tensor:
        """pert_fuse(sum of the set's GO embeddings) per group, zero for control groups: [U', h]. Prior-anchored:
        plus estimated_emb once per gene whose prior is a GO estimate."""
        emb, valid = self._member_embeddings(perts, go_table)
        summed = emb.sum(1)
        if self.estimated_emb is not None and self.prior is not None:
            num_estimated = self.prior.estimated(perts, self.training, as_unseen).sum(1, keepdim=True)
            summed = summed + num_estimated.to(summed.dtype) * self.estimated_emb.to(summed.dtype)
        is_pert = valid.any(1)
        # BatchNorm of pert_fuse sees only the perturbed cells (the reference feeds it those alone).
        fuse_weight = group_weight * is_pert.to(group_weight.dtype)
        fused = self.pert_fuse(summed, fuse_weight, self._sync())
        return fused * is_pert.unsqueeze(-1).to(fused.dtype)

    def _first_hidden(self, gene_base: Tensor, shift: Tensor, variant: Tensor | None,
                      group_weight: Tensor) -> Tensor:
        """ReLU(BN(gene_base[g, variant(u)] + shift[u])) as [G, U', h], BN moments from the two terms."""
        norm = self.bn_pert_base
        if self.training:
            with torch.autocast(gene_base.device.type, enabled=False):
                # float64: these moments come as E[x^2] - E[x]^2 from gene- and set-level terms (tiny tensors).
                acc = torch.float64
                gb = gene_base.to(acc)
                sh = shift.to(acc)
                gene_mean = gb.mean(0)
                gene_sq = (gb * gb).mean(0)
                if variant is not None:
                    gene_mean, gene_sq = gene_mean[variant], gene_sq[variant]
                w = group_weight.to(acc)
                g = float(self.num_genes)
                count = w.sum() * g
                s1 = g * (w @ (gene_mean + sh))
                s2 = g * (w @ (gene_sq + 2.0 * sh * gene_mean + sh * sh))
            mean, var = norm.statistics(count, s1, s2, sync=self._sync())
            mean, var = mean.to(self.gene_w1.dtype), var.to(self.gene_w1.dtype)
        else:
            mean, var = norm.running_mean, norm.running_var
        scale, offset = norm.scale_shift(mean, var)
        act = activation_dtype(gene_base.device, self.gene_w1.dtype)
        gene_part = torch.addcmul(offset, gene_base.to(scale.dtype), scale).to(act)
        set_part = (shift.to(scale.dtype) * scale).to(act)
        if variant is not None:
            gene_part = gene_part[:, variant]
        return torch.relu_(gene_part + set_part.unsqueeze(0))

    def _decode(self, hidden: Tensor, bn_weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Recovery MLP, per-gene map, cross-gene state on hidden [G, U', h]: delta [U', G] and logvar [U', G]
        or None. bn_weight: group multiplicities, None when every group is one cell."""
        sync = self._sync()
        if not self.training or native_batch_norm_ok(bn_weight, sync):
            out = self.recovery(hidden, bn_weight, sync)
            w1, b1 = self.gene_w1, self.gene_b1
        else:
            out = self.recovery(hidden, bn_weight, sync, last_norm=False)
            last = self.recovery.norms[-1]
            mean, var = last.statistics(*group_sums(out, bn_weight), sync=sync)
            scale, offset = last.scale_shift(mean, var)
            # BN(out) . w1[g] + b1[g] == out . (scale * w1[g]) + (offset . w1[g] + b1[g]): no normalized copy.
            with torch.autocast(out.device.type, enabled=False):
                w1 = self.gene_w1 * scale
                b1 = self.gene_w1 @ offset + self.gene_b1
        u = _GeneMap.apply(out, w1.to(out.dtype)).to(b1.dtype) + b1.unsqueeze(1)
        return self._cross_and_output(u, hidden, bn_weight)

    def _cross_and_output(self, u: Tensor, hidden: Tensor, bn_weight: Tensor | None, fold: bool = False
                          ) -> tuple[Tensor, Tensor | None]:
        """From the per-gene scalars u [G, U']: cross-gene state, delta [U', G] and logvar [U', G] or None.
        fold (eval only): the uncertainty head runs with its BatchNorms folded into its Linears."""
        sync = self._sync()
        u = u.t()
        cross = self.cross_gene(u, bn_weight, sync)
        with torch.autocast(u.device.type, enabled=False):
            # The output layer stays float32 under autocast: delta is what the loss compares.
            delta = torch.addmm(self.gene_b2 + self.gene_w2[:, 0] * u, cross.to(u.dtype), self.gene_w2[:, 1:].t())
        logvar = None
        if self.uncertainty_head is not None:
            if fold and not self.training:
                logvar = _apply_folded(hidden, _folded_layers(self.uncertainty_head, delta.dtype))
            else:
                logvar = self.uncertainty_head(hidden, bn_weight, sync)
            logvar = logvar.squeeze(-1).t().to(delta.dtype)
        return delta, logvar

    def _eval_decoder_maps(self) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
        """Eval-mode recovery MLP with every BatchNorm folded into its Linear, and its last Linear + BatchNorm
        folded into the per-gene map (all linear after the last ReLU):
            u[g] = w1[g] . (s * (W r + b) + t) + b1[g] = r . v[g] + c[g],
            v = (w1 * s) @ W  [G, k],   c = w1 @ (s * b + t) + b1  [G],
        r being the input of the last Linear (width k). Returns (the layers before the last, v, c)."""
        acc = torch.float64 if self.gene_w1.dtype == torch.float64 else torch.float32
        *layers, (w_last, b_last) = _folded_layers(self.recovery, acc)
        with torch.autocast(self.gene_w1.device.type, enabled=False):
            w1 = self.gene_w1.to(acc)
            v = w1 @ w_last
            c = w1 @ b_last + self.gene_b1.to(acc)
        return layers, v, c

    def _decode_folded(self, hidden: Tensor, maps: tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]
                       ) -> tuple[Tensor, Tensor | None]:
        """_decode in eval mode with the maps of _eval_decoder_maps: the last Linear's [G, U', h] output is never
        formed, so the per-(set, gene) work is the first Linear alone (half of the recovery MLP's)."""
        layers, v, c = maps
        r = _apply_folded(hidden, layers, relu_last=True)
        u = torch.bmm(r, v.to(r.dtype).unsqueeze(-1)).squeeze(-1).to(c.dtype) + c.unsqueeze(1)
        # (The cross-gene MLP takes the parameters' dtype, as in _decode: bf16 when DeepSpeed cast them.)
        return self._cross_and_output(u.to(self.gene_b1.dtype), hidden, None, fold=True)

    def _groups(self, perts: Tensor, inverse: Tensor, grouped: bool
                ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(group perts [U', K], group weight [U'], gene-base variant [U'] or None, cell -> group [B])."""
        num_cells, num_sets = inverse.shape[0], perts.shape[0]
        device = perts.device
        if grouped:
            weight = torch.zeros(num_sets, device=device).index_add_(
                0, inverse, torch.ones(num_cells, device=device))
            cell_group = inverse
        else:
            perts = perts[inverse]
            weight = torch.ones(num_cells, device=device)
            cell_group = torch.arange(num_cells, device=device)
        if self.cfg.coexpr_mode != "parity":
            return perts, weight, None, cell_group
        if grouped:
            # Cell 0 leaves its set's group for a group of its own, with the co-expression variant.
            first = inverse[:1]
            weight = torch.cat([weight.index_add(0, first, -torch.ones(1, device=device)),
                                torch.ones(1, device=device)])
            perts = torch.cat([perts, perts[first]])
            variant = torch.zeros(num_sets + 1, dtype=torch.long, device=device)
            variant[-1] = 1
            cell_group = inverse.clone()
            cell_group[0] = num_sets
        else:
            variant = torch.zeros(num_cells, dtype=torch.long, device=device)
            variant[0] = 1
        return perts, weight, variant, cell_group

    def group_delta(self, perts: Tensor, weight: Tensor, variant: Tensor | None, one_cell_each: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
        """F for each group: delta [U', G] (float32) and logvar [U', G] or None. weight [U']: cells per group;
        one_cell_each: every weight is 1 (the per-cell path), so fused BatchNorm kernels apply."""
        if variant is None:
            variant_weight = weight.sum().reshape(1)
        else:
            variant_weight = torch.zeros(2, device=weight.device).index_add_(0, variant, weight)
        gene_base = self._gene_base(variant_weight, weight.sum())
        as_unseen = self._draw_unseen_sets(perts)
        go_table = self._go_table()
        shift = self._set_shift(perts, weight, go_table, as_unseen=as_unseen)
        hidden = self._first_hidden(gene_base, shift, variant, weight)
        delta, logvar = self._decode(hidden, None if one_cell_each else weight)
        return self._with_prior(delta, perts, as_unseen, go_table), logvar

    # ------------------------------------------------------------------ public API
    def use_fast_path(self, num_sets: int, num_cells: int) -> bool:
        mode = self.cfg.fast_path
        if mode == "auto":
            # Same code either way; grouping only removes rows (a shape test, no host sync).
            return num_sets < num_cells
        return mode == "on"

    def forward(self, x: Tensor, perts: Tensor, inverse: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check_inputs(x, perts, inverse)
        grouped = self.use_fast_path(perts.shape[0], inverse.shape[0])
        group_perts, weight, variant, cell_group = self._groups(perts, inverse, grouped)
        delta, logvar = self.group_delta(group_perts, weight, variant, one_cell_each=not grouped)
        pred = x.to(delta.dtype) + delta.index_select(0, cell_group)
        if logvar is not None:
            logvar = logvar.index_select(0, cell_group)
        return pred, logvar

    @torch.no_grad()
    def predict_delta(self, perts: Tensor, return_logvar: bool = False, fold: bool = True
                      ) -> Tensor | tuple[Tensor, Tensor | None]:
        """F(S) [U, G] for each perturbation set (eval mode: running BatchNorm statistics, so the
        prediction for a condition is control mean + F(S), with no control cells sampled). Gene-level and
        GO work runs once; the set x gene part is chunked over sets to bound memory. In parity mode this is
        the reference's prediction for a cell that is not first in its batch.
        fold: run the decoder with its BatchNorms and last Linear folded into the per-gene map
        (`_eval_decoder_maps`; the same function, half the work); False runs the layers one by one."""
        if self.training:
            raise RuntimeError("predict_delta needs eval mode (running BatchNorm statistics): call model.eval() first")
        if perts.dim() != 2:
            raise ValueError(f"perts must have shape [U, K] (GO-node ids padded with -1), received {tuple(perts.shape)}")
        device = self.gene_w1.device
        perts = perts.to(device, torch.long)
        num_variants = 2 if self.cfg.coexpr_mode == "parity" else 1
        one = torch.ones(1, device=device)
        # (BatchNorm weights do not matter in eval.) In parity mode keep variant 0: no co-expression aggregation.
        gene_base = self._gene_base(torch.ones(num_variants, device=device), one)[:, :1]
        go_table = self._go_table()
        widest = max(self.cfg.recovery_sizes)
        chunk = max(1, _PREDICT_CHUNK_ELEMENTS // (self.num_genes * widest))
        maps = self._eval_decoder_maps() if fold else None
        deltas, logvars = [], []
        for start in range(0, perts.shape[0], chunk):
            part = perts[start:start + chunk]
            weight = torch.ones(part.shape[0], device=device)
            shift = self._set_shift(part, weight, go_table)
            hidden = self._first_hidden(gene_base, shift, None, weight)
            delta, logvar = self._decode(hidden, None) if maps is None else self._decode_folded(hidden, maps)
            deltas.append(self._with_prior(delta, part, go_table=go_table))
            logvars.append(logvar)
        delta = torch.cat(deltas) if deltas else torch.zeros(0, self.num_genes, device=device)
        if not return_logvar:
            return delta
        return delta, (torch.cat(logvars) if self.uncertainty_head is not None and logvars else None)

    def _check_inputs(self, x: Tensor, perts: Tensor, inverse: Tensor) -> None:
        # Shape/dtype checks only: value checks would synchronize with the device.
        if x.dim() != 2 or x.shape[1] != self.num_genes:
            raise ValueError(f"x must have shape [B, {self.num_genes}] (control expression per cell), "
                             f"received {tuple(x.shape)}")
        if perts.dim() != 2 or perts.dtype != torch.long:
            raise TypeError(f"perts must be a LongTensor [U, K] of GO-node ids padded with -1, "
                            f"received {perts.dtype} {tuple(perts.shape)}")
        if inverse.shape != (x.shape[0],) or inverse.dtype != torch.long:
            raise TypeError(f"inverse must be a LongTensor [{x.shape[0]}] (cell -> row of perts), "
                            f"received {inverse.dtype} {tuple(inverse.shape)}")
