"""Typed configuration of the gene graphs (the ``graphs:`` block of a run's YAML)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gears_dist.config import require


@dataclasses.dataclass
class GOGraphConfig:
    """Where GO similarity comes from and how the graph is sparsified.

    source: ``builtin`` (the shipped human table), ``gaf`` (a GO annotation file), ``table`` (two
    columns gene, term) or ``edgelist`` (three columns source, target, weight: a ready graph).
    universe: ``dataset`` = perturbed + measured genes; ``all`` = also every annotated gene.
    """

    source: Literal["builtin", "gaf", "table", "edgelist"] = "builtin"
    path: str | None = None
    k: int = 20
    threshold: float = 0.1
    universe: Literal["dataset", "all"] = "dataset"

    def validate(self) -> None:
        require(self.k >= 1, "go.k", f"expected an integer >= 1 (neighbours per gene), received {self.k}")
        require(
            0.0 <= self.threshold < 1.0,
            "go.threshold",
            f"expected a Jaccard threshold in [0, 1), received {self.threshold}",
        )
        if self.source == "builtin":
            require(
                self.path is None,
                "go.path",
                f"source 'builtin' takes no path (received {self.path!r}); "
                "set source to gaf, table or edgelist",
            )
        else:
            require(bool(self.path), "go.path", f"source {self.source!r} needs a path to the user's file")


@dataclasses.dataclass
class CoexprConfig:
    k: int = 20
    threshold: float = 0.4
    # Estimate the correlations from at most this many cells (whole chunk pieces drawn at random, seed 0)
    # instead of every training cell: the pass costs ~1 ms of CPU per cell at 8,000 genes (20 min at 1.4M
    # cells), while r from 2e5 cells is within ~0.005 of r from all of them. null: every cell.
    max_cells: int | None = None

    def validate(self) -> None:
        require(self.k >= 1, "coexpr.k", f"expected an integer >= 1, received {self.k}")
        require(self.max_cells is None or self.max_cells >= 2, "coexpr.max_cells",
                f"expected null (every cell) or an integer >= 2, received {self.max_cells}")
        require(
            0.0 <= self.threshold < 1.0,
            "coexpr.threshold",
            f"expected a |Pearson r| threshold in [0, 1), received {self.threshold}",
        )


@dataclasses.dataclass
class PartitionConfig:
    """Worker partitions built and stored by ``gears-dist graph`` (training may ask for others)."""

    method: Literal["metis", "contiguous", "random"] = "metis"
    num_parts: list[int] = dataclasses.field(default_factory=lambda: [2, 4])
    seed: int = 0

    def validate(self) -> None:
        require(
            all(w >= 1 for w in self.num_parts),
            "partition.num_parts",
            f"expected worker counts >= 1, received {self.num_parts}",
        )


@dataclasses.dataclass
class GraphConfig:
    """no_go: how a perturbed gene without GO annotation stays usable: an isolated node with a
    self loop (``self_loop``), or borrowing its co-expression neighbours (``coexpression``, only
    for genes that are measured). Either way the genes are logged by name."""

    go: GOGraphConfig = dataclasses.field(default_factory=GOGraphConfig)
    coexpr: CoexprConfig = dataclasses.field(default_factory=CoexprConfig)
    no_go: Literal["self_loop", "coexpression"] = "self_loop"
    partition: PartitionConfig = dataclasses.field(default_factory=PartitionConfig)

    def validate(self) -> None:
        self.go.validate()
        self.coexpr.validate()
        self.partition.validate()
