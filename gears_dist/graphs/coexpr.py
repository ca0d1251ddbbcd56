"""The co-expression graph: Pearson correlation between genes, computed out of core.

Only sufficient statistics are accumulated: n, Σx and Σxxᵀ (G x G, float64) over the chosen cells,
streamed from the store's X one block of whole chunks at a time with Dask (the next block is read
and decompressed on a background thread while BLAS multiplies the current one). Memory is one
G x G accumulator plus two blocks, whatever the number of cells. Values are shifted by the first
block's mean before squaring, which keeps Σxxᵀ/n - mean meanᵀ from cancelling catastrophically.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
from collections.abc import Sequence

import numpy as np

from gears_dist.data.store import Store, open_store, reading
from gears_dist.graphs.config import CoexprConfig, GraphConfig
from gears_dist.graphs.graph import GeneGraph, sort_edges, top_k_dense_rows, with_self_loops

log = logging.getLogger("gears_dist.graphs")
_TARGET_BLOCK_BYTES = 128 << 20


def condition_cell_ranges(store: Store, conditions: Sequence[int]) -> np.ndarray:
    """(R, 2) [start, stop) cell ranges of the given condition indices, merged where adjacent."""
    conditions = np.unique(np.asarray(conditions, dtype=np.int64))
    num_conditions = store.array("conditions/start").shape[0]
    if conditions.size and (conditions.min() < 0 or conditions.max() >= num_conditions):
        raise ValueError(
            f"condition indices must be in [0, {num_conditions}); received {conditions.min()}.."
            f"{conditions.max()}"
        )
    start = store.array("conditions/start")[conditions]
    stop = store.array("conditions/stop")[conditions]
    return merge_ranges(np.stack([start, stop], axis=1))


def merge_ranges(ranges: np.ndarray) -> np.ndarray:
    ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    if not len(ranges):
        return ranges
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    # A range starts a new run when it begins after every earlier range ended.
    ends = np.maximum.accumulate(ranges[:, 1])
    new = np.concatenate([[True], ranges[1:, 0] > ends[:-1]])
    run = np.cumsum(new) - 1
    starts = ranges[new, 0]
    stops = np.zeros(len(starts), dtype=np.int64)
    np.maximum.at(stops, run, ranges[:, 1])
    return np.stack([starts, stops], axis=1)


def sample_ranges(ranges: np.ndarray, max_cells: int, chunk_cells: int, seed: int = 0) -> np.ndarray:
    """At most about `max_cells` cells of `ranges`: the ranges cut at chunk boundaries, pieces drawn in a
    random order until the cells reach `max_cells` (the last piece may pass it by less than a chunk), merged.
    Whole pieces keep the reads chunk-aligned; random chunks spread the sample over the store's conditions."""
    ranges = merge_ranges(ranges)
    if not len(ranges) or int((ranges[:, 1] - ranges[:, 0]).sum()) <= max_cells:
        return ranges
    first, last = ranges[:, 0] // chunk_cells, (ranges[:, 1] - 1) // chunk_cells
    pieces = last - first + 1
    seg = np.repeat(np.arange(len(ranges)), pieces)
    chunk_id = first[seg] + np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    lo = np.maximum(ranges[seg, 0], chunk_id * chunk_cells)
    hi = np.minimum(ranges[seg, 1], (chunk_id + 1) * chunk_cells)
    order = np.random.default_rng([seed, 0xC0E]).permutation(lo.size)
    take = order[:int(np.searchsorted(np.cumsum((hi - lo)[order]), max_cells)) + 1]
    return merge_ranges(np.stack([lo[take], hi[take]], axis=1))


def _read_blocks(x, ranges: np.ndarray, block_cells: int) -> list:
    """Dask arrays of about `block_cells` rows each, cut at the store's chunk boundaries."""
    import dask.array as da

    chunk = int(x.chunks[0])
    dx = da.from_zarr(x)
    pieces = []
    for start, stop in ranges:
        cuts = np.unique(
            np.concatenate([[start, stop], np.arange((start // chunk + 1) * chunk, stop, chunk)])
        )
        pieces += [(int(a), int(b)) for a, b in itertools.pairwise(cuts)]
    blocks, current, rows = [], [], 0
    for a, b in pieces:
        current.append(dx[a:b])
        rows += b - a
        if rows >= block_cells:
            blocks.append(da.concatenate(current, axis=0))
            current, rows = [], 0
    if current:
        blocks.append(da.concatenate(current, axis=0))
    return blocks


def correlation_stats(
    x, ranges: np.ndarray, block_cells: int | None = None
) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean (G,), covariance (G, G)) over the rows of zarr array `x` in `ranges`, streamed."""
    from scipy.linalg.blas import ssyrk

    num_genes = int(x.shape[1])
    if block_cells is None:
        block_cells = max(int(x.chunks[0]), _TARGET_BLOCK_BYTES // (4 * max(1, num_genes)))
    ranges = merge_ranges(ranges)
    blocks = _read_blocks(x, ranges, block_cells)
    if not blocks:
        raise ValueError(
            "co-expression: no cells selected (the training split has no control or single-gene "
            "cells?); expected at least 2 cells"
        )
    n = 0
    shift = None
    total = np.zeros(num_genes, dtype=np.float64)
    gram = np.zeros((num_genes, num_genes), dtype=np.float64)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(blocks[0].compute, scheduler="threads")
        for i in range(len(blocks)):
            with reading(x, slice(int(ranges[0, 0]), int(ranges[-1, 1]))):  # a damaged chunk: named, with the fix
                block = np.asarray(pending.result(), dtype=np.float32)
            if i + 1 < len(blocks):
                pending = pool.submit(blocks[i + 1].compute, scheduler="threads")
            if shift is None:
                shift = block.mean(axis=0, dtype=np.float64).astype(np.float32)
            block -= shift
            n += block.shape[0]
            total += block.sum(axis=0, dtype=np.float64)
            # syrk on the Fortran view of the (cells, G) block gives the upper triangle of xᵀx
            # at half the flops of a full matmul; accumulate the float32 partial in float64.
            gram += ssyrk(1.0, block.T, trans=0, lower=0)  # its lower triangle is 0
            del block
    if n < 2:
        raise ValueError(f"co-expression: {n} cell selected; expected at least 2")
    mean_shifted = total / n
    _finish_covariance(gram, mean_shifted, n)
    return n, mean_shifted + shift, gram


def _finish_covariance(gram: np.ndarray, mean: np.ndarray, n: int, block: int = 1024) -> None:
    """In place: mirror syrk's upper triangle and turn Σxxᵀ into the unbiased covariance, one row
    block at a time so that no G x G temporary is made."""
    num_genes = gram.shape[0]
    for a in range(0, num_genes, block):
        b = min(num_genes, a + block)
        gram[a:b, :a] = gram[:a, a:b].T
        diag = gram[a:b, a:b]
        lower = np.tril_indices(b - a, -1)
        diag[lower] = diag.T[lower]
    for a in range(0, num_genes, block):  # only once every row is mirrored
        b = min(num_genes, a + block)
        gram[a:b] -= n * np.outer(mean[a:b], mean)
        gram[a:b] /= n - 1


def correlation_from_cov(cov: np.ndarray, block: int = 1024) -> np.ndarray:
    """Pearson r, computed in place over `cov`; genes with zero variance correlate 0 with
    everything (and 1 with themselves)."""
    sd = np.sqrt(np.clip(np.diag(cov).copy(), 0.0, None))
    ok = sd > 0
    inv = np.where(ok, 1.0 / np.where(ok, sd, 1.0), 0.0)
    for a in range(0, cov.shape[0], block):
        b = min(cov.shape[0], a + block)
        rows = cov[a:b]
        rows *= inv[a:b, None]
        rows *= inv[None, :]
        np.clip(rows, -1.0, 1.0, out=rows)
    np.fill_diagonal(cov, 1.0)
    return cov


def coexpression_edges(r: np.ndarray, k: int, threshold: float, block_rows: int = 1024):
    """Per target gene the self loop plus the k genes with largest |r| > threshold (weight |r|)."""
    num_genes = r.shape[0]
    parts = []
    for start in range(0, num_genes, block_rows):
        stop = min(num_genes, start + block_rows)
        sim = np.abs(r[start:stop]).astype(np.float32)
        parts.append(top_k_dense_rows(sim, np.arange(start, stop), k, threshold))
    src, dst, w = (np.concatenate(x) for x in zip(*parts))
    return with_self_loops(src, dst, w, num_genes)


def build_coexpression_graph(
    store: Store | str, cells, cfg: GraphConfig | CoexprConfig, *, block_cells: int | None = None
) -> GeneGraph:
    """Co-expression graph over the store's genes (store gene order).

    cells: either an (R, 2) array of [start, stop) cell ranges, or a 1-D sequence of condition
    indices (their cells are used). Pass the training split's control and single-gene conditions
    (``training_conditions`` in gears_dist.graphs.build does that).
    """
    co_cfg = cfg.coexpr if isinstance(cfg, GraphConfig) else cfg
    co_cfg.validate()
    store = store if isinstance(store, Store) else open_store(store)
    cells = np.asarray(cells, dtype=np.int64)
    if cells.ndim == 2 and cells.shape[1] == 2:
        ranges = cells
        if ranges.size and (ranges.min() < 0 or ranges.max() > store.num_cells):
            raise ValueError(f"cell ranges must lie in [0, {store.num_cells}]")
    elif cells.ndim == 1:
        ranges = condition_cell_ranges(store, cells)
    else:
        raise ValueError(
            f"cells: expected (R, 2) cell ranges or 1-D condition indices, received shape {cells.shape}"
        )
    available = int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0
    if co_cfg.max_cells is not None:
        ranges = sample_ranges(ranges, co_cfg.max_cells, store.chunk_cells)
    n, _, cov = correlation_stats(store.X, ranges, block_cells)
    r = correlation_from_cov(cov)
    del cov
    src, dst, w = coexpression_edges(r, co_cfg.k, co_cfg.threshold)
    edge_index, weight = sort_edges(src, dst, w)
    graph = GeneGraph(
        store.genes,
        edge_index,
        weight,
        {"kind": "coexpression", "k": co_cfg.k, "threshold": co_cfg.threshold, "num_cells": int(n),
         "cells_available": available, "max_cells": co_cfg.max_cells},
    )
    log.info("co-expression graph from %d of %d cells: %s", n, available, graph.summary())
    return graph
