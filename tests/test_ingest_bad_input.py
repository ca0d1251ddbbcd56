"""Every bad input of the ingest gets a clear error naming the problem and the fix, and leaves nothing behind."""

from __future__ import annotations

import json
import pathlib
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_ingest import condition_labels, make_adata, quiet_ingest, symbols, write_h5ad

from gears_dist.data import genes as gene_vocab
from gears_dist.data import ingest as ingest_mod
from gears_dist.data.ingest import ingest
from gears_dist.data.store import SCHEMA_VERSION, StoreError, open_store


# -- builders: each writes one broken input file into `tmp` and returns its path ----------------------
def missing_condition_column(tmp):
    a = make_adata()
    a.obs = a.obs.rename(columns={"condition": "label"})
    return write_h5ad(a, tmp / "in.h5ad")


def no_control_cells(tmp):
    a = make_adata()
    a = a[a.obs["condition"] != "ctrl"].copy()
    return write_h5ad(a, tmp / "in.h5ad")


def nan_in_x(tmp):
    a = make_adata(fmt="dense", kind="log1p")
    a.X[-3, 4] = np.nan  # late in the file: found by the scan before anything is written
    return write_h5ad(a, tmp / "in.h5ad")


def inf_in_x(tmp):
    a = make_adata(fmt="csr", kind="log1p")
    a.X.data[-1] = np.inf
    return write_h5ad(a, tmp / "in.h5ad")


def negative_in_x(tmp):
    a = make_adata(fmt="csc", kind="log1p")
    a.X.data[5] = -0.5
    return write_h5ad(a, tmp / "in.h5ad")


def duplicate_gene_names(tmp):
    a = make_adata(style="scperturb")
    names = list(a.var_names)
    names[7] = names[2]
    a.var_names = names
    return write_h5ad(a, tmp / "in.h5ad")


def duplicate_cell_names(tmp):
    a = make_adata()
    names = list(a.obs_names)
    names[300] = names[10]
    a.obs_names = names
    return write_h5ad(a, tmp / "in.h5ad")


def perturbed_genes_unknown(tmp):
    a = make_adata(style="scperturb")
    fake = {c: ("control" if c == "control" else f"guide{i}_x") for i, c in enumerate(a.obs["condition"].cat.categories)}
    a.obs["condition"] = a.obs["condition"].cat.rename_categories(fake)
    return write_h5ad(a, tmp / "in.h5ad")


def non_numeric_x(tmp):
    path = write_h5ad(make_adata(fmt="dense"), tmp / "in.h5ad")
    with h5py.File(path, "r+") as f:
        shape = f["X"].shape
        del f["X"]
        f.create_dataset("X", data=np.full(shape, "1.0", dtype=object), dtype=h5py.string_dtype())
    return path


def truncated_h5ad(tmp):
    path = write_h5ad(make_adata(), tmp / "in.h5ad")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def not_hdf5(tmp):
    path = tmp / "in.h5ad"
    path.write_text("cell,gene,count\nc1,A,3\n")
    return path


def empty_file(tmp):
    path = tmp / "in.h5ad"
    path.write_bytes(b"")
    return path


def unparseable_condition(tmp):
    a = make_adata()
    cats = list(a.obs["condition"].cat.categories)
    a.obs["condition"] = a.obs["condition"].cat.rename_categories({cats[1]: cats[1] + "+"})
    return write_h5ad(a, tmp / "in.h5ad")


def missing_condition_values(tmp):
    a = make_adata()
    cond = a.obs["condition"].astype(object)
    cond.iloc[17] = np.nan
    a.obs["condition"] = pd.Categorical(cond)
    return write_h5ad(a, tmp / "in.h5ad")


CASES = {
    "missing condition column": (missing_condition_column, ValueError, r"no condition column.*--condition-key"),
    "no control cells": (no_control_cells, ValueError, r"no control cells.*--control-value"),
    "NaN in X": (nan_in_x, ValueError, r"NaN or infinite"),
    "inf in X": (inf_in_x, ValueError, r"NaN or infinite"),
    "negative values in X": (negative_in_x, ValueError, r"negative values.*unscaled"),
    "duplicate gene names": (duplicate_gene_names, ValueError, r"duplicate gene names.*var_names_make_unique"),
    "duplicate cell names": (duplicate_cell_names, ValueError, r"duplicate cell names.*obs_names_make_unique"),
    "no perturbed gene measured or known": (perturbed_genes_unknown, ValueError,
                                            r"none of the \d+ perturbed genes.*gene symbols"),
    "non-numeric X": (non_numeric_x, TypeError, r"non-numeric.*convert X to numbers"),
    "truncated h5ad": (truncated_h5ad, ValueError, r"truncated"),
    "not HDF5": (not_hdf5, ValueError, r"not an HDF5 file"),
    "empty file": (empty_file, ValueError, r"empty file"),
    "unparseable condition name": (unparseable_condition, ValueError, r"empty gene name.*--separator"),
    "cells without a condition": (missing_condition_values, ValueError, r"1 cells have no value"),
}


def leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "in.h5ad")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_cleanly(tmp_path, case):
    build, error, message = CASES[case]
    src = build(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(error, match=message):
            ingest(src, tmp_path / "out.zarr")
    assert leftovers(tmp_path) == []  # no store, no temporary build or spill directory


def test_some_unmeasured_perturbed_genes_warn_with_the_list(tmp_path):
    unmeasured = gene_vocab.human_symbols()[5000]  # make_adata perturbs it; it is GO-annotated, not measured
    with pytest.warns(UserWarning, match=rf"1 of 4 perturbed genes are not among the measured genes.*{unmeasured}"):
        store = ingest(write_h5ad(make_adata(), tmp_path / "in.h5ad"), tmp_path / "out.zarr")
    assert store.manifest["unmeasured_perturbed_genes"] == [unmeasured]
    assert unmeasured in store.condition_names  # kept: GEARS predicts it through the GO graph
    assert store.manifest["dropped_perturbations"] == []


def test_existing_destination_needs_overwrite(tmp_path):
    src = write_h5ad(make_adata(), tmp_path / "in.h5ad")
    first = quiet_ingest(src, tmp_path / "out.zarr")
    with pytest.raises(StoreError, match=r"already exists.*--overwrite"):
        quiet_ingest(src, tmp_path / "out.zarr")
    assert open_store(tmp_path / "out.zarr").manifest == first.manifest  # untouched
    again = quiet_ingest(src, tmp_path / "out.zarr", overwrite=True, normalize="log1p")
    assert again.manifest["normalization"]["choice"] == "log1p_as_is"
    assert leftovers(tmp_path) == ["out.zarr"]


def test_store_from_a_newer_schema_is_refused(tmp_path):
    quiet_ingest(write_h5ad(make_adata(), tmp_path / "in.h5ad"), tmp_path / "out.zarr")
    path = tmp_path / "out.zarr" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"newer.*upgrade gears_dist"):
        open_store(tmp_path / "out.zarr")


@pytest.mark.parametrize("scattered", [True, False])
def test_failure_mid_write_leaves_no_store_and_no_temp_files(tmp_path, monkeypatch, scattered):
    """A failure after X was written (here: in the statistics step) must leave nothing behind."""
    a = make_adata(fmt="csr")
    if not scattered:  # already in store order: the direct-write path, no spill
        labels = condition_labels("gears", symbols())
        key = [(len(labels[c]) > 0, "+".join(labels[c])) for c in a.obs["condition"]]
        a = a[sorted(range(a.n_obs), key=lambda i: (key[i], i))].copy()
    src = write_h5ad(a, tmp_path / "in.h5ad")

    def broken_stats(root, **kwargs):
        assert root["X"].nchunks_initialized > 0  # the failure really happens mid-build
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(ingest_mod, "write_stats", broken_stats)
    with pytest.raises(RuntimeError, match="simulated"):
        quiet_ingest(src, tmp_path / "out.zarr", chunk_cells=16, _max_block_rows=50)
    assert leftovers(tmp_path) == []
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "out.zarr")


def test_failure_while_routing_cleans_spill(tmp_path, monkeypatch):
    src = write_h5ad(make_adata(fmt="csc"), tmp_path / "in.h5ad")
    calls = {"n": 0}
    original = ingest_mod.SpillBuckets.add_coo

    def add_then_fail(self, *args):
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C during routing

    monkeypatch.setattr(ingest_mod.SpillBuckets, "add_coo", add_then_fail)
    with pytest.raises(KeyboardInterrupt):
        quiet_ingest(src, tmp_path / "out.zarr", _max_block_nnz=200)
    assert calls["n"] == 2
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"normalize": "zscore"}, r"normalize='zscore': expected one of"),
    ({"hvg": 0}, r"hvg=0: expected a positive number"),
    ({"chunk_cells": -4}, r"chunk_cells=-4"),
    ({"memory_budget_mb": 4}, r"memory_budget_mb=4: expected an integer >= 32"),
    ({"condition_key": "drug"}, r"condition column 'drug' not found.*--condition-key"),
    ({"gene_key": "ensembl"}, r"gene column 'ensembl' not found.*--gene-key"),
    ({"cell_type_key": "tissue"}, r"cell type column 'tissue' not found"),
])
def test_bad_options(tmp_path, kwargs, message):
    src = write_h5ad(make_adata(), tmp_path / "in.h5ad")
    with pytest.raises(ValueError, match=message):
        quiet_ingest(src, tmp_path / "out.zarr", **kwargs)
    assert leftovers(tmp_path) == []


def test_missing_input_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest(tmp_path / "nope.h5ad", tmp_path / "out.zarr")


def test_counts_forced_on_log_data_warns(tmp_path):
    src = write_h5ad(make_adata(kind="log1p"), tmp_path / "in.h5ad")
    with pytest.warns(UserWarning, match="non-integer values"):
        ingest(src, tmp_path / "out.zarr", normalize="counts")


def test_normalized_but_not_logged_warns(tmp_path):
    a = make_adata(kind="counts")
    x = a.X.toarray()
    a.X = sp.csr_matrix(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    with pytest.warns(UserWarning, match="normalized but not log-transformed"):
        store = ingest(write_h5ad(a, tmp_path / "in.h5ad"), tmp_path / "out.zarr")
    assert store.manifest["normalization"]["choice"] == "log1p_as_is"
