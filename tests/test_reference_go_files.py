"""tools/reference/go_files.py writes GO files that the reference (cell-gears 0.1.2, installed in .venv as a
test oracle) loads through its own code, with the Jaccard values computed independently here from sets."""

from __future__ import annotations

import itertools
import pickle
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

gears = pytest.importorskip("gears", reason="the reference cell-gears is installed in .venv by `make install`")

from gears_dist.data.genes import go_annotations  # noqa: E402
from tools.reference.go_files import write_reference_go_files  # noqa: E402
from tools.reference.run_reference import patch_downloads  # noqa: E402


def _genes(n: int = 40) -> list[str]:
    go = go_annotations()
    # genes with a mid-sized annotation set, so that some pairs pass Jaccard > 0.1 and others do not
    return [g for g in sorted(go) if 3 <= len(go[g]) <= 12][:n]


def test_reference_loads_our_go_files(tmp_path):
    from gears.pertdata import PertData
    from gears.utils import GeneSimNetwork, get_similarity_network

    patch_downloads()
    genes = _genes()
    write_reference_go_files(tmp_path, genes + ["NOT_A_GENE_X1"])

    pert = PertData(str(tmp_path))
    pert.set_pert_genes()
    assert list(pert.pert_names) == sorted(genes)  # the unannotated name is dropped by the reference itself
    assert pert.gene2go["TP53"] == {f"GO:{t:07d}" for t in go_annotations()["TP53"]}

    k = 20
    edges = get_similarity_network("go", adata=None, threshold=0.4, k=k, data_path=str(tmp_path), data_name="x",
                                   split="simulation", seed=1, train_gene_set_size=0.75, set2conditions=None,
                                   default_pert_graph=True)
    net = GeneSimNetwork(edges, list(pert.pert_names), node_map=pert.node_map_pert)
    assert net.edge_index.shape[0] == 2 and net.edge_index.shape[1] == len(edges) > len(genes)

    go = go_annotations()
    expected = {}
    for a, b in itertools.product(genes, genes):
        j = len(go[a] & go[b]) / len(go[a] | go[b])
        if j > 0.1:
            expected[(a, b)] = j
    full = {(s, t): w for s, t, w in edges[["source", "target", "importance"]].itertuples(index=False)}
    for (s, t), w in full.items():
        assert w == pytest.approx(expected[(s, t)], abs=1e-12)
    for g in genes:  # self pairs (Jaccard 1) are always among a target's k+1 largest
        assert full[(g, g)] == 1.0
    per_target = edges.groupby("target").size()
    assert per_target.max() <= k + 1
    for t, n in per_target.items():  # the reference kept min(k+1, all) neighbours of each target
        assert n == min(k + 1, sum(1 for (s2, t2) in expected if t2 == t))


def test_essential_list_and_bad_input(tmp_path):
    genes = _genes(5)
    write_reference_go_files(tmp_path, genes + genes[:2])
    with open(tmp_path / "essential_all_data_pert_genes.pkl", "rb") as f:
        assert pickle.load(f) == genes  # duplicates removed, order kept
    with pytest.raises(ValueError, match="non-empty list"):
        write_reference_go_files(tmp_path / "a", [])
    with pytest.raises(ValueError, match="GO annotation"):
        write_reference_go_files(tmp_path / "b", ["NOT_A_GENE_X1"])
    assert not (tmp_path / "b" / "gene2go_all.pkl").exists()


def test_patched_download_never_reaches_the_network(tmp_path):
    import gears.pertdata

    patch_downloads()
    with pytest.raises(FileNotFoundError, match="go_files.py"):
        gears.pertdata.PertData(str(tmp_path / "empty"))
