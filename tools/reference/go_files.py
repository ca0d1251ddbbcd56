"""The GO files the reference (cell-gears 0.1.2) downloads at start, written locally from OUR GO table.

The reference fetches three files from Harvard Dataverse (no internet here):

- ``<data_dir>/gene2go_all.pkl``: pickled dict gene symbol -> set of GO ids ('GO:0005576'); read by
  ``PertData.__init__`` (its keys decide which genes can be perturbation-graph nodes).
- ``<data_dir>/essential_all_data_pert_genes.pkl``: pickled list of gene symbols, the candidate
  perturbation-graph nodes (``PertData.set_pert_genes`` with the default ``default_pert_graph=True``);
  nodes = this list ∩ the keys of gene2go_all.
- ``<data_dir>/go_essential_all/go_essential_all.csv``: the GO similarity edge list over those nodes,
  columns ``source,target,importance`` (Jaccard index of the two genes' GO-term sets, every pair with
  Jaccard > 0.1, self pairs included); ``GEARS.model_initialize`` keeps the k+1 largest per target.
  Its download wrapper skips the download when the folder ``go_essential_all`` exists.

We build all three from ``gears_dist.data.genes.go_annotations()`` so that both implementations use the
same annotations and the same node set as our GO graph with ``graphs.go.universe: dataset`` (every
perturbed and every measured gene). Jaccard is computed by blocked sparse products (no pairwise loop).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

GENE2GO = "gene2go_all.pkl"
ESSENTIAL = "essential_all_data_pert_genes.pkl"
GO_DIR = "go_essential_all"
GO_CSV = "go_essential_all.csv"
JACCARD_THRESHOLD = 0.1
_BLOCK_ROWS = 1024


def _go_id(term: int) -> str:
    return f"GO:{term:07d}"


def jaccard_edges(symbols: Sequence[str], go: dict[str, frozenset[int]],
                  threshold: float = JACCARD_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, jaccard) index arrays into `symbols` for every ordered pair with Jaccard > threshold
    (self pairs included), sorted by target then source."""
    terms = sorted({t for s in symbols for t in go[s]})
    col = {t: i for i, t in enumerate(terms)}
    rows = np.repeat(np.arange(len(symbols)), [len(go[s]) for s in symbols])
    cols = np.fromiter((col[t] for s in symbols for t in sorted(go[s])), dtype=np.int64, count=len(rows))
    a = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(symbols), len(terms)))
    size = np.asarray(a.sum(axis=1), dtype=np.float64).ravel()
    at = a.T.tocsc()
    src, dst, val = [], [], []
    for start in range(0, len(symbols), _BLOCK_ROWS):
        block = (a[start:start + _BLOCK_ROWS] @ at).tocoo()  # targets in rows, |T_i ∩ T_j|
        t = block.row + start
        inter = block.data.astype(np.float64)
        j = inter / (size[t] + size[block.col] - inter)
        keep = j > threshold
        src.append(block.col[keep])
        dst.append(t[keep])
        val.append(j[keep])
    src, dst, val = np.concatenate(src), np.concatenate(dst), np.concatenate(val)
    order = np.lexsort((src, dst))
    return src[order], dst[order], val[order]


def write_reference_go_files(data_dir: Path, gene_symbols: list[str]) -> None:
    """Write the reference's three GO files into `data_dir` (its PertData data_path).

    `gene_symbols`: the candidate perturbation-graph nodes (ours: every perturbed and measured gene). Genes
    without GO annotation are kept in the essential list (the reference drops them itself, as it would).
    Files are written to temporary names and renamed, so an interrupted call leaves nothing half-written.
    """
    import pandas as pd

    from gears_dist.data.genes import go_annotations

    if not gene_symbols or not all(isinstance(g, str) for g in gene_symbols):
        raise ValueError(f"gene_symbols: expected a non-empty list of gene symbols (str), received {gene_symbols!r:.80}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    go = go_annotations()
    gene2go = {sym: {_go_id(t) for t in terms} for sym, terms in go.items()}
    essential = list(dict.fromkeys(gene_symbols))
    nodes = sorted(g for g in essential if g in go)
    if not nodes:
        raise ValueError("gene_symbols: none of the genes has a GO annotation in gears_dist's table; "
                         "expected current human symbols (e.g. 'CBARP', not 'C19orf26')")
    src, dst, val = jaccard_edges(nodes, go)
    names = np.asarray(nodes, dtype=object)
    edges = pd.DataFrame({"source": names[src], "target": names[dst], "importance": val.astype(np.float64)})

    _atomic_pickle(data_dir / GENE2GO, gene2go)
    _atomic_pickle(data_dir / ESSENTIAL, essential)
    go_dir = data_dir / GO_DIR
    tmp_dir = data_dir / f".{GO_DIR}.writing-{os.getpid()}"
    tmp_dir.mkdir(exist_ok=True)
    edges.to_csv(tmp_dir / GO_CSV, index=False)
    if go_dir.exists():
        (go_dir / GO_CSV).unlink(missing_ok=True)
        go_dir.rmdir()
    os.replace(tmp_dir, go_dir)


def _atomic_pickle(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.writing-{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    os.replace(tmp, path)


def h5ad_gene_symbols(h5ad: str | os.PathLike, condition_key: str = "condition", gene_key: str = "gene_name") -> list[str]:
    """The candidate GO nodes of a GEARS-style h5ad: its measured genes (var[gene_key], else var_names) and
    every gene named in obs[condition_key] ('A+ctrl', 'A+B'), without reading X."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(h5ad, "r") as f:
        obs, var = read_elem(f["obs"]), read_elem(f["var"])
    if condition_key not in obs:
        raise ValueError(f"{h5ad}: obs has no column {condition_key!r} (has {list(obs.columns)}); expected GEARS "
                         f"style conditions 'ctrl' / 'A+ctrl' / 'A+B'")
    measured = list(var[gene_key]) if gene_key in var else list(var.index)
    perturbed = sorted({g for c in obs[condition_key].astype(str).unique() for g in c.split("+") if g != "ctrl"})
    return list(dict.fromkeys([*map(str, measured), *perturbed]))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="write the reference's GO files (gene2go_all.pkl, "
                                            "essential_all_data_pert_genes.pkl, go_essential_all/) from our GO table")
    p.add_argument("data_dir", help="the reference's PertData data_path")
    p.add_argument("--h5ad", required=True, help="GEARS-style h5ad whose measured + perturbed genes are the nodes")
    args = p.parse_args(argv)
    genes = h5ad_gene_symbols(args.h5ad)
    write_reference_go_files(Path(args.data_dir), genes)
    print(f"{args.data_dir}: GO files for {len(genes)} genes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
