"""Bad input through the command line: every case exits non-zero (2 = user error), says on stderr what is
wrong and how to fix it, and leaves nothing half-written (the destination is absent and the files around
it are exactly as before).

The table CASES below is the documentation: one row per malformed input, with the command it goes
through and the phrase the error must contain. The library-level variants of the h5ad problems (and a
few more) are in tests/test_ingest_bad_input.py; the config loader and condition parser are fuzzed in
tests/test_config_conditions.py. This file checks the whole path a user takes: ``gears-dist ...``.

Not covered here: "bf16 requested where unsupported" -- gears_dist runs bf16 as torch.autocast, which
CPU torch supports, so there is no unsupported configuration to refuse on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable

import pytest
from test_ingest_bad_input import (
    duplicate_gene_names,
    empty_file,
    missing_condition_column,
    nan_in_x,
    negative_in_x,
    no_control_cells,
    not_hdf5,
    truncated_h5ad,
)

from gears_dist.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
SBATCH = REPO / "cluster" / "slurm" / "gears_dist.sbatch"


@dataclasses.dataclass
class Ctx:
    """What a case may use: a scratch directory, the shared tiny store, a saved model run."""

    tmp: pathlib.Path
    tiny_store: pathlib.Path
    split: str
    model_run: pathlib.Path

    def store_copy(self) -> pathlib.Path:
        dest = self.tmp / "copy.zarr"
        shutil.copytree(self.tiny_store, dest)
        return dest

    def write(self, name: str, text: str) -> pathlib.Path:
        path = self.tmp / name
        path.write_text(text)
        return path


# -- builders: each prepares one malformed input and returns (argv, destination that must not appear) --
def _h5ad_cut_and_zero_padded(tmp: pathlib.Path) -> pathlib.Path:
    """A real h5ad (gears_dist.data.synthetic, gzip-compressed X) cut at 60% and padded back to its size with
    zeros, as a copy that crashed into a preallocated file leaves it: HDF5 opens it (the size is right), but
    X's compressed chunks past the cut do not decode -- h5py's bare OSError mid-ingest without the wrapping."""
    from gears_dist.data import synthetic

    path = tmp / "in.h5ad"
    synthetic.write_h5ad(synthetic.preset("tiny"), path, compression="gzip")
    data = path.read_bytes()
    cut = int(len(data) * 0.6)
    path.write_bytes(data[:cut] + bytes(len(data) - cut))
    return path


def _ingest(h5ad_builder) -> Callable[[Ctx], tuple[list[str], pathlib.Path]]:
    def build(c: Ctx):
        src = h5ad_builder(c.tmp)
        return ["ingest", str(src), str(c.tmp / "out.zarr")], c.tmp / "out.zarr"
    return build


def _train_config(yaml_text: str):
    def build(c: Ctx):
        cfg = c.write("bad.yaml", yaml_text)
        return ["train", str(c.tiny_store), "--config", str(cfg), "--out", str(c.tmp / "run")], c.tmp / "run"
    return build


def _damaged_store(damage: Callable[[pathlib.Path], None]):
    """`gears-dist split` on a copy of the tiny store after `damage(store)`: the store is opened first."""
    def build(c: Ctx):
        store = c.store_copy()
        damage(store)
        return ["split", str(store), "--name", "new_split"], store / "splits" / "new_split"
    return build


def _edit_manifest(**changes):
    def damage(store: pathlib.Path):
        path = store / "manifest.json"
        manifest = json.loads(path.read_text())
        for key, value in changes.items():
            manifest[key] = value(manifest[key]) if callable(value) else value
        path.write_text(json.dumps(manifest))
    return damage


def _truncate_x_chunks(store: pathlib.Path) -> None:
    for chunk in (store / "X" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(chunk.read_bytes()[:100])


def _corrupt_chunks_then_evaluate(c: Ctx):
    # evaluate's top-DE figures read X: the first command of this list that touches expression chunks
    store = c.store_copy()
    _truncate_x_chunks(store)
    return ["evaluate", str(store), "--split", c.split, "--no-mlflow", "--no-gi", "--baselines", "control_mean",
            "--out", str(c.tmp / "eval")], c.tmp / "eval"


def _graph_edgelist(rows: str):
    def build(c: Ctx):
        edges = c.write("edges.tsv", rows)
        cfg = c.write("graphs.yaml", f"graphs:\n  go:\n    source: edgelist\n    path: {edges}\n")
        store = c.store_copy()
        return ["graph", str(store), "--config", str(cfg), "--split", c.split, "--overwrite"], None
    return build


def _first_genes(c: Ctx, n: int) -> list[str]:
    from gears_dist.data.store import open_store

    return open_store(c.tiny_store).genes[:n]


def _unknown_gene_edges(c: Ctx):
    a, b = _first_genes(c, 2)
    return _graph_edgelist(f"{a}\t{b}\t0.5\n{a}\tNOT_A_GENE_XYZ\t0.7\n")(c)


def _negative_weight_edges(c: Ctx):
    a, b, d = _first_genes(c, 3)
    return _graph_edgelist(f"{a}\t{b}\t0.5\n{b}\t{d}\t-0.2\n")(c)


def _predict(*perts: str):
    def build(c: Ctx):
        out = c.tmp / "pred.h5ad"
        return ["predict", str(c.model_run), *(["--perts", *perts] if perts else []), "--out", str(out)], out
    return build


def _train_missing_store(c: Ctx):
    return ["train", str(c.tmp / "nowhere.zarr"), "--config", str(REPO / "configs" / "demo.yaml"),
            "--out", str(c.tmp / "run")], c.tmp / "run"


def _sbatch_missing_store(c: Ctx):
    """The SLURM batch script on a node that does not see the store (run by bash, outside SLURM)."""
    return ["<sbatch>", str(c.tmp / "nowhere.zarr")], c.tmp / "runs"


@dataclasses.dataclass
class Case:
    build: Callable[[Ctx], tuple[list[str], pathlib.Path | None]]  # argv, path that must not appear
    message: str  # regex that stderr must match: the problem and the fix
    xfail: str | None = None


CASES: dict[str, Case] = {
    # -- h5ad given to `gears-dist ingest` ----------------------------------------------------------------
    "h5ad: no condition column": Case(_ingest(missing_condition_column), r"no condition column.*--condition-key"),
    "h5ad: no control cells": Case(_ingest(no_control_cells), r"no control cells.*--control-value"),
    "h5ad: NaN in X": Case(_ingest(nan_in_x), r"NaN or infinite"),
    "h5ad: negative values in X": Case(_ingest(negative_in_x), r"negative values.*unscaled"),
    "h5ad: duplicate gene names": Case(_ingest(duplicate_gene_names), r"duplicate gene names.*var_names_make_unique"),
    "h5ad: not an HDF5 file": Case(_ingest(not_hdf5), r"not an HDF5 file"),
    "h5ad: empty file": Case(_ingest(empty_file), r"empty file"),
    "h5ad: truncated file": Case(_ingest(truncated_h5ad), r"truncated"),
    "h5ad: damaged mid-file (cut, zero-padded)": Case(_ingest(_h5ad_cut_and_zero_padded),
                                                      r"cannot read X rows.*truncated or damaged; re-export it"),
    "h5ad: file does not exist": Case(lambda c: (["ingest", str(c.tmp / "none.h5ad"), str(c.tmp / "out.zarr")],
                                                 c.tmp / "out.zarr"), r"does not exist"),
    # -- training config given to `gears-dist train --config` ---------------------------------------------
    "config: unknown key": Case(_train_config("optim:\n  learning_rate: 0.1\n"),
                                r"unknown config key.*optim\.learning_rate.*known keys here"),
    "config: wrong type": Case(_train_config("train:\n  epochs: three\n"), r"train\.epochs: expected an integer"),
    "config: negative batch size": Case(_train_config("data:\n  loader:\n    batch_size: -8\n"),
                                        r"batch_size.*>= 1, received -8"),
    "config: ZeRO stage 5": Case(_train_config("deepspeed:\n  zero_stage: 5\n"),
                                 r"zero_stage.*expected 0, 1, 2 or 3, received 5"),
    "config: not a mapping": Case(_train_config("- just\n- a list\n"), r"expected a mapping"),
    # -- stores --------------------------------------------------------------------------------------------
    "store: manifest missing": Case(_damaged_store(lambda s: (s / "manifest.json").unlink()),
                                    r"not a complete gears_dist store.*manifest"),
    "store: newer schema version": Case(_damaged_store(_edit_manifest(schema_version=lambda v: v + 1)),
                                        r"newer.*upgrade gears_dist"),
    "store: manifest/array shape mismatch": Case(_damaged_store(_edit_manifest(
        counts=lambda c: {**c, "num_cells": c["num_cells"] + 7})), r"X has shape .* but the manifest says.*--overwrite"),
    "store: manifest not JSON": Case(_damaged_store(lambda s: (s / "manifest.json").write_text("{oops")),
                                     r"not valid JSON.*--overwrite"),
    "store: truncated X chunks": Case(_corrupt_chunks_then_evaluate,
                                      r"chunk X/c/\d+/0 \(rows \d+\.\.\d+ of 'X'\).*damaged: re-run 'gears-dist ingest"),
    "store: path does not exist (train)": Case(_train_missing_store, r"does not exist; create it with"),
    # -- graphs: a user edge list via `gears-dist graph --config` ------------------------------------------
    "graph: edge list with unknown genes": Case(_unknown_gene_edges,
                                                r"NOT_A_GENE_XYZ.*remove them or set graphs.go.universe: all"),
    "graph: negative edge weight": Case(_negative_weight_edges, r"weight -0.2 \(weights must be finite and >= 0\)"),
    # -- predict queries -------------------------------------------------------------------------------------
    "predict: unknown gene": Case(_predict("NOT_A_GENE_XYZ"), r"not nodes of the model's GO graph.*NOT_A_GENE_XYZ.*the graph has \d+ genes"),
    "predict: empty set": Case(_predict(""), r"is empty; name at least one gene"),
    "predict: duplicated gene in a set": Case(_predict("KLF1+KLF1"), r"KLF1.*more than once; a set names each gene"),
    "predict: no sets at all": Case(_predict(), r"no perturbation sets given: pass --perts"),
    "predict: model path does not exist": Case(
        lambda c: (["predict", str(c.tmp / "no_run"), "--perts", "A", "--out", str(c.tmp / "p.csv")],
                   c.tmp / "p.csv"), r"does not exist; pass a run directory"),
    # -- cluster inputs ---------------------------------------------------------------------------------------
    "cluster: SLURM job, store missing on the node": Case(_sbatch_missing_store, r"GEARS_STORE .* does not exist on"),
}


def _tree(root: pathlib.Path) -> dict[str, int]:
    """Every path under root with its size (directories: -1): 'nothing half-written' means this is unchanged."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def _run_sbatch(store: str, tmp: pathlib.Path) -> tuple[int, str]:
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(tmp), "GEARS_STORE": store,
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(SBATCH)], check=False, env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr


def _params():
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", list(_params()))
def test_bad_input_refused_with_a_clear_error(name, tmp_path, capsys, tiny_train_store, saved_model):
    case = CASES[name]
    ctx = Ctx(tmp_path, tiny_train_store["path"], tiny_train_store["split"], saved_model[0])
    argv, destination = case.build(ctx)
    shared_before = _tree(ctx.tiny_store)
    before = _tree(tmp_path)
    if argv[0] == "<sbatch>":
        code, err = _run_sbatch(argv[1], tmp_path)
    else:
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(argv)
        err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert re.search(case.message, err, re.DOTALL), f"stderr does not match {case.message!r}:\n{err}"
    assert destination is None or not destination.exists(), f"{destination} was left behind"
    assert _tree(tmp_path) == before  # no temp build/spill directory, no half-written file anywhere
    assert _tree(ctx.tiny_store) == shared_before


def test_the_table_is_large_enough():
    """The issue asks for at least 20 distinct malformed inputs in one parametrized test."""
    assert len([c for c in CASES.values() if not c.xfail]) >= 20
