"""The GEARS training loss, vectorized over conditions (no Python loop, no host sync)."""

from __future__ import annotations

import torch
from torch import Tensor

from gears_dist.model.config import LossConfig


def gears_loss(pred: Tensor, y: Tensor, inverse: Tensor, gene_mask: Tensor, ctrl_mean: Tensor,
               cfg: LossConfig, logvar: Tensor | None = None) -> Tensor:
    """Mean over the batch's distinct conditions of the per-condition GEARS loss.

    pred, y: [B, G]; inverse: [B] cell -> condition row in [0, U); gene_mask: [U, G] bool, the genes whose mean
    under that condition is non-zero (all True for control); ctrl_mean: [G]; logvar: [B, G] from the
    uncertainty head or None. Per condition c with cells C and kept genes M (as the reference):
        sum_{C x M} |pred - y|^(2+gamma) [* (1 + reg * exp(-logvar))] + lambda * (dir(y - ctrl) - dir(pred - ctrl))^2
        divided by |C| * |M|; then averaged over the conditions present in the batch.
    dir is sign (the reference; no gradient) or tanh(scale * .) (differentiable), as cfg.direction says.
    """
    _check(pred, y, inverse, gene_mask, ctrl_mean, logvar)
    num_conditions = gene_mask.shape[0]
    # Loss arithmetic in float32 (float64 for a float64 model), also under bf16 autocast.
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    pred = pred.to(dtype)
    y = y.to(dtype)
    ctrl = ctrl_mean.to(dtype)
    cells_per_condition = torch.zeros(num_conditions, device=pred.device, dtype=dtype).index_add_(
        0, inverse, torch.ones(inverse.shape[0], device=pred.device, dtype=dtype))
    genes_per_condition = gene_mask.sum(1).to(dtype)
    cell_norm = 1.0 / (cells_per_condition * genes_per_condition).clamp_min(1.0)[inverse]

    diff = (pred - y).abs()
    err = diff.square().square() if cfg.gamma == 2.0 else diff.pow(2.0 + cfg.gamma)
    if logvar is not None:
        err = err * (1.0 + cfg.uncertainty_reg * torch.exp(-logvar.to(dtype)))
    if cfg.direction_lambda > 0:
        if cfg.direction == "sign":
            direction = (torch.sign(y - ctrl) - torch.sign(pred - ctrl)).square()
        else:
            k = cfg.direction_tanh_scale
            direction = (torch.tanh(k * (y - ctrl)) - torch.tanh(k * (pred - ctrl))).square()
        err = err + cfg.direction_lambda * direction
    per_cell = (err * gene_mask[inverse].to(err.dtype)).sum(1) * cell_norm
    num_present = (cells_per_condition > 0).sum().to(dtype).clamp_min(1.0)
    return per_cell.sum() / num_present


def _check(pred: Tensor, y: Tensor, inverse: Tensor, gene_mask: Tensor, ctrl_mean: Tensor,
           logvar: Tensor | None) -> None:
    if pred.dim() != 2 or y.shape != pred.shape:
        raise ValueError(f"pred and y must both be [B, G], received {tuple(pred.shape)} and {tuple(y.shape)}")
    num_cells, num_genes = pred.shape
    if inverse.shape != (num_cells,) or inverse.dtype != torch.long:
        raise TypeError(f"inverse must be a LongTensor [{num_cells}] (cell -> condition row), "
                        f"received {inverse.dtype} {tuple(inverse.shape)}")
    if gene_mask.dim() != 2 or gene_mask.shape[1] != num_genes or gene_mask.dtype != torch.bool:
        raise TypeError(f"gene_mask must be a bool tensor [U, {num_genes}], received {gene_mask.dtype} "
                        f"{tuple(gene_mask.shape)}")
    if ctrl_mean.shape != (num_genes,):
        raise ValueError(f"ctrl_mean must be [{num_genes}], received {tuple(ctrl_mean.shape)}")
    if logvar is not None and logvar.shape != pred.shape:
        raise ValueError(f"logvar must be [B, G] like pred, received {tuple(logvar.shape)}")
