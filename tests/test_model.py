"""GEARSModel: exact fast path, gradients for every parameter, GO halo restriction, prediction, bf16, inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from gears_dist.config import ConfigError, from_dict
from gears_dist.model import GEARSModel, LossConfig, ModelConfig, gears_loss
from gears_dist.model import gears as gears_module

G, P, H = 36, 22, 8


def random_graph(num_nodes: int, num_edges: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, num_nodes, (2, num_edges), generator=gen)
    return index, torch.rand(num_edges, generator=gen) + 0.1


def make_model(dtype=torch.float64, seed: int = 0, **cfg) -> GEARSModel:
    torch.manual_seed(seed)
    go_i, go_w = random_graph(P, 70, 1)
    co_i, co_w = random_graph(G, 90, 2)
    model = GEARSModel(ModelConfig(hidden_size=H, **cfg), G, P, go_i, go_w, co_i, co_w)
    return model.to(dtype)


def make_batch(dtype=torch.float64, seed: int = 3):
    """Sets of size 0 (control), 1, 2 and 3; several cells per set, cell 0 perturbed."""
    gen = torch.Generator().manual_seed(seed)
    perts = torch.tensor([[4, -1, -1], [-1, -1, -1], [1, 9, -1], [2, 5, 17], [7, -1, -1]])
    inverse = torch.tensor([0, 1, 2, 0, 3, 2, 1, 4, 2, 3, 0])
    num_cells = inverse.numel()
    x = torch.rand(num_cells, G, generator=gen, dtype=dtype)
    y = x + 0.3 * torch.randn(num_cells, G, generator=gen, dtype=dtype)
    mask = torch.rand(perts.shape[0], G, generator=gen) > 0.3
    mask[1] = True
    ctrl = torch.rand(G, generator=gen, dtype=dtype)
    return x, y, perts, inverse, mask, ctrl


def step(model: GEARSModel, batch, loss_cfg: LossConfig | None = None):
    loss_cfg = loss_cfg or LossConfig(direction="tanh")
    x, y, perts, inverse, mask, ctrl = batch
    model.zero_grad(set_to_none=True)
    pred, logvar = model(x, perts, inverse)
    loss = gears_loss(pred, y, inverse, mask, ctrl, loss_cfg, logvar)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return pred.detach(), (None if logvar is None else logvar.detach()), loss.detach(), grads


@pytest.mark.parametrize("mode", ["intended", "parity"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fast_path_equals_per_cell_path(mode, dtype, tol):
    batch = make_batch(dtype)
    per_cell = make_model(dtype, coexpr_mode=mode, uncertainty=True, fast_path="off").train()
    fast = copy.deepcopy(per_cell)
    fast.cfg.fast_path = "on"
    a, b = step(per_cell, batch), step(fast, batch)
    assert torch.allclose(a[0], b[0], rtol=0, atol=tol)
    assert torch.allclose(a[1], b[1], rtol=0, atol=tol)
    assert abs(a[2].item() - b[2].item()) <= tol * max(1.0, abs(a[2].item()))
    scale = max(g.abs().max().item() for g in a[3].values())
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        assert (a[3][name] - b[3][name]).abs().max().item() <= tol * scale, name
    # Same running statistics (the fast path weights BatchNorm rows by multiplicity).
    for (name, x), (_, y) in zip(per_cell.state_dict().items(), fast.state_dict().items()):
        assert torch.allclose(x.double(), y.double(), rtol=0, atol=tol), name


def test_auto_fast_path_follows_distinct_sets():
    model = make_model()
    assert model.use_fast_path(num_sets=3, num_cells=32)
    assert not model.use_fast_path(num_sets=32, num_cells=32)
    model.cfg.fast_path = "off"
    assert not model.use_fast_path(num_sets=3, num_cells=32)


@pytest.mark.parametrize("uncertainty", [False, True])
def test_every_parameter_receives_a_gradient(uncertainty):
    model = make_model(torch.float32, uncertainty=uncertainty).train()
    _, logvar, _, grads = step(model, make_batch(torch.float32))
    names = [n for n, _ in model.named_parameters()]
    assert set(grads) == set(names), sorted(set(names) - set(grads))
    assert any(n.startswith("uncertainty_head.") for n in names) == uncertainty
    assert (logvar is not None) == uncertainty
    # A batch of control cells only still gives every parameter a (zero) gradient: nothing DDP would flag.
    x, y, perts, _inverse, mask, ctrl = make_batch(torch.float32)
    only_ctrl = (x[:4], y[:4], perts[1:2], torch.zeros(4, dtype=torch.long), mask[1:2], ctrl)
    _, _, loss, grads = step(model, only_ctrl)
    assert torch.isfinite(loss) and set(grads) == set(names)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_combination_order_and_padding_do_not_matter():
    model = make_model().eval()
    a = model.predict_delta(torch.tensor([[2, 5, 17, -1], [9, 1, -1, -1]]))
    b = model.predict_delta(torch.tensor([[17, -1, 2, 5], [-1, 1, 9, -1]]))
    assert torch.allclose(a, b, atol=1e-12)


def test_predict_delta_is_eval_forward_minus_control(monkeypatch):
    for mode in ("intended", "parity"):
        model = make_model(coexpr_mode=mode, uncertainty=True).train()
        x, _y, perts, inverse, _mask, _ctrl = make_batch()
        model(x, perts, inverse)  # move the running statistics off their initial values
        model.eval()
        with torch.no_grad():
            pred, logvar = model(x, perts, inverse)
        # Chunk over sets (a tiny memory bound) to exercise the chunked loop.
        monkeypatch.setattr(gears_module, "_PREDICT_CHUNK_ELEMENTS", G * 16 * 2)
        delta, delta_logvar = model.predict_delta(perts, return_logvar=True)
        later = slice(1, None)  # in parity mode cell 0 is the reference's special first cell
        assert torch.allclose(delta[inverse][later], (pred - x)[later], atol=1e-10)
        assert torch.allclose(delta_logvar[inverse][later], logvar[later], atol=1e-10)
    with pytest.raises(RuntimeError, match="eval"):
        model.train().predict_delta(perts)


@pytest.mark.parametrize("num_go_layers", [1, 2])
def test_restricted_go_graph_is_exact_for_owned_perturbations(num_go_layers):
    full = make_model(num_go_layers=num_go_layers).train()
    part = copy.deepcopy(full)
    x, y, perts, inverse, mask, ctrl = make_batch()
    owned = perts[perts >= 0].unique()
    halo = part.restrict_go(owned)
    assert set(owned.tolist()) <= set(halo.tolist()) and halo.numel() < P
    a, b = step(full, (x, y, perts, inverse, mask, ctrl)), step(part, (x, y, perts, inverse, mask, ctrl))
    assert torch.allclose(a[0], b[0], atol=1e-10)
    for name in a[3]:
        assert torch.allclose(a[3][name], b[3][name], atol=1e-10), name
    # Restricting to nothing but the owned nodes themselves would not be exact: the halo matters.
    assert part.restrict_go(None) is None and part.go_halo is None


def test_bf16_autocast_runs_and_stays_close_to_float32():
    model = make_model(torch.float32, uncertainty=True).train()
    twin = copy.deepcopy(model)
    batch = make_batch(torch.float32)
    ref = step(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = step(twin, batch)
    assert low[0].dtype == torch.float32 and torch.isfinite(low[2])
    rel = (low[0] - ref[0]).abs().max() / ref[0].abs().max()
    assert rel < 0.05, rel
    assert all(b.dtype == torch.float32 for n, b in twin.state_dict().items() if "running" in n)


def test_loss_matches_a_loop_over_conditions():
    _x, y, _perts, inverse, mask, ctrl = make_batch()
    gen = torch.Generator().manual_seed(9)
    pred = y + 0.5 * torch.randn(y.shape, generator=gen, dtype=y.dtype)
    logvar = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    cfg = LossConfig(direction_lambda=0.3, uncertainty_reg=0.5)
    # Slow, obvious form: one term per condition present in the batch.
    terms = []
    for c in inverse.unique().tolist():
        cells = (inverse == c).nonzero().flatten()
        genes = mask[c].nonzero().flatten()
        p, t, lv = pred[cells][:, genes], y[cells][:, genes], logvar[cells][:, genes]
        err = (p - t) ** 4 * (1 + 0.5 * torch.exp(-lv))
        direction = (torch.sign(t - ctrl[genes]) - torch.sign(p - ctrl[genes])) ** 2
        terms.append((err + 0.3 * direction).sum() / (len(cells) * len(genes)))
    expected = torch.stack(terms).mean()
    got = gears_loss(pred, y, inverse, mask, ctrl, cfg, logvar)
    assert torch.allclose(got, expected, atol=1e-12)
    # A condition row that no cell uses does not count in the average.
    padded_mask = torch.cat([mask, torch.ones(1, G, dtype=torch.bool)])
    assert torch.allclose(gears_loss(pred, y, inverse, padded_mask, ctrl, cfg, logvar), expected, atol=1e-12)


def test_direction_term_sign_has_no_gradient_tanh_has_one():
    _x, y, _perts, inverse, mask, ctrl = make_batch()
    pred = y.clone().requires_grad_()  # autofocus term and its gradient are zero at pred == y
    with torch.no_grad():
        pred += 0.05
    for form, expect_grad in (("sign", False), ("tanh", True)):
        pred.grad = None
        gears_loss(pred, y, inverse, mask, ctrl, LossConfig(gamma=2.0, direction=form), None).backward()
        has = bool(pred.grad.abs().max() > 1e-3)
        assert has == expect_grad, form


def test_config_validation_and_yaml_types():
    cfg = from_dict(ModelConfig, {"hidden_size": 32, "recovery_hidden_sizes": [48, 40], "coexpr_mode": "parity"})
    assert cfg.recovery_sizes == [32, 48, 40, 32]
    model = GEARSModel(cfg, G, P, *random_graph(P, 30, 1), *random_graph(G, 30, 2))
    assert [lin.in_features for lin in model.recovery.linears] == [32, 48, 40]
    with pytest.raises(ConfigError, match="fast_path"):
        from_dict(ModelConfig, {"fast_path": "sometimes"})
    with pytest.raises(ConfigError, match="hidden_size"):
        from_dict(ModelConfig, {"hidden_size": 0})
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(LossConfig, {"gama": 2.0})
    with pytest.raises(ConfigError, match="direction"):
        from_dict(LossConfig, {"direction": "cosine"})


def test_bad_inputs_name_the_problem():
    model = make_model()
    x, y, perts, inverse, mask, ctrl = make_batch()
    with pytest.raises(ValueError, match=r"x must have shape \[B, 36\]"):
        model(x[:, :5], perts, inverse)
    with pytest.raises(TypeError, match="perts must be a LongTensor"):
        model(x, perts.float(), inverse)
    with pytest.raises(TypeError, match="inverse"):
        model(x, perts, inverse[:3])
    with pytest.raises(ValueError, match="node ids outside"):
        GEARSModel(ModelConfig(hidden_size=H), G, P, torch.tensor([[0], [P]]), None, *random_graph(G, 5, 2))
    with pytest.raises(ValueError, match="restrict_go"):
        model.restrict_go(torch.tensor([P + 3]))
    with pytest.raises(TypeError, match="gene_mask"):
        gears_loss(x, y, inverse, mask.float(), ctrl, LossConfig())


def test_bf16_parameters_as_deepspeed_casts_them():
    """DeepSpeed's bf16 mode casts parameters and buffers to bf16 (no autocast); the model must run so."""
    model = make_model(torch.float32, uncertainty=True).to(torch.bfloat16).train()
    x, y, perts, inverse, mask, ctrl = make_batch(torch.float32)
    pred, logvar = model(x.bfloat16(), perts, inverse)
    loss = gears_loss(pred, y, inverse, mask, ctrl, LossConfig(), logvar)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def _trained_for_eval(dtype, **cfg) -> GEARSModel:
    """A model whose running BatchNorm statistics and affine parameters are off their initial values."""
    model = make_model(dtype, **cfg).train()
    x, _y, perts, inverse, _mask, _ctrl = make_batch(dtype)
    with torch.no_grad():
        for _ in range(3):
            model(x, perts, inverse)
        for name, p in model.named_parameters():
            if ".norms." in name or name.startswith(("bn_", "gene_b")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("uncertainty", [False, True])
@pytest.mark.parametrize("mode", ["intended", "parity"])
@pytest.mark.parametrize("recovery_hidden", [None, [12, 10]])
def test_folded_prediction_equals_layer_by_layer(mode, uncertainty, recovery_hidden):
    """predict_delta's folded decoder (BatchNorms into Linears, last Linear + BatchNorm into the per-gene map)
    computes the same function as running the eval layers one by one: float64/float32 to rounding, and under
    bf16 autocast as close to float32 as the unfolded bf16 computation is."""
    perts = make_batch()[2]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model = _trained_for_eval(dtype, coexpr_mode=mode, uncertainty=uncertainty,
                                  recovery_hidden_sizes=recovery_hidden)
        folded = model.predict_delta(perts, return_logvar=True, fold=True)
        plain = model.predict_delta(perts, return_logvar=True, fold=False)
        for a, b in zip(folded, plain):
            if b is None:
                assert a is None
                continue
            assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())
    exact = plain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded = model.predict_delta(perts, return_logvar=True, fold=True)
        plain = model.predict_delta(perts, return_logvar=True, fold=False)
    for a, b, ref in zip(folded, plain, exact):
        if ref is None:
            continue
        assert a.dtype == torch.float32
        err_folded, err_plain = (a - ref).abs().max().item(), (b - ref).abs().max().item()
        assert err_folded <= 2.0 * err_plain + 1e-2 * ref.abs().max().item(), (err_folded, err_plain)


def test_folded_prediction_with_bf16_parameters():
    """DeepSpeed-style bf16 parameters: the folded maps are computed in float32 and predictions stay close."""
    model = _trained_for_eval(torch.float32, uncertainty=True)
    perts = make_batch()[2]
    exact = model.predict_delta(perts, fold=False)
    low = copy.deepcopy(model).to(torch.bfloat16)
    folded = low.predict_delta(perts, fold=True)
    plain = low.predict_delta(perts, fold=False)
    err_folded, err_plain = (folded.float() - exact).abs().max().item(), (plain.float() - exact).abs().max().item()
    assert err_folded <= 2.0 * err_plain + 2e-2 * exact.abs().max().item(), (err_folded, err_plain)


def test_fused_group_moments_equal_autograd_through_centring(monkeypatch):
    """layers._GroupMoments (one-pass backward) gives the statistics and gradients of autograd through x - pivot,
    its square and the sums; weights include 0 and one group of weight 5."""
    from gears_dist.model import layers

    gen = torch.Generator().manual_seed(4)
    weight = torch.tensor([1.0, 5.0, 0.0, 2.0], dtype=torch.float64)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(layers, "FUSED_MOMENTS", fused)
        x = (3.0 * torch.randn(9, 4, 6, generator=gen.manual_seed(4), dtype=torch.float64) + 5.0).requires_grad_()
        count, s1, s2, pivot = layers.group_sums(x, weight)
        mean = s1 / count + pivot
        var = s2 / count - (s1 / count) ** 2
        (mean.sin().sum() + var.cos().sum()).backward()
        results[fused] = (mean.detach(), var.detach(), x.grad)
    for a, b in zip(results[True], results[False]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
