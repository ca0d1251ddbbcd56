"""Per-condition metrics on cell-averaged profiles, vectorized over conditions.

Everything here works on arrays of U conditions x G genes: the predicted mean expression of each
condition, and the observed truth summarised by the store's streaming statistics (per-condition
mean and variance, top-20 DE genes). No function needs the cells themselves, so evaluating a
genome-wide screen never holds cells x genes in memory.

Definitions (GEARS, Roohani et al. 2023; conventions of its reference evaluation kept so numbers are
comparable):

- ``mse``, ``pearson``: over all genes, predicted mean vs observed mean of the condition.
- ``mse_de``, ``pearson_de``: the same over the condition's top-20 DE genes (``stats/top_de``).
- ``pearson_delta``: Pearson of (pred - control mean) vs (truth - control mean), all genes.
- ``pearson_delta_de``: the same over the top-20 DE genes.
- ``mse_top20_de_non_dropout``: MSE over the top-20 non-dropout DE genes
  (``stats/top_de_non_dropout``; the control mean cancels, so delta or raw gives the same number).
- ``frac_opposite_direction_top20_non_dropout``: over those 20 genes, the fraction where the
  predicted change and the observed change vs control have strictly opposite signs
  (sign(pred - ctrl) = -sign(truth - ctrl) != 0).
- ``frac_sigma_below_1_non_dropout``: over those genes whose observed cells vary (sigma > 0), the
  fraction with |pred - truth mean| <= 1 sigma, sigma = standard deviation of the condition's
  observed cells for that gene (population std, ddof=0, as the reference's ``np.std``; the store
  keeps the unbiased variance, converted here with (n-1)/n). NaN when no such gene exists (the
  reference omits the value), and averages skip NaN.

A Pearson correlation with a constant vector is undefined; it is reported as 0 (reference
convention). That is what "no change" predictions get on the delta metrics.
Index arrays may be padded with -1 (fewer than 20 eligible genes); padded entries are ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

METRICS = (
    "mse",
    "pearson",
    "mse_de",
    "pearson_de",
    "pearson_delta",
    "pearson_delta_de",
    "mse_top20_de_non_dropout",
    "frac_opposite_direction_top20_non_dropout",
    "frac_sigma_below_1_non_dropout",
)
# Whether a larger value is better, for tables and for picking "best" rows.
HIGHER_IS_BETTER = {
    "mse": False, "pearson": True, "mse_de": False, "pearson_de": True, "pearson_delta": True,
    "pearson_delta_de": True, "mse_top20_de_non_dropout": False,
    "frac_opposite_direction_top20_non_dropout": False, "frac_sigma_below_1_non_dropout": True,
}

# A predictor maps perturbation sets (sorted gene tuples) to predicted MEAN expression [U, G].
Predictor = Callable[[Sequence[tuple[str, ...]]], np.ndarray]


@dataclasses.dataclass
class ConditionTruth:
    """Observed summaries of U conditions (rows aligned with ``names``)."""

    names: list[str]
    mean: np.ndarray                # [U, G] mean of the condition's cells
    std: np.ndarray                 # [U, G] population std (ddof=0) of the condition's cells
    top_de: np.ndarray              # [U, k] gene indices, -1 = padding
    top_de_non_dropout: np.ndarray  # [U, k] gene indices, -1 = padding
    control_mean: np.ndarray        # [G]

    def __post_init__(self) -> None:
        u = len(self.names)
        g = self.control_mean.shape[0]
        for field in ("mean", "std"):
            arr = getattr(self, field)
            if arr.shape != (u, g):
                raise ValueError(f"ConditionTruth.{field}: expected shape {(u, g)} (conditions x genes), "
                                 f"received {arr.shape}")
        for field in ("top_de", "top_de_non_dropout"):
            arr = np.asarray(getattr(self, field))
            if arr.ndim != 2 or arr.shape[0] != u:
                raise ValueError(f"ConditionTruth.{field}: expected shape ({u}, k), received {arr.shape}")
            if arr.size and arr.max() >= g:
                raise ValueError(f"ConditionTruth.{field}: gene index {int(arr.max())} out of range for {g} genes")
            setattr(self, field, arr.astype(np.int64))

    def subset(self, rows: np.ndarray | Sequence[int]) -> ConditionTruth:
        rows = np.asarray(rows, dtype=np.int64)
        return ConditionTruth([self.names[i] for i in rows], self.mean[rows], self.std[rows],
                              self.top_de[rows], self.top_de_non_dropout[rows], self.control_mean)


def std_from_unbiased_var(var: np.ndarray, num_cells: np.ndarray) -> np.ndarray:
    """Population std (ddof=0) from the unbiased variance (ddof=1) of n cells; n<=1 gives 0."""
    n = np.asarray(num_cells, dtype=np.float64).reshape(-1, 1)
    scale = np.where(n > 1, (n - 1) / np.maximum(n, 1), 0.0)
    return np.sqrt(np.clip(np.asarray(var, dtype=np.float64), 0, None) * scale)


def truth_from_store(store, names: Sequence[str]) -> ConditionTruth:
    """Read the truth summaries of the named conditions from a store's stats/ (rows only)."""
    index = {n: i for i, n in enumerate(store.condition_names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"conditions not in store {str(store.path)!r}: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; expected names from its conditions/ table")
    rows = np.array([index[n] for n in names], dtype=np.int64)
    order = np.argsort(rows, kind="stable")  # zarr reads sorted selections fastest
    sorted_rows = rows[order]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)

    def read(key: str) -> np.ndarray:
        if sorted_rows.size == 0:
            arr = store.root[key]
            return np.zeros((0,) + tuple(arr.shape[1:]), dtype=arr.dtype)
        return store.read(key, sorted_rows, orthogonal=True)[inverse]

    num_cells = store.array("conditions/num_cells")[rows]
    return ConditionTruth(
        names=list(names),
        mean=read("stats/mean").astype(np.float64),
        std=std_from_unbiased_var(read("stats/var"), num_cells),
        top_de=read("stats/top_de"),
        top_de_non_dropout=read("stats/top_de_non_dropout"),
        control_mean=store.array("stats/control_mean").astype(np.float64),
    )


# -- vectorized building blocks ---------------------------------------------------------------

def rowwise_pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b, over the masked columns.

    Undefined correlations (a constant row, fewer than 2 columns) are 0, the GEARS convention.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if mask is None:
        mask = np.ones(a.shape, dtype=bool)
    w = mask.astype(np.float64)
    n = w.sum(axis=1, keepdims=True)
    safe_n = np.maximum(n, 1)
    am = (a * w).sum(axis=1, keepdims=True) / safe_n
    bm = (b * w).sum(axis=1, keepdims=True) / safe_n
    da = (a - am) * w
    db = (b - bm) * w
    cov = (da * db).sum(axis=1)
    va = (da * da).sum(axis=1)
    vb = (db * db).sum(axis=1)
    denom = np.sqrt(va * vb)
    # Relative tolerance: rows that are constant up to rounding are "constant", not noise-correlated.
    scale = np.sqrt((a * a * w).sum(axis=1) * (b * b * w).sum(axis=1))
    ok = (denom > 1e-12 * np.maximum(scale, 1e-300)) & (n[:, 0] >= 2)
    out = np.zeros(a.shape[0])
    out[ok] = cov[ok] / denom[ok]
    return np.clip(out, -1.0, 1.0)


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = mask.sum(axis=1)
    s = np.where(mask, x, 0.0).sum(axis=1)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _gather(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of x at per-row gene indices (padding -1 -> masked out)."""
    mask = idx >= 0
    return np.take_along_axis(x, np.where(mask, idx, 0), axis=1), mask


def condition_metrics(pred_mean: np.ndarray, truth: ConditionTruth) -> dict[str, np.ndarray]:
    """Every metric of METRICS for each of the U conditions: {metric: array [U]}."""
    pred = np.asarray(pred_mean, dtype=np.float64)
    if pred.shape != truth.mean.shape:
        raise ValueError(f"predictions have shape {pred.shape}, truth has {truth.mean.shape} "
                         f"(conditions x genes); predict the same conditions and genes as the truth")
    if not np.all(np.isfinite(pred)):
        bad = int((~np.isfinite(pred)).any(axis=1).sum())
        raise ValueError(f"predictions contain NaN/inf for {bad} condition(s); a predictor must return finite values")
    true = truth.mean
    ctrl = truth.control_mean[None, :]
    out: dict[str, np.ndarray] = {}
    sq = (pred - true) ** 2
    out["mse"] = sq.mean(axis=1)
    out["pearson"] = rowwise_pearson(pred, true)
    out["pearson_delta"] = rowwise_pearson(pred - ctrl, true - ctrl)

    p_de, m_de = _gather(pred, truth.top_de)
    t_de, _ = _gather(true, truth.top_de)
    c_de, _ = _gather(np.broadcast_to(ctrl, pred.shape), truth.top_de)
    out["mse_de"] = _masked_mean((p_de - t_de) ** 2, m_de)
    out["pearson_de"] = rowwise_pearson(p_de, t_de, m_de)
    out["pearson_delta_de"] = rowwise_pearson(p_de - c_de, t_de - c_de, m_de)

    p_nd, m_nd = _gather(pred, truth.top_de_non_dropout)
    t_nd, _ = _gather(true, truth.top_de_non_dropout)
    c_nd, _ = _gather(np.broadcast_to(ctrl, pred.shape), truth.top_de_non_dropout)
    s_nd, _ = _gather(truth.std, truth.top_de_non_dropout)
    out["mse_top20_de_non_dropout"] = _masked_mean((p_nd - t_nd) ** 2, m_nd)
    opposite = np.sign(p_nd - c_nd) * np.sign(t_nd - c_nd) < 0
    out["frac_opposite_direction_top20_non_dropout"] = _masked_mean(opposite.astype(np.float64), m_nd)
    varies = m_nd & (s_nd > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.abs(p_nd - t_nd) / np.where(varies, s_nd, 1.0)
    out["frac_sigma_below_1_non_dropout"] = _masked_mean((sigma <= 1.0).astype(np.float64), varies)
    return out


def per_condition_table(pred_mean: np.ndarray, truth: ConditionTruth):
    """pandas DataFrame indexed by condition name, one column per metric."""
    import pandas as pd

    df = pd.DataFrame(condition_metrics(pred_mean, truth), index=pd.Index(truth.names, name="condition"))
    return df[list(METRICS)]


def summarize(per_condition, categories: Mapping[str, Sequence[str]] | None = None, overall: str = "all"):
    """Average per-condition metrics per category (NaN skipped): DataFrame [category x metrics + num_conditions].

    `categories` maps a category name (combo_seen0, unseen_single, ...) to condition names; names
    not in `per_condition` are ignored. The `overall` row averages every condition.
    """
    import pandas as pd

    rows = {}
    groups: dict[str, list[str]] = {}
    if categories:
        for cat, names in categories.items():
            groups[cat] = [n for n in names if n in per_condition.index]
    if overall:
        groups[overall] = list(per_condition.index)
    for cat, names in groups.items():
        if not names:
            continue
        sub = per_condition.loc[names]
        row = sub.mean(axis=0, skipna=True).to_dict()
        row["num_conditions"] = len(names)
        rows[cat] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def evaluate_predictor(predictor: Predictor, truth: ConditionTruth, genes_of: Callable[[str], tuple[str, ...]],
                       block: int = 512, desc: str | None = None) -> tuple[object, np.ndarray]:
    """Run a predictor on every condition of `truth` in blocks; return (per-condition table, predictions).
    desc: show the progress over conditions under this name (gears_dist.progress).

    Predicted means are clipped at 0, for every predictor alike: log-normalized expression is never negative
    (a sum of deltas can be), and a cell-eval export, which can only hold values >= 0, then scores the same
    numbers as this table."""
    import pandas as pd

    from gears_dist.progress import progress

    preds = []
    tables = []
    with progress(len(truth.names), desc or "", "condition", enabled=desc is not None) as bar:
        for lo in range(0, len(truth.names), block):
            rows = np.arange(lo, min(lo + block, len(truth.names)))
            sub = truth.subset(rows)
            p = np.maximum(np.asarray(predictor([genes_of(n) for n in sub.names]), dtype=np.float64), 0.0)
            preds.append(p.astype(np.float32))  # kept for figures/export: half the memory of float64
            tables.append(per_condition_table(p, sub))
            bar.update(len(rows))
    if not tables:
        return pd.DataFrame(columns=list(METRICS)), np.zeros((0, truth.control_mean.shape[0]))
    return pd.concat(tables), np.concatenate(preds, axis=0)
