"""The GO-neighbour prior: what a perturbation set does, estimated from the training conditions alone.

Prior-anchored GEARS predicts control + prior(S) + residual(S), the residual being the GEARS network; the
same prior is also reported as a baseline (``go_prior``), so a user sees what the network adds to it.

Per gene p, a deviation from m, the train-mean delta (training conditions weighted equally, as the
``train_mean`` baseline):

- p's single is in training: dev(p) = d_p - m, its observed delta;
- p's single is not, but p is in training sets of two or more genes ("derived"): d_p is the mean over those
  sets S of d_S - sum over S's other genes h of their delta, i.e. what the additive model says p contributed;
  many screens perturb genes only in combinations. Where a partner h is itself only GO-estimated, the
  remainder carries that estimate's error, so it enters as lambda r + (1 - lambda) e_p (e_p: p's GO estimate);
  lambda is fitted on the training pairs of a trained single, where the answer (its observed delta) is known;
- inside a set of two or more seen genes, a trained gene p may use another row than d_p, whichever predicts
  the training combinations of trained singles best, each held out of its own prediction (the additive model
  stays unless one beats it by more than one standard error):
  - its "combination delta" (w d_p + sum_S r_pS) / (w + n_p), r_pS = d_S - the other genes' deltas, over the
    n_p training combinations S of p with seen genes: how p acts in combinations (real screens have genes that
    dominate or saturate in pairs); w on a grid;
  - its response in the linear model of Ahlmann-Eltze et al. (model/linear.py), fitted to every training
    condition: singles denoised in a few principal directions, and the sub- or super-additivity that the
    training combinations show as a whole;
- a pair of genes, at least one trained, whose GO annotations overlap: gene pairs that share annotation often
  buffer each other (Norman et al. 2019). Its genes' effects outside their own columns are scaled by
  g = 1 + b J, g in [0, MAX_PAIR_GAIN]; with one gene GO-estimated too (on the demo screen, most test pairs: ranked as
  additive, their buffering went unseen). J is the Jaccard of the two genes' GO terms where it is above the
  graph's threshold (the graph's own notion of a link), re-read from the annotations the graph was built from:
  the graph keeps each gene's top-20 neighbours among all genes, which misses most pairs of one pathway. The
  graph's edges serve only where it records no annotations (an edge-list graph). J is clamped to the largest J
  of the pairs b was fitted on: a line is not extrapolated to pairs more related than any it saw. b is fitted
  on the training pairs of trained singles: weighted least squares of each pair's observed gain less 1 on J,
  ridge-shrunk toward b = 0 (the additive model) by a lambda chosen leave-one-out. A pair's observed gain
  <d_ab, s> / <s, s> (s = d_a + d_b) is biased toward 0 by the noise of the observed singles (<s, s> counts
  their noise too), so it is corrected with the noise of the condition means (cell variance / cells; errors in
  variables), and weighted by the singles' signal (<s, s> less that noise). Without those variances, or where
  leave-one-out keeps b = 0, nothing changes; where b is kept, sets of trained genes use the observed singles
  (the combination or linear rows above model gene-level departures and would count the pairs' interactions
  twice). Outside training only, like those rows (cross-fitting gives a training pair the sum of its singles);
- otherwise: dev(p) = lambda_p (a_p - m), a_p the GO-similarity-weighted mean of the observed deltas of p's
  top-k GO neighbours among the training singles, shrunk by lambda_p = W_p / (W_p + tau) (W_p: their total
  Jaccard weight; no neighbour: dev 0). k and tau are fitted by leave-one-out over the training singles, and the
  choice of tau is bagged: lambda_p is the mean of W_p / (W_p + tau_b) over the taus chosen on bootstrap
  resamples of those singles. A screen has a handful to a few dozen singles, and the leave-one-out argmin alone
  jumps between no shrinkage and none of the estimate from one split to the next (on 20 Norman splits: tau 0
  once, inf five times); averaging the choice keeps the estimate where the evidence is mixed.

For a set S: prior(S) = |S| m + sum_p dev(p) when S has a gene whose single was trained, when every gene of S
is seen (trained or derived), or when S is one gene: that is the additive baseline when every single was
trained, and the shrunk GO estimate for an unseen single. Any other set of two or more genes (no trained
single, some gene GO-estimated) gets c + beta sum_p dev(p): summing per-gene estimates that are each already
pulled toward m would count m |S| times, and a derived gene's remainder does not anchor such a set. c is m,
except for a set with a derived gene outside training (cross-fitting keeps m): there c is m_c, the mean delta
of the training sets of two or more genes. A derived gene's evidence is the combinations it was in, and with
the few combinations a screen trains on, those are a large part of m_c; a set of genes never perturbed in
training has no such evidence and keeps m. beta in
[0, 1] is fitted on the training doubles of trained singles, cross-fitted (each double's two singles held out
of its own GO estimates), and kept only where it predicts held-out doubles better than beta = 0 by more than
one standard error; else 0.

Cross-fitting during training (``SetPrior(..., cross_fit=True)``): a training single's prior is its own
leave-one-out GO estimate, which is what an unseen gene gets at test time, so the residual learns to correct
the GO estimate; a training double's prior is the sum of its singles' observed deltas, which is what a seen
pair gets at test time, so the residual learns the interaction. A derived gene takes its GO estimate in every
training set (its derived delta came from training sets, possibly this one). No training condition's prior
uses its own cells.

Memory: the deltas are kept as rows R = D - m of the training singles [T, G], or, when T x G exceeds
``max_exact_mb``, as a rank-r factorization R ~ rows [T, r] @ basis [r, G] (r = ``rank``); per gene only
its k + 1 coefficients on those rows are stored, so genome scale (10k singles x 8k genes) costs a few MB.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gears_dist.data.stats import condition_means
from gears_dist.model.linear import fit_linear, low_rank

K_GRID = (5, 10, 20)
TAU_GRID = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, np.inf)
# Weight of a gene's single against each training combination's evidence (inf: the single alone, the additive model).
COMBO_GRID = (np.inf, 8.0, 4.0, 2.0, 1.0, 0.5)
# Leave-one-out fits use at most this many training singles and doubles (genome screens have ~10k).
MAX_FIT_CONDITIONS = 1000
# Bootstrap resamples of the training singles over which the choice of tau is averaged (module doc).
NUM_TAU_BAGS = 200
# Pair gains (module doc): the ridge penalties tried (relative to the mean pair weight; inf: b = 0), the fewest
# training pairs of trained singles to fit b on, and the largest gain.
GAIN_RIDGE_GRID = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, np.inf)
MIN_GAIN_PAIRS = 4
MAX_PAIR_GAIN = 3.0


@dataclasses.dataclass
class PriorFit:
    """A fitted GO-neighbour prior over the P nodes of a GO graph (numpy; ``SetPrior`` is its torch form)."""

    nodes: list[str]            # GO graph nodes (the model's perturbation vocabulary)
    single_genes: list[str]     # the T training singles whose deltas the prior uses
    mean_delta: np.ndarray      # [G] train-mean delta m
    rows: np.ndarray            # [T, r] residual rows R = D - m (r = G when exact)
    basis: np.ndarray | None    # [r, G] or None (exact)
    eval_index: np.ndarray      # [P, k + 1] rows of R per node (-1 padding)
    eval_weight: np.ndarray     # [P, k + 1]
    loo_index: np.ndarray       # [P, k + 1]: a trained single's leave-one-out GO estimate (others: as eval)
    loo_weight: np.ndarray
    seen: np.ndarray            # [P] bool: the node's single is in training, or its delta is derived
    derived: np.ndarray         # [P] bool: seen through training sets of >= 2 genes only (see module doc)
    combo_index: np.ndarray     # [P] row of the node's combination delta, -1 for none (see module doc)
    combo_weight: float         # w of the combination deltas (inf: none)
    beta_unseen: float          # weight of the deviations for sets of >= 2 genes that are not anchored
    k: int
    tau: float                  # the leave-one-out choice on all training singles
    loo_mse: float              # leave-one-out MSE of the fitted estimate over the training singles
    # [P] expression column of each node's own gene (-1: not measured). A perturbation sets its target's own
    # expression directly (CRISPRa up, CRISPRi down), whatever its partners do: gains on the prior leave it alone.
    node_column: np.ndarray | None = None
    # what the combination rows are: "combination" deltas (weight w), "linear" responses, or "none"
    combo_source: str = "combination"
    # the taus whose shrinkage factors are averaged (the bootstrap choices; [tau] when given or not bagged)
    taus: np.ndarray | None = None
    # [G] m_c, the mean delta of the training sets of two or more genes (None: no such set, m is used)
    combo_mean: np.ndarray | None = None
    # pair gains (combo_source "gain"): b of g = 1 + b J; for a graph without GO terms (an edge list), each node's
    # linked nodes [P, K] (-1 padding) with their Jaccard weights, to look J up; None otherwise
    pair_gain: float | None = None
    pair_max_jaccard: float | None = None   # J is clamped to the largest J of the pairs b was fitted on
    pair_threshold: float | None = None     # J at or below it counts as 0 (the graph's threshold)
    # each node's GO terms (CSR: indptr [P + 1], ids [nnz]) for the exact pair Jaccard; None: pair_nodes instead
    term_ptr: np.ndarray | None = None
    term_ids: np.ndarray | None = None
    pair_nodes: np.ndarray | None = None
    pair_weight: np.ndarray | None = None

    def summary(self) -> str:
        lowrank = "exact" if self.basis is None else f"rank {self.basis.shape[0]}"
        return (f"GO prior: {len(self.single_genes)} training singles, {int(self.derived.sum())} genes derived from "
                f"training combinations, {self._combo_text()} "
                f"({lowrank}), k {self.k}, tau {self._tau_text()}, "
                f"beta for unseen sets {self.beta_unseen:.3f}, leave-one-out mse {self.loo_mse:.4g}")

    def _tau_text(self) -> str:
        if self.taus is None or len(self.taus) <= 1:
            return f"{self.tau:g}"
        return f"{self.tau:g} (bagged: median {np.median(self.taus):g}, {np.mean(np.isinf(self.taus)):.0%} inf)"

    def _combo_text(self) -> str:
        num = int((self.combo_index >= 0).sum())
        if self.combo_source == "gain":
            return f"pairs with a trained gene scaled by 1 {self.pair_gain:+.2f} x GO Jaccard"
        if self.combo_source == "linear":
            return f"{num} genes use linear-model responses in sets of trained genes"
        return f"{num} combination deltas (w {self.combo_weight:g})"

    def residual_rows(self) -> np.ndarray:
        return self.rows if self.basis is None else self.rows @ self.basis

    def predict_delta(self, sets: Sequence[Sequence[int]]) -> np.ndarray:
        """prior(S) [U, G] for sets given as GO node ids (numpy twin of SetPrior.forward in eval mode)."""
        kmax = max([1] + [len(s) for s in sets])
        perts = np.full((len(sets), kmax), -1, dtype=np.int64)
        for i, s in enumerate(sets):
            perts[i, :len(s)] = list(s)
        with torch.no_grad():
            return SetPrior(self).eval()(torch.from_numpy(perts)).double().numpy()


def _neighbour_lists(go, single_index: dict[str, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per GO node: (training-single row ids, Jaccard weights) of its in-neighbours, strongest first, no self."""
    src, dst = go.edge_index
    weight = go.edge_weight
    node_row = np.array([single_index.get(n, -1) for n in go.nodes], dtype=np.int64)
    keep = (src != dst) & (node_row[src] >= 0) & (weight > 0)
    src, dst, weight = src[keep], dst[keep], weight[keep]
    order = np.lexsort((-weight, dst))
    src, dst, weight = src[order], dst[order], weight[order]
    bounds = np.searchsorted(dst, np.arange(go.num_nodes + 1))
    return [(node_row[src[bounds[p]:bounds[p + 1]]], weight[bounds[p]:bounds[p + 1]].astype(np.float64))
            for p in range(go.num_nodes)]


def _shrinkage(total: float, taus) -> float:
    """lambda = the mean over taus of W / (W + tau) (tau 0: 1, inf: 0)."""
    taus = np.atleast_1d(np.asarray(taus, dtype=np.float64))
    finite = np.isfinite(taus)
    lam = np.zeros_like(taus)
    lam[finite] = np.divide(total, total + taus[finite], out=np.ones(int(finite.sum())), where=taus[finite] > 0)
    return float(lam.mean())


def _estimate_coefficients(rows: np.ndarray, weights: np.ndarray, exclude: Sequence[int], k: int, tau
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, coefficients) of lambda * (Jaccard-weighted mean of the top-k neighbours), without `exclude`;
    tau: one value or the bagged taus (lambda is then the mean of the shrinkage factors)."""
    if len(exclude):
        ok = ~np.isin(rows, exclude)
        rows, weights = rows[ok], weights[ok]
    rows, weights = rows[:k], weights[:k]
    total = weights.sum()
    if total <= 0:
        return rows[:0], weights[:0]
    return rows, weights * (_shrinkage(total, tau) / total)


def _apply(coef: tuple[np.ndarray, np.ndarray], residuals: np.ndarray) -> np.ndarray:
    rows, w = coef
    return w @ residuals[rows] if rows.size else np.zeros(residuals.shape[1])


def _table_estimate(index: np.ndarray, weight: np.ndarray, p: int, residuals: np.ndarray) -> np.ndarray:
    """Node p's deviation from a padded coefficient table (eval_* or loo_*; -1 entries are padding)."""
    ok = index[p] >= 0
    return _apply((index[p][ok], weight[p][ok]), residuals)


def fit_go_prior(go, single_genes: Sequence[str], single_deltas: np.ndarray, mean_delta: np.ndarray,
                 doubles: Sequence[tuple[str, ...]] = (), double_deltas: np.ndarray | None = None,
                 max_exact_mb: float = 64.0, rank: int = 256, seed: int = 0, k: int | None = None,
                 tau: float | None = None, gene_symbols: Sequence[str] | None = None,
                 single_noise: np.ndarray | None = None, control_noise: np.ndarray | None = None,
                 pair_terms: Sequence[frozenset] | None = None) -> PriorFit:
    """Fit the prior from the training singles' and doubles' deltas (condition mean - control mean).

    go: the GO graph (GeneGraph: nodes, edge_index, edge_weight). single_genes [T] / single_deltas [T, G]: the
    training singles; mean_delta [G]: the train-mean delta; doubles / double_deltas: the training sets of two or
    more genes (beta from the pairs; derived genes from all). The training conditions only: nothing here may see validation or test conditions. k / tau: fixed
    values instead of the leave-one-out fit (both or neither). gene_symbols [G]: the expression columns' genes
    (``node_column``; None: no node has a column). single_noise [T, G] / control_noise [G]: the variance of
    each training single's mean and of the control mean (cell variance / cells), for the pair gains (both or
    none; a combination's own noise does not bias its observed gain). pair_terms [P]: each node's GO terms, for
    the pairs' Jaccard (None: the graph's edges; see _go_pair_table)."""
    single_deltas = np.asarray(single_deltas, dtype=np.float64)
    mean_delta = np.asarray(mean_delta, dtype=np.float64)
    num_singles, num_genes = single_deltas.shape if single_deltas.ndim == 2 else (0, mean_delta.shape[0])
    if len(single_genes) != num_singles or mean_delta.shape != (num_genes,):
        raise ValueError(f"fit_go_prior: {len(single_genes)} single genes, deltas {single_deltas.shape}, mean delta "
                         f"{mean_delta.shape}: expected [T] names, [T, G] deltas and a [G] mean")
    node_index = {n: i for i, n in enumerate(go.nodes)}
    # Training singles that are not GO nodes cannot be perturbed by the model: left out of the prior.
    keep = [i for i, g in enumerate(single_genes) if g in node_index]
    genes = [single_genes[i] for i in keep]
    residuals = single_deltas[keep] - mean_delta[None, :] if keep else np.zeros((0, num_genes))
    single_index = {g: i for i, g in enumerate(genes)}
    neighbours = _neighbour_lists(go, single_index)
    rng = np.random.default_rng(seed)

    # k and tau by leave-one-out over (a sample of) the training singles: squared error over all genes.
    fit_rows = np.arange(len(genes))
    if fit_rows.size > MAX_FIT_CONDITIONS:
        fit_rows = np.sort(rng.choice(fit_rows, MAX_FIT_CONDITIONS, replace=False))
    if (k is None) != (tau is None):
        raise ValueError(f"fit_go_prior: give both k and tau or neither (received k={k}, tau={tau})")
    best = (np.inf, K_GRID[-1], np.inf) if k is None else (np.nan, int(k), float(tau))
    taus = np.array([best[2]])
    if fit_rows.size and k is None:
        errors = np.zeros((fit_rows.size, len(K_GRID), len(TAU_GRID)))   # per held-out single
        for a, k in enumerate(K_GRID):
            for b, tau in enumerate(TAU_GRID):
                for i, r in enumerate(fit_rows):
                    nbr_rows, nbr_w = neighbours[node_index[genes[r]]]
                    est = _apply(_estimate_coefficients(nbr_rows, nbr_w, [r], k, tau), residuals)
                    errors[i, a, b] = float(np.mean((est - residuals[r]) ** 2))
                err = errors[:, a, b].mean()
                if err < best[0] - 1e-12:
                    best = (err, k, tau)
        # Bag the choice of tau at the chosen k (module doc): the argmin on each bootstrap resample.
        curves = errors[:, K_GRID.index(best[1]), :]
        picks = rng.integers(0, fit_rows.size, size=(NUM_TAU_BAGS, fit_rows.size))
        taus = np.asarray(TAU_GRID)[np.argmin(curves[picks].mean(axis=1), axis=1)]
    loo_mse, k, tau = best

    # Per-node coefficient tables (padded to k + 1 entries).
    width = k + 1
    num_nodes = go.num_nodes
    eval_index = np.full((num_nodes, width), -1, dtype=np.int64)
    eval_weight = np.zeros((num_nodes, width))
    loo_index, loo_weight = eval_index.copy(), eval_weight.copy()
    seen = np.zeros(num_nodes, dtype=bool)
    for p, name in enumerate(go.nodes):
        nbr_rows, nbr_w = neighbours[p]
        own = single_index.get(name)
        rows_est, w_est = _estimate_coefficients(nbr_rows, nbr_w, [] if own is None else [own], k, taus)
        loo_index[p, :rows_est.size], loo_weight[p, :rows_est.size] = rows_est, w_est
        if own is None:
            eval_index[p, :rows_est.size], eval_weight[p, :rows_est.size] = rows_est, w_est
        else:
            seen[p] = True
            eval_index[p, 0], eval_weight[p, 0] = own, 1.0

    # beta: training doubles of two trained singles, each single held out of both genes' estimates.
    beta = 0.0
    pairs = [(i, tuple(pair)) for i, pair in enumerate(doubles)
             if len(pair) == 2 and all(g in single_index for g in pair)]
    if pairs and double_deltas is not None and np.isfinite(taus).any():
        if len(pairs) > MAX_FIT_CONDITIONS:
            pairs = [pairs[i] for i in np.sort(rng.choice(len(pairs), MAX_FIT_CONDITIONS, replace=False))]
        double_deltas = np.asarray(double_deltas, dtype=np.float64)
        xy, xx, yy = np.zeros(len(pairs)), np.zeros(len(pairs)), np.zeros(len(pairs))
        for t, (i, (a, b)) in enumerate(pairs):
            held = [single_index[a], single_index[b]]
            x = sum(_apply(_estimate_coefficients(*neighbours[node_index[g]], held, k, taus), residuals)
                    for g in (a, b))
            y = double_deltas[i] - mean_delta
            xy[t], xx[t], yy[t] = x @ y, x @ x, y @ y
        beta = _fit_beta(xy, xx, yy)

    # Derived genes: GO nodes without a training single that are in training sets of >= 2 genes.
    derived = np.zeros(num_nodes, dtype=bool)
    derived_rows: list[np.ndarray] = []
    if len(doubles) and double_deltas is not None:
        double_deltas = np.asarray(double_deltas, dtype=np.float64)
        est_cache: dict[int, np.ndarray] = {}

        def delta_of(name: str) -> np.ndarray:
            # Observed single, else the GO estimate (a node's eval coefficients, deviation from m).
            if name in single_index:
                return single_deltas[keep[single_index[name]]]
            p = node_index.get(name)
            if p is None:
                return mean_delta
            if p not in est_cache:
                est_cache[p] = mean_delta + _table_estimate(eval_index, eval_weight, p, residuals)
            return est_cache[p]

        derive_weight = _fit_derive_weight(doubles, double_deltas, single_index, node_index, single_deltas[keep],
                                           mean_delta, loo_index, loo_weight, residuals, delta_of)
        sums: dict[str, list] = {}
        for i, genes_i in enumerate(doubles):
            if len(genes_i) < 2:
                continue
            for g in genes_i:
                if g in single_index or g not in node_index:
                    continue
                rest = sum(delta_of(h) for h in genes_i if h != g)
                evidence = double_deltas[i] - rest
                if any(h not in single_index for h in genes_i if h != g):
                    # the partner's part is itself a GO estimate: trust the remainder as far as training says
                    evidence = derive_weight * evidence + (1.0 - derive_weight) * delta_of(g)
                acc = sums.setdefault(g, [np.zeros(num_genes), 0])
                acc[0] += evidence
                acc[1] += 1
        for g in sorted(sums):
            p = node_index[g]
            total, count = sums[g]
            row = len(genes) + len(derived_rows)
            derived_rows.append(total / count - mean_delta)
            derived[p] = seen[p] = True
            # Eval: the derived row; loo (training) keeps the GO estimate it had.
            eval_index[p], eval_weight[p] = -1, 0.0
            eval_index[p, 0], eval_weight[p, 0] = row, 1.0
        if derived_rows:
            residuals = np.concatenate([residuals, np.stack(derived_rows)], axis=0)

    combo_index, combo_weight, combo_source = np.full(num_nodes, -1, dtype=np.int64), np.inf, "none"
    pair_gain = pair_nodes = pair_weight = pair_max_jaccard = pair_threshold = term_ptr = term_ids = None
    if len(doubles) and double_deltas is not None:
        seen_delta = {g: single_deltas[keep[i]] for g, i in single_index.items()}
        seen_delta.update({g: mean_delta + derived_rows[j] for j, g in enumerate(sorted(sums))})
        # The linear candidate gives every trained gene a row and refits on all training conditions per fold:
        # only while the prior is kept exactly (a combinatorial screen's ~100 genes, not a genome screen's 10k
        # singles, whose rows would double the residual matrix the low-rank form exists to avoid)
        exact = (len(genes) + len(doubles)) * num_genes * 4 <= max_exact_mb * 2**20
        combo_rows, combo_weight, combo_source = _combination_deltas(
            doubles, double_deltas, seen_delta, set(single_index), rng,
            linear_data=(genes, single_deltas[keep], list(gene_symbols or ())) if exact else None)
        if single_noise is not None and control_noise is not None:
            if pair_terms is not None:
                # the graph's own notion of a link (Jaccard above its threshold), without its per-gene top-k cut
                threshold = float((getattr(go, "info", None) or {}).get("threshold", 0.0))

                def jaccard(a: str, b: str) -> float:
                    return _set_jaccard(pair_terms[node_index[a]], pair_terms[node_index[b]], threshold)
            else:
                threshold = 0.0
                pair_nodes, pair_weight = _go_pair_table(go)

                def jaccard(a: str, b: str) -> float:
                    return _pair_jaccard(pair_nodes, pair_weight, node_index[a], node_index[b])
            columns = node_columns(go.nodes, gene_symbols)
            slope, max_jaccard = _fit_pair_gain(
                doubles, double_deltas, np.asarray(control_noise, np.float64),
                {g: single_deltas[keep[i]] for g, i in single_index.items()},
                {g: np.asarray(single_noise[keep[i]], np.float64) for g, i in single_index.items()},
                {g: int(columns[node_index[g]]) for g in single_index}, jaccard, rng)
            if slope != 0.0:
                combo_rows, combo_weight, combo_source, pair_gain = {}, np.inf, "gain", slope
                pair_max_jaccard, pair_threshold = max_jaccard, threshold
                if pair_terms is not None:
                    term_ptr, term_ids = _term_table(pair_terms)
        for j, (g, row) in enumerate(combo_rows.items()):
            combo_index[node_index[g]] = residuals.shape[0] + j
        if combo_rows:
            residuals = np.concatenate([residuals, np.stack(list(combo_rows.values())) - mean_delta], axis=0)

    rows, basis = residuals, None
    if residuals.size * 4 > max_exact_mb * 2**20 and min(residuals.shape) > rank:
        rows, basis = low_rank(residuals, rank, rng)
    return PriorFit(nodes=list(go.nodes), single_genes=genes, mean_delta=mean_delta, rows=rows, basis=basis,
                    eval_index=eval_index, eval_weight=eval_weight, loo_index=loo_index, loo_weight=loo_weight,
                    seen=seen, derived=derived, combo_index=combo_index, combo_weight=float(combo_weight),
                    combo_source=combo_source,
                    beta_unseen=beta, k=k, tau=float(tau), loo_mse=float(loo_mse), taus=taus,
                    combo_mean=(np.asarray(double_deltas, dtype=np.float64).mean(axis=0)
                                if len(doubles) and double_deltas is not None else None),
                    pair_gain=pair_gain, pair_max_jaccard=pair_max_jaccard, pair_threshold=pair_threshold,
                    term_ptr=term_ptr, term_ids=term_ids,
                    pair_nodes=pair_nodes if pair_gain is not None else None,
                    pair_weight=pair_weight if pair_gain is not None else None,
                    node_column=node_columns(go.nodes, gene_symbols))


def _fit_beta(xy: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> float:
    """beta in [0, 1] from per-pair x.y, x.x and y.y (x: the pair's summed GO deviations, y: its deviation from m).

    Least squares over the pairs, kept only where it predicts held-out pairs better than beta = 0 (the train
    mean) by more than one standard error of that gain (leave-one-out, paired); with the one or two pairs a
    small screen has, a clipped least-squares beta is as often 0 as 1."""
    n = len(xy)
    if n < 2 or xx.sum() <= 0:
        return 0.0
    loo = np.clip(np.divide(xy.sum() - xy, xx.sum() - xx, out=np.zeros(n), where=(xx.sum() - xx) > 0), 0.0, 1.0)
    gain = yy - (yy - 2 * loo * xy + loo ** 2 * xx)  # squared error of the mean minus that of the held-out beta
    if gain.mean() <= gain.std(ddof=1) / np.sqrt(n):
        return 0.0
    return float(np.clip(xy.sum() / xx.sum(), 0.0, 1.0))


def _fit_derive_weight(doubles, double_deltas, single_index, node_index, single_deltas, mean_delta, loo_index,
                       loo_weight, residuals, delta_of) -> float:
    """lambda in [0, 1]: how far a gene's remainder in a pair whose partner is only GO-estimated is trusted over
    the gene's own GO estimate (lambda r + (1 - lambda) e).

    Fitted where the answer is known: in training pairs with a trained single a, a's remainder after its
    partner b's GO estimate (b's leave-one-out estimate where b is trained too), blended with a's own
    leave-one-out GO estimate, against a's observed delta; least squares over the genes and the pairs.
    1 (the remainder as is) without such pairs."""
    def loo_estimate(name: str) -> np.ndarray:
        return mean_delta + _table_estimate(loo_index, loo_weight, node_index[name], residuals)

    num = den = 0.0
    for i, genes_i in enumerate(doubles):
        if len(genes_i) != 2 or not all(g in node_index for g in genes_i):
            continue
        for a, b in (genes_i, genes_i[::-1]):
            if a not in single_index:
                continue
            partner = loo_estimate(b) if b in single_index else delta_of(b)
            r = double_deltas[i] - partner
            e = loo_estimate(a)
            target = single_deltas[single_index[a]]
            num += float((r - e) @ (target - e))
            den += float((r - e) @ (r - e))
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 1.0


def node_columns(nodes: Sequence[str], gene_symbols: Sequence[str] | None) -> np.ndarray:
    """[P] the expression column of each GO node's gene, -1 where it is not measured."""
    column = {g: j for j, g in enumerate(gene_symbols or ())}
    return np.array([column.get(n, -1) for n in nodes], dtype=np.int64)


def _combination_deltas(combos: Sequence[tuple[str, ...]], combo_deltas: np.ndarray, seen_delta: dict[str, np.ndarray],
                        trained: set[str], rng: np.random.Generator,
                        linear_data: tuple[list[str], np.ndarray, list[str]] | None = None
                        ) -> tuple[dict[str, np.ndarray], float, str]:
    """Rows that trained genes use inside sets of two or more seen genes, and what they are.

    Candidates, scored on the training combinations of trained singles (the seen2 case), each predicted
    without its own evidence:
    - the additive model (w = inf): no rows;
    - combination deltas (module doc) for each w of the grid, leave-one-out;
    - the linear model's responses (model/linear.py) refitted without the held-out combinations
      (`linear_data`: the training singles' genes and deltas, and the expression columns' genes);
      leave-one-out up to LINEAR_FOLDS combinations, else that many folds.
    Returns (rows, w, source): rows per trained gene (deltas), w (inf unless combination deltas won), and
    "combination", "linear" or "none"."""
    remainders: dict[str, list[tuple[int, np.ndarray]]] = {}
    for i, genes_i in enumerate(combos):
        if len(genes_i) < 2 or not all(g in seen_delta for g in genes_i):
            continue
        for g in genes_i:
            if g in trained:
                rest = sum(seen_delta[h] for h in genes_i if h != g)
                remainders.setdefault(g, []).append((i, combo_deltas[i] - rest))
    tests = [i for i, genes_i in enumerate(combos) if len(genes_i) >= 2 and all(g in trained for g in genes_i)]
    if len(tests) > MAX_FIT_CONDITIONS:
        tests = [tests[j] for j in np.sort(rng.choice(len(tests), MAX_FIT_CONDITIONS, replace=False))]
    if not tests:
        return {}, np.inf, "none"
    errors: dict[object, np.ndarray] = {}
    for w in COMBO_GRID if remainders else (np.inf,):
        err = np.zeros(len(tests))
        for t, i in enumerate(tests):
            pred = np.zeros_like(combo_deltas[i])
            for g in combos[i]:
                others = [r for j, r in remainders.get(g, []) if j != i]
                pred += (w * seen_delta[g] + sum(others)) / (w + len(others)) if others and np.isfinite(w) \
                    else seen_delta[g]
            err[t] = np.mean((pred - combo_deltas[i]) ** 2)
        errors[w] = err
    if linear_data is not None:
        errors["linear"] = _linear_cv_errors(combos, combo_deltas, tests, *linear_data)
    best = min(errors, key=lambda v: (errors[v].mean(), v != "linear" and not np.isfinite(v)))
    # One-standard-error rule: the candidate must beat the additive model by more than the noise of its own
    # held-out estimate (paired over the held-out combinations), or the additive model stays.
    gain = errors[np.inf] - errors[best]
    if (best != "linear" and not np.isfinite(best)) or len(tests) < 2 \
            or gain.mean() <= gain.std(ddof=1) / np.sqrt(len(tests)):
        return {}, np.inf, "none"
    if best == "linear":
        single_genes, single_deltas, symbols = linear_data
        fit = _fit_linear_deltas(single_genes, single_deltas, combos, combo_deltas, range(len(combos)), symbols)
        return {g: fit.responses[fit.vocab[g]] for g in sorted(trained)}, np.inf, "linear"
    w = float(best)
    return ({g: (w * seen_delta[g] + sum(r for _, r in rs)) / (w + len(rs)) for g, rs in sorted(remainders.items())},
            w, "combination")


def _go_pair_table(go) -> tuple[np.ndarray, np.ndarray]:
    """[P, K] each GO node's linked nodes (both edge directions, no self; -1 padding) and their Jaccard: the pair
    Jaccard where the graph records no GO terms (an edge-list graph)."""
    src, dst = (np.asarray(a, dtype=np.int64) for a in go.edge_index)
    weight = np.asarray(go.edge_weight, dtype=np.float64)
    keep = (src != dst) & (weight > 0)
    a = np.concatenate([src[keep], dst[keep]])
    b = np.concatenate([dst[keep], src[keep]])
    w = np.concatenate([weight[keep], weight[keep]])
    order = np.lexsort((-w, b, a))
    a, b, w = a[order], b[order], w[order]
    first = np.ones(a.size, dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b, w = a[first], b[first], w[first]
    counts = np.bincount(a, minlength=go.num_nodes)
    nodes = np.full((go.num_nodes, int(counts.max()) if a.size else 0), -1, dtype=np.int64)
    weights = np.zeros(nodes.shape, dtype=np.float32)
    position = np.arange(a.size) - np.repeat(np.cumsum(counts) - counts, counts)
    nodes[a, position], weights[a, position] = b, w
    return nodes, weights


def _term_table(term_sets: Sequence[frozenset]) -> tuple[np.ndarray, np.ndarray]:
    """Each node's GO terms as CSR arrays (indptr [P + 1], term ids [nnz], sorted within a node), for the exact
    Jaccard of any pair (SetPrior._term_jaccard): a few MB for a genome, where a table of every gene's partners
    above the graph's threshold would not fit."""
    codes: dict = {}
    rows = [sorted({codes.setdefault(t, len(codes)) for t in terms}) for terms in term_sets]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return indptr, np.array([t for r in rows for t in r], dtype=np.int64)


def _set_jaccard(a: frozenset, b: frozenset, threshold: float) -> float:
    union = len(a | b)
    j = len(a & b) / union if union else 0.0
    return j if j > threshold else 0.0


def _pair_jaccard(pair_nodes: np.ndarray, pair_weight: np.ndarray, a: int, b: int) -> float:
    """The GO-graph Jaccard of nodes a and b (0 when not linked), from _go_pair_table's arrays."""
    hit = pair_nodes[a] == b
    return float(pair_weight[a][hit].max()) if hit.any() else 0.0


def _fit_pair_gain(combos, combo_deltas, control_noise, single_delta, single_noise, own_column, jaccard, rng
                   ) -> float:
    """(b, J_max) of the pair gain g = 1 + b min(J, J_max) (module doc): b is 0 where leave-one-out keeps the
    additive model; J_max is the largest J of the pairs b was fitted on (a line is not extrapolated).

    combos / combo_deltas [D, G]: the training sets; control_noise [G]; single_delta / single_noise: per
    trained gene; own_column: its expression column (-1: none); jaccard(gene, gene): their GO-graph Jaccard."""
    pairs = [i for i, c in enumerate(combos) if len(c) == 2 and all(g in single_delta for g in c)]
    if len(pairs) > MAX_FIT_CONDITIONS:
        pairs = [pairs[i] for i in np.sort(rng.choice(len(pairs), MAX_FIT_CONDITIONS, replace=False))]
    num_genes = combo_deltas.shape[1]
    rows = []   # (J, observed gain - 1, weight, s.s, s.d, d.d) outside the own columns
    for i in pairs:
        a, b = combos[i]
        outside = np.ones(num_genes, dtype=bool)
        outside[[c for c in (own_column[a], own_column[b]) if c >= 0]] = False
        s = (single_delta[a] + single_delta[b])[outside]
        d = combo_deltas[i][outside]
        # Errors in variables: s holds both singles' noise and twice the control's; d shares the control's.
        noise_c = control_noise[outside].sum()
        signal = s @ s - (single_noise[a] + single_noise[b])[outside].sum() - 4.0 * noise_c
        if signal > 0:
            rows.append((jaccard(a, b), (d @ s - 2.0 * noise_c) / signal - 1.0, signal, s @ s, s @ d,
                         d @ d))
    if len(rows) < MIN_GAIN_PAIRS or not any(r[0] > 0 for r in rows):
        return 0.0, 0.0
    j = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    w = np.array([r[2] for r in rows])

    def slope(use: np.ndarray, ridge: float) -> float:
        if np.isinf(ridge):
            return 0.0
        den = (w[use] * j[use] ** 2).sum() + ridge * w.mean()
        return float((w[use] * j[use] * y[use]).sum() / den) if den > 0 else 0.0

    errors = []
    for ridge in GAIN_RIDGE_GRID:
        err = 0.0
        for k, (jk, _, _, ss, sd, dd) in enumerate(rows):
            others = np.arange(len(rows)) != k
            g = np.clip(1.0 + slope(others, ridge) * min(jk, j[others].max()), 0.0, MAX_PAIR_GAIN)
            err += g * g * ss - 2.0 * g * sd + dd     # |g s - d|^2 on the columns outside
        errors.append(err)
    return slope(np.ones(len(rows), dtype=bool), GAIN_RIDGE_GRID[int(np.argmin(errors))]), float(j.max())


# Held-out combinations for the linear candidate: leave-one-out up to this many, else this many folds.
LINEAR_FOLDS = 10


def _fit_linear_deltas(single_genes, single_deltas, combos, combo_deltas, use, symbols):
    """The linear model on the training singles and the combinations `use`, in deltas (centre: no change),
    its responses kept at the observed singles on the trained genes' own columns: a perturbation sets its
    target's expression whatever its partner does, so a set stays additive there. (A model fitted to
    sub-additive pairs would otherwise shrink the targets' own change, the largest entries of a profile: on a
    generated screen where half the pairs buffer, one split's test pairs went from mse_de 0.04 additive to 0.37.)"""
    use = np.asarray(list(use), dtype=np.int64)
    perts = [(g,) for g in single_genes] + [tuple(combos[i]) for i in use]
    combo_deltas = np.asarray(combo_deltas, np.float64)
    deltas = np.concatenate([np.asarray(single_deltas, np.float64).reshape(len(single_genes), combo_deltas.shape[1]),
                             combo_deltas[use]])
    fit = fit_linear(perts, deltas, np.zeros(deltas.shape[1]), symbols,
                     embedding="both" if symbols else "training")
    column = {g: j for j, g in enumerate(symbols or ())}
    own = np.array([column[g] for g in single_genes if g in column], dtype=np.int64)
    if own.size:
        rows = np.array([fit.vocab[g] for g in single_genes], dtype=np.int64)
        fit.responses[np.ix_(rows, own)] = np.asarray(single_deltas, np.float64)[:, own]
    return fit


def _linear_cv_errors(combos, combo_deltas, tests, single_genes, single_deltas, symbols) -> np.ndarray:
    """Per test combination: the squared error of the linear model fitted without it (and its fold)."""
    folds = np.array_split(np.asarray(tests), min(len(tests), LINEAR_FOLDS))
    err = np.zeros(len(tests))
    position = {i: t for t, i in enumerate(tests)}
    for fold in folds:
        held = set(fold.tolist())
        fit = _fit_linear_deltas(single_genes, single_deltas, combos, combo_deltas,
                                 [i for i in range(len(combos)) if i not in held], symbols)
        for i in fold:
            pred = sum(fit.responses[fit.vocab[g]] for g in combos[i])
            err[position[int(i)]] = np.mean((pred - combo_deltas[i]) ** 2)
    return err


def fit_from_store(store, train_conditions: Sequence[str], go, max_exact_mb: float = 64.0, rank: int = 256
                   ) -> PriorFit:
    """The prior from a store's training conditions (rows of stats/mean; never the cells)."""
    table = dict(zip(store.condition_names, store.condition_genes()))
    missing = [n for n in train_conditions if n not in table]
    if missing:
        raise ValueError(f"GO prior: training conditions not in the store: {missing[:10]}; is the split from this "
                         f"store?")
    perturbed = [n for n in train_conditions if len(table[n]) > 0]
    if not perturbed:
        raise ValueError("GO prior: the training split has no perturbed condition; the prior needs training "
                         "perturbations (use a split with training singles)")
    index = {n: i for i, n in enumerate(store.condition_names)}
    rows = np.array(sorted(index[n] for n in perturbed), dtype=np.int64)
    means, noise, control, control_noise = condition_means(store, rows)
    return fit_from_means(go, [tuple(table[store.condition_names[r]]) for r in rows], means - control[None, :],
                          store.genes, noise=noise, control_noise=control_noise, max_exact_mb=max_exact_mb,
                          rank=rank)


def fit_from_means(go, perts: Sequence[tuple[str, ...]], deltas: np.ndarray, gene_symbols: Sequence[str],
                   noise: np.ndarray | None = None, control_noise: np.ndarray | None = None,
                   max_exact_mb: float = 64.0, rank: int = 256) -> PriorFit:
    """The prior from the training conditions' deltas [T, G] (perturbed ones only: `perts` their gene sets),
    with each mean's variance [T, G] and the control's [G] where known (pair gains need them): the one way both
    the model and the go_prior baseline fit it. Pair gains use the GO terms the graph was built from, where it
    records them."""
    from gears_dist.graphs.go import annotation_sets

    singles = [i for i, p in enumerate(perts) if len(p) == 1]
    combos = [i for i, p in enumerate(perts) if len(p) >= 2]
    return fit_go_prior(go, [perts[i][0] for i in singles], deltas[singles], deltas.mean(axis=0),
                        [perts[i] for i in combos], deltas[combos], max_exact_mb=max_exact_mb, rank=rank,
                        gene_symbols=gene_symbols, single_noise=None if noise is None else noise[singles],
                        control_noise=control_noise,
                        pair_terms=annotation_sets(go) if noise is not None and combos else None)


class SetPrior(nn.Module):
    """prior(S) [U, G] for perturbation sets perts [U, K] (GO node ids padded with -1); torch form of PriorFit.

    Buffers only (no parameters): they are saved with the model, so a loaded model predicts with the prior it
    was trained with. ``forward(perts, cross_fit=True)`` gives sets of one gene their leave-one-out estimate
    (training); sets of two or more genes use the observed singles, except those in ``as_unseen`` (training:
    pairs cross-fitted as if none of their genes were trained, see ModelConfig.prior_crossfit_pairs)."""

    def __init__(self, fit: PriorFit | None = None, *, shapes: dict[str, tuple[int, ...]] | None = None):
        super().__init__()
        if fit is not None:
            tensors = {
                "mean_delta": torch.as_tensor(fit.mean_delta, dtype=torch.float32),
                "combo_mean": torch.as_tensor(fit.combo_mean if fit.combo_mean is not None else fit.mean_delta,
                                              dtype=torch.float32),
                "rows": torch.as_tensor(fit.rows, dtype=torch.float32),
                "basis": torch.as_tensor(fit.basis if fit.basis is not None else np.zeros((0, 0)),
                                         dtype=torch.float32),
                "eval_index": torch.as_tensor(fit.eval_index), "eval_weight": torch.as_tensor(
                    fit.eval_weight, dtype=torch.float32),
                "loo_index": torch.as_tensor(fit.loo_index), "loo_weight": torch.as_tensor(
                    fit.loo_weight, dtype=torch.float32),
                "seen": torch.as_tensor(fit.seen), "derived": torch.as_tensor(fit.derived),
                "combo_index": torch.as_tensor(fit.combo_index),
                "beta_unseen": torch.tensor(float(fit.beta_unseen)),
                "node_column": torch.as_tensor(fit.node_column if fit.node_column is not None
                                               else np.full(len(fit.nodes), -1, dtype=np.int64)),
                "pair_gain": torch.tensor([fit.pair_gain, fit.pair_max_jaccard, fit.pair_threshold or 0.0]
                                          if fit.pair_gain is not None else [], dtype=torch.float32),
                "term_ptr": torch.as_tensor(fit.term_ptr if fit.term_ptr is not None else np.zeros(0, np.int64)),
                "term_ids": torch.as_tensor(fit.term_ids if fit.term_ids is not None else np.zeros(0, np.int64)),
                "pair_nodes": torch.as_tensor(fit.pair_nodes if fit.pair_nodes is not None
                                              else np.zeros((len(fit.nodes), 0), dtype=np.int64)),
                "pair_weight": torch.as_tensor(fit.pair_weight if fit.pair_weight is not None
                                               else np.zeros((len(fit.nodes), 0)), dtype=torch.float32),
            }
        elif shapes is not None:
            dtypes = {"eval_index": torch.long, "loo_index": torch.long, "seen": torch.bool, "derived": torch.bool,
                      "combo_index": torch.long, "node_column": torch.long, "pair_nodes": torch.long,
                      "term_ptr": torch.long, "term_ids": torch.long}
            tensors = {k: torch.zeros(s, dtype=dtypes.get(k, torch.float32)) for k, s in shapes.items()}
        else:
            raise ValueError("SetPrior: pass a PriorFit, or the buffer shapes of a saved one (from_state_dict)")
        for name, t in tensors.items():
            self.register_buffer(name, t)

    BUFFERS = ("mean_delta", "combo_mean", "rows", "basis", "eval_index", "eval_weight", "loo_index", "loo_weight",
               "seen", "derived", "combo_index", "beta_unseen", "node_column", "pair_gain", "pair_nodes",
               "pair_weight", "term_ptr", "term_ids")

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], prefix: str = "prior.") -> SetPrior:
        """An empty SetPrior shaped like the one saved in `state` (load_state_dict then fills it). A prior saved
        before derived genes, combination deltas, the combination mean and pair gains existed gets them empty
        (added to `state`; the combination mean as m): it predicts as it did."""
        if prefix + "mean_delta" in state:
            state.setdefault(prefix + "combo_mean", state[prefix + "mean_delta"].clone())
        if prefix + "seen" in state:
            seen = state[prefix + "seen"]
            state.setdefault(prefix + "derived", torch.zeros_like(seen))
            state.setdefault(prefix + "combo_index", torch.full(seen.shape, -1, dtype=torch.long))
            state.setdefault(prefix + "node_column", torch.full(seen.shape, -1, dtype=torch.long))
            state.setdefault(prefix + "pair_gain", torch.zeros(0))
            state.setdefault(prefix + "pair_nodes", torch.zeros(seen.shape[0], 0, dtype=torch.long))
            state.setdefault(prefix + "pair_weight", torch.zeros(seen.shape[0], 0))
            state.setdefault(prefix + "term_ptr", torch.zeros(0, dtype=torch.long))
            state.setdefault(prefix + "term_ids", torch.zeros(0, dtype=torch.long))
        missing = [b for b in cls.BUFFERS if prefix + b not in state]
        if missing:
            raise ValueError(f"saved weights lack the prior's {missing} (keys '{prefix}*'): the model was trained "
                             f"without model.prior, or with another version")
        return cls(shapes={b: tuple(state[prefix + b].shape) for b in cls.BUFFERS})

    def _loo_genes(self, perts: Tensor, cross_fit: bool, as_unseen: Tensor | None) -> Tensor | None:
        """[U, K] bool: the genes that take their leave-one-out estimate (cross_fit: the gene of a one-gene set,
        every gene of a set in as_unseen, and derived genes everywhere), or None outside cross-fitting."""
        if not cross_fit:
            return None
        valid = perts >= 0
        loo = valid.sum(1) == 1
        if as_unseen is not None:
            loo = loo | as_unseen
        return valid & (loo.unsqueeze(1) | self.derived[perts.clamp_min(0)])

    def trained_sets(self, perts: Tensor) -> Tensor:
        """[U] bool: sets of two or more genes whose singles were all trained."""
        valid = perts >= 0
        return (valid.sum(1) >= 2) & (self.seen[perts.clamp_min(0)] | ~valid).all(1)

    def estimated(self, perts: Tensor, cross_fit: bool = False, as_unseen: Tensor | None = None) -> Tensor:
        """[U, K] bool: the set's genes whose prior is a GO estimate (single not trained; with cross_fit, also
        the gene of a one-gene set and every gene of a set in as_unseen)."""
        valid = perts >= 0
        out = valid & ~self.seen[perts.clamp_min(0)]
        loo = self._loo_genes(perts, cross_fit, as_unseen)
        return out if loo is None else out | loo

    def own_columns(self, perts: Tensor, num_genes: int) -> Tensor:
        """[U, G] bool: the expression columns of each set's own genes (see PriorFit.node_column)."""
        col = torch.where(perts >= 0, self.node_column[perts.clamp_min(0)], -1)
        own = torch.zeros(perts.shape[0], num_genes + 1, dtype=torch.bool, device=perts.device)
        own.scatter_(1, torch.where(col >= 0, col, num_genes), True)  # -1 lands in the spare last column
        return own[:, :num_genes]

    def members(self, perts: Tensor, cross_fit: bool = False, as_unseen: Tensor | None = None) -> Tensor:
        """[U, K, G]: each gene's part of prior(S) (zero for padding); they sum to forward(perts). A gene's part is
        its share of the mean term plus its (beta-weighted, for unseen sets) deviation."""
        valid = perts >= 0
        node = perts.clamp_min(0)
        size = valid.sum(1)
        index, weight = self.eval_index[node], self.eval_weight[node]          # [U, K, k + 1]
        seen = self.seen[node] & valid
        loo = self._loo_genes(perts, cross_fit, as_unseen)
        if loo is not None:
            index = torch.where(loo.unsqueeze(-1), self.loo_index[node], index)
            weight = torch.where(loo.unsqueeze(-1), self.loo_weight[node], weight)
            seen = seen & ~loo
        else:
            # Not cross-fitting. Sets of two or more seen genes: a gene's combination delta where it has one (never while training).
            combo = self.combo_index[node]
            use_combo = valid & (combo >= 0) & self.trained_sets(perts).unsqueeze(1)
            first = torch.zeros_like(index[..., :1])
            combo_index = torch.cat([combo.unsqueeze(-1), first.expand_as(index[..., 1:]) - 1], -1)
            combo_weight = torch.cat([torch.ones_like(weight[..., :1]), torch.zeros_like(weight[..., 1:])], -1)
            index = torch.where(use_combo.unsqueeze(-1), combo_index, index)
            weight = torch.where(use_combo.unsqueeze(-1), combo_weight, weight)
        use = valid.unsqueeze(-1) & (index >= 0)
        rows = self.rows.float()
        num_sets, width = perts.shape
        member_id = torch.arange(num_sets * width, device=perts.device).view(num_sets, width, 1).expand_as(index)[use]
        contrib = rows.index_select(0, index[use]) * weight[use].float().unsqueeze(1)
        dev = torch.zeros(num_sets * width, rows.shape[1], device=rows.device).index_add_(0, member_id, contrib)
        if self.basis.numel():
            dev = dev @ self.basis.float()
        dev = dev.view(num_sets, width, -1)
        # |S| m + sum dev when a gene of S was trained, when every gene of S is seen (trained or derived), or when
        # |S| = 1; m + beta sum dev for the rest. A derived gene beside GO-estimated ones anchors nothing: its
        # remainder was itself taken after GO-estimated partners, and no observed single pins the set down (over
        # 20 Norman splits this took combo_seen1 pearson_delta from 0.493 to 0.533 and changed no other category).
        trained = seen & ~self.derived[node]
        anchored = trained.any(1) | (seen | ~valid).all(1) | (size <= 1)
        share = torch.where(anchored, 1.0, 1.0 / size.clamp_min(1).to(dev.dtype))
        beta = torch.where(anchored, torch.ones_like(share), self.beta_unseen.float().expand_as(share))
        mean = self.mean_delta.float().expand(num_sets, -1)
        if loo is None:
            # An unanchored set with a derived gene: the training combinations' mean (module doc). Over Norman
            # splits 1-20 this took combo_seen1 mse_de from 0.154 to 0.137; a set of never-trained genes
            # (combo_seen0) got worse with it (0.251 to 0.267), so it keeps m.
            use_combo_mean = ~anchored & (valid & self.derived[node]).any(1)
            mean = torch.where(use_combo_mean.unsqueeze(1), self.combo_mean.float(), mean)
        mean_part = (share.unsqueeze(1) * valid.to(dev.dtype)).unsqueeze(-1) * mean.unsqueeze(1)
        parts = mean_part + beta.view(-1, 1, 1) * dev
        if loo is None and self.pair_gain.numel():
            parts = parts * self._pair_gains(perts, trained).unsqueeze(1)
        return parts

    def _pair_gains(self, perts: Tensor, trained: Tensor) -> Tensor:
        """[U, G] each set's pair gain outside its own columns, 1 elsewhere and for sets that are not pairs with a
        trained gene (`trained` [U, K]: members whose single was trained): g = 1 + b min(J, J_max), J the pair's
        GO Jaccard (module doc)."""
        num_genes = self.mean_delta.shape[0]
        if perts.shape[1] < 2:
            return torch.ones(perts.shape[0], num_genes, device=perts.device)
        valid = perts >= 0
        # a prior saved before the clamp (pair_gain [b] only) scaled pairs of trained genes only, by 1 + b J
        # unclamped: it predicts as it did
        legacy = self.pair_gain.numel() == 1
        pair = (valid.sum(1) == 2) & ((trained | ~valid).all(1) if legacy else trained.any(1))
        first = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :2]   # the pair's two genes
        a, b = perts.gather(1, first).clamp_min(0).unbind(1)
        if self.term_ptr.numel():
            jaccard = self._term_jaccard(a, b)
            jaccard = torch.where(jaccard > self.pair_gain[2], jaccard, 0.0)
        elif self.pair_nodes.shape[1]:
            jaccard = torch.where(self.pair_nodes[a] == b.unsqueeze(1), self.pair_weight[a].float(), 0.0).amax(1)
        else:
            return torch.ones(perts.shape[0], num_genes, device=perts.device)
        if not legacy:
            jaccard = jaccard.clamp(max=float(self.pair_gain[1]))
        gain = (1.0 + self.pair_gain[0] * jaccard).clamp(0.0, MAX_PAIR_GAIN)
        scale = torch.where(pair, gain, torch.ones_like(gain)).unsqueeze(1)
        return torch.where(self.own_columns(perts, num_genes), torch.ones_like(scale), scale)

    def _term_jaccard(self, a: Tensor, b: Tensor) -> Tensor:
        """[U] the Jaccard of nodes a[u] and b[u]'s GO terms (term_ptr / term_ids), vectorized: every pair's terms
        as keys (pair, term), sorted; a key twice is a shared term (a node's own terms are distinct)."""
        ptr, ids = self.term_ptr, self.term_ids
        num, width = a.shape[0], int(ids.max()) + 1 if ids.numel() else 1
        keys, lengths = [], []
        for node in (a, b):
            length = ptr[node + 1] - ptr[node]
            within = torch.arange(int(length.sum()), device=a.device) - torch.repeat_interleave(
                torch.cumsum(length, 0) - length, length)
            pair = torch.repeat_interleave(torch.arange(num, device=a.device), length)
            keys.append(pair * width + ids[torch.repeat_interleave(ptr[node], length) + within])
            lengths.append(length)
        key = torch.sort(torch.cat(keys)).values
        inter = torch.bincount(key[1:][key[1:] == key[:-1]] // width, minlength=num).to(torch.float32)
        union = (lengths[0] + lengths[1]).to(torch.float32) - inter
        return torch.where(union > 0, inter / union.clamp_min(1.0), 0.0)

    def forward(self, perts: Tensor, cross_fit: bool = False, as_unseen: Tensor | None = None) -> Tensor:
        return self.members(perts, cross_fit, as_unseen).sum(1)
