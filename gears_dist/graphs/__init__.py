"""Gene graphs for GEARS: the GO similarity graph, the co-expression graph, worker partitions.

- ``GeneGraph`` (graph.py): nodes, PyG-style edge_index (row 0 source, row 1 target), edge_weight.
- ``build_go_graph`` (go.py): Jaccard of GO-term sets by blocked sparse products; shipped human
  annotations, a user GAF / gene-term table, or a user edge list (``GraphConfig.go.source``).
- ``build_coexpression_graph`` (coexpr.py): Pearson |r| streamed from the store with Dask.
- ``partition_conditions``, ``halo`` (partition.py): METIS / contiguous / random worker parts.
- order.py: the ``graph`` condition order for ingest (recursive METIS bisection).
- ``ensure_graphs``, ``ensure_partition`` (build.py): stored in the store's graphs/, keyed by parameters.
"""

from gears_dist.graphs.config import CoexprConfig, GOGraphConfig, GraphConfig, PartitionConfig
from gears_dist.graphs.graph import GeneGraph, perturbation_index

__all__ = [
    "CoexprConfig",
    "GOGraphConfig",
    "GeneGraph",
    "GraphConfig",
    "PartitionConfig",
    "perturbation_index",
]
