"""The GO-neighbour prior and prior-anchored GEARS: no leakage, sets of 1-3 genes, output = prior at init."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gears_dist.config import ConfigError, from_dict
from gears_dist.graphs.graph import GeneGraph
from gears_dist.model import GEARSModel, ModelConfig
from gears_dist.model.prior import NUM_TAU_BAGS, TAU_GRID, SetPrior, fit_go_prior

NODES = [f"N{i}" for i in range(8)]
NUM_GENES = 12


def _graph() -> GeneGraph:
    # A ring with chords: every node has 2-4 in-neighbours of different Jaccard weights, plus self loops.
    edges = {}
    for i in range(8):
        for j, w in (((i + 1) % 8, 0.5), ((i + 7) % 8, 0.4), ((i + 3) % 8, 0.2)):
            edges[j, i] = w
    src = [s for s, _ in edges] + list(range(8))
    dst = [d for _, d in edges] + list(range(8))
    weight = list(edges.values()) + [1.0] * 8
    return GeneGraph(NODES, np.array([src, dst]), np.array(weight, np.float32))


def _fit(single_genes=("N0", "N1", "N2", "N4", "N5"), seed=0, additive_doubles=False, **kw):
    rng = np.random.default_rng(seed)
    deltas = rng.normal(size=(len(single_genes), NUM_GENES))
    doubles = [("N0", "N1"), ("N2", "N4")]
    double_deltas = rng.normal(size=(2, NUM_GENES))
    if additive_doubles:  # nothing can beat the additive model inside sets of trained genes
        row = {g: d for g, d in zip(single_genes, deltas)}
        double_deltas = np.stack([row[a] + row[b] for a, b in doubles])
    mean = np.concatenate([deltas, double_deltas]).mean(0)
    fit = fit_go_prior(_graph(), list(single_genes), deltas, mean, doubles, double_deltas, **kw)
    fit.inputs = (doubles, double_deltas)
    return fit, dict(zip(single_genes, deltas)), mean


def _go_estimate(fit, node: int, exclude: str | None, singles: dict, mean: np.ndarray) -> np.ndarray:
    """lambda * (weighted mean of the top-k trained neighbours) - m, from the graph directly."""
    g = _graph()
    src, dst = g.edge_index
    cand = sorted(((float(w), NODES[s]) for s, d, w in zip(src, dst, g.edge_weight)
                   if d == node and s != node and NODES[s] in singles and NODES[s] != exclude), reverse=True)[:fit.k]
    if not cand:
        return np.zeros(NUM_GENES)
    total = sum(w for w, _ in cand)
    # lambda: the mean over the bagged taus of W / (W + tau) (one tau when it was given)
    lam = np.mean([1.0 if t == 0 else (0.0 if np.isinf(t) else total / (total + t)) for t in fit.taus])
    return lam * sum(w * (singles[n] - mean) for w, n in cand) / total


@pytest.mark.parametrize("k,tau", [(2, 0.0), (3, 0.3), (5, np.inf)])
def test_prior_on_sets_of_one_two_and_three_genes(k, tau):
    fit, singles, m = _fit(k=k, tau=tau, additive_doubles=True)
    assert fit.combo_source == "none"
    dev = {n: singles[n] - m if n in singles else _go_estimate(fit, i, None, singles, m) for i, n in enumerate(NODES)}
    sets = [[], [0], [3], [0, 1], [0, 3], [3, 6], [0, 1, 2], [3, 6, 7], [0, 3, 6]]
    got = fit.predict_delta(sets)
    for s, row in zip(sets, got):
        names = [NODES[i] for i in s]
        if not s:
            want = np.zeros(NUM_GENES)
        elif len(s) == 1 or any(n in singles for n in names):
            want = len(s) * m + sum(dev[n] for n in names)          # observed singles summed where trained
        else:
            want = m + fit.beta_unseen * sum(dev[n] for n in names)  # no trained gene: m counted once
        np.testing.assert_allclose(row, want, atol=1e-5, err_msg=str(names))
    # a set of trained singles is the additive prediction exactly
    np.testing.assert_allclose(got[3], singles["N0"] + singles["N1"], atol=1e-5)


def test_cross_fitted_prior_never_uses_a_training_conditions_own_data():
    fit, singles, m = _fit(k=3, tau=0.1)
    prior = SetPrior(fit)
    perts = torch.tensor([[0, -1], [1, -1], [0, 1]])
    # Structure: a trained single's leave-one-out row never points at its own delta.
    for name, row in zip(fit.single_genes, range(len(fit.single_genes))):
        assert row not in fit.loo_index[NODES.index(name)].tolist()
    before = prior(perts, cross_fit=True)
    # Changing N0's own delta (its cells) must not move N0's training prior; N1's, a neighbour's, may move.
    changed = dict(singles)
    changed["N0"] = singles["N0"] + 5.0
    fit2 = fit_go_prior(_graph(), list(changed), np.stack(list(changed.values())), m, *fit.inputs, k=3, tau=0.1)
    after = SetPrior(fit2)(perts, cross_fit=True)
    torch.testing.assert_close(after[0], before[0])
    np.testing.assert_allclose(before[0].numpy(), m + _go_estimate(fit, 0, "N0", singles, m), atol=1e-5)
    # A training double's prior is the sum of its observed singles (its own cells are not used).
    np.testing.assert_allclose(before[2].numpy(), singles["N0"] + singles["N1"], atol=1e-5)
    # Outside training the trained single is its observed delta.
    np.testing.assert_allclose(prior(perts)[0].numpy(), singles["N0"], atol=1e-5)


def test_hyperparameters_are_fitted_leave_one_out_and_low_rank_is_close():
    fit, singles, m = _fit(additive_doubles=True)
    assert fit.k in (5, 10, 20) and np.isfinite(fit.loo_mse) and 0.0 <= fit.beta_unseen <= 1.0
    low = _fit(max_exact_mb=0.0, rank=2, additive_doubles=True)[0]
    assert low.basis is not None and low.rows.shape == (5, 2)
    exact = fit.predict_delta([[0], [3, 6]])
    approx = low.predict_delta([[0], [3, 6]])
    assert np.abs(exact - approx).max() < np.abs(exact).max()  # a rank-2 view of 5 deltas: close, not equal


def _model_with_prior(seed=0, gain=False, gene_symbols=None) -> tuple[GEARSModel, SetPrior]:
    torch.manual_seed(seed)
    g = _graph()
    ei, ew = g.to_torch()
    co = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    model = GEARSModel(ModelConfig(hidden_size=8, prior="go", prior_gain=gain), NUM_GENES, len(NODES), ei, ew, co,
                       None)
    fit = _fit(k=3, tau=0.1, gene_symbols=gene_symbols)[0]
    prior = SetPrior(fit)
    model.attach_prior(prior)
    return model, prior


@pytest.mark.parametrize("gain", [False, True])
def test_prior_anchored_model_starts_exactly_at_the_prior(gain):
    model, prior = _model_with_prior(gain=gain)
    perts = torch.tensor([[-1, -1], [0, -1], [3, -1], [0, 1], [3, 6]])
    inverse = torch.tensor([0, 1, 2, 3, 4, 4, 1])
    x = torch.rand(inverse.numel(), NUM_GENES)
    pred, _ = model(x, perts, inverse)  # training mode: the cross-fitted prior
    torch.testing.assert_close(pred, x + prior(perts, cross_fit=True)[inverse])
    model.eval()
    torch.testing.assert_close(model.predict_delta(perts), prior(perts))
    # and the network can move it: after a step the output differs from the prior
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pred, _ = model(x, perts, inverse)
    ((pred - x - 1.0) ** 2).mean().backward()
    opt.step()
    model.eval()
    assert not torch.allclose(model.predict_delta(perts), prior(perts))


def test_saved_prior_reloads_and_config_is_validated():
    model, prior = _model_with_prior()
    state = model.state_dict()
    assert {k for k in state if k.startswith("prior.")} == {f"prior.{b}" for b in SetPrior.BUFFERS}
    g = _graph()
    ei, ew = g.to_torch()
    fresh = GEARSModel(ModelConfig(hidden_size=8, prior="go"), NUM_GENES, len(NODES), ei, ew,
                       torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]]), None)
    fresh.attach_prior(SetPrior.from_state_dict(state))
    fresh.load_state_dict(state)
    perts = torch.tensor([[0, 5], [2, -1]])
    torch.testing.assert_close(fresh.eval().predict_delta(perts), model.eval().predict_delta(perts))
    # A prior saved before the combination mean existed reloads with m in its place, and predicts as it did.
    old = {k: v for k, v in state.items() if k != "prior.combo_mean"}
    older = SetPrior.from_state_dict(old)
    older.load_state_dict({k[len("prior."):]: v for k, v in old.items() if k.startswith("prior.")})
    torch.testing.assert_close(older.combo_mean, prior.mean_delta)
    with pytest.raises(RuntimeError, match="attach_prior"):
        GEARSModel(ModelConfig(hidden_size=8, prior="go"), NUM_GENES, len(NODES), ei, ew,
                   torch.tensor([[0], [1]]), None).eval().predict_delta(perts)
    with pytest.raises(ConfigError, match="prior"):
        from_dict(ModelConfig, {"prior": "knn"}).validate()
    with pytest.raises(ValueError, match="prior"):
        SetPrior.from_state_dict({})


def test_the_choice_of_tau_is_bagged_over_resamples_of_the_training_singles():
    # Singles whose profiles vary smoothly around the ring (neighbours alike) plus noise: the leave-one-out
    # evidence for tau is mixed, as on a real screen's dozen singles.
    rng = np.random.default_rng(0)
    genes = ["N0", "N1", "N2", "N4", "N5", "N6"]
    phase = rng.uniform(0, 2 * np.pi, NUM_GENES)
    deltas = np.stack([np.cos(2 * np.pi * int(g[1:]) / 8 + phase) for g in genes])
    deltas += 0.6 * rng.normal(size=deltas.shape)
    m = deltas.mean(0)
    fit = fit_go_prior(_graph(), genes, deltas, m)
    assert len(fit.taus) == NUM_TAU_BAGS and set(fit.taus.tolist()) <= set(TAU_GRID)
    assert len(set(fit.taus.tolist())) > 1 and fit.tau in fit.taus   # mixed evidence; the full-data choice among them
    np.testing.assert_array_equal(fit_go_prior(_graph(), genes, deltas, m).taus, fit.taus)   # seeded
    # An unseen gene's shrinkage is the mean of the bagged factors, not the full-data tau's.
    singles = dict(zip(genes, deltas))
    np.testing.assert_allclose(fit.predict_delta([[3]])[0], m + _go_estimate(fit, 3, None, singles, m), atol=1e-5)
    fixed = fit_go_prior(_graph(), genes, deltas, m, k=fit.k, tau=fit.tau)
    assert not np.allclose(fixed.predict_delta([[3]])[0], fit.predict_delta([[3]])[0], atol=1e-4)


def test_estimated_flags_follow_what_the_prior_knows():
    fit, singles, _ = _fit(k=3, tau=0.1)
    prior = SetPrior(fit)
    perts = torch.tensor([[0, -1, -1], [3, -1, -1], [0, 1, -1], [0, 3, -1], [3, 6, 7]])
    # N0, N1 trained (observed); N3, N6, N7 not (GO estimates)
    assert prior.estimated(perts).tolist() == [[False, False, False], [True, False, False], [False, False, False],
                                               [False, True, False], [True, True, True]]
    # while training, a one-gene set gets its leave-one-out estimate: flagged as estimated too
    assert prior.estimated(perts, cross_fit=True)[0].tolist() == [True, False, False]
    assert prior.estimated(perts, cross_fit=True)[2].tolist() == [False, False, False]


def test_low_rank_factorization_recovers_a_low_rank_matrix():
    from gears_dist.model.linear import low_rank

    rng = np.random.default_rng(3)
    a = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 40))
    rows, basis = low_rank(a, 3, rng)
    assert rows.shape == (60, 3) and basis.shape == (3, 40)
    np.testing.assert_allclose(rows @ basis, a, atol=1e-8)


def test_pairs_cross_fitted_as_unseen_get_the_unseen_prior_and_flags():
    fit, singles, m = _fit(k=3, tau=0.1)
    prior = SetPrior(fit)
    perts = torch.tensor([[0, 1], [0, 3], [3, 6]])        # trained pair, seen1 pair, unseen pair
    assert prior.trained_sets(perts).tolist() == [True, False, False]
    as_unseen = torch.tensor([True, False, False])
    got = prior(perts, cross_fit=True, as_unseen=as_unseen)
    dev = [_go_estimate(fit, i, NODES[i], singles, m) for i in (0, 1)]  # each gene's leave-one-out estimate
    np.testing.assert_allclose(got[0].numpy(), m + fit.beta_unseen * (dev[0] + dev[1]), atol=1e-5)
    torch.testing.assert_close(got[1:], prior(perts, cross_fit=True)[1:])
    assert prior.estimated(perts, True, as_unseen)[0].tolist() == [True, True]
    assert prior.estimated(perts, True)[0].tolist() == [False, False]
    # the model draws such sets only while training, at the configured rate
    model, _ = _model_with_prior()
    model.cfg.prior_crossfit_pairs = 1.0
    assert model._draw_unseen_sets(perts).tolist() == [True, False, False]
    model.eval()
    assert model._draw_unseen_sets(perts) is None


def test_gene_seen_only_in_combinations_gets_the_additive_remainder_and_no_leak():
    # N3 has no training single; it is in the training doubles N0+N3 and N3+N6 (N6 untrained too).
    rng = np.random.default_rng(3)
    singles = {n: rng.normal(size=NUM_GENES) for n in ("N0", "N1", "N2", "N4", "N5")}
    doubles = [("N0", "N3"), ("N3", "N6")]
    double_deltas = rng.normal(size=(2, NUM_GENES))
    double_deltas[0] = singles["N0"] + 0.5 * double_deltas[0]  # N0 acts in its pair much as alone
    m = np.concatenate([np.stack(list(singles.values())), double_deltas]).mean(0)
    fit = fit_go_prior(_graph(), list(singles), np.stack(list(singles.values())), m, doubles, double_deltas,
                       k=3, tau=0.1)
    assert fit.derived.tolist() == [n in ("N3", "N6") for n in NODES]
    est = {n: m + _go_estimate(fit, NODES.index(n), None, singles, m) for n in ("N3", "N6")}
    # N3: the mean of what each of its doubles leaves after its partner: after an observed single as is; after a
    # GO-estimated partner (N6) blended with N3's own GO estimate by lambda, fitted where the answer is known:
    # N0's remainder in N0+N3 after N3's GO estimate, against N0's observed single (least squares, in [0, 1]).
    r = double_deltas[0] - est["N3"]
    e = m + _go_estimate(fit, 0, "N0", singles, m)
    lam = float(np.clip((r - e) @ (singles["N0"] - e) / ((r - e) @ (r - e)), 0, 1))
    assert 0 < lam < 1
    want_n3 = ((double_deltas[0] - singles["N0"]) + lam * (double_deltas[1] - est["N6"]) + (1 - lam) * est["N3"]) / 2
    got = fit.predict_delta([[3], [0, 3], [3, 7], [3, 6]])
    np.testing.assert_allclose(got[0], want_n3, atol=1e-5)
    np.testing.assert_allclose(got[1], singles["N0"] + want_n3, atol=1e-5)   # a seen pair: additive
    # N3 (derived) beside N7 (GO-estimated only): no trained single anchors the pair, so it is an unseen set,
    # m_c + beta (dev N3 + dev N7), m_c the training combinations' mean delta (what N3 was seen in); both genes
    # derived (N3 + N6): a seen pair, additive over the derived deltas.
    dev7 = _go_estimate(fit, 7, None, singles, m)
    m_c = double_deltas.mean(0)
    np.testing.assert_allclose(fit.combo_mean, m_c)
    np.testing.assert_allclose(got[2], m_c + fit.beta_unseen * (want_n3 - m + dev7), atol=1e-5)
    assert not np.allclose(got[2], want_n3 + m + dev7, atol=1e-3)
    assert not np.allclose(m_c, m, atol=1e-3)
    want_n6 = fit.predict_delta([[6]])[0]
    np.testing.assert_allclose(got[3], want_n3 + want_n6, atol=1e-5)
    # Training (cross-fitted): a derived gene takes its GO estimate, so N0+N3's prior ignores its own cells.
    prior = SetPrior(fit)
    train_pair = torch.tensor([[0, 3]])
    np.testing.assert_allclose(prior(train_pair, cross_fit=True)[0].numpy(), singles["N0"] + est["N3"], atol=1e-5)
    assert prior.estimated(train_pair, cross_fit=True).tolist() == [[False, True]]
    # ... and a set of a derived and a GO-estimated gene keeps m while training: m_c holds the training
    # combinations' own deltas.
    unanchored = torch.tensor([[3, 7]])
    np.testing.assert_allclose(prior(unanchored, cross_fit=True)[0].numpy(),
                               m + fit.beta_unseen * (est["N3"] - m + dev7), atol=1e-5)
    assert prior.estimated(train_pair).tolist() == [[False, False]]
    fit2 = fit_go_prior(_graph(), list(singles), np.stack(list(singles.values())), m, doubles,
                        double_deltas + np.array([[5.0], [0.0]]), k=3, tau=0.1)
    torch.testing.assert_close(SetPrior(fit2)(train_pair, cross_fit=True), prior(train_pair, cross_fit=True))


def test_prior_members_sum_to_the_prior_and_gains_scale_each_member():
    model, prior = _model_with_prior(gain=True)
    perts = torch.tensor([[-1, -1, -1], [0, -1, -1], [3, -1, -1], [0, 1, -1], [3, 6, -1], [0, 3, 6], [3, 6, 7]])
    for cross_fit in (False, True):
        parts = prior.members(perts, cross_fit=cross_fit)
        torch.testing.assert_close(parts.sum(1), prior(perts, cross_fit=cross_fit))
        assert (parts[perts < 0] == 0).all()
    # A gain of g on every gene's part (bias only) scales the whole prior by 1 + g; padding gets none. With
    # prior_residual 'observed' (the default) only sets without a GO-estimated gene get it.
    with torch.no_grad():
        model.gain_mlp[-1].bias.fill_(0.5)
    model.eval()
    observed = ~prior.estimated(perts).any(1)
    assert observed.tolist() == [True, True, False, True, False, False, False]
    torch.testing.assert_close(model.predict_delta(perts),
                               torch.where(observed.unsqueeze(1), 1.5 * prior(perts), prior(perts)))
    with pytest.raises(ConfigError, match="prior_gain"):
        from_dict(ModelConfig, {"prior_gain": True}).validate()


def test_combination_deltas_are_fitted_leave_one_out_and_used_only_for_seen_sets():
    from gears_dist.model.prior import _combination_deltas

    rng = np.random.default_rng(5)
    d = {g: rng.normal(size=NUM_GENES) for g in ("N0", "N1", "N2", "N4")}
    shift = rng.normal(size=NUM_GENES)  # N0 acts the same way differently in every pair: learnable
    combos = [("N0", "N1"), ("N0", "N2"), ("N0", "N4")]
    deltas = np.stack([d[a] + d[b] + shift for a, b in combos])
    rows, w, source = _combination_deltas(combos, deltas, d, set(d), rng)
    assert source == "combination" and np.isfinite(w) and set(rows) == {"N0", "N1", "N2", "N4"}
    # N0's combination delta: (w d + sum of what each pair leaves after its partner) / (w + 3)
    np.testing.assert_allclose(rows["N0"], (w * d["N0"] + 3 * (d["N0"] + shift)) / (w + 3))
    # Exactly additive pairs: the evidence cannot help, so the additive model (w = inf) stays.
    assert _combination_deltas(combos, deltas - shift, d, set(d), rng) == ({}, np.inf, "none")

    fit = fit_go_prior(_graph(), list(d), np.stack(list(d.values())), np.zeros(NUM_GENES), combos, deltas,
                       k=3, tau=0.1)
    assert fit.combo_source == "combination" and fit.combo_weight == w and (fit.combo_index >= 0).sum() == 4
    prior = SetPrior(fit)
    pair = torch.tensor([[1, 2]])  # N1+N2, not a training pair: each gene's combination delta
    np.testing.assert_allclose(prior(pair)[0].numpy(), rows["N1"] + rows["N2"], atol=1e-5)
    np.testing.assert_allclose(prior(torch.tensor([[1, -1]]))[0].numpy(), d["N1"], atol=1e-5)   # a single: its own
    # Training (cross-fitted): the plain singles, so a training pair never sees its own cells.
    np.testing.assert_allclose(prior(torch.tensor([[0, 1]]), cross_fit=True)[0].numpy(), d["N0"] + d["N1"],
                               atol=1e-5)


@pytest.mark.parametrize("residual", ["observed", "all"])
def test_residual_only_on_sets_of_observed_genes(residual):
    torch.manual_seed(0)
    g = _graph()
    ei, ew = g.to_torch()
    model = GEARSModel(ModelConfig(hidden_size=8, prior="go", prior_residual=residual), NUM_GENES, len(NODES), ei, ew,
                       torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]]), None)
    prior = SetPrior(_fit(k=3, tau=0.1)[0])
    model.attach_prior(prior)
    with torch.no_grad():
        model.gene_b2.fill_(0.3)  # a network that outputs something everywhere
    perts = torch.tensor([[0, -1], [3, -1], [0, 1], [0, 3], [3, 6]])  # N0, N1 trained; N3, N6 GO estimates
    moved = (model.eval().predict_delta(perts) - prior(perts)).abs().amax(1) > 0.1
    want = [True, False, True, False, False] if residual == "observed" else [True] * 5
    assert moved.tolist() == want
    # Training: a single is cross-fitted (its GO estimate), so only the pair of trained genes trains the network.
    model.train()
    x = torch.zeros(5, NUM_GENES)
    pred, _ = model(x, perts, torch.arange(5))
    moved = (pred - prior(perts, cross_fit=True)).abs().amax(1) > 0.1
    assert moved.tolist() == ([False, False, True, False, False] if residual == "observed" else [True] * 5)


def test_gains_leave_the_targets_own_expression_alone():
    # Genes N0, N3 and N6 are measured (columns 4, 0 and 11); a perturbation sets its target's own expression.
    symbols = [f"G{j}" for j in range(NUM_GENES)]
    symbols[4], symbols[0], symbols[11] = "N0", "N3", "N6"
    model, prior = _model_with_prior(gain=True, gene_symbols=symbols)
    assert prior.node_column[[0, 3, 6, 1]].tolist() == [4, 0, 11, -1]
    perts = torch.tensor([[0, -1], [0, 1], [3, 6], [1, 2]])
    own = prior.own_columns(perts, NUM_GENES)
    assert [torch.nonzero(r).flatten().tolist() for r in own] == [[4], [4], [0, 11], []]
    with torch.no_grad():
        model.gain_mlp[-1].bias.fill_(0.5)
    model.eval()
    observed = ~prior.estimated(perts).any(1)
    base = prior(perts)
    scale = torch.where(observed.unsqueeze(1) & ~own, 1.5, 1.0)
    torch.testing.assert_close(model.predict_delta(perts), scale * base)
    assert observed[1] and not own[1, 0]  # a set that is scaled, outside its target's column


def test_linear_responses_win_where_singles_are_noisy_views_of_a_low_rank_world():
    """Doubles additive in a rank-2 truth, every profile observed with noise: the linear model's responses
    (denoised in its principal directions, fitted to every training condition) predict held-out doubles
    better than the noisy sums, so the prior uses them inside sets of trained genes, and there it equals the
    `linear` baseline fitted on the same training conditions."""
    from gears_dist.evaluate.baselines import LinearPCA, TrainingProfiles
    from gears_dist.model.prior import _combination_deltas

    rng = np.random.default_rng(11)
    num_genes = 80
    truth = {g: rng.normal(size=2) @ rng.normal(size=(2, num_genes)) for g in NODES[:6]}
    noisy = {g: t + 0.6 * rng.normal(size=num_genes) for g, t in truth.items()}
    combos = [("N0", "N1"), ("N0", "N2"), ("N1", "N3"), ("N2", "N4"), ("N3", "N5"), ("N4", "N5"), ("N1", "N4")]
    deltas = np.stack([truth[a] + truth[b] + 0.6 * rng.normal(size=num_genes) for a, b in combos])
    singles = list(noisy)
    rows, w, source = _combination_deltas(combos, deltas, noisy, set(noisy), rng,
                                          linear_data=(singles, np.stack(list(noisy.values())), []))
    assert source == "linear" and not np.isfinite(w) and set(rows) == set(noisy)

    fit = fit_go_prior(_graph(), singles, np.stack(list(noisy.values())), np.zeros(num_genes), combos, deltas,
                       k=3, tau=0.1)
    assert fit.combo_source == "linear" and (fit.combo_index >= 0).sum() == 6
    train = TrainingProfiles(perts=[(g,) for g in singles] + combos,
                             means=np.concatenate([np.stack(list(noisy.values())), deltas]),
                             control_mean=np.zeros(num_genes), gene_symbols=[f"x{j}" for j in range(num_genes)])
    baseline = LinearPCA(train, embedding="training")
    prior = SetPrior(fit)
    pair = torch.tensor([[0, 3]])  # N0+N3: both trained, not a training pair
    np.testing.assert_allclose(prior(pair)[0].numpy(), baseline([("N0", "N3")])[0], atol=1e-4)
    # a single keeps its observed delta, and training (cross-fitted) pairs their observed singles
    np.testing.assert_allclose(prior(torch.tensor([[0, -1]]))[0].numpy(), noisy["N0"], atol=1e-5)
    np.testing.assert_allclose(prior(pair, cross_fit=True)[0].numpy(), noisy["N0"] + noisy["N3"], atol=1e-5)


def test_linear_responses_keep_the_targets_own_columns_additive():
    """Pairs that buffer each other downstream (half their sum) while each target's own column is set by its
    perturbation: the linear responses fitted to them stay at the observed singles on the targets' columns, so a
    pair of trained genes is additive there, and only downstream carries the fitted sub-additivity."""
    from gears_dist.model.prior import _combination_deltas, _fit_linear_deltas

    rng = np.random.default_rng(12)
    num_genes = 60
    symbols = NODES[:6] + [f"x{j}" for j in range(num_genes - 6)]
    truth = {g: rng.normal(size=2) @ rng.normal(size=(2, num_genes)) for g in NODES[:6]}
    for j, g in enumerate(NODES[:6]):
        truth[g][j] = 5.0                                   # the target's own expression
    noisy = {g: t + 0.3 * rng.normal(size=num_genes) for g, t in truth.items()}
    combos = [("N0", "N1"), ("N0", "N2"), ("N1", "N3"), ("N2", "N4"), ("N3", "N5"), ("N4", "N5"), ("N1", "N4")]
    deltas = []
    for a, b in combos:
        d = 0.5 * (truth[a] + truth[b])
        d[[NODES.index(a), NODES.index(b)]] = 5.0
        deltas.append(d + 0.3 * rng.normal(size=num_genes))
    deltas = np.stack(deltas)
    singles = list(noisy)
    fit = _fit_linear_deltas(singles, np.stack(list(noisy.values())), combos, deltas, range(len(combos)), symbols)
    for j, g in enumerate(singles):
        np.testing.assert_allclose(fit.responses[fit.vocab[g], :6], noisy[g][:6])
    pair = fit.responses[fit.vocab["N0"]] + fit.responses[fit.vocab["N3"]]
    np.testing.assert_allclose(pair[[0, 3]], noisy["N0"][[0, 3]] + noisy["N3"][[0, 3]])
    downstream = slice(6, None)
    additive = (noisy["N0"] + noisy["N3"])[downstream]
    assert np.linalg.norm(pair[downstream]) < 0.8 * np.linalg.norm(additive)   # sub-additive downstream
    # and it is what the prior uses when the linear candidate wins
    rows, _, source = _combination_deltas(combos, deltas, noisy, set(noisy), rng,
                                          linear_data=(singles, np.stack(list(noisy.values())), symbols))
    assert source == "linear"
    np.testing.assert_allclose((rows["N0"] + rows["N3"])[[0, 3]], pair[[0, 3]])


def _gain_world(slope: float, seed: int = 0, terms: list[frozenset] | None = None):
    """Eight trained singles on the ring graph (linked pairs at Jaccard 0.5, 0.4, 0.2) and 20 of their pairs,
    each pair's effect (g = 1 + slope J) x the sum of its singles, N0-N3's own columns 0-3 set additively; every
    mean observed with noise of a known variance (the singles' noise is what biases an observed gain). With
    `terms` (each node's GO terms), J is their Jaccard instead of the graph's edge weight."""
    rng = np.random.default_rng(seed)
    num_genes = 200
    symbols = NODES[:4] + [f"x{j}" for j in range(num_genes - 4)]
    g = _graph()
    jac = {}
    for a, b, w in zip(*g.edge_index, g.edge_weight):
        if a != b and terms is None:
            jac[NODES[a], NODES[b]] = jac[NODES[b], NODES[a]] = max(float(w), jac.get((NODES[a], NODES[b]), 0.0))
    for i, j in itertools.combinations(range(len(NODES)), 2):
        if terms is not None and terms[i] & terms[j]:
            jac[NODES[i], NODES[j]] = jac[NODES[j], NODES[i]] = len(terms[i] & terms[j]) / len(terms[i] | terms[j])
    truth = {n: rng.normal(size=num_genes) for n in NODES}
    for j in range(4):
        truth[NODES[j]][j] = 4.0
    sd = 0.3
    singles = {n: t + sd * rng.normal(size=num_genes) for n, t in truth.items()}
    pairs = [(a, b) for i, a in enumerate(NODES) for b in NODES[i + 1:]][:20]
    deltas = []
    for a, b in pairs:
        d = (1.0 + slope * jac.get((a, b), 0.0)) * (truth[a] + truth[b])
        own = [NODES.index(x) for x in (a, b) if NODES.index(x) < 4]
        d[own] = (truth[a] + truth[b])[own]
        deltas.append(d + sd * rng.normal(size=num_genes))
    noise = np.full(num_genes, sd ** 2)
    names = list(singles)
    mean = np.concatenate([np.stack(list(singles.values())), np.stack(deltas)]).mean(0)
    kw = dict(k=3, tau=0.1, gene_symbols=symbols, single_noise=np.tile(noise, (len(names), 1)),
              control_noise=np.zeros(num_genes))
    return names, singles, pairs, np.stack(deltas), mean, jac, kw


def test_pair_gains_follow_go_jaccard_and_stay_off_without_it():
    names, singles, pairs, deltas, mean, jac, kw = _gain_world(slope=-1.6)
    fit = fit_go_prior(_graph(), names, np.stack(list(singles.values())), mean, pairs, deltas, **kw)
    assert fit.combo_source == "gain" and (fit.combo_index < 0).all()
    assert -2.0 < fit.pair_gain < -1.2                       # noise-corrected: not pulled toward 0
    prior = SetPrior(fit)
    # N0+N1 (linked at 0.5): its singles scaled by 1 + b 0.5 outside the targets' own columns 0 and 1
    got = prior(torch.tensor([[0, 1]]))[0].numpy()
    s = singles["N0"] + singles["N1"]
    want = (1.0 + fit.pair_gain * jac["N0", "N1"]) * s
    want[[0, 1]] = s[[0, 1]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # padding anywhere, pairs without a GO link (N0+N4), single genes and training (cross-fitted) pairs: unscaled
    np.testing.assert_allclose(prior(torch.tensor([[-1, 1, 0]]))[0].numpy(), want, rtol=1e-4, atol=1e-4)
    assert ("N0", "N4") not in jac
    np.testing.assert_allclose(prior(torch.tensor([[0, 4]]))[0].numpy(), singles["N0"] + singles["N4"], atol=1e-4)
    np.testing.assert_allclose(prior(torch.tensor([[0, -1]]))[0].numpy(), singles["N0"], atol=1e-5)
    np.testing.assert_allclose(prior(torch.tensor([[0, 1]]), cross_fit=True)[0].numpy(), s, atol=1e-4)
    # The same world with additive pairs, or without the noise variances: no gains.
    names, singles, pairs, deltas, mean, _, kw = _gain_world(slope=0.0)
    null = fit_go_prior(_graph(), names, np.stack(list(singles.values())), mean, pairs, deltas, **kw)
    assert null.combo_source != "gain" and null.pair_gain is None
    for key in ("single_noise", "control_noise"):
        kw.pop(key)
    names, singles, pairs, deltas, mean, _, _ = _gain_world(slope=-1.6)
    plain = fit_go_prior(_graph(), names, np.stack(list(singles.values())), mean, pairs, deltas, **kw)
    assert plain.pair_gain is None
    # A saved model reloads them; one saved before they existed reloads without them.
    state = {f"prior.{k}": v for k, v in prior.state_dict().items()}
    again = SetPrior.from_state_dict(dict(state))
    again.load_state_dict({k[len("prior."):]: v for k, v in state.items()})
    torch.testing.assert_close(again(torch.tensor([[0, 1]])), prior(torch.tensor([[0, 1]])))
    old = {k: v for k, v in state.items() if not k.startswith("prior.pair_")}
    older = SetPrior.from_state_dict(old)
    older.load_state_dict({k[len("prior."):]: v for k, v in old.items()})
    np.testing.assert_allclose(older(torch.tensor([[0, 1]]))[0].numpy(), s, atol=1e-4)


def test_pair_gains_use_the_go_terms_where_the_graph_keeps_too_few_edges():
    """A gene's top-k graph edges miss pairs of one pathway (on the demo screen, most buffering pairs): with the
    nodes' GO terms the gain follows the terms' Jaccard, also for a pair that is no edge of the graph."""
    # N0 and N4 share two of four terms (Jaccard 0.5) but are not linked in the ring graph; N1 shares one with N0.
    terms = [frozenset({"a", "b", "c"}), frozenset({"c", "z"}), frozenset({"d"}), frozenset({"e"}),
             frozenset({"a", "b", "f"}), frozenset({"g"}), frozenset({"h"}), frozenset({"d", "i"})]
    names, singles, pairs, deltas, mean, jac, kw = _gain_world(slope=-1.6, terms=terms)
    assert ("N0", "N4") in jac and (0, 4) not in set(zip(*_graph().edge_index.tolist()))
    fit = fit_go_prior(_graph(), names, np.stack(list(singles.values())), mean, pairs, deltas, pair_terms=terms,
                       **kw)
    assert fit.combo_source == "gain" and -2.0 < fit.pair_gain < -1.2
    prior = SetPrior(fit)
    s = singles["N0"] + singles["N4"]
    want = (1.0 + fit.pair_gain * 0.5) * s
    want[0] = s[0]                                           # N0's own column; N4 has none
    np.testing.assert_allclose(prior(torch.tensor([[0, 4]]))[0].numpy(), want, rtol=1e-4, atol=1e-4)
    # J is clamped to the largest J b was fitted on (N0+N4's 0.5), and pairs below the graph's own threshold
    # are not linked: with a threshold of 0.3, N0+N1 (Jaccard 0.25) stays additive.
    assert fit.pair_max_jaccard == pytest.approx(0.5)
    graph = _graph()
    graph.info["threshold"] = 0.3
    strict = fit_go_prior(graph, names, np.stack(list(singles.values())), mean, pairs, deltas, pair_terms=terms,
                          **kw)
    assert strict.pair_gain is not None
    np.testing.assert_allclose(SetPrior(strict)(torch.tensor([[0, 1]]))[0].numpy(), singles["N0"] + singles["N1"],
                               atol=1e-4)
    # A pair with one trained gene gets the same law: N7 untrained, N2+N7 share one of two terms (Jaccard 0.5).
    keep = [i for i, n in enumerate(names) if n != "N7"]
    pair_keep = [i for i, p in enumerate(pairs) if "N7" not in p]
    half = fit_go_prior(_graph(), [names[i] for i in keep], np.stack([singles[names[i]] for i in keep]), mean,
                        [pairs[i] for i in pair_keep], deltas[pair_keep], pair_terms=terms, **kw)
    assert half.pair_gain is not None
    gained, plain = SetPrior(half), SetPrior(half)
    plain.pair_gain[0] = 0.0
    base = plain(torch.tensor([[2, 7]]))[0].numpy()
    want = (1.0 + half.pair_gain * min(0.5, half.pair_max_jaccard)) * base
    want[2] = base[2]                                        # N2's own column
    np.testing.assert_allclose(gained(torch.tensor([[2, 7]]))[0].numpy(), want, rtol=1e-4, atol=1e-4)
    # A set of two untrained genes (N7 and, unfitted here, nothing else) or of three genes: no gain.
    np.testing.assert_allclose(gained(torch.tensor([[7, -1]])).numpy(), plain(torch.tensor([[7, -1]])).numpy())
    np.testing.assert_allclose(gained(torch.tensor([[0, 4, 2]])).numpy(), plain(torch.tensor([[0, 4, 2]])).numpy())
    # The graph's edges alone miss it: a weak slope on the wrong pairs, and N0+N4 stays additive.
    edges = fit_go_prior(_graph(), names, np.stack(list(singles.values())), mean, pairs, deltas, **kw)
    assert edges.pair_gain is None or abs(edges.pair_gain) < 0.5
    if edges.pair_gain is not None:
        np.testing.assert_allclose(SetPrior(edges)(torch.tensor([[0, 4]]))[0].numpy(), s, atol=1e-4)


def test_term_jaccard_matches_sets_for_any_pairs():
    """The vectorized Jaccard of nodes' GO terms equals the set computation, for pairs in any order, repeated,
    of a node with itself, and with nodes that have no terms."""
    from gears_dist.model.prior import _set_jaccard, _term_table

    rng = np.random.default_rng(3)
    terms = [frozenset(rng.choice(30, size=rng.integers(0, 8), replace=False).tolist()) for _ in range(12)]
    ptr, ids = _term_table(terms)
    prior = SetPrior.__new__(SetPrior)
    torch.nn.Module.__init__(prior)
    prior.register_buffer("term_ptr", torch.as_tensor(ptr))
    prior.register_buffer("term_ids", torch.as_tensor(ids))
    a = torch.as_tensor(rng.integers(0, 12, size=200))
    b = torch.as_tensor(rng.integers(0, 12, size=200))
    got = prior._term_jaccard(a, b).numpy()
    want = [_set_jaccard(terms[i], terms[j], 0.0) for i, j in zip(a.tolist(), b.tolist())]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_annotation_sets_are_the_terms_a_go_graph_was_built_from(tmp_path):
    from gears_dist.data.genes import go_annotations
    from gears_dist.graphs.config import GOGraphConfig
    from gears_dist.graphs.go import annotation_sets, build_go_graph

    genes = ["CEBPA", "CEBPB", "KLF1", "NOT_A_GENE"]
    built = build_go_graph(genes, GOGraphConfig())
    sets = annotation_sets(built)
    assert [sets[built.nodes.index(g)] for g in genes] == [go_annotations().get(g, frozenset()) for g in genes]
    assert sets[built.nodes.index("CEBPA")] and not sets[built.nodes.index("NOT_A_GENE")]
    table = tmp_path / "terms.tsv"
    table.write_text("CEBPA\tT1\nCEBPB\tT1\nCEBPB\tT2\n")
    from_table = build_go_graph(genes, GOGraphConfig(source="table", path=str(table)))
    assert annotation_sets(from_table)[from_table.nodes.index("CEBPB")] == frozenset({"T1", "T2"})
    edges = tmp_path / "edges.tsv"
    edges.write_text("CEBPA\tCEBPB\t0.5\n")
    assert annotation_sets(build_go_graph(genes, GOGraphConfig(source="edgelist", path=str(edges)))) is None
    table.unlink()                                   # moved since: the graph's edges serve instead
    assert annotation_sets(from_table) is None


@pytest.mark.parametrize("num_pairs", [1, 2])
def test_prior_fits_with_as_few_as_one_training_pair(num_pairs):
    """Held out, a screen's only training pair leaves the linear model no combination to fit: it must still fit
    (on the singles) and the prior must still come out, with the additive model kept for lack of evidence."""
    rng = np.random.default_rng(2)
    singles = {n: rng.normal(size=NUM_GENES) for n in ("N0", "N1", "N2", "N4")}
    doubles = [("N0", "N1"), ("N2", "N4")][:num_pairs]
    double_deltas = rng.normal(size=(num_pairs, NUM_GENES))
    fit = fit_go_prior(_graph(), list(singles), np.stack(list(singles.values())), np.zeros(NUM_GENES), doubles,
                       double_deltas, k=3, tau=0.1, gene_symbols=[f"x{j}" for j in range(NUM_GENES)])
    if num_pairs == 1:
        assert fit.combo_source == "none"  # one held-out pair cannot pass the one-standard-error rule
    np.testing.assert_allclose(fit.predict_delta([[0, 2]])[0].shape, (NUM_GENES,))


def test_beta_for_unseen_sets_needs_held_out_evidence():
    """beta (the weight of GO deviations for sets with no trained gene) is the least-squares fit only when it
    predicts held-out pairs better than the train mean by more than one standard error."""
    from gears_dist.model.prior import _fit_beta

    rng = np.random.default_rng(4)
    xs = rng.normal(size=(12, 40))
    ys = 0.6 * xs + 0.2 * rng.normal(size=(12, 40))  # the GO deviations do predict these pairs
    stats = [np.einsum("ij,ij->i", a, b) for a, b in ((xs, ys), (xs, xs), (ys, ys))]
    want = float(np.clip(stats[0].sum() / stats[1].sum(), 0, 1))
    assert 0.5 < _fit_beta(*stats) == pytest.approx(want)
    assert _fit_beta(*(s[:1] for s in stats)) == 0.0  # one pair: no held-out evidence at all
    noise = rng.normal(size=(12, 40))  # deviations unrelated to the pairs: the train mean stays
    stats = [np.einsum("ij,ij->i", a, b) for a, b in ((xs, noise), (xs, xs), (noise, noise))]
    assert _fit_beta(*stats) == 0.0
