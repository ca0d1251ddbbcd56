"""Genetic interactions of gene pairs from their single and double perturbation deltas.

For a pair (a, b) with deltas vs control da, db, dab over well-expressed genes, fit
dab ~ c1*da + c2*db by robust regression WITHOUT intercept (Norman et al. 2019; GEARS) and score:

- ``magnitude`` = sqrt(c1^2 + c2^2). Additive pairs have c1 = c2 = 1, magnitude sqrt(2): synergy is
  high magnitude, suppression low.
- ``corr_fit``: Pearson correlation of the fit c1*da + c2*db with dab (neomorphism: low, the double
  does something the singles do not explain).
- ``dcor``: distance correlation of the singles [da, db] (jointly) with dab; ``dcor_singles`` of da
  with db; ``dcor_first`` / ``dcor_second`` of each single with dab.
- ``eq_contr`` = min(dcor_first, dcor_second) / max(...) (equality of contribution; epistasis:
  low, one gene's effect masks the other's).
- ``dominance`` = |log10(c1 / c2)|.

GI types and the score that ranks them (``GI_RULES``): synergy = magnitude, high first;
suppression = magnitude, low first; neomorphism = corr_fit, low first; redundancy = dcor_singles,
high first (the two genes do the same thing; GEARS' notebooks rank by the joint ``dcor``, also
reported); epistasis = eq_contr, low first.

Robust fit: ``method="huber"`` (default; Huber M-estimator by iteratively reweighted least squares,
MAD scale, k=1.345, vectorized over all pairs at once: thousands of pairs in seconds) or
``method="theilsen"`` (scikit-learn's TheilSenRegressor as the reference uses; ~0.25 s per pair).
Distance correlation is implemented here (the ``dcor`` package is not a dependency); it is the
square root of dCov^2(x,y)/sqrt(dVar^2(x) dVar^2(y)) with double-centred distance matrices, O(n^2)
memory in the number of genes n, so the gene set is capped (``max_genes``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

GI_RULES: dict[str, tuple[str, bool]] = {
    # type: (score column, higher score = more of this type)
    "synergy": ("magnitude", True),
    "suppression": ("magnitude", False),
    "neomorphism": ("corr_fit", False),
    "redundancy": ("dcor_singles", True),
    "epistasis": ("eq_contr", False),
}
SCORE_COLUMNS = ("c1", "c2", "magnitude", "corr_fit", "dcor", "dcor_singles", "dcor_first", "dcor_second",
                 "eq_contr", "dominance")


def well_expressed_genes(control_mean: np.ndarray, quantile: float = 0.5, max_genes: int = 2000) -> np.ndarray:
    """Indices of genes expressed above the `quantile` of non-zero control means (at most `max_genes`,
    the highest), the genes on which GI regressions are fitted (GEARS uses a fixed high-mean list)."""
    cm = np.asarray(control_mean, dtype=np.float64)
    if not 0 <= quantile < 1:
        raise ValueError(f"quantile: expected in [0, 1), received {quantile}")
    nz = cm > 0
    if not nz.any():
        raise ValueError("no gene has a non-zero control mean; cannot choose well-expressed genes")
    threshold = np.quantile(cm[nz], quantile)
    idx = np.flatnonzero(cm >= threshold)
    if idx.size > max_genes:
        idx = np.sort(idx[np.argsort(-cm[idx], kind="stable")[:max_genes]])
    return idx


def huber_fit(X: np.ndarray, y: np.ndarray, k: float = 1.345, num_iter: int = 50, tol: float = 1e-10) -> np.ndarray:
    """Huber regression without intercept for a batch of problems: X [P, n, d], y [P, n] -> coef [P, d]."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    d = X.shape[-1]
    eye = 1e-12 * np.eye(d)
    w = np.ones(y.shape)
    coef = np.zeros(X.shape[:1] + (d,))
    for _ in range(num_iter):
        Xw = X * w[..., None]
        A = np.einsum("pni,pnj->pij", Xw, X) + eye
        rhs = np.einsum("pni,pn->pi", Xw, y)
        new = np.linalg.solve(A, rhs[..., None])[..., 0]
        r = y - np.einsum("pnd,pd->pn", X, new)
        scale = 1.4826 * np.median(np.abs(r - np.median(r, axis=1, keepdims=True)), axis=1, keepdims=True)
        scale = np.maximum(scale, 1e-12 * (np.abs(y).max(axis=1, keepdims=True) + 1e-300))
        u = np.abs(r) / (k * scale)
        w = np.where(u <= 1, 1.0, 1.0 / np.maximum(u, 1e-300))
        done = np.max(np.abs(new - coef)) < tol
        coef = new
        if done:
            break
    return coef


def theilsen_fit(X: np.ndarray, y: np.ndarray, max_subpopulation: int = 10_000, seed: int = 1000) -> np.ndarray:
    """Theil-Sen without intercept (scikit-learn), one problem at a time: X [P, n, d], y [P, n] -> [P, d]."""
    from sklearn.linear_model import TheilSenRegressor

    out = np.zeros(X.shape[:1] + X.shape[-1:])
    for p in range(X.shape[0]):
        reg = TheilSenRegressor(fit_intercept=False, max_subpopulation=max_subpopulation, max_iter=1000,
                                random_state=seed)
        out[p] = reg.fit(X[p], y[p]).coef_
    return out


def _centred_distances(x: np.ndarray) -> np.ndarray:
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] == 1:
        d = np.abs(x - x.T)
    else:
        sq = (x * x).sum(axis=1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    return d - d.mean(axis=0, keepdims=True) - d.mean(axis=1, keepdims=True) + d.mean()


def distance_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Distance correlation (Szekely et al. 2007; V-statistic) of samples x [n] or [n, p] and y."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"distance_correlation: x has {x.shape[0]} samples, y has {y.shape[0]}")
    A = _centred_distances(x)
    B = _centred_distances(y)
    dcov = (A * B).mean()
    dvar = np.sqrt((A * A).mean() * (B * B).mean())
    if dvar <= 0:
        return 0.0
    return float(np.sqrt(max(dcov, 0.0) / dvar))


def gi_scores(delta_a: np.ndarray, delta_b: np.ndarray, delta_ab: np.ndarray, pairs: Sequence[str] | None = None,
              method: str = "huber", with_dcor: bool = True):
    """GI scores of P pairs from deltas [P, n] (n well-expressed genes): DataFrame indexed by pair."""
    import pandas as pd

    da, db, dab = (np.atleast_2d(np.asarray(v, dtype=np.float64)) for v in (delta_a, delta_b, delta_ab))
    if not (da.shape == db.shape == dab.shape):
        raise ValueError(f"gi_scores: delta shapes differ: {da.shape}, {db.shape}, {dab.shape}; "
                         f"expected [pairs, genes] for each")
    X = np.stack([da, db], axis=-1)
    if method == "huber":
        coef = huber_fit(X, dab)
    elif method == "theilsen":
        coef = theilsen_fit(X, dab)
    else:
        raise ValueError(f"GI fit method {method!r}: expected 'huber' or 'theilsen'")
    fit = np.einsum("pnd,pd->pn", X, coef)
    from gears_dist.evaluate.metrics import rowwise_pearson

    out = {
        "c1": coef[:, 0], "c2": coef[:, 1], "magnitude": np.sqrt((coef ** 2).sum(axis=1)),
        "corr_fit": rowwise_pearson(fit, dab),
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        out["dominance"] = np.abs(np.log10(np.abs(coef[:, 0]) / np.abs(coef[:, 1])))
    if with_dcor:
        dc = np.array([[distance_correlation(X[p], dab[p]), distance_correlation(da[p], db[p]),
                        distance_correlation(da[p], dab[p]), distance_correlation(db[p], dab[p])]
                       for p in range(X.shape[0])]).reshape(-1, 4)
        out["dcor"], out["dcor_singles"], out["dcor_first"], out["dcor_second"] = dc.T
        hi = np.maximum(dc[:, 2], dc[:, 3])
        out["eq_contr"] = np.where(hi > 0, np.minimum(dc[:, 2], dc[:, 3]) / np.where(hi > 0, hi, 1), np.nan)
    index = list(pairs) if pairs is not None else [str(i) for i in range(X.shape[0])]
    df = pd.DataFrame(out, index=pd.Index(index, name="pair"))
    return df[[c for c in SCORE_COLUMNS if c in df.columns]]


def gi_from_profiles(pairs: Sequence[tuple[str, str]], mean_of: Mapping[str, np.ndarray], control_mean: np.ndarray,
                     genes: np.ndarray | None = None, method: str = "huber", with_dcor: bool = True):
    """GI scores for pairs given mean profiles by condition name ('A', 'B', 'A+B').

    Pairs whose single or double profile is missing are skipped (and listed in df.attrs['skipped']).
    """
    from gears_dist.data.conditions import condition_name

    genes = well_expressed_genes(control_mean) if genes is None else np.asarray(genes)
    kept, skipped, rows = [], [], ([], [], [])
    for a, b in pairs:
        names = (a, b, condition_name((a, b)))
        if all(n in mean_of for n in names):
            kept.append(names[2])
            for lst, n in zip(rows, names):
                lst.append(np.asarray(mean_of[n])[genes] - control_mean[genes])
        else:
            skipped.append(names[2])
    if not kept:
        df = gi_scores(np.zeros((0, genes.size)), np.zeros((0, genes.size)), np.zeros((0, genes.size)), [],
                       method=method, with_dcor=with_dcor)
    else:
        df = gi_scores(*(np.stack(r) for r in rows), pairs=kept, method=method, with_dcor=with_dcor)
    df.attrs["skipped"] = skipped
    return df


def rank_gi(scores, top: int = 10) -> dict[str, list[str]]:
    """The `top` pairs of each GI type by its rule (ties broken by pair name)."""
    out = {}
    for gi_type, (col, higher) in GI_RULES.items():
        if col not in scores.columns:
            continue
        s = scores[col].dropna()
        order = s.sort_index().sort_values(ascending=not higher, kind="stable")
        out[gi_type] = list(order.index[:top])
    return out


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int, higher: bool = True, decimals: int = 9) -> float:
    """Expected precision of the top-k under uniformly random tie-breaking.

    Scores equal after rounding to `decimals` are tied: a predictor that gives every pair the same
    score (the additive baseline: c1 = c2 = 1 for all pairs) gets the base rate of positives, which is
    what chance would get, not an artefact of the input order.
    """
    s = np.round(np.asarray(scores, dtype=np.float64), decimals)
    pos = np.asarray(positive, dtype=bool)
    keep = np.isfinite(s)
    s, pos = s[keep], pos[keep]
    n = s.size
    if n == 0:
        return float("nan")
    k = min(k, n)
    key = -s if higher else s
    order = np.argsort(key, kind="stable")
    kth = key[order[k - 1]]
    better = key < kth
    tied = key == kth
    slots = k - int(better.sum())
    expected = pos[better].sum() + slots * pos[tied].mean()
    return float(expected / k)


def gi_precision(scores, truth: Mapping[str, str], k: int = 10) -> dict[str, float]:
    """precision@k per GI type present in the truth. `truth`: pair name -> GI type ('additive' = none).

    Only pairs with scores and a ground-truth label are ranked.
    """
    labelled = [p for p in scores.index if p in truth]
    sub = scores.loc[labelled]
    labels = np.array([truth[p] for p in labelled])
    out = {}
    for gi_type, (col, higher) in GI_RULES.items():
        if col not in sub.columns or not np.any(labels == gi_type):
            continue
        out[gi_type] = precision_at_k(sub[col].to_numpy(), labels == gi_type, k, higher)
    return out
