from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform

from gears_dist.evaluate import gi


def _dcor_reference(x, y):
    """Distance correlation written from the definition with the centring matrix H = I - 11^T/n."""
    x = np.asarray(x, float).reshape(len(x), -1)
    y = np.asarray(y, float).reshape(len(y), -1)
    n = len(x)
    H = np.eye(n) - np.ones((n, n)) / n
    A = H @ squareform(pdist(x)) @ H
    B = H @ squareform(pdist(y)) @ H
    return np.sqrt(np.sum(A * B) / np.sqrt(np.sum(A * A) * np.sum(B * B)))


def test_distance_correlation_matches_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 2))
    y = x[:, 0] ** 2 + 0.1 * rng.normal(size=80)
    assert gi.distance_correlation(x, y) == pytest.approx(_dcor_reference(x, y), rel=1e-10)
    assert gi.distance_correlation(x[:, 0], 3 * x[:, 0] - 1) == pytest.approx(1.0)
    big = rng.normal(size=(1500, 2))
    assert gi.distance_correlation(big[:, 0], big[:, 1]) < 0.1
    assert gi.distance_correlation(np.ones(10), np.arange(10)) == 0.0
    with pytest.raises(ValueError, match="samples"):
        gi.distance_correlation(np.ones(3), np.ones(4))


def test_robust_fits_ignore_outliers_and_agree():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, 400, 2))
    true = np.array([[1.0, 1.0], [2.0, 0.5], [0.2, -0.4]])
    y = np.einsum("pnd,pd->pn", X, true) + 0.05 * rng.normal(size=(3, 400))
    y[:, :40] += 20  # 10% gross outliers
    h = gi.huber_fit(X, y)
    np.testing.assert_allclose(h, true, atol=0.05)
    ts = gi.theilsen_fit(X, y, max_subpopulation=2000)
    np.testing.assert_allclose(ts, true, atol=0.05)
    ols = np.stack([np.linalg.lstsq(X[p], y[p], rcond=None)[0] for p in range(3)])
    assert np.abs(ols - true).max() > 0.3  # ordinary least squares is pulled away: the fit must be robust


def _pair_world(num_genes=300, seed=0):
    """Deltas of singles and doubles with planted interaction types (a known ground truth)."""
    rng = np.random.default_rng(seed)
    kinds = (["additive"] * 30 + ["synergy"] * 10 + ["suppression"] * 10 + ["neomorphism"] * 10)
    da = rng.normal(size=(len(kinds), num_genes))
    db = rng.normal(size=(len(kinds), num_genes))
    dab = np.empty_like(da)
    for i, k in enumerate(kinds):
        base = da[i] + db[i]
        if k == "synergy":
            base = 2.5 * base
        elif k == "suppression":
            base = 0.3 * base
        elif k == "neomorphism":
            base = base + 2.5 * rng.normal(size=num_genes)
        dab[i] = base + 0.2 * rng.normal(size=num_genes)
    names = [f"A{i}+B{i}" for i in range(len(kinds))]
    return da, db, dab, names, dict(zip(names, kinds))


def test_gi_scores_of_known_pairs():
    da, db, dab, names, truth = _pair_world()
    s = gi.gi_scores(da, db, dab, names)
    add = s.loc[[n for n in names if truth[n] == "additive"]]
    np.testing.assert_allclose(add["magnitude"], np.sqrt(2), rtol=0.05)
    assert (add["corr_fit"] > 0.95).all()
    assert (s.loc[[n for n in names if truth[n] == "synergy"], "magnitude"] > 3).all()
    assert (s.loc[[n for n in names if truth[n] == "suppression"], "magnitude"] < 0.6).all()
    assert (s.loc[[n for n in names if truth[n] == "neomorphism"], "corr_fit"] < 0.8).all()
    assert set(s.columns) == set(gi.SCORE_COLUMNS)
    exact = gi.gi_scores(da[:1], db[:1], 1.0 * da[:1] + 1.0 * db[:1])
    assert exact["c1"].iloc[0] == pytest.approx(1.0) and exact["dominance"].iloc[0] == pytest.approx(0, abs=1e-9)


def test_precision_at_10_observed_vs_additive_baseline():
    da, db, dab, names, truth = _pair_world()
    observed = gi.gi_scores(da, db, dab, names)
    p_obs = gi.gi_precision(observed, truth, k=10)
    assert p_obs == {"synergy": 1.0, "suppression": 1.0, "neomorphism": 1.0}
    # The additive baseline predicts dab = da + db for every pair: all scores tie, precision = base rate.
    additive = gi.gi_scores(da, db, da + db, names)
    p_add = gi.gi_precision(additive, truth, k=10)
    for k, v in p_add.items():
        assert v == pytest.approx(10 / 60), k
    ranked = gi.rank_gi(observed, top=10)
    assert sorted(ranked["synergy"]) == sorted(n for n in names if truth[n] == "synergy")


def test_precision_at_k_ties():
    assert gi.precision_at_k(np.array([3, 2, 1, 0]), np.array([1, 1, 0, 0]), k=2) == 1.0
    assert gi.precision_at_k(np.array([3, 2, 1, 0]), np.array([1, 1, 0, 0]), k=2, higher=False) == 0.0
    assert gi.precision_at_k(np.ones(8), np.array([1, 0, 0, 0, 0, 0, 0, 1]), k=3) == pytest.approx(0.25)
    # One clear winner, then a tie for the last slot among 3 (1 positive): 1 + 1/3.
    assert gi.precision_at_k(np.array([5, 1, 1, 1]), np.array([1, 1, 0, 0]), k=2) == pytest.approx((1 + 1 / 3) / 2)
    assert np.isnan(gi.precision_at_k(np.array([]), np.array([], bool), k=3))


def test_gi_from_profiles_selects_genes_and_skips_missing():
    rng = np.random.default_rng(2)
    g = 50
    ctrl = np.concatenate([np.zeros(10), rng.uniform(0.5, 3, g - 10)])
    da, db = rng.normal(size=g), rng.normal(size=g)
    means = {"A": ctrl + da, "B": ctrl + db, "A+B": ctrl + 2 * (da + db), "C": ctrl + db}
    genes = gi.well_expressed_genes(ctrl, quantile=0.5)
    assert genes.min() >= 10 and len(genes) == 20
    df = gi.gi_from_profiles([("A", "B"), ("A", "C")], means, ctrl, genes=genes)
    assert list(df.index) == ["A+B"] and df.attrs["skipped"] == ["A+C"]
    assert df.loc["A+B", "magnitude"] == pytest.approx(2 * np.sqrt(2), rel=1e-6)
    with pytest.raises(ValueError, match="non-zero"):
        gi.well_expressed_genes(np.zeros(5))
    with pytest.raises(ValueError, match="method"):
        gi.gi_scores(da[None], db[None], da[None], method="ols")
