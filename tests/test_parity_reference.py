"""Parity with the reference implementation (PyPI cell-gears 0.1.2, used only as an oracle).

The reference `GEARS_Model` and ours are built on the same small graphs, the reference's weights are copied
into ours, and forward outputs, loss, gradients and BatchNorm running statistics are compared on the same
batch in 'parity' co-expression mode (max abs difference < 1e-5, float32), in train and eval mode. The last
tests show where the default 'intended' mode differs and why. No compatibility shim was needed: the
reference imports and runs unchanged with torch-geometric 2.8.1 (its package import needs `dcor`, which is
in the test extra).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

ref_model = pytest.importorskip("gears.model", reason="reference cell-gears 0.1.2 not installed (make install)")
ref_utils = pytest.importorskip("gears.utils", reason="reference cell-gears 0.1.2 not importable")
from torch_geometric.data import Batch, Data

from gears_dist.model import GEARSModel, LossConfig, ModelConfig, gears_loss

NUM_GENES, NUM_PERTS, HIDDEN = 24, 15, 8
TOL = 1e-5


def _graphs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def random_graph(num_nodes, num_edges):
        src = torch.randint(0, num_nodes, (num_edges,), generator=gen)
        dst = torch.randint(0, num_nodes, (num_edges,), generator=gen)
        # Every node carries a self-loop of weight 1 like the reference's similarity graphs, plus some
        # self-loops with other weights (add_remaining_self_loops keeps those).
        keep = src != dst
        src, dst = src[keep], dst[keep]
        nodes = torch.arange(num_nodes)
        loops_w = torch.ones(num_nodes)
        loops_w[: num_nodes // 3] = 0.5
        index = torch.stack([torch.cat([src, nodes]), torch.cat([dst, nodes])])
        weight = torch.cat([torch.rand(src.numel(), generator=gen) * 0.9 + 0.1, loops_w])
        return index, weight

    go = random_graph(NUM_PERTS, 60)
    coexpr = random_graph(NUM_GENES, 80)
    return go, coexpr


# Cells: the first cell is perturbed (so the co-expression defect matters), a control cell, two cells of
# the same single, a pair twice, and a triple.
CELL_SETS = [(2,), (), (5,), (2,), (3, 9), (5,), (3, 9), (), (1, 4, 7)]


def _reference(uncertainty: bool, seed: int = 1):
    (go_i, go_w), (co_i, co_w) = _graphs()
    torch.manual_seed(seed)
    args = {"num_genes": NUM_GENES, "num_perts": NUM_PERTS, "hidden_size": HIDDEN, "uncertainty": uncertainty,
                "num_go_gnn_layers": 1, "decoder_hidden_size": 16, "num_gene_gnn_layers": 1, "no_perturb": False,
                "G_coexpress": co_i, "G_coexpress_weight": co_w, "G_go": go_i, "G_go_weight": go_w, "device": "cpu"}
    return ref_model.GEARS_Model(args)


def _ours(reference, mode: str, uncertainty: bool, fast_path: str = "off"):
    (go_i, go_w), (co_i, co_w) = _graphs()
    cfg = ModelConfig(hidden_size=HIDDEN, coexpr_mode=mode, uncertainty=uncertainty, fast_path=fast_path)
    model = GEARSModel(cfg, NUM_GENES, NUM_PERTS, go_i, go_w, co_i, co_w)
    model.load_state_dict(_map_state(reference.state_dict(), uncertainty))
    return model


def _mlp(prefix_ref: str, prefix_ours: str, num_layers: int) -> dict[str, str]:
    # Reference MLP: Sequential(Linear, BN, ReLU, Linear, BN, ...): layer i at 3i, its BatchNorm at 3i + 1.
    out = {}
    for i in range(num_layers):
        for ref_idx, ours in ((3 * i, f"{prefix_ours}.linears.{i}"), (3 * i + 1, f"{prefix_ours}.norms.{i}")):
            out[f"{prefix_ref}.network.{ref_idx}"] = ours
    return out


def _name_map(uncertainty: bool) -> dict[str, str]:
    names = {
        "gene_emb": "gene_emb", "pert_emb": "pert_emb", "emb_pos": "coexpr_emb",
        "layers_emb_pos.0.lin": "coexpr_layers.0", "sim_layers.0.lin": "go_layers.0",
        "bn_emb": "bn_gene", "bn_pert_base": "bn_pert_base",
    }
    names.update(_mlp("emb_trans_v2", "gene_mlp", 2))
    names.update(_mlp("pert_fuse", "pert_fuse", 2))
    names.update(_mlp("recovery_w", "recovery", 2))
    names.update(_mlp("cross_gene_state", "cross_gene", 2))
    if uncertainty:
        names.update(_mlp("uncertainty_w", "uncertainty_head", 3))
    return names


# Reference parameters that its forward never uses (they break DDP); ours does not have them.
UNUSED_IN_REFERENCE = ("pert_w.", "bn_pert_base_trans.")
RESHAPED = {"indv_w1": "gene_w1", "indv_b1": "gene_b1", "indv_w2": "gene_w2", "indv_b2": "gene_b2"}


def _map_state(ref_state: dict, uncertainty: bool) -> dict:
    names = _name_map(uncertainty)
    out = {}
    for key, value in ref_state.items():
        if key.startswith(UNUSED_IN_REFERENCE):
            continue
        if key in RESHAPED:
            # w1 [G, h, 1] -> [G, h]; b1 [G, 1] -> [G]; w2 [1, G, h + 1] -> [G, h + 1]; b2 [1, G] -> [G]
            out[RESHAPED[key]] = value.reshape(NUM_GENES, -1).squeeze(-1) if key != "indv_w2" else value[0]
            continue
        module, leaf = key.rsplit(".", 1)
        out[f"{names[module]}.{leaf}"] = value
    return out


def _batch(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    num_cells = len(CELL_SETS)
    x = torch.rand(num_cells, NUM_GENES, generator=gen) * 2
    y = x + torch.randn(num_cells, NUM_GENES, generator=gen) * 0.3
    conditions = sorted(set(CELL_SETS), key=lambda s: (len(s), s))
    inverse = torch.tensor([conditions.index(s) for s in CELL_SETS])
    width = max(len(s) for s in conditions)
    perts = torch.full((len(conditions), width), -1, dtype=torch.long)
    for row, genes in enumerate(conditions):
        perts[row, : len(genes)] = torch.tensor(genes, dtype=torch.long)
    names = ["ctrl" if not s else "+".join(f"g{i}" for i in s) for s in conditions]
    gene_mask = torch.rand(len(conditions), NUM_GENES, generator=gen) > 0.25
    gene_mask[names.index("ctrl")] = True
    ctrl_mean = torch.rand(NUM_GENES, generator=gen) * 2
    ref_batch = Batch.from_data_list([
        Data(x=x[i].reshape(-1, 1), y=y[i].reshape(1, -1), pert_idx=list(CELL_SETS[i]) or [-1],
             pert=names[inverse[i]])
        for i in range(num_cells)
    ])
    return {"x": x, "y": y, "perts": perts, "inverse": inverse, "names": names, "gene_mask": gene_mask, "ctrl_mean": ctrl_mean,
                "ref_batch": ref_batch}


def _ref_loss(pred, y, batch, lam, logvar=None, reg=1.0):
    dict_filter = {name: np.where(batch["gene_mask"][i].numpy())[0] for i, name in enumerate(batch["names"])}
    perts = [batch["names"][i] for i in batch["inverse"].tolist()]
    if logvar is None:
        return ref_utils.loss_fct(pred, y, perts, ctrl=batch["ctrl_mean"], direction_lambda=lam,
                                  dict_filter=dict_filter)
    # The reference's uncertainty_loss_fct cannot run with autograd on CPU: it accumulates in place into a
    # leaf `torch.tensor(0., requires_grad=True).to(device)` (a copy, hence no leaf, only on CUDA). So its
    # value is taken under no_grad, and gradients are compared through a shared functional instead.
    with torch.no_grad():
        return ref_utils.uncertainty_loss_fct(pred, logvar, y, perts, reg=reg, ctrl=batch["ctrl_mean"],
                                              direction_lambda=lam, dict_filter=dict_filter)


def _max_diff(a, b) -> float:
    return (a.detach() - b.detach()).abs().max().item()


@pytest.mark.parametrize("uncertainty", [False, True])
@pytest.mark.parametrize("fast_path", ["off", "on"])
def test_train_mode_forward_loss_gradients_match_reference(uncertainty, fast_path):
    reference = _reference(uncertainty)
    ours = _ours(reference, "parity", uncertainty, fast_path)
    batch = _batch()
    reference.train()
    ours.train()
    lam = 0.1
    ref_out = reference(copy.deepcopy(batch["ref_batch"]))
    pred, logvar = ours(batch["x"], batch["perts"], batch["inverse"])
    loss_cfg = LossConfig(direction_lambda=lam, uncertainty_reg=0.7)
    if uncertainty:
        ref_pred, ref_logvar = ref_out
        assert _max_diff(logvar, ref_logvar) < TOL
        ref_loss = _ref_loss(ref_pred, batch["y"], batch, lam, ref_logvar, reg=0.7)
    else:
        ref_pred = ref_out
        assert logvar is None
        ref_loss = _ref_loss(ref_pred, batch["y"], batch, lam)
    assert _max_diff(pred, ref_pred) < TOL
    loss = gears_loss(pred, batch["y"], batch["inverse"], batch["gene_mask"], batch["ctrl_mean"], loss_cfg, logvar)
    assert abs(loss.item() - ref_loss.item()) < TOL * max(1.0, abs(ref_loss.item()))

    if uncertainty:
        probe = torch.randn(pred.shape, generator=torch.Generator().manual_seed(5))
        ref_objective = (ref_pred * probe).sum() + (ref_logvar * probe.flip(0)).sum()
        objective = (pred * probe).sum() + (logvar * probe.flip(0)).sum()
    else:
        ref_objective, objective = ref_loss, loss
    ref_objective.backward()
    objective.backward()
    ref_grads = _map_state({k: p.grad for k, p in reference.named_parameters() if p.grad is not None}, uncertainty)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, param in ours.named_parameters():
        assert name in ref_grads, f"{name} has no gradient in the reference"
        assert _max_diff(param.grad, ref_grads[name]) < 1e-4 * scale, name
    # The same BatchNorm running statistics after the step (embedding max-norm renormalization included).
    ref_state = _map_state(reference.state_dict(), uncertainty)
    for name, value in ours.state_dict().items():
        assert _max_diff(value.float(), ref_state[name].float()) < TOL, name


@pytest.mark.parametrize("uncertainty", [False, True])
def test_eval_mode_matches_reference(uncertainty):
    reference = _reference(uncertainty)
    ours = _ours(reference, "parity", uncertainty)
    batch = _batch()
    # One training step first so that the running statistics are not the initial ones.
    reference.train()
    ours.train()
    reference(copy.deepcopy(batch["ref_batch"]))
    ours(batch["x"], batch["perts"], batch["inverse"])
    reference.eval()
    ours.eval()
    with torch.no_grad():
        ref_out = reference(copy.deepcopy(batch["ref_batch"]))
        pred, logvar = ours(batch["x"], batch["perts"], batch["inverse"])
    ref_pred = ref_out[0] if uncertainty else ref_out
    assert _max_diff(pred, ref_pred) < TOL
    if uncertainty:
        assert _max_diff(logvar, ref_out[1]) < TOL
    # predict_delta in parity mode = the reference's prediction for a cell that is not first in its batch.
    delta = ours.predict_delta(batch["perts"])
    later = torch.arange(1, len(CELL_SETS))
    expected = ref_pred[later] - batch["x"][later]
    assert _max_diff(delta[batch["inverse"][later]], expected) < TOL


def test_intended_mode_differs_from_reference_only_by_the_coexpression_defect():
    """The reference applies its co-expression SGConv to the B*G nodes of a batch with the G-node edge list,
    so only cell 0 gets neighbour aggregation; every other cell's nodes see only their self-loop. 'intended'
    aggregates for every cell. In eval mode (no batch statistics) the first cell is therefore identical in
    both modes, and every other cell differs."""
    reference = _reference(False)
    intended = _ours(reference, "intended", False)
    batch = _batch()
    reference.eval()
    intended.eval()
    with torch.no_grad():
        ref_pred = reference(copy.deepcopy(batch["ref_batch"]))
        pred, _ = intended(batch["x"], batch["perts"], batch["inverse"])
    assert _max_diff(pred[0], ref_pred[0]) < TOL
    per_cell = (pred[1:] - ref_pred[1:]).abs().amax(1)
    assert bool((per_cell > 10 * TOL).all()), per_cell
    # In train mode the batch statistics of the gene MLP differ as well (its rows differ), so all cells move.
    reference.train()
    intended.train()
    ref_pred = reference(copy.deepcopy(batch["ref_batch"]))
    pred, _ = intended(batch["x"], batch["perts"], batch["inverse"])
    assert _max_diff(pred, ref_pred) > 10 * TOL


def test_reference_has_parameters_without_gradient_ours_has_none():
    reference = _reference(False)
    ours = _ours(reference, "intended", False)
    batch = _batch()
    reference.train()
    ours.train()
    reference(copy.deepcopy(batch["ref_batch"])).sum().backward()
    ours(batch["x"], batch["perts"], batch["inverse"])[0].sum().backward()
    unused = sorted(n for n, p in reference.named_parameters() if p.grad is None)
    assert unused == ["bn_pert_base_trans.bias", "bn_pert_base_trans.weight", "pert_w.bias", "pert_w.weight"]
    assert all(p.grad is not None for p in ours.parameters())
