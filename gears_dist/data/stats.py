"""Per-condition statistics and differential expression, computed in Dask streaming passes over X.

Cells of a store are grouped by condition (condition c is rows ``start[c]:stop[c]``), so per-condition
sums are segment sums inside each window of X: one task per window returns the sums of the (few)
conditions it overlaps, and the driver merges the two partial sums of a condition cut by a window
edge. A condition is finished as soon as the pass has gone past its last row; its statistics are
written then, so memory is a few windows plus one block of condition rows, never (conditions x genes).

DE follows scanpy's ``rank_genes_groups(method='t-test', reference=<control>, rankby_abs=True)``:
mean and variance of the log1p data in float64 with the unbiased (ddof=1) variance (a group of one
cell gets variance 0, as in scanpy), Welch's t = (m1 - m2) / sqrt(v1/n1 + v2/n2) (scipy's
``ttest_ind_from_stats(equal_var=False)``), NaN scores (0/0: same mean, both variances 0) set to 0,
and +-inf kept where the means differ with both variances 0. Genes are ranked by |t|, ties by gene
index. Non-dropout genes of a condition (GEARS' definition): non-zero mean under the condition, or
zero mean under both the condition and control; ``top_de_non_dropout`` is the ranking restricted to
them. The control condition's own rows hold t = 0 and top genes -1. Rows with fewer than
``num_top_de`` eligible genes are padded with -1.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from gears_dist.data.store import read_checked, reading

STATS_CODEC = ZstdCodec(level=3)
STATS_CHUNK_BYTES = 4 << 20


def _segment_moments(block: np.ndarray, row0: int, start: np.ndarray, stop: np.ndarray):
    """Sum, sum of squares and non-zero count per condition over rows [row0, row0 + len(block))."""
    row1 = row0 + block.shape[0]
    c_lo = int(np.searchsorted(stop, row0, side="right"))
    c_hi = int(np.searchsorted(start, row1, side="left"))
    seg = np.maximum(start[c_lo:c_hi], row0) - row0
    nnz = np.add.reduceat((block != 0).astype(np.int32), seg, axis=0).astype(np.int64)
    x = np.asarray(block, dtype=np.float64)  # float64 sums: scanpy's precision
    sums = np.add.reduceat(x, seg, axis=0)
    sqs = np.add.reduceat(np.square(x, out=x), seg, axis=0)
    return c_lo, sums, sqs, nnz


def _mean_var(sums: np.ndarray, sqs: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = n.astype(np.float64)[:, None]
    mean = sums / n
    var = np.maximum(sqs / n - mean * mean, 0.0)
    # scanpy: population variance rescaled by n/(n-1), left as is for a single cell
    var = np.where(n > 1, var * n / np.maximum(n - 1, 1), var)
    return mean, var


def welch_t(mean: np.ndarray, var: np.ndarray, n: np.ndarray,
            ctrl_mean: np.ndarray, ctrl_var: np.ndarray, ctrl_n: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (mean - ctrl_mean) / np.sqrt(var / n[:, None] + ctrl_var / ctrl_n)
    t[np.isnan(t)] = 0.0
    return t


def rank_top(scores: np.ndarray, eligible: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gene indices by |score| (ties: lower index first), overall and among `eligible`."""
    order = np.argsort(-np.abs(scores), axis=1, kind="stable")
    top = order[:, :k].astype(np.int32)
    ok_sorted = np.take_along_axis(eligible, order, axis=1)
    first_ok = np.argsort(~ok_sorted, axis=1, kind="stable")[:, :k]
    top_ok = np.take_along_axis(order, first_ok, axis=1).astype(np.int32)
    top_ok[~np.take_along_axis(ok_sorted, first_ok, axis=1)] = -1
    return top, top_ok


class _StatsWriter:
    """Buffers finished condition rows and writes them in whole chunks of the (C, G) stats arrays."""

    def __init__(self, group: zarr.Group, num_conditions: int, num_genes: int, num_top: int):
        self.rows = max(1, min(num_conditions, STATS_CHUNK_BYTES // (4 * max(num_genes, 1))))
        shape, chunks = (num_conditions, num_genes), (self.rows, num_genes)
        self.arrays = {name: group.create_array(name, shape=shape, chunks=chunks, dtype="float32",
                                                compressors=[STATS_CODEC])
                       for name in ("mean", "var", "nonzero_frac", "de_score")}
        for name in ("top_de", "top_de_non_dropout"):
            self.arrays[name] = group.create_array(name, shape=(num_conditions, num_top),
                                                   chunks=(max(1, min(num_conditions, 65536)), num_top),
                                                   dtype="int32", fill_value=-1)
        self.pending: dict[str, list[np.ndarray]] = {k: [] for k in self.arrays}
        self.written = 0
        self.buffered = 0

    def add(self, values: dict[str, np.ndarray]) -> None:
        for k, v in values.items():
            self.pending[k].append(v)
        self.buffered += len(next(iter(values.values())))
        if self.buffered >= self.rows:
            self.flush(whole_chunks_only=True)

    def flush(self, whole_chunks_only: bool = False) -> None:
        if not self.buffered:
            return
        take = (self.buffered // self.rows) * self.rows if whole_chunks_only else self.buffered
        if take == 0:
            return
        for k, parts in self.pending.items():
            block = np.concatenate(parts)
            self.arrays[k][self.written:self.written + take] = block[:take]
            self.pending[k] = [block[take:]] if take < len(block) else []
        self.written += take
        self.buffered -= take


def write_stats(root: zarr.Group, *, num_top_de: int = 20, memory_budget_mb: int = 1024) -> None:
    """Compute stats/ of a store group holding X, conditions/start|stop|is_control (see store.py)."""
    x = root["X"]
    num_cells, num_genes = (int(v) for v in x.shape)
    start = read_checked(root["conditions/start"]).astype(np.int64)
    stop = read_checked(root["conditions/stop"]).astype(np.int64)
    is_control = read_checked(root["conditions/is_control"]).astype(bool)
    num_conditions = len(start)
    if np.flatnonzero(is_control).size != 1:
        raise ValueError(f"stats need exactly one control condition, found {int(is_control.sum())}; "
                         f"ingest with --control-value naming the control")
    if num_conditions == 0 or start[0] != 0 or stop[-1] != num_cells or np.any(start[1:] != stop[:-1]):
        raise ValueError("conditions/start|stop must tile X's rows in order; the store is damaged, re-ingest it")
    num_top = min(num_top_de, num_genes)

    workers = 2
    chunk = int(x.chunks[0])
    bytes_per_row = num_genes * (4 + 8 + 4 + 4)  # float32 block, float64 copy, int32 mask, slack
    budget = memory_budget_mb << 20
    # all windows in flight together take about a quarter of the budget
    window = max(chunk, (budget // (4 * workers) // bytes_per_row) // chunk * chunk)
    xd = da.from_zarr(x, chunks=(window, num_genes))

    c0 = int(np.flatnonzero(is_control)[0])
    ctrl_n = int(stop[c0] - start[c0])
    ctrl = xd[start[c0]:stop[c0]].astype(np.float64)
    with reading(x, slice(int(start[c0]), int(stop[c0]))):
        ctrl_sum, ctrl_sq, ctrl_nnz = dask.compute(ctrl.sum(axis=0), (ctrl * ctrl).sum(axis=0),
                                                   (ctrl != 0).sum(axis=0), scheduler="threads",
                                                   num_workers=workers)
    ctrl_mean, ctrl_var = (a[0] for a in _mean_var(ctrl_sum[None], ctrl_sq[None], np.array([ctrl_n])))
    ctrl_zero = ctrl_nnz == 0

    group = root.require_group("stats")
    group.attrs.update({"num_top_de": num_top, "de_method": "welch_t_test_vs_control_rankby_abs",
                        "variance_ddof": 1, "non_dropout": "mean != 0 under condition, or 0 under both"})
    group.create_array("control_mean", data=ctrl_mean.astype(np.float32), compressors=[STATS_CODEC])
    writer = _StatsWriter(group, num_conditions, num_genes, num_top)

    acc: dict[int, list[np.ndarray]] = {}
    next_done = 0

    def finish(upto: int) -> None:
        nonlocal next_done
        if upto <= next_done:
            return
        ids = range(next_done, upto)
        sums = np.stack([acc[c][0] for c in ids])
        sqs = np.stack([acc[c][1] for c in ids])
        nnz = np.stack([acc[c][2] for c in ids])
        for c in ids:
            del acc[c]
        n = (stop[next_done:upto] - start[next_done:upto]).astype(np.float64)
        mean, var = _mean_var(sums, sqs, n)
        t = welch_t(mean, var, n, ctrl_mean, ctrl_var, ctrl_n)
        ctrl_rows = is_control[next_done:upto]
        t[ctrl_rows] = 0.0
        eligible = (nnz > 0) | ctrl_zero[None, :]
        top, top_nd = rank_top(t, eligible, num_top)
        top[ctrl_rows] = -1
        top_nd[ctrl_rows] = -1
        writer.add({"mean": mean.astype(np.float32), "var": var.astype(np.float32),
                    "nonzero_frac": (nnz / n[:, None]).astype(np.float32), "de_score": t.astype(np.float32),
                    "top_de": top, "top_de_non_dropout": top_nd})
        next_done = upto

    blocks = xd.to_delayed().ravel()
    offsets = np.concatenate([[0], np.cumsum(xd.chunks[0])])
    task = dask.delayed(_segment_moments, pure=True)
    for i in range(0, len(blocks), workers):
        with reading(x, slice(int(offsets[i]), int(offsets[min(i + workers, len(blocks))]))):
            results = dask.compute(*[task(blocks[j], int(offsets[j]), start, stop)
                                     for j in range(i, min(i + workers, len(blocks)))],
                                   scheduler="threads", num_workers=workers)
        for c_lo, sums, sqs, nnz in results:
            for k in range(len(sums)):
                part = acc.get(c_lo + k)
                if part is None:
                    acc[c_lo + k] = [sums[k], sqs[k], nnz[k]]
                else:
                    part[0] += sums[k]
                    part[1] += sqs[k]
                    part[2] += nnz[k]
        row_end = int(offsets[min(i + workers, len(blocks))])
        finish(int(np.searchsorted(stop, row_end, side="right")))
    finish(num_conditions)
    writer.flush()


def condition_means(store, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The means [R, G] of store rows `rows` (any order) and each mean's variance (the cells' variance, ddof 1,
    over their number), then the same two [G] for the control (a store has one control condition): rows of
    stats/, never the cells."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")  # zarr reads sorted selections fastest
    cells = np.maximum(store.array("conditions/num_cells").astype(np.float64), 1.0)
    means = np.zeros((rows.size, len(store.genes)))
    noise = np.zeros_like(means)
    if rows.size:
        means[order] = store.read("stats/mean", rows[order], orthogonal=True)
        noise[order] = store.read("stats/var", rows[order], orthogonal=True) / cells[rows[order]][:, None]
    control = np.array([i for i, g in enumerate(store.condition_genes()) if len(g) == 0][:1], dtype=np.int64)
    control_var = store.read("stats/var", control, orthogonal=True).astype(np.float64)[0]
    control_mean = store.array("stats/control_mean").astype(np.float64)
    return means, noise, control_mean, control_var / cells[control[0]]
