"""gears_dist.model: the GEARS model (vectorized, exact per-perturbation-set fast path) and its loss."""

from gears_dist.model.config import LossConfig, ModelConfig
from gears_dist.model.gears import GEARSModel
from gears_dist.model.layers import MLP, WeightedBatchNorm1d, gcn_normalized_edges
from gears_dist.model.loss import gears_loss

__all__ = [
           "MLP",
           "GEARSModel",
           "LossConfig",
           "ModelConfig",
           "WeightedBatchNorm1d",
           "gcn_normalized_edges",
           "gears_loss",
]
