"""Gene graphs on the real Norman subset: GO (Jaccard) graph, co-expression, partitions, storage."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gears_dist.config import ConfigError, from_dict
from gears_dist.data.conditions import condition_name, parse_condition
from gears_dist.data.genes import go_annotations
from gears_dist.data.store import building_store, open_store, write_manifest
from gears_dist.graphs.build import (
    coexpr_key,
    ensure_graphs,
    ensure_partition,
    go_key,
    load_partition,
    perturbable_genes,
    perturbed_genes,
    training_conditions,
)
from gears_dist.graphs.coexpr import build_coexpression_graph, condition_cell_ranges, merge_ranges
from gears_dist.graphs.config import GOGraphConfig, GraphConfig
from gears_dist.graphs.go import build_go_graph
from gears_dist.graphs.graph import GeneGraph, perturbation_index
from gears_dist.graphs.order import graph_condition_order
from gears_dist.graphs.partition import halo, halo_sizes, partition_conditions, partition_from_order

K = 20


# -- fixtures ----------------------------------------------------------------------------------------
def _build_store_from_h5ad(h5ad, dest, chunk_cells=128):
    """A store with the layout the graphs read (X grouped by condition, conditions/, genes/)."""
    import anndata as ad

    a = ad.read_h5ad(h5ad)
    genes = [parse_condition(c, control_values=("control", "ctrl")) for c in a.obs["condition"].astype(str)]
    names = np.array([condition_name(g) for g in genes])
    uniq = sorted(set(names), key=lambda n: (n != "ctrl", n))
    code = np.array([uniq.index(n) for n in names])
    order = np.argsort(code, kind="stable")
    x = a.X[order]
    x = np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=np.float32)
    counts = np.bincount(code, minlength=len(uniq))
    stop = np.cumsum(counts)
    import zarr

    with building_store(dest, overwrite=True) as tmp:
        root = zarr.open_group(tmp, mode="w")
        root.create_array("X", data=x, chunks=(chunk_cells, x.shape[1]))
        root.create_array("obs/condition", data=code[order].astype(np.int32))
        root.create_array("conditions/name", data=np.array(uniq, dtype=np.dtypes.StringDType()))
        gene_field = [n.replace("ctrl", "") for n in uniq]
        root.create_array("conditions/genes", data=np.array(gene_field, dtype=np.dtypes.StringDType()))
        root.create_array(
            "conditions/num_genes",
            data=np.array([len(n.split("+")) if n != "ctrl" else 0 for n in uniq], dtype=np.int32),
        )
        root.create_array("conditions/num_cells", data=counts.astype(np.int64))
        root.create_array("conditions/start", data=(stop - counts).astype(np.int64))
        root.create_array("conditions/stop", data=stop.astype(np.int64))
        root.create_array("conditions/is_control", data=np.array([n == "ctrl" for n in uniq]))
        root.create_array("genes/symbol", data=np.array(list(a.var_names), dtype=np.dtypes.StringDType()))
        write_manifest(
            tmp, {"counts": {"num_cells": x.shape[0], "num_genes": x.shape[1], "num_conditions": len(uniq)}}
        )
    return dest


@pytest.fixture(scope="module")
def norman_store(norman_path, tmp_path_factory):
    dest = tmp_path_factory.mktemp("graphs") / "norman.zarr"
    try:
        from gears_dist.data.ingest import ingest
    except ImportError:
        return _build_store_from_h5ad(norman_path, dest)
    ingest(norman_path, dest)
    return dest


@pytest.fixture(scope="module")
def norman_conditions(norman_path):
    import anndata as ad

    obs = ad.read_h5ad(norman_path, backed="r").obs
    return sorted({parse_condition(c, control_values=("control",)) for c in obs["condition"].astype(str)})


@pytest.fixture(scope="module")
def norman_go(norman_store):
    store = open_store(norman_store)
    return build_go_graph(perturbable_genes(store), GraphConfig(), perturbed=perturbed_genes(store))


def _jaccard(a, b):
    return len(a & b) / len(a | b) if a | b else 0.0


# -- GO graph ----------------------------------------------------------------------------------------
def test_norman_perturbed_genes_resolve_including_renamed(norman_conditions, norman_store, caplog):
    # The real subset spells KMT2A; older screens call it MLL. Both must reach the same GO terms.
    renamed = [tuple(sorted("MLL" if g == "KMT2A" else g for g in genes)) for genes in norman_conditions]
    perturbed = sorted({g for genes in renamed for g in genes})
    assert "MLL" in perturbed and "KMT2A" not in perturbed
    measured = open_store(norman_store).genes
    with caplog.at_level(logging.WARNING, logger="gears_dist.graphs"):
        graph = build_go_graph(sorted(set(perturbed) | set(measured)), GOGraphConfig(), perturbed=perturbed)
    assert graph.info["renamed"] == {"MLL": "KMT2A"}
    idx = perturbation_index(graph.nodes, renamed)
    assert (idx[[i for i, g in enumerate(renamed) if not g]] == -1).all()
    annotated = go_annotations()
    # IER5L has no GO annotation in the shipped table: reported by name and count, kept as an isolated node.
    assert graph.info["unannotated_perturbed"] == [g for g in perturbed if g != "MLL" and g not in annotated]
    assert graph.info["unannotated_perturbed"] == ["IER5L"]
    assert "1 perturbed gene(s) have no GO annotation" in caplog.text and "IER5L" in caplog.text
    where = graph.node_index()
    assert where["IER5L"] in graph.isolated()
    # MLL's edges are KMT2A's: the Jaccard with each neighbour equals the direct set computation.
    src, dst = graph.edge_index
    into = src[(dst == where["MLL"]) & (src != where["MLL"])]
    assert into.size > 0
    for j in into:
        w = graph.edge_weight[(src == j) & (dst == where["MLL"])][0]
        assert w == pytest.approx(_jaccard(annotated["KMT2A"], annotated[graph.nodes[j]]), abs=1e-6)


def test_go_graph_properties_on_norman(norman_go):
    g = norman_go
    src, dst = g.edge_index
    assert g.edge_index.dtype == np.int64 and g.edge_weight.dtype == np.float32
    loops = src == dst
    assert np.array_equal(np.sort(src[loops]), np.arange(g.num_nodes))  # one self loop per node
    assert np.all(g.edge_weight[loops] == 1.0)
    assert g.in_degree().max() <= K + 1
    other = g.edge_weight[~loops]
    assert other.size > 0 and other.min() > 0.1 and other.max() <= 1.0
    assert len({(a, b) for a, b in zip(src, dst)}) == src.size  # no repeated edges
    ei, ew = g.to_torch()
    assert (
        ei.dtype.is_floating_point is False
        and tuple(ei.shape) == (2, g.num_edges)
        and ew.shape[0] == g.num_edges
    )


def test_go_jaccard_and_top_k_against_direct_sets(norman_go):
    g = norman_go
    annotated = go_annotations()
    terms = [annotated.get(n, frozenset()) for n in g.nodes]
    src, dst = g.edge_index
    rng = np.random.default_rng(0)
    targets = rng.choice(np.flatnonzero(g.in_degree() > 3), 4, replace=False)
    for t in targets:
        direct = np.array([_jaccard(terms[t], terms[j]) if j != t else -1 for j in range(g.num_nodes)])
        kept = src[(dst == t) & (src != t)]
        weights = g.edge_weight[(dst == t) & (src != t)]
        np.testing.assert_allclose(weights, direct[kept], atol=1e-6)
        candidates = np.flatnonzero(direct > 0.1)
        assert kept.size == min(K, candidates.size)
        dropped = np.setdiff1d(candidates, kept)
        if dropped.size:
            assert weights.min() >= direct[dropped].max() - 1e-6


# -- user annotations and graphs --------------------------------------------------------------------
def test_user_gaf_and_table_annotations(tmp_path):
    gaf = tmp_path / "user.gaf"
    rows = [
        ("A", "", "GO:1", "IDA"),
        ("A", "", "GO:2", "IDA"),
        ("B", "", "GO:1", "IEA"),
        ("B", "", "GO:2", "IEA"),
        ("B", "", "GO:3", "IEA"),
        ("C", "NOT", "GO:1", "IDA"),
        ("C", "", "GO:3", "IDA"),
        ("D", "", "GO:9", "ND"),
        ("E", "", "GO:3", "IDA"),
    ]
    lines = ["!gaf-version: 2.2"] + [
        "\t".join(
            ["DB", f"id{s}", s, q, t, "PMID:1", e, "", "P", "", "", "protein", "taxon:1", "20220101", "DB"]
        )
        for s, q, t, e in rows
    ]
    gaf.write_text("\n".join(lines) + "\n")
    graph = build_go_graph(
        ["A", "B", "C", "D", "E"], GOGraphConfig(source="gaf", path=str(gaf), k=2, threshold=0.1)
    )
    w = {(graph.nodes[s], graph.nodes[d]): float(x) for s, d, x in zip(*graph.edge_index, graph.edge_weight)}
    # A={1,2}, B={1,2,3}, C={3} (the NOT line dropped), D: only ND -> unannotated, E={3}
    assert w[("B", "A")] == pytest.approx(2 / 3) and w[("A", "B")] == pytest.approx(2 / 3)
    assert w[("C", "E")] == pytest.approx(1.0) and w[("B", "C")] == pytest.approx(1 / 3)
    assert ("A", "C") not in w and graph.info["unannotated_perturbed"] == ["D"]
    table = tmp_path / "terms.tsv"
    table.write_text("gene\tterm\nA\tx\nA\ty\nB\tx\nB\ty\nB\tz\nC\tz\nE\tz\n")
    graph2 = build_go_graph(["A", "B", "C", "D", "E"], GOGraphConfig(source="table", path=str(table), k=2))
    assert np.array_equal(graph2.edge_index, graph.edge_index)
    np.testing.assert_allclose(graph2.edge_weight, graph.edge_weight)
    table.write_text("A\tx\tz\n")
    with pytest.raises(ValueError, match="line 1"):
        build_go_graph(["A"], GOGraphConfig(source="table", path=str(table)))


def test_user_edge_list_and_its_errors(tmp_path):
    path = tmp_path / "edges.csv"
    path.write_text("source,target,weight\nA,B,0.9\nC,B,0.5\nD,B,0.05\nB,A,0.3\n")
    graph = build_go_graph(["A", "B", "C", "D"], GOGraphConfig(source="edgelist", path=str(path), k=1))
    w = {(graph.nodes[s], graph.nodes[d]): float(x) for s, d, x in zip(*graph.edge_index, graph.edge_weight)}
    # k=1: B keeps only its heaviest source A; D -> B is below the threshold; every node has a self loop.
    assert w == pytest.approx(
        {("A", "B"): 0.9, ("B", "A"): 0.3, ("A", "A"): 1, ("B", "B"): 1, ("C", "C"): 1, ("D", "D"): 1}
    )
    path.write_text("A\tB\t0.5\nA\tZZZ\t0.5\nQ\tB\t0.2\n")
    with pytest.raises(ValueError, match=r"line 2 \(A -> ZZZ\); line 3 \(Q -> B\)"):
        build_go_graph(["A", "B"], GOGraphConfig(source="edgelist", path=str(path)))
    graph = build_go_graph(["A", "B"], GOGraphConfig(source="edgelist", path=str(path), universe="all"))
    assert set(graph.nodes) == {"A", "B", "ZZZ", "Q"}
    path.write_text("A\tB\t0.5\nB\tA\t-0.2\nA\tB\tx\n")
    with pytest.raises(ValueError, match=r"2 bad edge row.*line 2: weight -0.2.*line 3: weight 'x'"):
        build_go_graph(["A", "B"], GOGraphConfig(source="edgelist", path=str(path)))
    path.write_text("A\tB\t0.5\nA\tB\t0.7\n")
    with pytest.raises(ValueError, match=r"repeated edges.*lines \[1, 2\]"):
        build_go_graph(["A", "B"], GOGraphConfig(source="edgelist", path=str(path)))


def test_graph_config_is_validated():
    cfg = from_dict(GraphConfig, {"go": {"k": 10, "universe": "all"}, "no_go": "coexpression"})
    assert cfg.go.k == 10 and cfg.coexpr.k == 20 and cfg.coexpr.threshold == 0.4
    with pytest.raises(ConfigError, match=r"go\.path"):
        from_dict(GraphConfig, {"go": {"source": "gaf"}})
    with pytest.raises(ConfigError, match=r"go\.kk"):
        from_dict(GraphConfig, {"go": {"kk": 3}})
    with pytest.raises(ConfigError, match="no_go"):
        from_dict(GraphConfig, {"no_go": "drop"})
    with pytest.raises(ConfigError, match="threshold"):
        from_dict(GraphConfig, {"coexpr": {"threshold": 1.5}})


def test_perturbation_index_pads_and_names_missing_genes():
    idx = perturbation_index(["A", "B", "C"], [(), ("B",), ("A", "C")])
    assert idx.dtype == np.int64 and idx.tolist() == [[-1, -1], [1, -1], [0, 2]]
    with pytest.raises(ValueError, match=r"\['X', 'Y'\]"):
        perturbation_index(["A"], [("A", "Y"), ("X",)])


# -- co-expression -----------------------------------------------------------------------------------
def test_coexpression_matches_numpy_corrcoef(norman_store):
    store = open_store(norman_store)
    conds = training_conditions(store, None)
    genes = store.condition_genes()
    assert all(len(genes[c]) <= 1 for c in conds) and any(len(genes[c]) == 0 for c in conds)
    ranges = condition_cell_ranges(store, conds)
    # Blocks smaller than the store's chunks and not aligned to them exercise the streaming.
    graph = build_coexpression_graph(store, conds, GraphConfig(), block_cells=200)
    x = np.concatenate([store.X[a:b] for a, b in ranges]).astype(np.float64)
    assert graph.info["num_cells"] == x.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(x, rowvar=False)
    r = np.nan_to_num(np.abs(r))
    src, dst = graph.edge_index
    other = src != dst
    np.testing.assert_allclose(graph.edge_weight[other], r[dst[other], src[other]], atol=2e-5)
    assert graph.edge_weight[other].min() > 0.4 and graph.in_degree().max() <= K + 1
    assert graph.nodes == store.genes
    np.fill_diagonal(r, -1)
    for t in np.flatnonzero(graph.in_degree() > 1)[:5]:
        kept = src[(dst == t) & other]
        candidates = np.flatnonzero(r[t] > 0.4)
        assert kept.size == min(K, candidates.size)
        assert r[t, kept].min() >= np.delete(r[t], np.concatenate([kept, [t]])).max() - 2e-5
    # Condition indices and explicit cell ranges select the same cells.
    again = build_coexpression_graph(store, ranges, GraphConfig())
    assert np.array_equal(again.edge_index, graph.edge_index)


def test_coexpression_from_a_cell_sample(norman_store):
    from gears_dist.graphs.coexpr import sample_ranges

    store = open_store(norman_store)
    conds = training_conditions(store, None)
    ranges = condition_cell_ranges(store, conds)
    total = int((ranges[:, 1] - ranges[:, 0]).sum())
    cap = total // 3
    picked = sample_ranges(ranges, cap, store.chunk_cells)
    n = int((picked[:, 1] - picked[:, 0]).sum())
    assert cap <= n < cap + store.chunk_cells  # whole chunk pieces, stopping at the first past the cap
    inside = np.zeros(store.num_cells, bool)
    for a, b in ranges:
        inside[a:b] = True
    assert all(inside[a:b].all() for a, b in picked)  # only cells of the chosen conditions
    # pieces from chunks all over the store, not a prefix
    assert picked[-1, 1] > ranges[-1, 1] - (ranges[-1, 1] - ranges[0, 0]) // 3
    np.testing.assert_array_equal(sample_ranges(ranges, cap, store.chunk_cells), picked)  # deterministic
    np.testing.assert_array_equal(sample_ranges(ranges, total, store.chunk_cells), merge_ranges(ranges))

    cfg = from_dict(GraphConfig, {"coexpr": {"max_cells": cap}})
    graph = build_coexpression_graph(store, conds, cfg)
    assert graph.info["num_cells"] == n and graph.info["cells_available"] == total
    # the same as a graph over exactly those cells
    direct = build_coexpression_graph(store, picked, GraphConfig())
    assert np.array_equal(direct.edge_index, graph.edge_index)
    assert coexpr_key(cfg) == coexpr_key(GraphConfig()) + f"_n{cap}"
    with pytest.raises(ConfigError, match="coexpr.max_cells"):
        from_dict(GraphConfig, {"coexpr": {"max_cells": 1}})


def test_covariance_finish_and_correlation_in_row_blocks():
    from scipy.linalg.blas import dsyrk

    from gears_dist.graphs.coexpr import _finish_covariance, correlation_from_cov

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7)) @ rng.normal(size=(7, 7))
    x[:, 3] = 2.0  # a constant gene
    gram = dsyrk(1.0, x.T, trans=0, lower=0)  # upper triangle only, as the streaming sums hold it
    _finish_covariance(gram, x.mean(axis=0), x.shape[0], block=3)
    np.testing.assert_allclose(gram, np.cov(x, rowvar=False), atol=1e-10)
    r = correlation_from_cov(gram, block=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.nan_to_num(np.corrcoef(x, rowvar=False))
    np.fill_diagonal(want, 1.0)
    np.testing.assert_allclose(r, want, atol=1e-10)


def test_merge_ranges():
    assert merge_ranges(np.array([[5, 8], [0, 2], [2, 4], [7, 9], [10, 10]])).tolist() == [[0, 4], [5, 9]]


def test_unannotated_measured_gene_borrows_coexpression(norman_store):
    store = open_store(norman_store)
    coexpr = build_coexpression_graph(store, training_conditions(store, None), GraphConfig())
    annotated = go_annotations()
    measured_unannotated = [
        g for g, d in zip(coexpr.nodes, coexpr.in_degree()) if g not in annotated and d > 1
    ]
    gene = measured_unannotated[0]
    perturbed = perturbed_genes(store) + [gene]
    cfg = from_dict(GraphConfig, {"no_go": "coexpression"})
    graph = build_go_graph(perturbable_genes(store), cfg, perturbed=perturbed, fallback=coexpr)
    assert gene in graph.info["borrowed_coexpression"]
    gi, ci = graph.node_index()[gene], coexpr.node_index()[gene]
    got = {graph.nodes[s]: w for s, d, w in zip(*graph.edge_index, graph.edge_weight) if d == gi and s != gi}
    want = {
        coexpr.nodes[s]: w for s, d, w in zip(*coexpr.edge_index, coexpr.edge_weight) if d == ci and s != ci
    }
    assert got == pytest.approx(want) and got
    with pytest.raises(ValueError, match="no co-expression graph"):
        build_go_graph(perturbable_genes(store), cfg, perturbed=perturbed)


# -- partitions and halos ----------------------------------------------------------------------------
def _check_partition(part, condition_genes, num_cells, num_parts):
    perturbed = np.array([len(g) > 0 for g in condition_genes])
    assert part.part_of_condition.shape == (len(condition_genes),)
    assert (part.part_of_condition[~perturbed] == -1).all()  # controls shared, owned by nobody
    assert set(part.part_of_condition[perturbed]) <= set(range(num_parts))
    cells = np.bincount(part.part_of_condition[perturbed], weights=num_cells[perturbed], minlength=num_parts)
    assert cells.sum() == num_cells[perturbed].sum() and np.array_equal(cells, part.cells_per_part)
    assert part.balance == pytest.approx(cells.max() / cells.mean())


def test_partitions_on_norman_are_valid(norman_store, norman_go):
    store = open_store(norman_store)
    genes, cells = store.condition_genes(), store.array("conditions/num_cells")
    for w in (2, 4):
        for method in ("metis", "contiguous", "random"):
            part = partition_conditions(genes, cells, norman_go, w, method, seed=3)
            _check_partition(part, genes, cells, w)
            # 33 conditions of ~100 cells: balance is bounded by the granularity of whole conditions
            assert part.balance < 1.0 + 1.5 * cells.max() / (cells[1:].sum() / w)
            # a combination goes to the part of one of its genes (where those have singles to show it)
            if method == "metis":
                single_part = {g[0]: part.part_of_condition[c] for c, g in enumerate(genes) if len(g) == 1}
                for c, g in enumerate(genes):
                    if len(g) > 1 and all(x in single_part for x in g):
                        assert part.part_of_condition[c] in {single_part[x] for x in g}


def _screen(num_singles, num_pairs, seed=0):
    rng = np.random.default_rng(seed)
    symbols = np.array(sorted(go_annotations()))
    genes = sorted(rng.choice(symbols, num_singles, replace=False))
    pairs = set()
    while len(pairs) < num_pairs:
        pairs.add(tuple(sorted(rng.choice(genes, 2, replace=False))))
    conds = [()] + [(g,) for g in genes] + sorted(pairs)
    cells = np.concatenate([[5000], np.maximum(5, rng.lognormal(np.log(150), 0.5, len(conds) - 1))]).astype(
        np.int64
    )
    return conds, cells, genes


def test_metis_balance_and_locality_on_generated_screen():
    conds, cells, genes = _screen(2000, 100)
    go = build_go_graph(genes, GOGraphConfig())
    order = graph_condition_order(conds, cells, go)
    assert np.array_equal(np.sort(order), np.arange(len(conds))) and order[0] == 0  # control first
    for w in (2, 4, 8, 16):
        metis = partition_conditions(conds, cells, go, w, "metis")
        rand = partition_conditions(conds, cells, go, w, "random", seed=1)
        local = partition_from_order(order, conds, cells, go, w)
        for p in (metis, rand, local):
            _check_partition(p, conds, cells, w)
            assert p.balance <= 1.05, p.summary()
        # graph-aware parts cut far fewer GO edges than random ones
        assert metis.edge_cut < 0.7 * rand.edge_cut and local.edge_cut < 0.7 * rand.edge_cut


def test_halo_on_hand_graph():
    # 0 -> 1 -> 2 -> 3, 4 -> 2, 5 isolated (messages flow source -> target)
    src = np.array([0, 1, 2, 4] + list(range(6)))
    dst = np.array([1, 2, 3, 2] + list(range(6)))
    g = GeneGraph(list("abcdef"), np.stack([src, dst]), np.ones(src.size, np.float32))
    assert halo(g, [3], 0).tolist() == [3]
    assert halo(g, [3], 1).tolist() == [2, 3]
    assert halo(g, [3], 2).tolist() == [1, 2, 3, 4]
    assert halo(g, [3], 3).tolist() == [0, 1, 2, 3, 4]
    assert halo(g, [3], 10).tolist() == [0, 1, 2, 3, 4]
    assert halo(g, [0, 5], 2).tolist() == [0, 5]  # nothing flows into 0
    assert halo(g, [1, 4], 1).tolist() == [0, 1, 4]
    conds = [(), ("d",), ("a",), ("f",)]
    part = partition_from_order(np.array([0, 1, 2, 3]), conds, np.array([5, 10, 10, 10]), g, 3)
    assert part.part_of_condition.tolist() == [-1, 0, 1, 2]
    assert halo_sizes(g, part, conds, 2).tolist() == [4, 1, 1]
    with pytest.raises(ValueError, match="node ids"):
        halo(g, [6], 1)


# -- storage and CLI ---------------------------------------------------------------------------------
def test_ensure_graphs_stores_and_reloads(norman_store, capsys):
    store = open_store(norman_store, mode="r+")
    cfg = GraphConfig()
    bundle = ensure_graphs(store, cfg, None)
    assert bundle.keys == {"go": "go_builtin_k20_t0.1_dataset", "coexpr": "coexpr_all_k20_r0.4"}
    assert bundle.keys["go"] == go_key(cfg) and bundle.keys["coexpr"] == coexpr_key(cfg)
    reopened = open_store(norman_store)
    assert reopened.has_component("graphs", bundle.keys["go"])
    again = ensure_graphs(reopened, cfg, None)
    for a, b in ((bundle.go, again.go), (bundle.coexpr, again.coexpr)):
        assert a.nodes == b.nodes and np.array_equal(a.edge_index, b.edge_index)
        np.testing.assert_array_equal(a.edge_weight, b.edge_weight)
    assert again.go.info["unannotated_perturbed"] == ["IER5L"]
    part, key = ensure_partition(store, bundle.go, bundle.keys["go"], 2)
    loaded = load_partition(open_store(norman_store), key)
    assert np.array_equal(loaded.part_of_condition, part.part_of_condition) and loaded.balance == part.balance

    from gears_dist.cli import main

    assert main(["graph", str(norman_store)]) == 0
    out = capsys.readouterr().out
    assert "perturbed genes without GO annotation: 1: IER5L" in out
    assert "isolated perturbed genes in the GO graph:" in out and "W=2" in out and "W=4" in out
    assert "balance" in out


def test_ingest_graph_order_is_registered_and_used(norman_path, tmp_path):
    import gears_dist.graphs.order  # noqa: F401  (registers 'graph' with the ingest)
    from gears_dist.data.ingest import ingest, registered_orders

    assert "graph" in registered_orders()
    store = ingest(norman_path, tmp_path / "graph_order.zarr", order="graph")
    genes, cells = store.condition_genes(), store.array("conditions/num_cells")
    assert genes[0] == ()  # the shared controls first
    # The stored order is the locality order itself: ordering it again changes nothing.
    assert graph_condition_order(genes, cells).tolist() == list(range(len(genes)))
    part = partition_conditions(
        genes, cells, build_go_graph(sorted({g for c in genes for g in c}), GOGraphConfig()), 2, "contiguous"
    )
    assert part.part_of_condition[0] == -1 and (np.diff(part.part_of_condition[1:]) >= 0).all()


def test_coexpression_uses_the_training_split(norman_store):
    from gears_dist.data.splits import load_split, make_and_save_split

    key = make_and_save_split(norman_store, "simulation", seed=1, key="graphs_test_sim", overwrite=True)
    store = open_store(norman_store, mode="r+")
    train = set(load_split(store, key).train)
    conds = training_conditions(store, key)
    names, genes = store.condition_names, store.condition_genes()
    want = [i for i, n in enumerate(names) if n in train and len(genes[i]) <= 1]
    assert conds.tolist() == want and len(want) < sum(len(g) <= 1 for g in genes)
    bundle = ensure_graphs(store, GraphConfig(), key)
    assert bundle.keys["coexpr"] == "coexpr_graphs_test_sim_k20_r0.4"
    assert bundle.coexpr.info["num_cells"] == int(store.array("conditions/num_cells")[want].sum())
    part, pkey = ensure_partition(store, bundle.go, bundle.keys["go"], 2, "random", seed=5, split_key=key)
    assert pkey == "part_random_W2_s5_graphs_test_sim__go_builtin_k20_t0.1_dataset"
    codes = load_split(store, key).codes(names)
    assert (
        part.cells_per_part.sum()
        == store.array("conditions/num_cells")[(codes == 0) & (np.array([len(g) > 0 for g in genes]))].sum()
    )
