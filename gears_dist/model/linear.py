"""The linear model of Ahlmann-Eltze et al. (Nat Methods 2025) as per-gene response vectors.

Training profiles Y [G, T] (condition means), centred by b (the control mean, or the mean over training
conditions), are explained as Y - b ~ G W P^T: G [G, k] the top-k principal directions of the centred
profiles, P [T, E] the training sets' perturbation embeddings (the sum of their genes' embeddings), W [k, E]
fitted by ridge regression on both sides. A gene's embedding is its training single's profile in the k
directions ("training") and/or its own expression row of G ("expression"), each scaled to unit mean norm.

Because a set's embedding is the sum of its genes', the prediction for any set S is b + sum over g in S of
r_g, with r_g = G W e_g the gene's response vector: an additive model in responses that were fitted to
every training condition at once, doubles included. Where doubles are sub- or super-additive in some
directions, W learns it; where singles are noisy, the k directions denoise them. The ``linear`` baseline
predicts with it, and the GO prior may use its responses inside sets of trained genes (model/prior.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Above this many entries the principal directions come from a randomized range finder, not a full SVD.
EXACT_SVD_MAX = 4_000_000


@dataclasses.dataclass
class LinearResponses:
    vocab: dict[str, int]       # gene -> row of `responses`
    responses: np.ndarray       # [V, G] r_g (profile change from b)
    has: np.ndarray             # [V] bool: the gene has a non-zero embedding (the model covers it)
    center: np.ndarray          # [G] b
    num_components: int
    directions: np.ndarray      # [G, k] the principal directions (G of the module doc)
    gene_emb: np.ndarray        # [V, E] the genes' embeddings
    w: np.ndarray               # [k, E]

    def predict(self, set_matrix) -> np.ndarray:
        """[U, G] b + sum of the set's responses, for a [U, V] indicator matrix (scipy sparse or dense)."""
        return np.asarray(set_matrix @ self.responses) + self.center[None, :]


def low_rank(a: np.ndarray, rank: int, rng: np.random.Generator, power_iterations: int = 2
             ) -> tuple[np.ndarray, np.ndarray]:
    """a ~ rows [m, rank] @ basis [rank, n] by a randomized range finder (Halko et al. 2011) with power
    iterations: a few passes over a, where a full SVD of 10k x 8k takes minutes."""
    sketch = a @ rng.standard_normal((a.shape[1], min(a.shape[1], rank + 10)))
    q, _ = np.linalg.qr(sketch)
    for _ in range(power_iterations):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    u_small, sing, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_small[:, :rank]) * sing[:rank], vt[:rank]


def _unit_mean_norm(e: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(e, axis=1)
    nz = norms > 0
    return e / norms[nz].mean() if nz.any() else e


def fit_linear(perts: Sequence[tuple[str, ...]], means: np.ndarray, control_mean: np.ndarray,
               gene_symbols: Sequence[str], num_components: int = 10, ridge: float = 0.1,
               embedding: str = "both", center: str = "control", seed: int = 0) -> LinearResponses:
    """Fit on training sets `perts` [T] with condition means `means` [T, G] (control excluded)."""
    if center not in ("control", "mean"):
        raise ValueError(f"linear model center {center!r}: expected 'control' or 'mean'")
    if embedding not in ("both", "training", "expression"):
        raise ValueError(f"linear model embedding {embedding!r}: expected 'both', 'training' or 'expression'")
    if num_components < 1:
        raise ValueError(f"linear model num_components: expected >= 1, received {num_components}")
    if ridge < 0:
        raise ValueError(f"linear model ridge: expected >= 0, received {ridge}")
    means = np.asarray(means, dtype=np.float64)
    control_mean = np.asarray(control_mean, dtype=np.float64)
    b = control_mean.copy() if center == "control" else means.mean(axis=0)
    yc = (means - b[None, :]).T  # G x T
    # Centred on their mean, T training profiles span at most T-1 directions.
    k = max(1, min(num_components, yc.shape[1] - (center == "mean"), yc.shape[0]))
    if yc.size <= EXACT_SVD_MAX:
        u = np.linalg.svd(yc, full_matrices=False)[0][:, :k]
    else:
        rows, _ = low_rank(yc, k, np.random.default_rng(seed))
        u = rows / np.maximum(np.linalg.norm(rows, axis=0, keepdims=True), 1e-300)
    genes = sorted({g for p in perts for g in p} | set(gene_symbols))
    vocab = {g: i for i, g in enumerate(genes)}
    emb = []
    if embedding in ("both", "training"):
        e = np.zeros((len(genes), k))
        for i, p in enumerate(perts):
            if len(p) == 1:
                e[vocab[p[0]]] = u.T @ yc[:, i]
        emb.append(_unit_mean_norm(e))
    if embedding in ("both", "expression"):
        e = np.zeros((len(genes), k))
        for j, g in enumerate(gene_symbols):
            e[vocab[g]] = u[j]
        emb.append(_unit_mean_norm(e))
    gene_emb = np.concatenate(emb, axis=1)
    P = np.zeros((len(perts), gene_emb.shape[1]))
    for i, p in enumerate(perts):
        for g in p:
            P[i] += gene_emb[vocab[g]]
    lhs = np.linalg.solve(u.T @ u + ridge * np.eye(k), u.T @ yc)  # k x T
    rhs = np.linalg.inv(P.T @ P + ridge * np.eye(P.shape[1]))  # E x E
    w = lhs @ P @ rhs  # k x E
    responses = gene_emb @ w.T @ u.T  # V x G
    return LinearResponses(vocab=vocab, responses=responses, has=np.linalg.norm(gene_emb, axis=1) > 0, center=b,
                           num_components=k, directions=u, gene_emb=gene_emb, w=w)
