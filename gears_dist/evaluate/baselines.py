"""Baselines that later papers showed to be strong, fitted on the training split only.

Every baseline is a predictor: called with perturbation sets (sorted gene tuples) it returns the
predicted mean expression [U, G]; ``covers(perts)`` says for which sets it has the information it
is meant to use (the rest get its fallback, reported as coverage).

- ``control_mean`` ("no change"): the control mean for every perturbation.
- ``train_mean``: the average of the training perturbations' mean profiles (each condition weighted
  equally), i.e. control + the average training delta.
- ``additive``: control + the sum of the measured single-gene deltas of the set's genes (Norman et
  al. 2019; the baseline that matches or beats deep models on double perturbations). Genes whose
  single was not in training contribute nothing; ``covers`` is true when every gene's single was.
- ``linear``: the linear model of Ahlmann-Eltze, Huber & Anders (Nat Methods 2025):
  Y ~ G W P^T + b with Y the genes x training-conditions matrix of mean profiles, G the top-K
  principal directions of Y - b (gene embedding, K=10), P the perturbation embedding, and W by
  ridge regression in closed form W = (G^T G + l I)^-1 G^T (Y - b) P (P^T P + l I)^-1 (l=0.1).
  Our choices (documented, configurable):
  * ``center="control"`` (default): b = the control mean, so Y - b are the training deltas. The
    paper uses b = the row means of Y (``center="mean"``); with that offset a SUM of perturbation
    embeddings carries the offset twice for a pair, and on an exactly additive toy world the paper's
    centring reaches mean pearson_delta 0.92 on held-out pairs where control centring reaches 1.0.
  * P: a gene's perturbation embedding concatenates (i) G^T (y_gene - b) for its own training
    single (zero when its single was not trained) and (ii) its row of G when the gene is measured
    (the paper's default for unseen singles; zero otherwise), each block scaled to unit mean norm
    (``embedding="both"``; or only ``"training"`` / ``"expression"``).
  * A set's embedding is the SUM of its genes' embeddings, so pairs need no pair in training.
  A set with no embedding at all is predicted as b; ``covers`` is true when every gene of the set
  has a non-zero embedding.
- ``go_prior``: the GO-neighbour prior that prior-anchored GEARS starts from (``gears_dist.model.prior``):
  observed singles summed for trained genes, a gene seen only in training combinations gets the delta the
  additive model attributes to it there, a shrunk GO-similarity-weighted mean of the neighbours'
  training deltas for the others (k and shrinkage fitted leave-one-out on the training singles). It needs
  the GO graph (``go=``); ``covers`` is true when every gene of the set is a node of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class TrainingProfiles:
    """Mean profiles of the training perturbations (control excluded) and the control mean."""

    perts: list[tuple[str, ...]]   # sorted gene tuple per training condition
    means: np.ndarray              # [T, G]
    control_mean: np.ndarray       # [G]
    gene_symbols: list[str]        # [G] measured genes
    # [T, G] / [G] the variance of each training mean and of the control mean (cell variance / cells); None when
    # not known (the go_prior then fits no pair gains)
    noise: np.ndarray | None = None
    control_noise: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.means = np.asarray(self.means, dtype=np.float64)
        self.control_mean = np.asarray(self.control_mean, dtype=np.float64)
        if self.means.shape != (len(self.perts), self.control_mean.shape[0]):
            raise ValueError(f"TrainingProfiles.means: expected shape {(len(self.perts), self.control_mean.shape[0])}, "
                             f"received {self.means.shape}")
        if len(self.gene_symbols) != self.control_mean.shape[0]:
            raise ValueError(f"TrainingProfiles: {len(self.gene_symbols)} gene symbols for "
                             f"{self.control_mean.shape[0]} genes")
        if any(len(p) == 0 for p in self.perts):
            raise ValueError("TrainingProfiles: the control is not a training perturbation; drop it from perts")

    @property
    def singles(self) -> dict[str, np.ndarray]:
        """gene -> its single-perturbation delta vs control (only genes whose single was trained)."""
        return {p[0]: self.means[i] - self.control_mean for i, p in enumerate(self.perts) if len(p) == 1}


def training_profiles(store, train_names: Sequence[str]) -> TrainingProfiles:
    """Read the training conditions' means, and their variances, from a store (rows of stats/ only)."""
    from gears_dist.data.stats import condition_means

    names = [n for n in train_names if n != "ctrl"]
    table = dict(zip(store.condition_names, store.condition_genes()))
    perts = [tuple(table[n]) for n in names if n in table]
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"training conditions not in the store: {missing[:10]}; is the split from this store?")
    controls = [n for n, g in table.items() if len(g) == 0]
    if not controls:
        raise ValueError(f"store {str(store.path)!r} has no control condition; baselines need the control mean")
    perts = [p for p in perts if len(p) > 0]
    names = [n for n in names if len(table[n]) > 0]
    index = {n: i for i, n in enumerate(store.condition_names)}
    means, noise, control_mean, control_noise = condition_means(store, [index[n] for n in names])
    return TrainingProfiles(perts=perts, means=means, control_mean=control_mean, gene_symbols=store.genes,
                            noise=noise, control_noise=control_noise)


class Baseline:
    name = "baseline"

    def __call__(self, perts: Sequence[tuple[str, ...]]) -> np.ndarray:
        raise NotImplementedError

    def covers(self, perts: Sequence[tuple[str, ...]]) -> np.ndarray:
        return np.ones(len(perts), dtype=bool)


class ControlMean(Baseline):
    name = "control_mean"

    def __init__(self, train: TrainingProfiles):
        self.control = train.control_mean

    def __call__(self, perts):
        return np.repeat(self.control[None, :], len(perts), axis=0)


class TrainMean(Baseline):
    name = "train_mean"

    def __init__(self, train: TrainingProfiles):
        if len(train.perts) == 0:
            raise ValueError("train_mean baseline: the training split has no perturbed condition")
        self.mean = train.means.mean(axis=0)

    def __call__(self, perts):
        return np.repeat(self.mean[None, :], len(perts), axis=0)


def _set_matrix(perts: Sequence[tuple[str, ...]], vocabulary: dict[str, int]):
    """Sparse U x V indicator of which vocabulary genes each set contains (unknown genes dropped)."""
    import scipy.sparse as sp

    rows, cols = [], []
    for i, p in enumerate(perts):
        for g in p:
            j = vocabulary.get(g)
            if j is not None:
                rows.append(i)
                cols.append(j)
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(perts), len(vocabulary)))


class Additive(Baseline):
    name = "additive"

    def __init__(self, train: TrainingProfiles):
        singles = train.singles
        self.genes = sorted(singles)
        self.index = {g: i for i, g in enumerate(self.genes)}
        g_count = train.control_mean.shape[0]
        self.deltas = np.stack([singles[g] for g in self.genes]) if self.genes else np.zeros((0, g_count))
        self.control = train.control_mean

    def __call__(self, perts):
        # One sparse x dense product: all pairs of a 100-gene list cost one matmul, not 4,950 loops.
        return self.control[None, :] + np.asarray(_set_matrix(perts, self.index) @ self.deltas)

    def covers(self, perts):
        return np.array([len(p) > 0 and all(g in self.index for g in p) for p in perts], dtype=bool)


class LinearPCA(Baseline):
    """The linear model of Ahlmann-Eltze et al. 2025 (gears_dist/model/linear.py), fitted on the training split."""

    name = "linear"

    def __init__(self, train: TrainingProfiles, num_components: int = 10, ridge: float = 0.1,
                 embedding: str = "both", center: str = "control"):
        from gears_dist.model.linear import fit_linear

        self.fit = fit_linear(train.perts, train.means, train.control_mean, train.gene_symbols,
                              num_components=num_components, ridge=ridge, embedding=embedding, center=center)

    def __call__(self, perts):
        return self.fit.predict(_set_matrix(perts, self.fit.vocab))

    def covers(self, perts):
        vocab, has = self.fit.vocab, self.fit.has
        return np.array([len(p) > 0 and all(g in vocab and has[vocab[g]] for g in p) for p in perts], dtype=bool)


class GOPrior(Baseline):
    name = "go_prior"

    def __init__(self, train: TrainingProfiles, go=None):
        from gears_dist.model.prior import fit_from_means

        if go is None:
            raise ValueError("go_prior baseline: needs the GO graph (go=GeneGraph); evaluate_split loads the store's")
        self.fit = fit_from_means(go, train.perts, train.means - train.control_mean[None, :], train.gene_symbols,
                                  noise=train.noise, control_noise=train.control_noise)
        self.node_index = {g: i for i, g in enumerate(go.nodes)}
        self.control = train.control_mean

    def __call__(self, perts):
        sets = [[self.node_index[g] for g in p if g in self.node_index] for p in perts]
        return self.control[None, :] + self.fit.predict_delta(sets)

    def covers(self, perts):
        return np.array([len(p) > 0 and all(g in self.node_index for g in p) for p in perts], dtype=bool)


BASELINES = {"control_mean": ControlMean, "train_mean": TrainMean, "additive": Additive, "linear": LinearPCA,
             "go_prior": GOPrior}
# Baselines that need the GO graph (fit_baselines' `go`).
NEEDS_GO = ("go_prior",)


def fit_baselines(train: TrainingProfiles, names: Sequence[str] = tuple(BASELINES), go=None) -> dict[str, Baseline]:
    """Fit the named baselines on the training profiles; `go` (a GeneGraph) for those in NEEDS_GO."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; expected some of {list(BASELINES)}")
    return {n: BASELINES[n](train, go) if n in NEEDS_GO else BASELINES[n](train) for n in names}
