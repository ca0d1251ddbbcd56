"""Graph-locality order of conditions for ingest (``gears-dist ingest --order graph``).

The GO graph of the perturbed genes is bisected recursively with METIS, node weight = cells of
the gene's conditions, and the leaves are read left to right. Because every subtree is a set of
GO-close genes, cutting the resulting order into W ranges of equal cell count gives parts that are
graph-local for any W, and contiguous on disk (cells are stored in condition order).

Controls come first (they are shared by every worker); a combination sits beside the earlier of
its genes in the order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from gears_dist.graphs.graph import GeneGraph
from gears_dist.graphs.partition import gene_weights, metis_parts, symmetric_adjacency

log = logging.getLogger("gears_dist.graphs")
_LEAF_SIZE = 2


def bisection_order(graph: GeneGraph, weights: np.ndarray, seed: int = 0) -> np.ndarray:
    """Permutation of the graph's nodes from recursive weighted METIS bisection (iterative, so
    deep trees on genome-scale graphs do not hit Python's recursion limit)."""
    n = graph.num_nodes
    adj = symmetric_adjacency(graph)
    weights = np.maximum(1, np.asarray(weights, dtype=np.int64))
    out: list[np.ndarray] = []
    stack = [np.arange(n, dtype=np.int64)]
    while stack:
        ids = stack.pop()
        if ids.size <= _LEAF_SIZE:
            out.append(ids)
            continue
        sub = adj[ids][:, ids].tocsr()
        sub.sort_indices()
        halves = metis_parts(
            sub.indptr.astype(np.int64),
            sub.indices.astype(np.int64),
            sub.data.astype(np.int64),
            weights[ids],
            2,
            seed,
            recursive=True,
        )
        left, right = ids[halves == 0], ids[halves == 1]
        if left.size == 0 or right.size == 0:  # METIS could not split (e.g. one heavy node)
            order = np.argsort(-weights[ids], kind="stable")
            left, right = ids[order[: ids.size // 2]], ids[order[ids.size // 2 :]]
        stack.append(right)  # popped after left: left is emitted first
        stack.append(left)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def graph_condition_order(
    condition_genes: Sequence[tuple[str, ...]],
    num_cells: np.ndarray,
    go_graph: GeneGraph | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Permutation of condition indices in GO-graph locality order (see the module docstring).

    go_graph: default, the shipped GO graph over the perturbed genes (k=20, Jaccard > 0.1).
    """
    num_cells = np.asarray(num_cells, dtype=np.int64)
    if num_cells.shape != (len(condition_genes),):
        raise ValueError(f"num_cells: expected shape ({len(condition_genes)},), received {num_cells.shape}")
    perturbed_genes = sorted({g for genes in condition_genes for g in genes})
    if not perturbed_genes:
        return np.arange(len(condition_genes), dtype=np.int64)
    if go_graph is None:
        from gears_dist.graphs.config import GOGraphConfig
        from gears_dist.graphs.go import build_go_graph

        go_graph = build_go_graph(perturbed_genes, GOGraphConfig())
    weights = gene_weights(condition_genes, num_cells, go_graph.nodes)
    node_order = bisection_order(go_graph, weights, seed)
    position = np.empty(go_graph.num_nodes, dtype=np.int64)
    position[node_order] = np.arange(node_order.size)
    where = go_graph.node_index()
    anchor = np.array([min((position[where[g]] for g in genes), default=-1) for genes in condition_genes])
    size = np.array([len(g) for g in condition_genes])
    names = np.array(["+".join(g) for g in condition_genes])
    return np.lexsort((names, size, anchor)).astype(np.int64)


def _register() -> None:
    try:
        from gears_dist.data.ingest import register_condition_order
    except ModuleNotFoundError as exc:  # only a missing ingest module is tolerated, not a broken one
        if exc.name != "gears_dist.data.ingest":
            raise
        log.debug("gears_dist.data.ingest not available; the 'graph' condition order is not registered")
        return
    register_condition_order("graph", graph_condition_order)


_register()
