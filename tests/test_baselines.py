from __future__ import annotations

import itertools

import numpy as np
import pytest

from gears_dist.evaluate import baselines as B


def _toy(num_genes=40, rank=3, seed=0, noise=0.0):
    """Additive world: every set's delta is the sum of its genes' deltas, deltas of rank `rank`."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(num_genes)]
    perturbed = [f"P{i}" for i in range(8)]
    basis = rng.normal(size=(rank, num_genes))
    single = {p: rng.normal(size=rank) @ basis for p in perturbed}
    ctrl = rng.uniform(1, 2, size=num_genes)
    combos = list(itertools.combinations(perturbed, 2))
    train_perts = [(p,) for p in perturbed] + combos[::2]
    test_perts = combos[1::2]

    def mean(p):
        return ctrl + sum(single[g] for g in p) + noise * rng.normal(size=num_genes)

    train = B.TrainingProfiles(perts=train_perts, means=np.stack([mean(p) for p in train_perts]),
                               control_mean=ctrl, gene_symbols=genes)
    return train, test_perts, np.stack([mean(p) for p in test_perts]), single, ctrl


def test_control_and_train_mean():
    train, test, _, _, ctrl = _toy()
    np.testing.assert_array_equal(B.ControlMean(train)(test), np.repeat(ctrl[None], len(test), 0))
    np.testing.assert_allclose(B.TrainMean(train)(test[:2]), np.repeat(train.means.mean(0)[None], 2, 0))


def test_additive_is_exact_in_an_additive_world_and_reports_coverage():
    train, test, truth, single, ctrl = _toy()
    add = B.Additive(train)
    np.testing.assert_allclose(add(test), truth, atol=1e-12)
    perts = [("P0", "P1"), ("P0", "UNSEEN"), ("UNSEEN",), ("P0", "P1", "P2")]
    np.testing.assert_array_equal(add.covers(perts), [True, False, False, True])
    # A missing single contributes nothing: P0+UNSEEN falls back to control + delta(P0).
    np.testing.assert_allclose(add(perts)[1], ctrl + single["P0"])
    np.testing.assert_allclose(add(perts)[3], ctrl + single["P0"] + single["P1"] + single["P2"])


def test_linear_matches_independent_least_squares():
    """With ridge=0 the closed form must equal a generic least-squares fit of vec(Y - b) on kron(P, G)."""
    train, *_ = _toy(num_genes=15, rank=2, noise=0.1)  # noise: full-rank, well-posed at ridge 0
    lin = B.LinearPCA(train, num_components=3, ridge=0.0, embedding="training")
    y = train.means.T
    b = lin.fit.center
    np.testing.assert_array_equal(b, train.control_mean)  # default centring on the control
    P = np.asarray(B._set_matrix(train.perts, lin.fit.vocab) @ lin.fit.gene_emb)
    design = np.kron(P, lin.fit.directions)  # vec(G W P^T) = (P kron G) vec(W), column-major vec
    w_vec, *_ = np.linalg.lstsq(design, (y - b[:, None]).reshape(-1, order="F"), rcond=None)
    W = w_vec.reshape(lin.fit.w.shape, order="F")
    fitted_ref = lin.fit.directions @ W @ P.T + b[:, None]
    fitted_ours = lin(train.perts).T
    np.testing.assert_allclose(fitted_ours, fitted_ref, atol=1e-8)


def test_linear_predicts_unseen_combos_in_an_additive_low_rank_world():
    from gears_dist.evaluate.metrics import rowwise_pearson

    train, test, truth, _, ctrl = _toy(num_genes=60, rank=3)
    lin = B.LinearPCA(train, num_components=5, ridge=0.1)
    r = rowwise_pearson(lin(test) - ctrl, truth - ctrl)
    assert r.min() > 0.95
    assert lin.covers(test).all()
    # Far better than the train mean, which cannot tell the combinations apart.
    r_mean = rowwise_pearson(B.TrainMean(train)(test) - ctrl, truth - ctrl)
    assert r.mean() > r_mean.mean() + 0.2
    # A gene with neither a trained single nor a measured row has no embedding: prediction = b.
    np.testing.assert_allclose(lin([("NOWHERE",)])[0], ctrl, atol=1e-10)
    paper = B.LinearPCA(train, num_components=5, ridge=0.1, center="mean")
    np.testing.assert_allclose(paper([("NOWHERE",)])[0], train.means.mean(0), atol=1e-10)
    assert not lin.covers([("NOWHERE",)])[0]


def test_linear_expression_embedding_uses_measured_perturbed_genes():
    """Paper default: a measured gene's perturbation embedding is its PCA loading row."""
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(30)]
    ctrl = rng.uniform(1, 2, 30)
    perts = [(g,) for g in genes[:20]]
    means = np.stack([ctrl + rng.normal(size=30) for _ in perts])
    train = B.TrainingProfiles(perts=perts, means=means, control_mean=ctrl, gene_symbols=genes)
    lin = B.LinearPCA(train, embedding="expression")
    assert lin.covers([("G25",)])[0]  # never perturbed, but measured
    assert not np.allclose(lin([("G25",)])[0], ctrl)


def test_bad_input():
    with pytest.raises(ValueError, match="control"):
        B.TrainingProfiles(perts=[()], means=np.zeros((1, 2)), control_mean=np.zeros(2), gene_symbols=["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        B.TrainingProfiles(perts=[("a",)], means=np.zeros((2, 2)), control_mean=np.zeros(2), gene_symbols=["a", "b"])
    train, *_ = _toy()
    with pytest.raises(ValueError, match="center"):
        B.LinearPCA(train, center="median")
    with pytest.raises(ValueError, match="embedding"):
        B.LinearPCA(train, embedding="go")
    with pytest.raises(ValueError, match="unknown baseline"):
        B.fit_baselines(train, ["additive", "gears"])
    with pytest.raises(ValueError, match="GO graph"):
        B.fit_baselines(train)
    assert set(B.fit_baselines(train, B.BASELINES, go=_go_for(train))) == {
        "control_mean", "train_mean", "additive", "linear", "go_prior"}


def _go_for(train):
    """A GO graph over the toy's perturbed genes: a ring, each gene's two ring neighbours at Jaccard 0.5."""
    from gears_dist.graphs.graph import GeneGraph

    nodes = sorted({g for p in train.perts for g in p})
    n = len(nodes)
    src = [(i + d) % n for i in range(n) for d in (1, n - 1)] + list(range(n))
    dst = [i for i in range(n) for _ in (1, 2)] + list(range(n))
    return GeneGraph(nodes, np.array([src, dst]), np.array([0.5] * (2 * n) + [1.0] * n, np.float32))


def test_go_prior_baseline_is_additive_on_trained_singles_and_covers_graph_genes():
    train, test, truth, single, ctrl = _toy()
    prior = B.GOPrior(train, _go_for(train))
    np.testing.assert_allclose(prior(test), B.Additive(train)(test), atol=1e-5)
    assert prior.covers([("P0", "P1"), ("P0", "X9")]).tolist() == [True, False]


def test_go_prior_baseline_is_the_prior_the_model_fits(tiny_doubles_store):
    """The go_prior baseline and the prior-anchored model's prior (fit_from_store) are one fit: the same
    expression columns for the perturbed genes (kept additive by the linear responses and left alone by gains)
    and the same predictions."""
    from gears_dist.evaluate.pipeline import store_go_graph
    from gears_dist.model.prior import fit_from_store

    store, split = tiny_doubles_store
    go = store_go_graph(store)
    baseline = B.GOPrior(B.training_profiles(store, split.train), go)
    model_prior = fit_from_store(store, split.train, go)
    assert (model_prior.node_column >= 0).any()
    np.testing.assert_array_equal(baseline.fit.node_column, model_prior.node_column)
    assert baseline.fit.combo_source == model_prior.combo_source
    table = dict(zip(store.condition_names, store.condition_genes()))
    sets = [tuple(table[n]) for n in split.test if table[n]]
    node = {g: i for i, g in enumerate(go.nodes)}
    np.testing.assert_allclose(baseline(sets) - store.array("stats/control_mean")[None, :],
                               model_prior.predict_delta([[node[g] for g in s] for s in sets]), atol=1e-4)
