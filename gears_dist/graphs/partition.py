"""Partitioning the work for W data-parallel workers, and k-hop halos in the GO graph.

A partition assigns every perturbed condition to exactly one part; control cells are shared by
all parts (``part_of_condition`` is -1 for them). Methods:

- ``metis``: METIS (pymetis) k-way partition of the GO graph's nodes with node weight = the cells
  of the conditions involving the gene (a combination's cells split evenly between its genes), so
  parts carry about equal cells and few GO edges cross parts. A single goes to its gene's part; a
  combination to the part of one of its genes, the lighter one at that moment (largest first).
- ``contiguous``: the conditions in the given (store) order cut into W ranges of equal cell count,
  i.e. contiguous chunk ranges on disk; with a graph-locality store order these are also local.
- ``random``: conditions shuffled by seed, then cut into W equal-cell ranges (the baseline).

Edge cut (every method alike): undirected GO edges between two perturbed genes whose *home parts*
differ; a gene's home part is the part that owns most of the cells of its conditions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from gears_dist.graphs.graph import GeneGraph

METHODS = ("metis", "contiguous", "random")


@dataclasses.dataclass
class Partition:
    method: str
    num_parts: int
    seed: int
    part_of_condition: np.ndarray  # (C,) int64, -1 = control (shared by every part)
    cells_per_part: np.ndarray  # (W,) int64
    balance: float  # max / mean cells per part
    edge_cut: int  # GO edges between perturbed genes in different home parts
    num_pairs: int  # GO edges between perturbed genes (the denominator of edge_cut_frac)
    nodes_per_part: np.ndarray  # (W,) perturbed genes whose home part it is
    node_part: np.ndarray  # (P,) home part of each GO node, -1 if not perturbed

    def __post_init__(self) -> None:
        for name in ("part_of_condition", "cells_per_part", "nodes_per_part", "node_part"):
            setattr(self, name, np.asarray(getattr(self, name)).astype(np.int64))

    @property
    def edge_cut_frac(self) -> float:
        return self.edge_cut / self.num_pairs if self.num_pairs else 0.0

    def conditions_of(self, part: int) -> np.ndarray:
        return np.flatnonzero(self.part_of_condition == part)

    def summary(self) -> str:
        return (
            f"{self.method} W={self.num_parts}: cells/part "
            f"{self.cells_per_part.min()}..{self.cells_per_part.max()} balance {self.balance:.3f}, "
            f"edge cut {self.edge_cut}/{self.num_pairs} ({self.edge_cut_frac:.1%}),"
            f" genes/part {self.nodes_per_part.min()}..{self.nodes_per_part.max()}"
        )

    def to_attrs(self) -> dict:
        return {
            "method": self.method,
            "num_parts": self.num_parts,
            "seed": self.seed,
            "balance": self.balance,
            "edge_cut": self.edge_cut,
            "num_pairs": self.num_pairs,
            "cells_per_part": self.cells_per_part.tolist(),
            "nodes_per_part": self.nodes_per_part.tolist(),
        }


def _condition_node_table(condition_genes: Sequence[Sequence[str]], nodes: Sequence[str]):
    """(condition, node) incidence as flat arrays, with ValueError for genes not in the graph."""
    from gears_dist.graphs.graph import perturbation_index

    idx = perturbation_index(nodes, condition_genes)
    cond, slot = np.nonzero(idx >= 0)
    return cond, idx[cond, slot]


def gene_weights(condition_genes, num_cells: np.ndarray, nodes: Sequence[str]) -> np.ndarray:
    """Cells per GO node: a condition's cells split evenly between its genes (rounded up)."""
    cond, node = _condition_node_table(condition_genes, nodes)
    size = np.array([len(g) for g in condition_genes], dtype=np.float64)
    w = np.zeros(len(nodes), dtype=np.float64)
    np.add.at(w, node, np.asarray(num_cells, np.float64)[cond] / size[cond])
    return np.ceil(w).astype(np.int64)


def symmetric_adjacency(graph: GeneGraph) -> sp.csr_matrix:
    """Symmetric, loop-free integer adjacency for METIS: edge weight = the larger weight of the two
    directions, scaled to 1..1000 (METIS takes integer weights)."""
    n = graph.num_nodes
    src, dst = graph.edge_index
    keep = src != dst
    w = np.maximum(1, np.round(graph.edge_weight[keep] * 1000)).astype(np.int64)
    a = sp.coo_matrix((w, (src[keep], dst[keep])), shape=(n, n)).tocsr()
    return a.maximum(a.T).tocsr()


def metis_csr(graph: GeneGraph, nodes_mask: np.ndarray | None = None):
    """(xadj, adjncy, eweights) of `symmetric_adjacency` (optionally an induced subgraph) for METIS."""
    a = symmetric_adjacency(graph)
    if nodes_mask is not None:
        sel = np.flatnonzero(nodes_mask)
        a = a[sel][:, sel].tocsr()
    a.sort_indices()
    return a.indptr.astype(np.int64), a.indices.astype(np.int64), a.data.astype(np.int64)


def metis_parts(
    xadj,
    adjncy,
    eweights,
    vweights: np.ndarray,
    num_parts: int,
    seed: int,
    ufactor: int = 10,
    recursive: bool = False,
) -> np.ndarray:
    import pymetis

    n = len(xadj) - 1
    if num_parts == 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    opts = pymetis.Options(seed=seed, ufactor=ufactor)
    # METIS needs positive total weight; weightless nodes (measured, never perturbed) weigh 0.
    vw = np.asarray(vweights, dtype=np.int64)
    if vw.sum() == 0:
        vw = np.ones(n, dtype=np.int64)
    _, parts = pymetis.part_graph(
        num_parts,
        xadj=xadj,
        adjncy=adjncy,
        vweights=vw,
        eweights=eweights if len(adjncy) else None,
        recursive=recursive,
        options=opts,
    )
    # pymetis hands back numpy.longlong, which zarr cannot store: normalise to int64.
    return np.asarray(parts).astype(np.int64)


def rebalance_nodes(
    node_part: np.ndarray,
    weights: np.ndarray,
    xadj,
    adjncy,
    eweights,
    num_parts: int,
    tolerance: float = 0.01,
    max_moves: int | None = None,
) -> np.ndarray:
    """Greedy moves of single nodes from the heaviest part to lighter ones until max/mean weight
    is within `tolerance` (METIS leaves a few percent when nodes are coarse, e.g. few conditions of
    ~100 cells per part). Each move takes the node with the most edge weight toward the receiving
    part among those whose move lowers the heavier load; a move never increases the imbalance."""
    node_part = node_part.copy()
    weights = np.asarray(weights, dtype=np.int64)
    n = len(weights)
    adj = sp.csr_matrix(
        (np.asarray(eweights, np.float64), np.asarray(adjncy), np.asarray(xadj)), shape=(n, n)
    )
    load = np.bincount(node_part, weights=weights, minlength=num_parts).astype(np.int64)
    target = weights.sum() / num_parts
    max_moves = n if max_moves is None else max_moves
    # A loop over moves, each vectorized over the candidates of the heaviest part; on balanced
    # genome-scale partitions it does not run at all.
    for _ in range(max_moves):
        heavy = int(np.argmax(load))
        if load[heavy] <= (1 + tolerance) * target:
            break
        cands = np.flatnonzero((node_part == heavy) & (weights > 0))
        moved = False
        for light in np.argsort(load, kind="stable"):
            if light == heavy:
                continue
            gap = load[heavy] - load[light]
            ok = cands[weights[cands] < gap]
            if ok.size == 0:
                continue
            toward = np.asarray(adj[ok][:, np.flatnonzero(node_part == light)].sum(axis=1)).ravel()
            stay = np.asarray(adj[ok][:, np.flatnonzero(node_part == heavy)].sum(axis=1)).ravel()
            v = ok[np.lexsort((-weights[ok], stay - toward))[0]]
            node_part[v] = light
            load[heavy] -= weights[v]
            load[light] += weights[v]
            moved = True
            break
        if not moved:
            break
    return node_part


def anchor_conditions(
    condition_genes, num_cells: np.ndarray, node_part: np.ndarray, nodes, num_parts: int
) -> np.ndarray:
    """The GO node each perturbed condition follows (-1 for controls): a single its gene; a
    combination, heaviest first, the gene whose part holds the fewest cells so far (combinations
    whose genes share a part first, as they have no choice)."""
    cond, node = _condition_node_table(condition_genes, nodes)
    sizes = np.array([len(g) for g in condition_genes])
    num_cells = np.asarray(num_cells, dtype=np.int64)
    anchor = np.full(len(condition_genes), -1, dtype=np.int64)
    single = sizes[cond] == 1
    anchor[cond[single]] = node[single]
    load = np.bincount(node_part[anchor[anchor >= 0]], weights=num_cells[anchor >= 0], minlength=num_parts)
    genes_of: dict[int, list[int]] = {}
    for c, v in zip(cond[~single], node[~single]):
        genes_of.setdefault(int(c), []).append(int(v))
    multi = np.flatnonzero(sizes > 1)
    choices = np.array([len({node_part[v] for v in genes_of[int(c)]}) for c in multi])
    multi = multi[np.lexsort((-num_cells[multi], choices))]
    # A loop over combinations (not cells): a few thousand at most, each O(genes per condition).
    for c in multi:
        best = min(genes_of[int(c)], key=lambda v: (load[node_part[v]], node_part[v], v))
        anchor[c] = best
        load[node_part[best]] += num_cells[c]
    return anchor


def _equal_cell_ranges(order: np.ndarray, num_cells: np.ndarray, num_parts: int) -> np.ndarray:
    """Part of each condition when `order` is cut into num_parts runs of (about) equal cells.
    A condition goes to the run holding the midpoint of its cells."""
    cells = np.asarray(num_cells, dtype=np.float64)[order]
    total = cells.sum()
    mid = np.cumsum(cells) - cells / 2
    part = np.minimum(num_parts - 1, np.floor(mid * num_parts / max(total, 1.0))).astype(np.int64)
    out = np.empty(len(order), dtype=np.int64)
    out[order] = part
    return out


def home_parts(
    condition_genes, num_cells: np.ndarray, part_of_condition: np.ndarray, nodes, num_parts: int
) -> np.ndarray:
    """Home part of each node: the part owning most of the cells of its conditions (-1: none)."""
    cond, node = _condition_node_table(condition_genes, nodes)
    owned = part_of_condition[cond] >= 0
    cond, node = cond[owned], node[owned]
    table = sp.coo_matrix(
        (np.asarray(num_cells, np.float64)[cond] + 1e-9, (node, part_of_condition[cond])),
        shape=(len(nodes), num_parts),
    ).toarray()
    out = np.argmax(table, axis=1).astype(np.int64)
    out[table.sum(axis=1) == 0] = -1
    return out


def edge_cut(graph: GeneGraph, node_part: np.ndarray) -> tuple[int, int]:
    """(cut, total) undirected GO edges between nodes that both have a home part."""
    pairs = graph.undirected_pairs()
    a, b = node_part[pairs[:, 0]], node_part[pairs[:, 1]]
    both = (a >= 0) & (b >= 0)
    return int((a[both] != b[both]).sum()), int(both.sum())


def partition_conditions(
    condition_genes: Sequence[Sequence[str]],
    num_cells,
    go_graph: GeneGraph,
    num_parts: int,
    method: str = "metis",
    seed: int = 0,
) -> Partition:
    """Assign every perturbed condition to one of `num_parts` parts (controls: -1, shared).

    condition_genes: the conditions' gene tuples in store order (() for control); num_cells: (C,).
    """
    if method not in METHODS:
        raise ValueError(f"partition method {method!r}: expected one of {list(METHODS)}")
    if not isinstance(num_parts, (int, np.integer)) or num_parts < 1:
        raise ValueError(f"num_parts: expected an integer >= 1, received {num_parts!r}")
    num_cells = np.asarray(num_cells, dtype=np.int64)
    if num_cells.shape != (len(condition_genes),):
        raise ValueError(f"num_cells: expected shape ({len(condition_genes)},), received {num_cells.shape}")
    perturbed = np.array([len(g) > 0 for g in condition_genes], dtype=bool)
    if perturbed.sum() < num_parts:
        raise ValueError(f"{num_parts} parts requested but only {int(perturbed.sum())} perturbed conditions")
    nodes = go_graph.nodes
    if method == "metis":
        xadj, adjncy, ew = metis_csr(go_graph)
        weights = gene_weights(condition_genes, num_cells, nodes)
        node_part = metis_parts(xadj, adjncy, ew, weights, num_parts, seed)
        anchor = anchor_conditions(condition_genes, num_cells, node_part, nodes, num_parts)
        # Rebalance whole genes with the conditions anchored to them, so that a combination stays
        # in the part of one of its genes.
        owned = anchor >= 0
        unit = np.bincount(anchor[owned], weights=num_cells[owned], minlength=len(nodes)).astype(np.int64)
        node_part = rebalance_nodes(node_part, unit, xadj, adjncy, ew, num_parts)
        part_of = np.where(owned, node_part[np.maximum(anchor, 0)], -1)
    else:
        idx = np.flatnonzero(perturbed)
        if method == "random":
            idx = idx[np.random.default_rng(seed).permutation(idx.size)]
        part_of = np.full(len(condition_genes), -1, dtype=np.int64)
        part_of[idx] = _equal_cell_ranges(np.arange(idx.size), num_cells[idx], num_parts)
    return _finish(method, num_parts, seed, part_of, condition_genes, num_cells, go_graph)


def partition_from_order(
    order: np.ndarray, condition_genes, num_cells, go_graph: GeneGraph, num_parts: int, method: str = "order"
) -> Partition:
    """Cut a condition order (e.g. the graph-locality order) into W equal-cell ranges."""
    num_cells = np.asarray(num_cells, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    order = order[np.array([len(condition_genes[c]) > 0 for c in order], dtype=bool)]
    part_of = np.full(len(condition_genes), -1, dtype=np.int64)
    part_of[order] = _equal_cell_ranges(np.arange(order.size), num_cells[order], num_parts)
    return _finish(method, num_parts, 0, part_of, condition_genes, num_cells, go_graph)


def _finish(method, num_parts, seed, part_of, condition_genes, num_cells, go_graph) -> Partition:
    perturbed = np.array([len(g) > 0 for g in condition_genes], dtype=bool)
    assert ((part_of >= 0) == perturbed).all(), "every perturbed condition must have exactly one part"
    cells = np.bincount(part_of[perturbed], weights=num_cells[perturbed], minlength=num_parts).astype(
        np.int64
    )
    mean = cells.mean()
    node_part = home_parts(condition_genes, num_cells, part_of, go_graph.nodes, num_parts)
    cut, total = edge_cut(go_graph, node_part)
    nodes_per_part = np.bincount(node_part[node_part >= 0], minlength=num_parts).astype(np.int64)
    return Partition(
        method,
        int(num_parts),
        int(seed),
        part_of,
        cells,
        float(cells.max() / mean) if mean else 1.0,
        cut,
        total,
        nodes_per_part,
        node_part,
    )


def halo(go_graph: GeneGraph, node_ids, num_hops: int) -> np.ndarray:
    """Sorted nodes whose information reaches any of `node_ids` within `num_hops` message-passing
    steps (sources along edges j -> i, walked backwards from the targets), the nodes included."""
    n = go_graph.num_nodes
    node_ids = np.asarray(node_ids, dtype=np.int64).reshape(-1)
    if node_ids.size and (node_ids.min() < 0 or node_ids.max() >= n):
        raise ValueError(f"halo: node ids must be in [0, {n})")
    if num_hops < 0:
        raise ValueError(f"halo: num_hops must be >= 0, received {num_hops}")
    src, dst = go_graph.edge_index
    # Row t of `incoming` lists the sources of target t.
    incoming = sp.csr_matrix((np.ones(src.size, np.int8), (dst, src)), shape=(n, n))
    reached = np.zeros(n, dtype=bool)
    reached[node_ids] = True
    frontier = reached.copy()
    for _ in range(num_hops):
        if not frontier.any():
            break
        nxt = np.asarray(incoming[frontier].sum(axis=0)).ravel() > 0
        frontier = nxt & ~reached
        reached |= nxt
    return np.flatnonzero(reached).astype(np.int64)


def part_nodes(partition: Partition, condition_genes, nodes, part: int) -> np.ndarray:
    """GO nodes perturbed by the conditions of one part (the nodes whose embeddings it needs)."""
    cond, node = _condition_node_table(condition_genes, nodes)
    return np.unique(node[partition.part_of_condition[cond] == part])


def halo_sizes(go_graph: GeneGraph, partition: Partition, condition_genes, num_hops: int) -> np.ndarray:
    """Per part: how many GO nodes its workers' GNN touches (the num_hops halo of its genes)."""
    return np.asarray(
        [
            halo(go_graph, part_nodes(partition, condition_genes, go_graph.nodes, p), num_hops).size
            for p in range(partition.num_parts)
        ],
        dtype=np.int64,
    )
