"""Ingest: h5ad (GEARS / scPerturb style; CSR / CSC / dense; counts / log1p) -> store, checked against
the source file cell by cell, plus the real Norman subset against scanpy's DE ranking."""

from __future__ import annotations

import pathlib
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from gears_dist.cli import main as cli_main
from gears_dist.data import genes as gene_vocab
from gears_dist.data.ingest import (
    default_chunk_cells,
    ingest,
    register_condition_order,
    seurat_dispersion_norm,
)
from gears_dist.data.store import open_store

NUM_GENES = 40


def symbols(n: int = NUM_GENES) -> list[str]:
    """Real, GO-annotated human symbols (deterministic)."""
    return gene_vocab.human_symbols()[100:100 + n]


def condition_labels(style: str, genes: list[str]) -> dict[str, tuple[str, ...]]:
    """Source label -> expected canonical gene tuple; perturbs 3 measured genes and 1 unmeasured one."""
    a, b, c = genes[0], genes[5], genes[9]
    u = gene_vocab.human_symbols()[5000]  # GO-annotated, not measured
    if style == "gears":
        return {"ctrl": (), f"{a}+ctrl": (a,), f"ctrl+{b}": (b,), f"{c}+ctrl": (c,), f"{u}+ctrl": (u,),
                f"{b}+{a}": tuple(sorted((a, b))), f"{a}+{c}": tuple(sorted((a, c)))}
    return {"control": (), a: (a,), b: (b,), c: (c,), u: (u,), f"{b}_{a}": tuple(sorted((a, b))),
            f"{a}_{c}": tuple(sorted((a, c)))}


def make_adata(style: str = "gears", fmt: str = "csr", kind: str = "counts", num_cells: int = 420,
               seed: int = 0, cell_types: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = symbols()
    labels = condition_labels(style, genes)
    cond = rng.choice(list(labels), size=num_cells)  # scattered: conditions interleaved
    cond[: len(labels)] = list(labels)  # every condition present
    rate = rng.gamma(0.6, 2.0, size=NUM_GENES)
    effect = {lab: np.exp(rng.normal(0, 0.7, NUM_GENES)) if labels[lab] else np.ones(NUM_GENES) for lab in labels}
    lam = rate[None, :] * np.stack([effect[c] for c in cond])
    counts = rng.poisson(lam * rng.uniform(0.5, 2.0, size=(num_cells, 1))).astype(np.float32)
    if kind == "counts":
        x = counts
    else:
        lib = np.maximum(counts.sum(1, keepdims=True), 1)
        x = np.log1p(counts / lib * 1e4).astype(np.float32)
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[fmt](x)
    obs = pd.DataFrame({"condition": pd.Categorical(cond)}, index=[f"cell{i:05d}" for i in range(num_cells)])
    if cell_types:
        obs["cell_line"] = pd.Categorical(rng.choice(["K562", "RPE1"], size=num_cells))
    var = pd.DataFrame(index=genes) if style != "gears" else \
        pd.DataFrame({"gene_name": genes}, index=[f"ENSG{i:011d}" for i in range(NUM_GENES)])
    return ad.AnnData(X=matrix, obs=obs, var=var)


def write_h5ad(adata: ad.AnnData, path: pathlib.Path) -> pathlib.Path:
    adata.write_h5ad(path)
    return path


def expected_log(adata: ad.AnnData, kind: str) -> np.ndarray:
    """The normalization written out independently of the ingest code."""
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    x = x.astype(np.float64)
    if kind == "counts":
        lib = x.sum(1, keepdims=True)
        x = np.log1p(x / np.where(lib > 0, lib, 1) * 1e4)
    return x


def quiet_ingest(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ingest(*args, **kwargs)


@pytest.mark.parametrize("style", ["gears", "scperturb"])
@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
@pytest.mark.parametrize("kind", ["counts", "log1p"])
def test_roundtrip_cell_by_cell(tmp_path, style, fmt, kind):
    adata = make_adata(style, fmt, kind, seed=hash((style, fmt, kind)) % 1000)
    src = write_h5ad(adata, tmp_path / "in.h5ad")
    store = quiet_ingest(src, tmp_path / "s.zarr", chunk_cells=16, _max_block_rows=50, _max_block_nnz=300)
    m = store.manifest
    assert m["normalization"]["choice"] == ("counts_normalize_log1p" if kind == "counts" else "log1p_as_is")
    assert m["counts"]["num_cells"] == adata.n_obs and m["counts"]["num_genes"] == NUM_GENES
    assert store.genes == symbols()
    assert store.X.chunks == (16, NUM_GENES)

    rows = store.array("obs/source_row")
    assert sorted(rows) == list(range(adata.n_obs))
    np.testing.assert_allclose(store.X[...], expected_log(adata, kind)[rows], rtol=2e-6, atol=2e-6)
    assert store.array("obs/cell_id").tolist() == list(adata.obs_names[rows])

    # grouping: contiguous conditions, control first, then sorted names; source order within a condition
    labels = condition_labels(style, symbols())
    want = pd.Series([labels[c] for c in adata.obs["condition"]]).map(lambda g: "+".join(g) or "ctrl")
    table = store.conditions()
    assert table["name"].tolist() == ["ctrl"] + sorted(n for n in set(want) if n != "ctrl")
    assert table["num_cells"].tolist() == [int((want == n).sum()) for n in table["name"]]
    assert (table["start"].to_numpy()[1:] == table["stop"].to_numpy()[:-1]).all()
    cond = store.array("obs/condition")
    assert (np.array(table["name"])[cond] == want.to_numpy()[rows]).all()
    for start, stop in zip(table["start"], table["stop"]):
        assert (np.diff(rows[start:stop]) > 0).all()
    assert (store.array("obs/is_control") == (cond == 0)).all()
    assert m["counts"]["num_control_cells"] == int((want == "ctrl").sum())
    assert m["counts"]["num_conditions"] == len(table)
    perturbed = set(store.array("genes/symbol")[store.array("genes/is_perturbed")].tolist())
    assert perturbed == {g for gs in labels.values() for g in gs} & set(symbols())


def test_source_already_grouped_skips_the_spill(tmp_path):
    adata = make_adata("gears", "csr", "counts")
    labels = condition_labels("gears", symbols())
    key = [(len(labels[c]) > 0, "+".join(labels[c])) for c in adata.obs["condition"]]
    adata = adata[sorted(range(adata.n_obs), key=lambda i: (key[i], i))].copy()
    store = quiet_ingest(write_h5ad(adata, tmp_path / "in.h5ad"), tmp_path / "s.zarr", chunk_cells=16,
                         _max_block_rows=50)
    assert store.manifest["ingest"]["source_in_destination_order"] is True
    assert store.manifest["ingest"]["spill_bytes"] == 0
    assert (store.array("obs/source_row") == np.arange(adata.n_obs)).all()
    np.testing.assert_allclose(store.X[...], expected_log(adata, "counts"), rtol=2e-6, atol=2e-6)


def test_cell_type_and_batch_columns(tmp_path):
    adata = make_adata("scperturb", "csr", "log1p", cell_types=True)
    adata.obs["gem"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 3 == 0, "g1", "g2"))
    store = quiet_ingest(write_h5ad(adata, tmp_path / "in.h5ad"), tmp_path / "s.zarr", cell_type_key="cell_line",
                         batch_key="gem")
    rows = store.array("obs/source_row")
    types = np.array(store.root.attrs["cell_types"])[store.array("obs/cell_type")]
    assert (types == adata.obs["cell_line"].to_numpy()[rows]).all()
    batches = np.array(store.root.attrs["batches"])[store.array("obs/batch")]
    assert (batches == adata.obs["gem"].to_numpy()[rows]).all()
    table = store.conditions()
    ct = store.array("conditions/cell_type")
    for c, (start, stop) in enumerate(zip(table["start"], table["stop"])):
        values, counts = np.unique(store.array("obs/cell_type")[start:stop], return_counts=True)
        assert ct[c] == values[np.argmax(counts)]


def test_cells_without_cell_type_get_unknown(tmp_path):
    adata = make_adata("gears", "csr", "counts", cell_types=True)
    line = adata.obs["cell_line"].astype(object)
    line.iloc[[3, 50, 51]] = np.nan
    adata.obs["cell_line"] = pd.Categorical(line)
    store = quiet_ingest(write_h5ad(adata, tmp_path / "in.h5ad"), tmp_path / "s.zarr", cell_type_key="cell_line")
    assert store.root.attrs["cell_types"] == ["K562", "RPE1", "unknown"]
    rows = store.array("obs/source_row")
    types = np.array(store.root.attrs["cell_types"])[store.array("obs/cell_type")]
    assert (types == adata.obs["cell_line"].astype(object).fillna("unknown").to_numpy()[rows]).all()
    assert store.root.attrs["batches"] == ["none"]


def test_user_named_column_and_control_values(tmp_path):
    adata = make_adata("scperturb", "csr", "counts")
    adata.obs = adata.obs.rename(columns={"condition": "guide_target"})
    adata.obs["guide_target"] = adata.obs["guide_target"].cat.rename_categories({"control": "NTC"})
    store = quiet_ingest(write_h5ad(adata, tmp_path / "in.h5ad"), tmp_path / "s.zarr",
                         condition_key="guide_target", control_values=["NTC"], separators=["_"])
    assert store.conditions()["name"][0] == "ctrl"
    assert store.manifest["counts"]["num_control_cells"] == int((adata.obs["guide_target"] == "NTC").sum())
    assert store.manifest["parameters"]["control_values"] == ["NTC"]
    assert store.manifest["parameters"]["separators"] == ["_"]


def test_scperturb_underscore_separator_is_detected(tmp_path):
    store = quiet_ingest(write_h5ad(make_adata("scperturb"), tmp_path / "in.h5ad"), tmp_path / "s.zarr")
    assert store.manifest["parameters"]["separators"] == ["+", "_"]
    assert any(len(g) == 2 for g in store.condition_genes())


def test_alias_symbols_resolved_and_recorded(tmp_path):
    table = gene_vocab.aliases()
    measured = set(symbols())
    old, new = next((a, s) for a, s in sorted(table.items())
                    if s not in measured and a not in gene_vocab.go_annotations() and s != symbols()[0])
    adata = make_adata("scperturb", "csr", "counts")
    names = symbols()
    names[3] = old
    adata.var_names = names
    cats = {c: c.replace(symbols()[0], old) for c in adata.obs["condition"].cat.categories}
    adata.obs["condition"] = adata.obs["condition"].cat.rename_categories(cats)
    store = quiet_ingest(write_h5ad(adata, tmp_path / "in.h5ad"), tmp_path / "s.zarr")
    assert store.genes[3] == new and store.array("genes/source_name")[3] == old
    assert store.manifest["renamed_genes"] == {old: new}
    assert store.manifest["renamed_perturbation_genes"] == {old: new}
    assert new in {g for gs in store.condition_genes() for g in gs}


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_hvg_matches_scanpy_seurat_and_keeps_perturbed_genes(tmp_path, fmt):
    import scanpy as sc

    adata = make_adata("gears", fmt, "log1p", num_cells=600, seed=3)
    src = write_h5ad(adata, tmp_path / "in.h5ad")
    ref = adata.copy()
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=10)
    x = np.expm1(expected_log(adata, "log1p"))
    ours = seurat_dispersion_norm(x.sum(0), (x * x).sum(0), adata.n_obs)
    np.testing.assert_allclose(ours, ref.var["dispersions_norm"].to_numpy(dtype=float), rtol=1e-4, atol=1e-5)

    store = quiet_ingest(src, tmp_path / "s.zarr", hvg=10)
    # scanpy keeps every gene tied at the cut-off; the ingest keeps exactly N, ties broken by gene index
    disp = np.nan_to_num(ref.var["dispersions_norm"].to_numpy(dtype=float), nan=-np.inf)
    hvg = set(np.array(symbols())[np.lexsort((np.arange(NUM_GENES), -disp))[:10]])
    assert hvg <= set(ref.var["gene_name"][ref.var["highly_variable"]])
    perturbed = {g for gs in condition_labels("gears", symbols()).values() for g in gs} & set(symbols())
    assert set(store.genes) == hvg | perturbed
    assert store.genes == [g for g in symbols() if g in hvg | perturbed]  # source order kept
    assert set(np.array(store.genes)[store.array("genes/highly_variable")]) == hvg
    rows = store.array("obs/source_row")
    cols = store.array("genes/source_index")
    np.testing.assert_allclose(store.X[...], expected_log(adata, "log1p")[rows][:, cols], rtol=2e-6, atol=2e-6)


def test_pluggable_condition_order(tmp_path):
    register_condition_order("reverse_test", lambda genes, n: np.arange(len(genes))[::-1])
    store = quiet_ingest(write_h5ad(make_adata(), tmp_path / "in.h5ad"), tmp_path / "s.zarr", order="reverse_test")
    names = store.conditions()["name"].tolist()
    assert names[-1] == "ctrl" and names[:-1] == sorted(names[:-1], reverse=True)
    assert store.manifest["parameters"]["order"] == "reverse_test"
    cs = store.array("stats/control_mean")
    start, stop = store.array("conditions/start")[-1], store.array("conditions/stop")[-1]
    np.testing.assert_allclose(cs, store.X[start:stop].mean(0), rtol=1e-5, atol=1e-6)


def test_unknown_order_lists_registered(tmp_path):
    with pytest.raises(ValueError, match=r"unknown condition order 'nope'.*'condition'"):
        ingest(write_h5ad(make_adata(), tmp_path / "in.h5ad"), tmp_path / "s.zarr", order="nope")


def test_default_chunk_cells_is_a_power_of_two():
    for g in (10, 500, 5000, 20000):
        c = default_chunk_cells(g)
        assert c & (c - 1) == 0 and 16 <= c <= 16384


def test_cli_ingest_prints_summary(tmp_path, capsys):
    src = write_h5ad(make_adata(), tmp_path / "in.h5ad")
    assert cli_main(["ingest", str(src), str(tmp_path / "s.zarr")]) == 0
    captured = capsys.readouterr()
    assert "420 cells" in captured.out and "40 genes" in captured.out and "counts_normalize_log1p" in captured.out
    assert "gears-dist ingest: warning: 1 of 4 perturbed genes are not among the measured genes" in captured.err
    assert cli_main(["ingest", str(src), str(tmp_path / "s.zarr")]) == 2
    assert "already exists" in capsys.readouterr().err


def _scanpy_scores(adata, group: str) -> pd.Series:
    names = adata.uns["rank_genes_groups"]["names"][group]
    scores = adata.uns["rank_genes_groups"]["scores"][group]
    return pd.Series(np.asarray(scores, dtype=float), index=np.asarray(names))


def test_norman_subset_de_agrees_with_scanpy(tmp_path, norman_path):
    import scanpy as sc

    with pytest.warns(UserWarning, match="not among the measured genes"):
        store = ingest(norman_path, tmp_path / "norman.zarr")
    ref = ad.read_h5ad(norman_path)
    assert store.manifest["normalization"]["choice"] == "log1p_as_is"
    assert store.num_cells == ref.n_obs and store.num_genes == ref.n_vars
    rows = store.array("obs/source_row")
    np.testing.assert_allclose(store.X[...], ref.X[rows].toarray(), rtol=1e-6, atol=1e-6)

    sc.tl.rank_genes_groups(ref, "condition", reference="control", method="t-test", rankby_abs=True,
                            n_genes=ref.n_vars)
    genes = np.array(store.genes)
    top = store.array("stats/top_de")
    canon = {"+".join(sorted(c.split("+"))): c for c in ref.obs["condition"].unique() if c != "control"}
    exact = 0
    for c, name in enumerate(store.condition_names):
        if name == "ctrl":
            continue
        scores = _scanpy_scores(ref, canon[name])
        want = list(scores.index[:20])
        got = list(genes[top[c]])
        # agreement up to ties: the genes we rank k-th carry scanpy's k-th |score|
        np.testing.assert_allclose(np.abs(scores[got].to_numpy()), np.abs(scores[want].to_numpy()), rtol=1e-4)
        np.testing.assert_allclose(store.array("stats/de_score")[c][top[c]], scores[got].to_numpy(), rtol=1e-3)
        exact += got == want
    assert exact >= 30  # of 33 perturbations; in practice all


def test_norman_top_non_dropout_follows_gears_definition(tmp_path, norman_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        store = ingest(norman_path, tmp_path / "norman.zarr")
    ref = ad.read_h5ad(norman_path)
    x = ref.X.toarray()
    ctrl_zero = x[ref.obs["condition"] == "control"].mean(0) == 0
    genes = list(store.genes)
    top = store.array("stats/top_de")
    for c, (name, start, stop) in enumerate(zip(store.condition_names, store.array("conditions/start"),
                                                store.array("conditions/stop"))):
        if name == "ctrl":
            continue
        full = np.argsort(-np.abs(store.array("stats/de_score")[c]), kind="stable")
        mean = store.X[start:stop].mean(0)
        non_dropout = (mean != 0) | ((mean == 0) & ctrl_zero)
        want = [g for g in full if non_dropout[g]][:20]
        assert store.array("stats/top_de_non_dropout")[c].tolist() == want
        assert top[c].tolist() == full[:20].tolist()
        assert all(genes[g] for g in want)


@pytest.mark.slow
def test_cli_graph_order_from_the_graphs_package(tmp_path, capsys):
    """`--order graph` makes the CLI import gears_dist.graphs.order, which registers the locality order."""
    src = write_h5ad(make_adata(), tmp_path / "in.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli_main(["ingest", str(src), str(tmp_path / "s.zarr"), "--order", "graph"]) == 0
    store = open_store(tmp_path / "s.zarr")
    assert store.manifest["parameters"]["order"] == "graph"
    assert sorted(store.condition_names) == sorted(quiet_ingest(src, tmp_path / "c.zarr").condition_names)


def test_spill_records_round_trip_compressed(tmp_path):
    """Rows (some empty, indices unsorted in one) and COO triples come back exactly from the compressed spill,
    and sparse count-like rows take well under their raw 8 bytes per non-zero on disk."""
    from gears_dist.data.spill import RowsRecord, SpillBuckets

    rng = np.random.default_rng(3)
    n, g = 300, 2000
    row_nnz = rng.integers(0, 400, n).astype(np.int32)
    row_nnz[::7] = 0
    indices = np.concatenate([np.sort(rng.choice(g, k, replace=False)) for k in row_nnz]).astype(np.int32)
    indices[row_nnz[:3].sum():row_nnz[:4].sum()] = indices[row_nnz[:3].sum():row_nnz[:4].sum()][::-1]
    data = np.log1p(rng.poisson(2.0, len(indices)) + 1.0).astype(np.float32)
    dest = rng.permutation(n)
    ids = np.array([f"cell{i}" for i in range(n)], dtype=object)
    spill = SpillBuckets(tmp_path / "spill", np.array([0, 100, 200, n]))
    half = n // 2
    cut = int(row_nnz[:half].sum())
    for lo, hi, a, b in ((0, half, 0, cut), (half, n, cut, len(indices))):
        spill.add_rows(RowsRecord(dest[lo:hi], np.arange(lo, hi), np.zeros(hi - lo, np.int32),
                                  np.zeros(hi - lo, np.int32), ids[lo:hi], row_nnz[lo:hi], indices[a:b], data[a:b]))
    coo = (rng.integers(0, n, 500), rng.integers(0, g, 500).astype(np.int32), rng.random(500).astype(np.float32))
    spill.add_coo(*coo)
    assert spill.bytes_written < 0.6 * spill.raw_bytes

    starts = np.concatenate([[0], np.cumsum(row_nnz)])
    got_rows, got_coo = {}, []
    for k in range(spill.num_buckets):
        rows, trip = spill.read(k)
        for r in rows:
            ends = np.cumsum(r.row_nnz)
            for j, s in enumerate(r.source_row):
                got_rows[int(s)] = (int(r.dest[j]), r.cell_ids[j], r.indices[ends[j] - r.row_nnz[j]:ends[j]].copy(),
                                    r.data[ends[j] - r.row_nnz[j]:ends[j]].copy())
        got_coo += [tuple(np.asarray(t).copy() for t in x) for x in trip]
        assert not (tmp_path / "spill" / f"bucket-{k:06d}.bin").exists()
    assert sorted(got_rows) == list(range(n))
    for s, (d, cid, ix, v) in got_rows.items():
        assert d == dest[s] and cid == ids[s]
        np.testing.assert_array_equal(ix, indices[starts[s]:starts[s + 1]])
        np.testing.assert_array_equal(v, data[starts[s]:starts[s + 1]])
    back = [np.concatenate([c[i] for c in got_coo]) for i in range(3)]
    order = np.lexsort((back[1], back[0]))
    want = np.lexsort((coo[1], coo[0]))
    for i in range(3):
        np.testing.assert_array_equal(back[i][order], coo[i][want])
    spill.cleanup()
