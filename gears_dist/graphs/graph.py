"""The GeneGraph type, top-k sparsification, and the condition -> node index table.

Edges follow PyTorch Geometric: ``edge_index[0]`` is the source j, ``edge_index[1]`` the target i,
and a message flows j -> i. Every graph built here keeps a self loop (weight 1) on every node, so
a node never loses its own signal, and at most k+1 in-edges per target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


@dataclasses.dataclass
class GeneGraph:
    nodes: list[str]
    edge_index: np.ndarray  # (2, E) int64: row 0 source j, row 1 target i
    edge_weight: np.ndarray  # (E,) float32
    info: dict = dataclasses.field(default_factory=dict)  # provenance and reports (JSON-able)

    def __post_init__(self) -> None:
        self.nodes = [str(n) for n in self.nodes]
        self.edge_index = np.asarray(self.edge_index, dtype=np.int64).reshape(2, -1)
        self.edge_weight = np.asarray(self.edge_weight, dtype=np.float32).reshape(-1)
        n = len(self.nodes)
        if self.edge_weight.shape[0] != self.edge_index.shape[1]:
            raise ValueError(
                f"GeneGraph: {self.edge_index.shape[1]} edges but {self.edge_weight.shape[0]} weights"
            )
        if self.edge_index.size and (self.edge_index.min() < 0 or self.edge_index.max() >= n):
            raise ValueError(f"GeneGraph: edge_index refers to nodes outside [0, {n})")
        if len(set(self.nodes)) != n:
            raise ValueError("GeneGraph: node names must be unique")

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def node_index(self) -> dict[str, int]:
        return {g: i for i, g in enumerate(self.nodes)}

    def to_torch(self):
        """(edge_index LongTensor (2, E), edge_weight FloatTensor (E,)) for PyG layers."""
        import torch

        return torch.from_numpy(self.edge_index.copy()), torch.from_numpy(self.edge_weight.copy())

    def adjacency(self) -> sp.csr_matrix:
        """Sparse (target, source) matrix: row i holds the in-edges of node i."""
        n = self.num_nodes
        return sp.csr_matrix((self.edge_weight, (self.edge_index[1], self.edge_index[0])), shape=(n, n))

    def in_degree(self) -> np.ndarray:
        return np.bincount(self.edge_index[1], minlength=self.num_nodes)

    def isolated(self) -> np.ndarray:
        """Nodes whose only in- and out-edges are their own self loop."""
        src, dst = self.edge_index
        other = src != dst
        touched = np.zeros(self.num_nodes, dtype=bool)
        touched[src[other]] = True
        touched[dst[other]] = True
        return np.flatnonzero(~touched)

    def undirected_pairs(self) -> np.ndarray:
        """(M, 2) unique node pairs a < b joined by an edge in either direction (no self loops)."""
        src, dst = self.edge_index
        keep = src != dst
        a = np.minimum(src[keep], dst[keep])
        b = np.maximum(src[keep], dst[keep])
        return np.unique(np.stack([a, b], axis=1), axis=0) if a.size else np.zeros((0, 2), np.int64)

    def summary(self) -> str:
        deg = self.in_degree()
        return (
            f"{self.num_nodes} nodes, {self.num_edges} edges (incl. {self.num_nodes} self loops), "
            f"in-degree mean {deg.mean():.1f} max {deg.max() if deg.size else 0}, "
            f"{len(self.isolated())} isolated"
        )

    # -- storage (a zarr group, e.g. a store's graphs/<key>) -------------------------------------
    def write(self, group) -> None:
        group.create_array("nodes", data=np.array(self.nodes, dtype=np.dtypes.StringDType()))
        group.create_array("edge_index", data=self.edge_index)
        group.create_array("edge_weight", data=self.edge_weight)
        group.attrs["info"] = self.info
        group.attrs["num_nodes"] = self.num_nodes
        group.attrs["num_edges"] = self.num_edges

    @classmethod
    def read(cls, group) -> GeneGraph:
        return cls(
            nodes=[str(s) for s in group["nodes"][...]],
            edge_index=group["edge_index"][...],
            edge_weight=group["edge_weight"][...],
            info=dict(group.attrs.get("info", {})),
        )


def top_k_dense_rows(
    sim: np.ndarray, row_ids: np.ndarray, k: int, threshold: float
) -> tuple[np.ndarray, ...]:
    """Sparsify a block of similarity rows: for each target row keep the k best other sources with
    similarity > threshold (no self loop: add those with `with_self_loops`).

    sim: (b, n) float32 similarities of targets `row_ids` (global indices) to all n sources;
    modified in place. Returns (source, target, weight).
    """
    import torch  # torch.topk is several times faster than np.argpartition on wide rows

    b, n = sim.shape
    sim[np.arange(b), row_ids] = -np.inf
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    vals, idx = torch.topk(torch.from_numpy(sim), kk, dim=1)
    vals, idx = vals.numpy(), idx.numpy()
    keep = vals > threshold
    dst = np.broadcast_to(np.asarray(row_ids, np.int64)[:, None], idx.shape)[keep]
    return idx[keep].astype(np.int64), dst, vals[keep].astype(np.float32)


def top_k_per_target(
    src: np.ndarray, dst: np.ndarray, w: np.ndarray, k: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep non-self edges with weight > threshold, at most the k heaviest per target (ties broken
    by source index); no self loops in the result."""
    keep = (w > threshold) & (src != dst)
    src, dst, w = src[keep], dst[keep], w[keep]
    order = np.lexsort((src, -w, dst))
    src, dst, w = src[order], dst[order], w[order]
    first = np.searchsorted(dst, dst, side="left")
    keep = (np.arange(dst.size) - first) < k
    return src[keep].astype(np.int64), dst[keep].astype(np.int64), w[keep].astype(np.float32)


def with_self_loops(src, dst, w, num_nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    loops = np.arange(num_nodes, dtype=np.int64)
    return (
        np.concatenate([loops, src]).astype(np.int64),
        np.concatenate([loops, dst]).astype(np.int64),
        np.concatenate([np.ones(num_nodes, np.float32), np.asarray(w, np.float32)]),
    )


def top_k_edges(
    src: np.ndarray, dst: np.ndarray, w: np.ndarray, num_nodes: int, k: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparsify an edge list: weight > threshold, per target the k heaviest non-self sources,
    plus a self loop of weight 1 on every node."""
    return with_self_loops(*top_k_per_target(src, dst, w, k, threshold), num_nodes)


def sort_edges(src, dst, w) -> tuple[np.ndarray, np.ndarray]:
    """Edges sorted by (target, source): a canonical order, so equal graphs have equal arrays."""
    order = np.lexsort((src, dst))
    return np.stack([src[order], dst[order]]).astype(np.int64), np.asarray(w)[order].astype(np.float32)


def perturbation_index(nodes: Sequence[str], condition_genes: Sequence[Sequence[str]]) -> np.ndarray:
    """(C, Kmax) int64 GO-node indices of each condition's genes, -1 padded; control rows all -1.

    Raises ValueError listing the genes that are not nodes of the graph.
    """
    where = {g: i for i, g in enumerate(nodes)}
    missing = sorted({g for genes in condition_genes for g in genes if g not in where})
    if missing:
        raise ValueError(
            f"{len(missing)} perturbed gene(s) are not nodes of the GO graph: {missing[:50]}"
            f"{' ...' if len(missing) > 50 else ''}; build the graph over the dataset's perturbed "
            f"genes (universe 'dataset' or 'all') or add them to the user annotations / edge list"
        )
    kmax = max([1] + [len(g) for g in condition_genes])
    out = np.full((len(condition_genes), kmax), -1, dtype=np.int64)
    lens = np.array([len(g) for g in condition_genes], dtype=np.int64)
    flat = np.array([where[g] for genes in condition_genes for g in genes], dtype=np.int64)
    rows = np.repeat(np.arange(len(condition_genes)), lens)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)
    out[rows, cols] = flat
    return out
