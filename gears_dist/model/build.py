"""The one place a GEARSModel is built from a store's graphs: for training (with a freshly fitted prior) and for
loading a trained model (prior and weights from its saved state)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from gears_dist.model.config import ModelConfig
from gears_dist.model.gears import GEARSModel


def build_model(cfg: ModelConfig, num_genes: int, go, coexpr, *, prior_fit=None,
                state: Mapping[str, Tensor] | None = None, where: str = "the saved model") -> GEARSModel:
    """A GEARSModel over `go` (perturbation graph) and `coexpr` (gene graph), both GeneGraphs.

    Training: `prior_fit` (a PriorFit, for model.prior 'go') is attached; the caller seeds torch first so that
    every worker builds the same initial weights. Loading: `state` (a saved state_dict) supplies the prior's
    buffers and every weight; a state that lacks some of the model's weights (another config) is refused,
    naming `where`."""
    go_ei, go_ew = go.to_torch()
    co_ei, co_ew = coexpr.to_torch()
    model = GEARSModel(cfg, num_genes, go.num_nodes, go_ei, go_ew, co_ei, co_ew)
    if cfg.prior != "none":
        from gears_dist.model.prior import SetPrior

        if state is not None:
            model.attach_prior(SetPrior.from_state_dict(state))  # fills buffers an older prior lacks into state
        elif prior_fit is not None:
            model.attach_prior(SetPrior(prior_fit))
        else:
            raise ValueError(f"model.prior is {cfg.prior!r}: build_model needs prior_fit (training) or state (loading)")
    if state is not None:
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"saved weights in {where} lack {missing[:5]}; the model config does not match")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own})
    return model
