"""The GO similarity graph: Jaccard index of GO-term sets, by sparse matrix algebra.

With A the (gene x term) 0/1 incidence matrix, |T_i ∩ T_j| = (A Aᵀ)_ij and
|T_i ∪ T_j| = |T_i| + |T_j| - |T_i ∩ T_j|. A Aᵀ is nearly dense over the whole genome (a few
terms such as "protein binding" annotate most genes), so it is computed one block of target rows
at a time and each block is cut to its top k+1 before the next: memory stays O(block · n).

Annotations come from the shipped human table (``builtin``), a GAF file, a two-column gene/term
table, or the user supplies the graph itself as an edge list. Gene names are matched to the
annotations through the alias table (old symbol -> current symbol).
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from gears_dist.data import genes as gene_resources
from gears_dist.graphs.config import GOGraphConfig, GraphConfig
from gears_dist.graphs.graph import GeneGraph, sort_edges, top_k_dense_rows, top_k_edges, with_self_loops

log = logging.getLogger("gears_dist.graphs")

# GAF 2.x columns (0-based): 2 symbol, 3 qualifier, 4 GO id, 6 evidence code.
_GAF_SYMBOL, _GAF_QUALIFIER, _GAF_TERM, _GAF_EVIDENCE = 2, 3, 4, 6
# "ND" = no biological data: annotates the root term only; "NOT" qualifiers negate the annotation.
_EXCLUDED_EVIDENCE = {"ND"}
_BLOCK_BYTES = 64 << 20  # one dense block of A_B Aᵀ (bounds memory)


def _open_text(path: pathlib.Path):
    import gzip

    if not path.is_file():
        raise FileNotFoundError(
            f"annotation/graph file {str(path)!r} does not exist; set graphs.go.path to an existing file"
        )
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _split_line(line: str) -> list[str]:
    sep = "\t" if "\t" in line else ","
    return [f.strip() for f in line.rstrip("\n").split(sep)]


def read_gaf(path: str | pathlib.Path) -> dict[str, set[str]]:
    """Gene symbol -> GO ids from a GAF 2.x file (skips 'NOT' qualifiers and ND evidence)."""
    path = pathlib.Path(path)
    out: dict[str, set[str]] = {}
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.startswith("!") or not line.strip():
                continue
            f = line.rstrip("\n").split("\t")
            if len(f) < 7:
                raise ValueError(
                    f"{path}: line {lineno} has {len(f)} tab-separated columns; a GAF line has "
                    f"15 (symbol in column 3, GO id in column 5); is this a two-column table? "
                    f"then set graphs.go.source: table"
                )
            if "NOT" in f[_GAF_QUALIFIER].split("|") or f[_GAF_EVIDENCE] in _EXCLUDED_EVIDENCE:
                continue
            out.setdefault(f[_GAF_SYMBOL], set()).add(f[_GAF_TERM])
    if not out:
        raise ValueError(f"{path}: no usable annotation lines found in the GAF file")
    return out


def read_gene_term_table(path: str | pathlib.Path) -> dict[str, set[str]]:
    """Gene -> terms from a two-column table (tab or comma separated, '#' comments, optional
    header row starting with 'gene' or 'symbol'). Terms are any strings, not only GO ids."""
    path = pathlib.Path(path)
    out: dict[str, set[str]] = {}
    with _open_text(path) as fh:
        first = True
        for lineno, line in enumerate(fh, 1):
            if line.startswith("#") or not line.strip():
                continue
            f = _split_line(line)
            if first and f[0].lower() in ("gene", "symbol", "gene_symbol", "gene_name"):
                first = False
                continue
            first = False
            if len(f) != 2 or not f[0] or not f[1]:
                raise ValueError(
                    f"{path}: line {lineno} {line.strip()!r}: expected two columns 'gene<TAB>term'"
                )
            out.setdefault(f[0], set()).add(f[1])
    if not out:
        raise ValueError(f"{path}: no gene/term rows found")
    return out


def read_edge_list(path: str | pathlib.Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(sources, targets, weights, line numbers) of a three-column edge list (tab or comma separated,
    optional header 'source,target,weight'). Negative, non-numeric or repeated edges raise
    ValueError naming the lines."""
    path = pathlib.Path(path)
    src, dst, w, lines, bad = [], [], [], [], []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.startswith("#") or not line.strip():
                continue
            f = _split_line(line)
            if not src and not bad and f[0].lower() == "source":
                continue
            if len(f) != 3:
                bad.append(f"line {lineno} {line.strip()!r}: expected 3 columns source, target, weight")
                continue
            try:
                weight = float(f[2])
            except ValueError:
                bad.append(f"line {lineno}: weight {f[2]!r} is not a number")
                continue
            if not np.isfinite(weight) or weight < 0:
                bad.append(f"line {lineno}: weight {weight} (weights must be finite and >= 0)")
                continue
            src.append(f[0])
            dst.append(f[1])
            w.append(weight)
            lines.append(lineno)
    if bad:
        raise ValueError(f"{path}: {len(bad)} bad edge row(s): " + "; ".join(bad[:20]))
    if not src:
        raise ValueError(f"{path}: no edges found (expected rows 'source<TAB>target<TAB>weight')")
    return src, dst, np.asarray(w, dtype=np.float64), np.asarray(lines)


def load_annotations(cfg: GOGraphConfig) -> dict[str, frozenset]:
    if cfg.source == "builtin":
        return gene_resources.go_annotations()
    if cfg.source == "gaf":
        return {g: frozenset(t) for g, t in read_gaf(cfg.path).items()}
    if cfg.source == "table":
        return {g: frozenset(t) for g, t in read_gene_term_table(cfg.path).items()}
    raise ValueError(f"graphs.go.source {cfg.source!r} has no annotations (an edge list is a graph)")


def annotation_sets(graph: GeneGraph) -> list[frozenset] | None:
    """Each node's GO terms, re-read from the annotations a GO graph was built from (its ``info``: source, path,
    renames), or None where it records none: an edge list, a graph of another kind, or an annotation file that
    is no longer there (a warning says so). The graph keeps each node's top-k neighbours only; exact Jaccards of
    any two genes need the term sets themselves."""
    info = getattr(graph, "info", None) or {}
    if info.get("kind") != "go" or info.get("source") not in ("builtin", "gaf", "table"):
        return None
    try:
        annotations = load_annotations(GOGraphConfig(source=info["source"], path=info.get("path")))
    except OSError as err:
        log.warning("GO graph: its annotations (%s) cannot be read again (%s); gene pairs use the graph's "
                    "edges instead", info.get("path"), err)
        return None
    renamed = info.get("renamed") or {}
    return [annotations.get(renamed.get(n, n), frozenset()) for n in graph.nodes]


def incidence_matrix(term_sets: Sequence[Iterable]) -> sp.csr_matrix:
    """(n, T) 0/1 CSR matrix of gene x term membership (terms factorized in first-seen order)."""
    lens = np.array([len(t) for t in term_sets], dtype=np.int64)
    flat = [t for terms in term_sets for t in terms]
    if not flat:
        return sp.csr_matrix((len(term_sets), 0), dtype=np.float32)
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(flat, dtype=object))
    indptr = np.concatenate([[0], np.cumsum(lens)])
    a = sp.csr_matrix(
        (np.ones(len(flat), np.float32), codes.astype(np.int64), indptr), shape=(len(term_sets), len(uniques))
    )
    a.sum_duplicates()
    a.data[:] = 1.0
    return a


def jaccard_top_k(
    a: sp.csr_matrix, k: int, threshold: float, block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, weight) edges: per target i the self loop plus the k sources j with the
    largest Jaccard(T_i, T_j) > threshold. Blocked A_B Aᵀ products; never a pairwise loop."""
    n = a.shape[0]
    size = np.asarray(a.sum(axis=1)).ravel().astype(np.float32)
    at = a.T.tocsr()
    if block_rows is None:
        block_rows = max(64, min(n, _BLOCK_BYTES // max(1, 4 * n)))
    parts = []
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        inter = (a[start:stop] @ at).toarray()  # (b, n) |T_i ∩ T_j|
        union = size[start:stop, None] + size[None, :]
        union -= inter
        np.maximum(union, 1.0, out=union)  # union 0 means both sets empty, and then inter is 0 too
        inter /= union
        del union
        parts.append(top_k_dense_rows(inter, np.arange(start, stop), k, threshold))
    src, dst, w = (np.concatenate(x) for x in zip(*parts))
    return with_self_loops(src, dst, w, n)


def _match_names(names: Sequence[str], known: set[str]) -> tuple[list[str], dict[str, str]]:
    """The annotation symbol for each name: itself if known, else its current symbol via the
    alias table (only when that one is known)."""
    resolved, renamed = [], {}
    table = gene_resources.aliases()
    for g in names:
        if g in known:
            resolved.append(g)
        elif g in table and table[g] in known:
            resolved.append(table[g])
            renamed[g] = table[g]
        else:
            resolved.append(g)
    return resolved, renamed


def _universe(genes: Sequence[str], cfg: GOGraphConfig, known: Iterable[str]) -> list[str]:
    nodes = list(dict.fromkeys(str(g) for g in genes))
    if cfg.universe == "all":
        resolved, _ = _match_names(nodes, set(known))
        covered = set(resolved) | set(nodes)
        nodes += sorted(set(known) - covered)
    return nodes


def build_go_graph(
    genes: Sequence[str],
    cfg: GraphConfig | GOGraphConfig,
    *,
    perturbed: Sequence[str] | None = None,
    fallback: GeneGraph | None = None,
) -> GeneGraph:
    """GO similarity graph over `genes` (the perturbable genes: perturbed + measured, in the
    dataset's spelling; universe 'all' adds every annotated gene).

    perturbed: the dataset's perturbed genes, for the report of those without annotation
    (default: all of `genes`). fallback: the co-expression graph, used when ``no_go`` is
    ``coexpression``. The returned graph's ``info`` records the source, renames and the
    unannotated perturbed genes.
    """
    go_cfg = cfg.go if isinstance(cfg, GraphConfig) else cfg
    no_go = cfg.no_go if isinstance(cfg, GraphConfig) else "self_loop"
    go_cfg.validate()
    if not genes:
        raise ValueError(
            "build_go_graph: no genes given; expected the dataset's perturbed and measured genes"
        )
    perturbed = list(dict.fromkeys(genes if perturbed is None else perturbed))
    # Every perturbed gene is a node, whether or not the caller listed it among `genes`.
    genes = list(dict.fromkeys([*genes, *perturbed]))
    if go_cfg.source == "edgelist":
        graph, annotated = _graph_from_edge_list(genes, go_cfg)
        renamed: dict[str, str] = {}
    else:
        annotations = load_annotations(go_cfg)
        nodes = _universe(genes, go_cfg, annotations)
        resolved, renamed = _match_names(nodes, set(annotations))
        term_sets = [annotations.get(s, ()) for s in resolved]
        annotated = {n for n, t in zip(nodes, term_sets) if t}
        src, dst, w = jaccard_top_k(incidence_matrix(term_sets), go_cfg.k, go_cfg.threshold)
        edge_index, weight = sort_edges(src, dst, w)
        graph = GeneGraph(nodes, edge_index, weight)
    missing = [g for g in perturbed if g not in annotated]
    if no_go == "coexpression" and missing:
        graph = _borrow_coexpression(graph, missing, fallback, go_cfg.k)
    graph.info.update(
        {
            "kind": "go",
            "source": go_cfg.source,
            "path": go_cfg.path,
            "k": go_cfg.k,
            "threshold": go_cfg.threshold,
            "universe": go_cfg.universe,
            "no_go": no_go,
            "renamed": renamed,
            "unannotated_perturbed": missing,
            "num_unannotated_nodes": int(len(graph.nodes) - len(annotated & set(graph.nodes))),
        }
    )
    if go_cfg.source == "builtin":
        graph.info["annotations"] = gene_resources.go_provenance()
    if renamed:
        log.info(
            "GO graph: %d gene(s) matched through the alias table: %s",
            len(renamed),
            ", ".join(f"{a}->{b}" for a, b in sorted(renamed.items())[:30]),
        )
    if missing:
        how = (
            "isolated nodes with a self loop"
            if no_go == "self_loop"
            else "given their co-expression neighbours where measured, else a self loop"
        )
        log.warning(
            "GO graph: %d perturbed gene(s) have no GO annotation (%s source) and are kept as %s: %s",
            len(missing),
            go_cfg.source,
            how,
            ", ".join(missing[:100]),
        )
    return graph


def _graph_from_edge_list(genes: Sequence[str], cfg: GOGraphConfig) -> tuple[GeneGraph, set[str]]:
    src_names, dst_names, w, lines = read_edge_list(cfg.path)
    nodes = list(dict.fromkeys(str(g) for g in genes))
    if cfg.universe == "all":
        nodes += sorted((set(src_names) | set(dst_names)) - set(nodes))
    where = {g: i for i, g in enumerate(nodes)}
    # An old symbol in the user's list names the dataset's gene under its current symbol.
    for old, new in gene_resources.aliases().items():
        if new in where and old not in where:
            where[old] = where[new]
    src = np.array([where.get(g, -1) for g in src_names], dtype=np.int64)
    dst = np.array([where.get(g, -1) for g in dst_names], dtype=np.int64)
    unknown = np.flatnonzero((src < 0) | (dst < 0))
    if unknown.size:
        rows = [f"line {lines[i]} ({src_names[i]} -> {dst_names[i]})" for i in unknown[:20]]
        raise ValueError(
            f"{cfg.path}: {unknown.size} edge(s) name genes that are not perturbable genes of "
            f"this dataset: {'; '.join(rows)}; remove them or set graphs.go.universe: all"
        )
    key = src * len(nodes) + dst
    uniq, counts = np.unique(key, return_counts=True)
    if (counts > 1).any():
        dup = [int(lines[i]) for i in np.flatnonzero(np.isin(key, uniq[counts > 1]))[:20]]
        raise ValueError(
            f"{cfg.path}: repeated edges (same source and target) on lines {dup}; keep one per pair"
        )
    s, d, ww = top_k_edges(src, dst, w.astype(np.float32), len(nodes), cfg.k, cfg.threshold)
    edge_index, weight = sort_edges(s, d, ww)
    touched = np.zeros(len(nodes), dtype=bool)
    touched[src] = touched[dst] = True
    return GeneGraph(nodes, edge_index, weight), {g for g, t in zip(nodes, touched) if t}


def _borrow_coexpression(
    graph: GeneGraph, missing: Sequence[str], fallback: GeneGraph | None, k: int
) -> GeneGraph:
    """Give unannotated genes their co-expression in-edges among the GO nodes (weight |r|)."""
    if fallback is None:
        raise ValueError(
            "graphs.no_go is 'coexpression' but no co-expression graph was given; build it first "
            "(ensure_graphs does) or set graphs.no_go: self_loop"
        )
    where = graph.node_index()
    fb_src, fb_dst = fallback.edge_index
    to_go = np.array([where.get(g, -1) for g in fallback.nodes], dtype=np.int64)
    want = np.zeros(len(fallback.nodes), dtype=bool)
    fb_where = fallback.node_index()
    borrowed = [g for g in missing if g in fb_where]
    want[[fb_where[g] for g in borrowed]] = True
    sel = want[fb_dst] & (fb_src != fb_dst) & (to_go[fb_src] >= 0)
    src = to_go[fb_src[sel]]
    dst = to_go[fb_dst[sel]]
    w = fallback.edge_weight[sel]
    log.info(
        "GO graph: %d unannotated perturbed gene(s) borrow %d co-expression edge(s): %s; not measured, so "
        "self loop only: %s",
        len(borrowed),
        int(sel.sum()),
        ", ".join(borrowed[:50]),
        ", ".join(sorted(set(missing) - set(borrowed))[:50]) or "none",
    )
    all_src = np.concatenate([graph.edge_index[0], src])
    all_dst = np.concatenate([graph.edge_index[1], dst])
    all_w = np.concatenate([graph.edge_weight, w])
    s, d, ww = top_k_edges(all_src, all_dst, all_w, graph.num_nodes, k, -np.inf)
    edge_index, weight = sort_edges(s, d, ww)
    return GeneGraph(graph.nodes, edge_index, weight, dict(graph.info, borrowed_coexpression=borrowed))
