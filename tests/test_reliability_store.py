"""The store under damage and after kills (issue 10, the data side).

- A damaged chunk of X or of a per-cell array (truncated, emptied, overwritten) is reported by every
  reader as a `StoreError` (a ValueError) naming the store, the chunk file, its rows and the fix --
  never as Zarr's bare codec error -- and the intact chunks still read the same numbers.
- `gears-dist evaluate` writes its outputs atomically: a failure midway leaves no output directory
  (or the previous results untouched), and no staging directory.
- A build killed outright (SIGKILL) leaves its temporary directory behind; the next build of the same
  destination removes it -- and never one whose owner is alive, or that belongs to another host.

The CLI view of the damaged store and of a damaged h5ad is in tests/test_reliability_bad_input.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import psutil
import pytest

from gears_dist.cli import main
from gears_dist.data.store import (
    StoreError,
    building_store,
    open_store,
    owner_file,
    owner_record,
    owner_state,
    remove_stale_temp_dirs,
    write_manifest,
)

CHUNK = 64  # cells per X chunk of the shared tiny store (tests/conftest.py)
DAMAGES = {
    "truncated": lambda b: b[: len(b) // 2],
    "emptied": lambda b: b"",
    "overwritten": lambda b: bytes(len(b)),
}


@pytest.fixture
def store_copy(tiny_train_store, tmp_path) -> pathlib.Path:
    dest = tmp_path / "copy.zarr"
    shutil.copytree(tiny_train_store["path"], dest)
    return dest


def _damage(path: pathlib.Path, how: str = "truncated") -> None:
    path.write_bytes(DAMAGES[how](path.read_bytes()))


def _chunk_files(store: pathlib.Path, array: str) -> list[pathlib.Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


def _damage_all(store: pathlib.Path, array: str = "X") -> None:
    chunks = _chunk_files(store, array)
    assert chunks, f"{array} has no chunk files (all fill value?)"
    for chunk in chunks:
        _damage(chunk)


# -- damaged chunks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", list(DAMAGES))
def test_a_damaged_x_chunk_is_named_with_the_fix(store_copy, how):
    intact = open_store(store_copy)
    everything = intact.read_x_rows(0, intact.num_cells)
    k = 5
    _damage(store_copy / "X" / "c" / str(k) / "0", how)
    store = open_store(store_copy)  # opening reads only metadata: the damage shows on reading
    rows = f"chunk X/c/{k}/0 (rows {k * CHUNK}..{k * CHUNK + CHUNK - 1} of 'X')"
    readers = {
        "read_x_rows": lambda: store.read_x_rows(0, store.num_cells),
        "read_x_rows at some genes": lambda: store.read_x_rows(k * CHUNK + 3, k * CHUNK + 9, np.array([0, 7])),
        "read_x_cells": lambda: store.read_x_cells(np.array([2, k * CHUNK + 1, store.num_cells - 1])),
        "read('X')": lambda: store.read("X"),
    }
    for name, read in readers.items():
        with pytest.raises(StoreError) as err:
            read()
        msg = str(err.value)
        assert isinstance(err.value, ValueError)
        assert rows in msg, f"{name}: {msg}"
        assert repr(str(store_copy)) in msg and "damaged" in msg
        assert f"re-run 'gears-dist ingest {intact.manifest['source']['path']} {store_copy} --overwrite'" in msg
    # what does not touch the damaged chunk reads exactly what it held before
    np.testing.assert_array_equal(store.read_x_rows(0, k * CHUNK), everything[:k * CHUNK])
    np.testing.assert_array_equal(store.read_x_cells(np.array([0, (k + 1) * CHUNK])), everything[[0, (k + 1) * CHUNK]])


def test_a_damaged_per_cell_array_is_named(store_copy):
    (chunk,) = _chunk_files(store_copy, "obs/condition")[:1]
    _damage(chunk)
    store = open_store(store_copy)
    with pytest.raises(StoreError, match=r"chunk obs/condition/c/0 \(rows 0\.\.\d+ of 'obs/condition'\).*damaged"):
        store.read("obs/condition", slice(10, 20))


def test_errors_that_are_not_damage_pass_through_unchanged(store_copy):
    store = open_store(store_copy)
    with pytest.raises(IndexError):
        store.read_x_cells(np.array([store.num_cells + 5]))
    with pytest.raises(IndexError):
        store.read_x_rows(0, 3, np.array([store.num_genes]))


def _loader_epoch(store, split_key):
    from gears_dist.data.loader import LoaderConfig, ShardLoader, plan_shard
    from gears_dist.data.splits import load_split
    from gears_dist.graphs.build import ensure_graphs
    from gears_dist.graphs.config import GraphConfig
    from gears_dist.graphs.graph import perturbation_index

    names = store.condition_names
    train = np.array([names.index(n) for n in load_split(store, split_key).train])
    go = ensure_graphs(store, GraphConfig(), split_key).go
    plan = plan_shard(store, train, 0, 1)
    loader = ShardLoader(store, plan, perturbation_index(go.nodes, store.condition_genes()),
                         LoaderConfig(batch_size=16, buffer_chunks=3))
    for _ in loader.epoch_batches(0):
        pass


def _figure_cells(store, split_key):
    from gears_dist.evaluate import plots

    plots.condition_cells(store, store.condition_names[3], np.arange(5))


def _cell_eval_export(store, split_key):
    from gears_dist.evaluate import export

    names = [n for n in store.condition_names if n != "ctrl"][:2]
    export.export_cell_eval(store, names, np.zeros((2, store.num_genes)), store.path.parent / "cell_eval")


def _coexpression(store, split_key):
    from gears_dist.graphs.coexpr import build_coexpression_graph
    from gears_dist.graphs.config import CoexprConfig

    build_coexpression_graph(store, np.array([[0, store.num_cells]]), CoexprConfig())


def _stats(store, split_key):
    import zarr

    from gears_dist.data.stats import write_stats

    shutil.rmtree(store.path / "stats")
    write_stats(zarr.open_group(store.path, mode="r+"))


def _truth(store, split_key):
    from gears_dist.evaluate.metrics import truth_from_store

    truth_from_store(store, store.condition_names[1:4])


READERS = {  # every path that reads X or a per-cell array (the array damaged in that case)
    "training loader": (_loader_epoch, "X"),
    "evaluate figures": (_figure_cells, "X"),
    "cell-eval export": (_cell_eval_export, "X"),
    "co-expression graph (Dask)": (_coexpression, "X"),
    "per-condition stats (Dask)": (_stats, "X"),
    "condition truth from stats": (_truth, "stats/mean"),
    "loader's per-cell conditions": (_loader_epoch, "obs/condition"),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_reports_the_damaged_chunk(store_copy, tiny_train_store, reader):
    read, array = READERS[reader]
    _damage_all(store_copy, array)
    store = open_store(store_copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StoreError, match=rf"chunk {array}/c/[\d/]+ \(rows \d+\.\.\d+ of '{array}'\).*"
                                             rf"store is damaged: re-run 'gears-dist ingest .* --overwrite'"):
            read(store, tiny_train_store["split"])


# -- evaluate's outputs land atomically ------------------------------------------------------------------------
def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_evaluate_failing_midway_leaves_no_output(store_copy, tiny_train_store, tmp_path, capsys):
    cmd = ["evaluate", str(store_copy), "--split", tiny_train_store["split"], "--no-mlflow", "--no-gi",
           "--baselines", "control_mean,additive", "--num-plot-conditions", "1"]
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*cmd, "--out", str(out)]) == 0  # intact: every output lands, no staging left
        done = _files(out)
        assert {"metrics.json", "metrics.csv"} <= set(done) and any(k.startswith("figures/") for k in done)
        assert _hidden(tmp_path) == []
        # the metrics come from stats/, the figures read X: a damaged X fails the command midway
        _damage_all(store_copy)
        capsys.readouterr()
        fresh = tmp_path / "new" / "eval"  # its parent does not exist either
        assert main([*cmd, "--out", str(fresh)]) == 2
        assert re.search(r"chunk X/c/\d+/0 .*damaged", capsys.readouterr().err)
        assert not (tmp_path / "new").exists()
        # over earlier results (plus a file of the user's): all of it exactly as it was
        (out / "notes.txt").write_text("mine")
        before = _files(out)
        assert main([*cmd, "--out", str(out)]) == 2
        assert _files(out) == before
        assert _hidden(tmp_path) == []


def test_evaluate_into_an_existing_directory_replaces_its_results_and_keeps_other_files(
        store_copy, tiny_train_store, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["evaluate", str(store_copy), "--split", tiny_train_store["split"], "--no-mlflow", "--no-gi",
                     "--no-figures", "--baselines", "control_mean", "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["split"] == tiny_train_store["split"]
    assert _hidden(tmp_path) == []


# -- temporary directories of killed builds ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def screen_h5ad(tmp_path_factory) -> pathlib.Path:
    """A screen whose ingest takes a few seconds with 16-cell chunks (time to stop or kill it mid-build)."""
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    assert main(["simulate", str(path), "--preset", "demo", "--num-cells", "5000", "--num-genes", "600",
                 "--seed", "4"]) == 0
    return path


INGEST = ["--chunk-cells", "16", "--memory-budget-mb", "32"]


def _building(dest: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in dest.parent.glob(f".{dest.name}.building-*") if p.is_dir())


def _start_ingest_and_wait_for_its_build(src: pathlib.Path, dest: pathlib.Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gears_dist.cli", "ingest", str(src), str(dest), *INGEST],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _building(dest):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the ingest exited ({proc.returncode}) or timed out before its build directory appeared")
        time.sleep(0.01)
    return proc


def test_killed_ingest_leaves_a_temp_dir_that_the_next_build_removes_never_a_live_one(screen_h5ad, tmp_path):
    from gears_dist.data.ingest import ingest

    dest = tmp_path / "screen.zarr"
    proc = _start_ingest_and_wait_for_its_build(screen_h5ad, dest)
    try:
        time.sleep(0.2)
        proc.send_signal(signal.SIGSTOP)  # alive but stalled mid-build: its directory must survive
        assert proc.poll() is None and not dest.exists(), "the ingest finished before it could be stopped"
        (theirs,) = _building(dest)
        assert owner_state(theirs)[0] == "alive"
        assert json.loads(owner_file(theirs).read_text())["pid"] == proc.pid
        with pytest.warns(UserWarning, match=rf"another process on this host is writing .*pid {proc.pid}"):
            ingest(screen_h5ad, dest, chunk_cells=16)
        open_store(dest)
        assert _building(dest) == [theirs] and owner_file(theirs).is_file()
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup code runs: the build directory stays behind
        proc.wait(timeout=30)
    assert theirs.is_dir() and owner_state(theirs)[0] == "gone"

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left to warn about: the owner is gone
        warnings.filterwarnings("ignore", message=".*perturbed genes.*")
        ingest(screen_h5ad, dest, chunk_cells=16, overwrite=True)
    open_store(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["screen.zarr"]  # no directory, no owner record


def _fake_temp_dir(dest: pathlib.Path, tag: str, record: dict | None) -> pathlib.Path:
    tmp = dest.with_name(f".{dest.name}.{tag}-{os.urandom(4).hex()}")
    tmp.mkdir()
    (tmp / "zarr.json").write_text("{}")
    if record is not None:
        owner_file(tmp).write_text(json.dumps(record))
    return tmp


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_dirs_are_judged_by_their_owner(tmp_path):
    dest = tmp_path / "out.zarr"
    me = owner_record()
    dead = _fake_temp_dir(dest, "building", {**me, "pid": _dead_pid()})
    reused = _fake_temp_dir(dest, "building", {**me, "process_start": me["process_start"] - 1000})  # pid reused
    rebooted = _fake_temp_dir(dest, "building", {**me, "boot_id": "another-boot"})
    alive = _fake_temp_dir(dest, "building", me)
    elsewhere = _fake_temp_dir(dest, "building", {**me, "host": "node-17.cluster"})
    unknown = _fake_temp_dir(dest, "building", None)
    orphan_record = _fake_temp_dir(dest, "building", {**me, "pid": _dead_pid()})
    shutil.rmtree(orphan_record)  # killed between writing the record and making the directory
    other_dest = _fake_temp_dir(tmp_path / "other.zarr", "building", {**me, "pid": _dead_pid()})

    with pytest.warns(UserWarning) as caught:
        removed = remove_stale_temp_dirs(dest, "building")
    assert sorted(removed) == sorted([dead, reused, rebooted, orphan_record])
    for gone in removed:
        assert not gone.exists() and not owner_file(gone).exists()
    for kept in (alive, elsewhere, unknown, other_dest):
        assert kept.is_dir()
    text = " | ".join(str(w.message) for w in caught)
    assert f"pid {os.getpid()}" in text and "node-17.cluster" in text and "no owner record" in text
    assert unknown.name in text and "delete them by hand" in text


def test_building_a_store_removes_dead_builds_and_replaced_copies(tmp_path):
    dest = tmp_path / "out.zarr"
    dead = _fake_temp_dir(dest, "building", {**owner_record(), "pid": _dead_pid()})
    with building_store(dest) as tmp:
        assert not dead.exists()  # removed before this build starts
        assert owner_file(tmp).is_file()
        write_manifest(tmp, {})
    assert not owner_file(tmp).exists() and not tmp.exists() and (dest / "manifest.json").is_file()
    # a replacement killed while deleting the old copy leaves it beside a complete store
    replaced = dest.with_name(f".{dest.name}.replaced-0badc0de")
    replaced.mkdir()
    with building_store(dest, overwrite=True) as tmp:
        write_manifest(tmp, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_writing_a_component_removes_dead_component_builds(store_copy):
    dead = _fake_temp_dir(store_copy, "splits-extra", {**owner_record(), "pid": _dead_pid()})
    store = open_store(store_copy, mode="r+")
    with store.write_component("splits", "extra", {"kind": "custom"}) as group:
        group.create_array("train", shape=(2,), dtype="int32")
    assert not dead.exists() and not owner_file(dead).exists()
    assert store.has_component("splits", "extra")
    assert _hidden(store_copy.parent) == []


def test_owner_state_follows_the_process(tmp_path):
    """A live process whose start time matches is 'alive'; psutil's view is the reference."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rec = {**owner_record(), "pid": proc.pid, "process_start": psutil.Process(proc.pid).create_time()}
        tmp = _fake_temp_dir(tmp_path / "x.zarr", "building", rec)
        assert owner_state(tmp)[0] == "alive"
    finally:
        proc.kill()
        proc.wait()
    assert owner_state(tmp)[0] == "gone"
