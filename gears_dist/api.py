"""A Python API for notebooks: ``import gears_dist as gd``.

The same pipeline as the ``gears-dist`` command line, as functions that take and return Python objects
(AnnData in, AnnData and pandas out)::

    import gears_dist as gd

    adata = gd.simulate("demo")                        # or: anndata.read_h5ad("screen.h5ad")
    store = gd.ingest(adata, "screen.zarr")            # or: gd.ingest("screen.h5ad", "screen.zarr")
    split = store.split("simulation", seed=1)          # saved in the store, as gears-dist split
    graphs = store.build_graphs("demo", split=split)   # the GO / co-expression graphs, as gears-dist graph
    print(gd.describe(store))
    run = gd.train(store, "demo", train__epochs=2)     # preset configs/demo.yaml, one override
    run.history                                        # pandas DataFrame, one row per epoch
    pred = run.predict(["KLF1+MAP2K6", "CEBPE"])       # AnnData: X = predicted mean, layers['delta']
    run.evaluate()                                     # pandas DataFrame: model and baselines per category
    search = gd.tune(store, "tune_demo", num_trials=4) # Ray Tune search, as gears-dist tune
    search.trials                                      # pandas DataFrame: the trials, ranked

Conventions: errors are exceptions (`ValueError` / `TypeError` naming what was expected and what was
received; `gears_dist.config.ConfigError` is a `ValueError`), warnings go through `warnings`, and nothing here
prints (training prints its per-epoch progress lines, as on the command line).

Importing this module is cheap: torch, Ray, Zarr and AnnData are imported by the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import pathlib
import tempfile
import time
import typing
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import anndata
    import pandas

    from gears_dist.data.splits import Split
    from gears_dist.data.store import Store as DataStore
    from gears_dist.evaluate.predict import TrainedPredictor
    from gears_dist.graphs.build import GraphBundle
    from gears_dist.graphs.config import GraphConfig
    from gears_dist.train.config import RunConfig
    from gears_dist.tune.config import TuneConfig

    Store = DataStore  # for type checkers; at run time `Store` is the subclass `_store_class` makes

__all__ = ["Run", "Store", "TuneResult", "describe", "ingest", "load_run", "open_store", "simulate", "train", "tune"]

PathLike = str | os.PathLike

# In-memory screens larger than this many cells get a warning from `simulate` (memory).
_SIMULATE_WARN_CELLS = 500_000


def _type_name(value: Any) -> str:
    return type(value).__name__


def _as_path(value: Any, what: str) -> pathlib.Path:
    if isinstance(value, (str, os.PathLike)):
        return pathlib.Path(value)
    raise TypeError(f"{what}: expected a path (str or os.PathLike), received {_type_name(value)} ({value!r})")


def _as_list(value: Any, what: str) -> list[str] | None:
    """None -> None; 'x' -> ['x']; an iterable of strings -> list (the CLI's repeatable flags)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        out = list(value)
        bad = [v for v in out if not isinstance(v, str)]
        if not bad:
            return out
    raise TypeError(f"{what}: expected a string or a list of strings, received {value!r}")


# ----------------------------------------------------------------------------------------------------
# data: simulate, ingest, open, describe
# ----------------------------------------------------------------------------------------------------
def simulate(preset: str = "demo", *, style: str = "gears", num_workers: int = 1, **overrides: Any
             ) -> anndata.AnnData:
    """Generate a synthetic Perturb-seq screen in memory.

    Parameters
    ----------
    preset : str
        Size preset: ``"tiny"`` (seconds, for tests), ``"demo"``, ``"norman"``, ``"k562"``, ``"genome"``
        (``gears_dist.data.synthetic.PRESETS``).
    style : str
        Condition naming of ``obs['condition']``: ``"gears"`` (``ctrl``, ``A+ctrl``, ``A+B``) or
        ``"scperturb"`` (``control``, ``A``, ``A_B``).
    num_workers : int
        Processes sampling cell blocks; the result does not depend on it.
    **overrides
        Fields of ``gears_dist.data.synthetic.ScreenSpec`` to change, e.g. ``num_cells=3000, seed=1``.
        Unknown fields and wrong types raise `gears_dist.config.ConfigError` (a `ValueError`) naming the field.

    Returns
    -------
    anndata.AnnData
        Raw counts (CSR float32) in ``X``; ``obs['condition']``, ``var['gene_name']``; the planted genetic
        interactions in ``uns['gears_dist_truth']``, which `ingest` carries into the store.

    Notes
    -----
    The whole screen is held in memory; for the large presets write it to disk instead
    (``gears-dist simulate OUT.zarr --preset genome --format store``).
    """
    from gears_dist.data import synthetic

    if not isinstance(preset, str):
        raise TypeError(f"preset: expected a preset name (one of {sorted(synthetic.PRESETS)}), "
                        f"received {_type_name(preset)} ({preset!r})")
    if style not in synthetic.STYLES:
        raise ValueError(f"style: expected one of {list(synthetic.STYLES)}, received {style!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers: expected a positive integer, received {num_workers!r}")
    spec = synthetic.preset(preset, **overrides)
    if spec.num_cells > _SIMULATE_WARN_CELLS:
        warnings.warn(f"simulate: building {spec.num_cells:,} cells in memory; for screens this size write them to "
                      f"disk with 'gears-dist simulate OUT.zarr --preset {preset} --format store'", stacklevel=2)
    return synthetic.simulate_screen(spec, style=style, num_workers=num_workers)


def _register_order(order: str) -> None:
    """The 'graph' condition order lives in gears_dist.graphs.order and registers itself on import (the CLI
    does the same before ingesting)."""
    if order == "graph":
        with contextlib.suppress(ModuleNotFoundError):
            import gears_dist.graphs.order  # noqa: F401


def _backed_file_matches(adata: anndata.AnnData) -> bool:
    """A backed AnnData whose obs and var are those of its file (not edited in memory since it was opened)."""
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(adata.filename, "r") as f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
    except (OSError, KeyError):
        return False
    return obs.equals(adata.obs) and var.equals(adata.var)


def _truth_doc(uns: Mapping) -> str | None:
    """uns['gears_dist_truth'] (a synthetic screen's planted interactions) as the store's truth.json."""
    from gears_dist.data.synthetic import TRUTH_KEY

    table = uns.get(TRUTH_KEY) if isinstance(uns, Mapping) else None
    if not isinstance(table, Mapping) or "condition" not in table or "interaction" not in table:
        return None
    import numpy as np

    cols = {str(k): np.asarray(v).tolist() for k, v in table.items()}
    rows = [dict(zip(cols, r)) for r in zip(*cols.values())]
    return json.dumps({"format": "gears_dist.synthetic_truth", "source": f"AnnData.uns[{TRUTH_KEY!r}]",
                       "doubles": rows}, indent=1, default=str)


def _record_in_memory_source(store_path: pathlib.Path, adata: anndata.AnnData) -> None:
    """After ingesting a temporary copy of an in-memory AnnData: the manifest names no (deleted) file, and a
    synthetic screen's planted interactions go to the store's truth.json (what `gears-dist evaluate` reads)."""
    from gears_dist.data.store import MANIFEST, atomic_write_text
    from gears_dist.data.synthetic import STORE_TRUTH

    mpath = store_path / MANIFEST
    manifest = json.loads(mpath.read_text())
    source = dict(manifest.get("source") or {})
    for k in ("path", "size", "mtime", "sha256_head_tail"):
        source.pop(k, None)
    manifest["source"] = {**source, "kind": "anndata", "path": None, "in_memory": True}
    truth = _truth_doc(adata.uns)
    if truth is not None:
        atomic_write_text(store_path / STORE_TRUTH, truth)
        manifest["truth"] = STORE_TRUTH
    atomic_write_text(mpath, json.dumps(manifest, indent=2, sort_keys=True))


def ingest(source: PathLike | anndata.AnnData, store_path: PathLike, *, condition_key: str | None = None,
           control_values: str | Sequence[str] | None = None, separators: str | Sequence[str] | None = None,
           gene_key: str | None = None, cell_type_key: str | None = None, batch_key: str | None = None,
           hvg: int | None = None, normalize: str = "auto", chunk_cells: int | None = None,
           order: str = "condition", memory_budget_mb: int = 1024, overwrite: bool = False,
           tmp_dir: PathLike | None = None) -> Store:
    """Ingest an AnnData (a .h5ad path or an AnnData object) into a training-ready Zarr store.

    The same conventions, checks and result as ``gears-dist ingest`` (`gears_dist.data.ingest.ingest`): the
    condition column is auto-detected (``condition``, ``perturbation``, ``gene``, ``target_gene``) unless
    named, raw counts are detected and normalized (library size 1e4, log1p), and the store is built beside
    `store_path` and renamed into place only when complete.

    Parameters
    ----------
    source : str, os.PathLike or anndata.AnnData
        A .h5ad file (read out of core), or an AnnData object, in memory or backed.
    store_path : str or os.PathLike
        Destination store directory, e.g. ``"screen.zarr"``.
    condition_key : str, optional
        obs column holding the perturbation (``--condition-key``).
    control_values : str or list of str, optional
        Value(s) of the condition column meaning control (default: ctrl, control, non-targeting, NT).
    separators : str or list of str, optional
        Separator(s) between the genes of a combination (default ``'+'``, and ``'_'`` when the data uses it).
    gene_key : str, optional
        var column with gene symbols (default: ``gene_name`` if present, else ``var_names``).
    cell_type_key, batch_key : str, optional
        obs columns with the cell type / cell line and the batch.
    hvg : int, optional
        Keep the top-N highly variable genes plus every measured perturbed gene (default: all genes).
    normalize : str
        ``"auto"`` (detect raw counts), ``"counts"`` or ``"log1p"`` (use as is).
    chunk_cells : int, optional
        Cells per X chunk (default chosen by size).
    order : str
        Order of conditions in the store: ``"condition"`` or ``"graph"``.
    memory_budget_mb : int
        Bound on the ingest's working memory (>= 32).
    overwrite : bool
        Replace an existing store at `store_path`.
    tmp_dir : str or os.PathLike, optional
        Where an in-memory AnnData is written before ingesting (default: beside `store_path`).

    Returns
    -------
    Store
        The opened store (see `describe`, `Store.split`, `Store.build_graphs`).

    Notes
    -----
    The ingest reads an .h5ad file out of core, so an AnnData object costs one extra copy:

    - in memory (or a view): written to a temporary ``.h5ad`` in `tmp_dir` (default: beside the store; about
      the size of ``X`` on disk, plus the time of ``adata.write_h5ad``), ingested, and deleted in all cases.
      The manifest then records no source file; a synthetic screen's ``uns['gears_dist_truth']`` is kept as the
      store's ``truth.json`` (used to score genetic interactions).
    - backed (``anndata.read_h5ad(path, backed='r')``): its file is ingested directly, without a copy, unless
      obs or var were changed in memory since it was opened; then it is copied like an in-memory one (with a
      warning, since backed files are usually large).
    """
    from gears_dist.data import ingest as _ingest

    store_path = _as_path(store_path, "store_path")
    kwargs = dict(condition_key=condition_key, control_values=_as_list(control_values, "control_values"),
                  separators=_as_list(separators, "separators"), gene_key=gene_key, cell_type_key=cell_type_key,
                  batch_key=batch_key, hvg=hvg, normalize=normalize, chunk_cells=chunk_cells, order=order,
                  memory_budget_mb=memory_budget_mb, overwrite=overwrite)
    for name in ("condition_key", "gene_key", "cell_type_key", "batch_key"):
        if kwargs[name] is not None and not isinstance(kwargs[name], str):
            raise TypeError(f"{name}: expected a column name (str) or None, received {kwargs[name]!r}")
    _register_order(order)
    if isinstance(source, (str, os.PathLike)):
        return open_store(_ingest.ingest(source, store_path, **kwargs))

    import anndata

    if not isinstance(source, anndata.AnnData):
        raise TypeError(f"source: expected a path to an .h5ad file or an anndata.AnnData, received "
                        f"{_type_name(source)}")
    if source.isbacked and not source.is_view:
        if _backed_file_matches(source):
            return open_store(_ingest.ingest(source.filename, store_path, **kwargs))
        warnings.warn(f"ingest: the backed AnnData's obs or var differ from its file {str(source.filename)!r} "
                      f"(changed in memory); ingesting a temporary copy of it (costs a full write of the data)",
                      stacklevel=2)
    if store_path.exists() and not overwrite:  # before paying for the copy; ingest checks again
        from gears_dist.data.store import StoreError

        raise StoreError(f"destination {str(store_path)!r} already exists; pass overwrite=True to replace it or "
                         f"choose another path")
    where = pathlib.Path(tmp_dir) if tmp_dir is not None else store_path.parent
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{store_path.name}.anndata-", suffix=".h5ad", dir=where)
    os.close(fd)
    try:
        source.write_h5ad(tmp)
        store = _ingest.ingest(tmp, store_path, **kwargs)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)
    _record_in_memory_source(store.path, source)
    return open_store(store.path)


def open_store(path: PathLike | DataStore, mode: str = "r") -> Store:
    """Open (and validate) a gears_dist store.

    Parameters
    ----------
    path : str, os.PathLike or Store
        The store directory (an API `Store` is returned as is when `mode` is ``"r"``; a
        `gears_dist.data.store.Store` is opened again as an API `Store`).
    mode : str
        ``"r"`` (read) or ``"r+"`` (read and write). `Store.split` and `Store.build_graphs` add components in
        either mode.

    Returns
    -------
    Store
        A `gears_dist.data.store.Store` with `Store.split` and `Store.build_graphs`.

    Raises
    ------
    gears_dist.data.store.StoreError
        The path is not a complete store of a schema this version reads; the message says how to fix it.
    """
    from gears_dist.data.store import Store as _DataStore

    if mode not in ("r", "r+"):
        raise ValueError(f"mode: expected 'r' or 'r+', received {mode!r}")
    cls = _store_class()
    if isinstance(path, cls) and mode == "r":
        return path
    if isinstance(path, _DataStore):
        return cls(path.path, mode)
    return cls(_as_path(path, "path"), mode)


# ----------------------------------------------------------------------------------------------------
# the store: splits and graphs
# ----------------------------------------------------------------------------------------------------
# `Store` is a subclass of the data layer's `gears_dist.data.store.Store` made on first use, so that importing
# this module does not import Zarr. It lives here, not in gears_dist.data: building graphs needs
# gears_dist.graphs (a layer above data), and gears_dist.data.splits imports gears_dist.data.store, so
# neither method can be defined on the data-layer class without an upward import or an import cycle (see
# tests/test_cli_api.py::test_no_import_cycles_and_layers_point_down).
_STORE_CLASS: type | None = None


def __getattr__(name: str) -> Any:  # gears_dist.api.Store, made on first use
    if name == "Store":
        return _store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _store_class() -> type:
    global _STORE_CLASS
    if _STORE_CLASS is None:
        from gears_dist.data.store import Store as _DataStore

        _STORE_CLASS = type("Store", (_DataStore,), {
            "__module__": __name__, "__qualname__": "Store", "__doc__": _STORE_DOC,
            "split": _store_split, "build_graphs": _store_build_graphs})
        globals()["Store"] = _STORE_CLASS
    return _STORE_CLASS


_STORE_DOC = """A gears_dist store opened by `open_store` or `ingest`: a `gears_dist.data.store.Store` (cells, genes,
conditions, ``read_x_rows``, ``components``, ...) that also makes splits and graphs in place.

Methods
-------
split(kind="simulation", seed=1, ...)
    A train/val/test split of the conditions, saved in the store (``gears-dist split``).
build_graphs(config=None, split=None, ...)
    The GO and co-expression graphs and worker partitions, saved in the store (``gears-dist graph``).

Both write into the store directory whatever `mode` it was opened with (new components only, atomically; the
expression data are never changed), and the object's manifest, ``repr`` and `describe` show them at once.
"""


def _reload_manifest(store: DataStore) -> None:
    from gears_dist.data.store import MANIFEST

    store.manifest = json.loads((store.path / MANIFEST).read_text())


def _read_custom_split(custom: Any) -> dict | None:
    if custom is None or isinstance(custom, Mapping):
        return None if custom is None else {str(k): list(v) for k, v in custom.items()}
    from gears_dist.data.splits import read_custom_split

    return read_custom_split(_as_path(custom, "custom"))


def _store_split(self: DataStore, kind: str = "simulation", seed: int = 1, *, name: str | None = None,
                 custom: Mapping[str, Sequence[str]] | PathLike | None = None, train_gene_frac: float = 0.75,
                 combo_seen2_train_frac: float = 0.75, overwrite: bool = False) -> Split:
    """Make a condition-level train/val/test split and save it in the store: ``gears-dist split``.

    Parameters
    ----------
    kind : str
        ``"simulation"`` (GEARS' default), ``"single"``, ``"combo_seen0"``, ``"combo_seen1"``,
        ``"combo_seen2"``, ``"no_test"`` or ``"custom"`` (see `gears_dist.data.splits`).
    seed : int
        The split is a function of the store's conditions, `kind`, `seed` and the fractions.
    name : str, optional
        Key to save it under (default ``"<kind>_seed<seed>"``, the key training looks for with
        ``data.split_kind`` / ``data.split_seed``).
    custom : dict or str or os.PathLike, optional
        For ``kind="custom"``: ``{"train": [...], "val": [...], "test": [...]}`` of condition names, or a JSON
        file holding it.
    train_gene_frac : float
        Fraction of the perturbed genes that are "seen" (in (0, 1]).
    combo_seen2_train_frac : float
        Fraction of the seen-seen combinations that train (in (0, 1]).
    overwrite : bool
        Replace a different split already saved under the key.

    Returns
    -------
    gears_dist.data.splits.Split
        The saved split (``train``, ``val``, ``test``, ``excluded``, ``categories``; ``key``: where it is
        saved). Pass it (or its key) to `build_graphs` and as ``data__split=split.key`` to `train`.

    Raises
    ------
    ValueError
        An unknown kind, a fraction out of range, a bad custom split; or the key holds a different split and
        not `overwrite` (making the same split again returns the saved one).
    TypeError
        Arguments of the wrong type.
    """
    from gears_dist.data.splits import load_split, make_split, save_split, split_key
    from gears_dist.data.store import Store as _DataStore
    from gears_dist.data.store import StoreError

    if not isinstance(kind, str):
        raise TypeError(f"kind: expected a split kind (str), received {_type_name(kind)} ({kind!r})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an integer, received {_type_name(seed)} ({seed!r})")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name: expected a key (str) or None, received {_type_name(name)} ({name!r})")
    for field, v in (("train_gene_frac", train_gene_frac), ("combo_seen2_train_frac", combo_seen2_train_frac)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{field}: expected a number in (0, 1], received {_type_name(v)} ({v!r})")
    if custom is not None and kind != "custom":
        raise ValueError(f"custom: only used with kind='custom', received kind {kind!r}")
    if custom is None and kind == "custom":
        raise ValueError("custom: kind='custom' needs custom={'train': [...], 'val': [...], 'test': [...]} (condition "
                         "names) or the path of a JSON file holding it")
    split = make_split(self.condition_names, kind, seed, custom=_read_custom_split(custom),
                       train_gene_frac=float(train_gene_frac), combo_seen2_train_frac=float(combo_seen2_train_frac))
    key = name or split_key(kind, seed)
    _reload_manifest(self)
    if self.has_component("splits", key) and not overwrite:
        saved = load_split(self, key)
        if saved == split:
            return saved
        raise StoreError(f"store {str(self.path)!r} already has a different split {key!r} "
                         f"({saved.kind}, seed {saved.seed}, params {saved.params}); pass overwrite=True to replace "
                         f"it or choose another name")
    writer = _DataStore(self.path, "r+")
    save_split(writer, split, key, overwrite=overwrite)
    self.manifest = writer.manifest
    return load_split(self, key)


def _graph_config(config: Any) -> GraphConfig:
    """A GraphConfig from None (defaults), a GraphConfig, a RunConfig (its graphs), a graphs section (mapping or
    YAML holding only it) or a training config in any form `resolve_config` takes (its graphs section)."""
    from gears_dist.config import from_dict
    from gears_dist.graphs.config import GraphConfig
    from gears_dist.train.config import RunConfig

    if config is None:
        return GraphConfig()
    if isinstance(config, GraphConfig):
        return dataclasses.replace(config)
    if isinstance(config, RunConfig):
        return dataclasses.replace(config.graphs)
    try:
        data = _config_data(config)
    except TypeError:
        raise TypeError(f"config: expected None, a GraphConfig, a RunConfig, a preset name, a YAML path or a dict, "
                        f"received {_type_name(config)} ({config!r})") from None
    fields = {f.name for f in dataclasses.fields(GraphConfig)}
    if data and "graphs" not in data and set(data) <= fields:
        return from_dict(GraphConfig, data, "graphs")
    return resolve_config(data).graphs


def _store_build_graphs(self: DataStore, config: Any = None, split: str | Split | None = None, *,
                        parts: int | Sequence[int] | None = None, method: str | None = None,
                        overwrite: bool = False) -> GraphBundle:
    """Build the GO and co-expression graphs and the worker partitions into the store: ``gears-dist graph``.

    What is already stored for the same parameters is loaded, not rebuilt (unless `overwrite`); training
    (`train`) reuses them the same way.

    Parameters
    ----------
    config : GraphConfig, RunConfig, str, os.PathLike or dict, optional
        The ``graphs`` parameters: None (the defaults), a `gears_dist.graphs.config.GraphConfig`, or a training
        config in any form `train` takes (a preset name such as ``"demo"``, a YAML path, a dict or a
        RunConfig; its ``graphs`` section is used), or a dict / YAML holding only a graphs section.
    split : str or Split, optional
        The split (its key, or a `Split` returned by `split`) whose training cells feed the co-expression
        graph; None: every control and single-gene condition. Training builds its graphs with its own split,
        so pass that split to prepare what a run will read.
    parts : int or list of int, optional
        Worker counts W to partition the conditions for (default: the config's ``partition.num_parts``).
    method : str, optional
        Partition method, ``"metis"``, ``"contiguous"`` or ``"random"`` (default: the config's).
    overwrite : bool
        Rebuild the graphs and partitions even when stored.

    Returns
    -------
    gears_dist.graphs.build.GraphBundle
        ``go`` and ``coexpr`` (`gears_dist.graphs.graph.GeneGraph`: ``nodes``, ``num_edges``, ...) and ``keys``:
        the stored components, ``{"go": ..., "coexpr": ..., "part_W<W>": ...}`` (partitions skipped for too
        few conditions are absent).

    Raises
    ------
    gears_dist.data.store.StoreError
        (a ValueError) The store has no split `split`.
    gears_dist.config.ConfigError
        (a ValueError) A bad config field (named).
    ValueError
        An unknown partition method.
    TypeError
        Arguments of the wrong type.
    """
    from gears_dist.data.splits import Split as _Split
    from gears_dist.data.store import StoreError
    from gears_dist.graphs.build import GraphBundle as _Bundle
    from gears_dist.graphs.build import build_graphs as _build
    from gears_dist.graphs.build import load_graph

    cfg = _graph_config(config)
    if isinstance(split, _Split):
        if split.key is None:
            raise ValueError("split: this Split is not saved in a store (no key); save it with store.split(...) "
                             "and pass what that returns, or pass a split key")
        split = split.key
    if split is not None and not isinstance(split, str):
        raise TypeError(f"split: expected a split key (str), a Split or None, received {_type_name(split)} "
                        f"({split!r})")
    if isinstance(parts, int) and not isinstance(parts, bool):
        parts = [parts]
    if parts is not None:
        parts = list(parts)
        if not parts or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in parts):
            raise ValueError(f"parts: expected positive worker counts, e.g. [2, 4], received {parts!r}")
    if method is not None and not isinstance(method, str):
        raise TypeError(f"method: expected a partition method name (str) or None, received {method!r}")
    _reload_manifest(self)
    if split is not None and not self.has_component("splits", split):
        raise StoreError(f"split: store {str(self.path)!r} has no split {split!r} (has "
                         f"{sorted(self.components('splits'))}); make it with store.split(...)")
    keys = _build(self.path, config=cfg, split=split, parts=parts, method=method, overwrite=overwrite, echo=False)
    _reload_manifest(self)
    return _Bundle(load_graph(self, keys["go"]), load_graph(self, keys["coexpr"]), keys)


def describe(store: PathLike | Store) -> str:
    """A readable summary of a store: cells, genes, conditions, normalization, splits and graphs.

    Parameters
    ----------
    store : str, os.PathLike or Store

    Returns
    -------
    str
        Several lines, e.g. for ``print(gd.describe(store))``.
    """
    import numpy as np

    st = open_store(store)
    m = st.manifest
    counts = m.get("counts", {})
    sizes = np.asarray(st.array("conditions/num_genes"))
    by_size = {int(k): int(n) for k, n in zip(*np.unique(sizes, return_counts=True)) if k > 0}
    noun = {1: "single", 2: "pair"}
    kinds = ", ".join(f"{n} {noun.get(k, f'{k}-gene set')}{'s' if n != 1 else ''}" for k, n in sorted(by_size.items()))
    norm = (m.get("normalization") or {}).get("choice") or st.root.attrs.get("normalization", "?")
    attrs = dict(st.root.attrs)
    lines = [f"gears_dist store {str(st.path)!r}",
             f"  cells       {st.num_cells:,} ({counts.get('num_control_cells', 0):,} control)",
             f"  genes       {st.num_genes:,} measured (of {counts.get('num_source_genes', st.num_genes):,} in the "
             f"source); {counts.get('num_perturbed_genes', 0):,} perturbed genes",
             f"  conditions  {len(sizes):,}: control, {kinds or 'no perturbations'}",
             f"  X           log1p-normalized float32 ({norm}), chunks of {st.chunk_cells:,} cells",
             f"  cell types  {', '.join(map(str, attrs.get('cell_types', [])))}"]
    source = m.get("source") or {}
    if source.get("kind") == "synthetic":
        lines.append("  source      synthetic (gears-dist simulate --format store)")
    elif source.get("path"):
        lines.append(f"  source      {source['path']}")
    elif source.get("in_memory"):
        lines.append("  source      an in-memory AnnData")
    splits = st.components("splits")
    lines.append(f"  splits      {len(splits) or 'none'}")
    for key, a in sorted(splits.items()):
        c = a.get("counts", {})
        lines.append(f"    {key}: {a.get('kind')} seed {a.get('seed')}, " + ", ".join(
            f"{s} {c[s]}" for s in ("train", "val", "test", "excluded") if s in c))
    graphs = st.components("graphs")
    lines.append(f"  graphs      {len(graphs) or 'none'}")
    for key, a in sorted(graphs.items()):
        if a.get("type") == "partition":
            lines.append(f"    {key}: partition into {a.get('num_parts')} parts ({a.get('method')}) of "
                         f"{a.get('go_graph')}")
        else:
            lines.append(f"    {key}: {a.get('kind') or a.get('type')} graph, {_count(a.get('num_nodes'))} nodes, "
                         f"{_count(a.get('num_edges'))} edges")
    return "\n".join(lines)


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


# ----------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------
def _config_dir() -> pathlib.Path:
    from gears_dist.config import CONFIGS

    return CONFIGS


def available_configs() -> list[str]:
    """Names of the training presets (``configs/<name>.yaml``; the ``tune_*`` search presets excluded)."""
    d = _config_dir()
    return sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("tune_")) if d.is_dir() else []


def _config_data(config: Any) -> dict:
    """Plain data of a config given as a preset name, a YAML path, a mapping or a RunConfig."""
    from gears_dist.config import load_yaml_with_base, to_dict
    from gears_dist.train.config import RunConfig

    if isinstance(config, RunConfig):
        return to_dict(config)
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=_no_json))  # a deep copy of plain data
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        path = pathlib.Path(text)
        if path.suffix in (".yaml", ".yml") or path.is_file() or os.sep in text:
            return load_yaml_with_base(path)
        preset = _config_dir() / f"{text}.yaml"
        if not preset.is_file():
            raise ValueError(f"config: {text!r} is neither a YAML file nor a preset; presets: {available_configs()} "
                             f"(configs/<name>.yaml), or pass a path, a dict or a RunConfig")
        return load_yaml_with_base(preset)
    raise TypeError(f"config: expected a preset name (str), a YAML path, a dict or a RunConfig, received "
                    f"{_type_name(config)} ({config!r})")


def _no_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        from gears_dist.config import to_dict

        return to_dict(value)
    raise TypeError(f"config: cannot use a value of type {_type_name(value)} ({value!r}); expected plain data "
                    f"(numbers, strings, lists, dicts)")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _section_class(tp: Any) -> type | None:
    """The dataclass a field's type names (through Optional), None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _is_mapping_type(tp: Any) -> bool:
    return typing.get_origin(tp) is dict or tp is dict or any(_is_mapping_type(a) for a in typing.get_args(tp))


def _leaf_fields(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _field_types(cls).items():
        sub = _section_class(tp)
        out += _leaf_fields(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def _check_override(dotted: str, root: type | None = None) -> Any:
    """Raise ConfigError naming `dotted` when it is not a field of `root` (default RunConfig; free-form dict
    fields, such as deepspeed.extra, accept any key below them). Returns the field's type (None below a
    free-form dict)."""
    from gears_dist.config import ConfigError
    from gears_dist.train.config import RunConfig

    root = root or RunConfig
    parts = dotted.split(".")
    cls: type | None = root
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if cls is None:
            raise ConfigError(f"override {dotted!r}: {here!r} is a value, not a section; it has no field {part!r}")
        fields = _field_types(cls)
        if part not in fields:
            leaves = _leaf_fields(root)
            close = [p for p in leaves if p.rsplit(".", 1)[-1] == parts[-1]]
            close = close or difflib.get_close_matches(dotted, leaves, n=3)
            hint = (" did you mean " + " or ".join(f"{c!r} (keyword {c.replace('.', '__')})" for c in close) + "?"
                    if close else "")
            where = f"section {here!r}" if here else ("the run config" if root is RunConfig else
                                                          f"the {root.__name__}")
            raise ConfigError(f"unknown config field {dotted!r}: {where} has no field {part!r}; known fields there: "
                              f"{sorted(fields)}.{hint}")
        tp = fields[part]
        if _is_mapping_type(tp):
            return None if i < len(parts) - 1 else tp  # a free-form mapping: any key below it
        cls = _section_class(tp)
    return tp


def _is_section(tp: Any) -> bool:
    """A field holding a config section (a dataclass), not a plain value or a free-form mapping."""
    return tp is not None and not _is_mapping_type(tp) and _section_class(tp) is not None


def _nested(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def resolve_config(config: Any = "demo", overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> RunConfig:
    """The validated `RunConfig` that `train` would use.

    Parameters
    ----------
    config : str, os.PathLike, dict or RunConfig
        A preset name (``configs/<name>.yaml``, see `available_configs`), a YAML path, a mapping like the YAML,
        or a RunConfig (not modified).
    overrides : dict, optional
        Dotted field names to values, e.g. ``{"train.epochs": 2, "model.prior": "go"}``.
    **kwargs
        The same with ``__`` for the dots (``train__epochs=2``); applied after `overrides`.

    Raises
    ------
    gears_dist.config.ConfigError
        (a ValueError) An unknown field (named, with the likely intended one) or a value of the wrong type.
    TypeError
        `config` or `overrides` of the wrong type.
    """
    from gears_dist.config import deep_merge
    from gears_dist.train.config import run_config_from_dict

    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides: expected a dict of dotted field names to values (e.g. {{'train.epochs': 2}}), "
                        f"received {_type_name(overrides)} ({overrides!r})")
    data = _config_data(config)
    pairs = [*(overrides or {}).items(), *((k.replace("__", "."), v) for k, v in kwargs.items())]
    for dotted, value in pairs:
        if not isinstance(dotted, str) or not dotted:
            raise TypeError(f"overrides: expected field names as strings, received {dotted!r}")
        _check_override(dotted)
        data = deep_merge(data, _nested(dotted, value))
    return run_config_from_dict(data)


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------
def _default_out(name: str) -> pathlib.Path:
    base = pathlib.Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def _holds_run(run_dir: pathlib.Path, name: str) -> bool:
    return any(p.exists() for p in (run_dir / "summary.json", run_dir / "checkpoints", run_dir / "ray" / name))


def train(store: PathLike | Store, config: Any = "demo", *, out: PathLike | None = None,
          num_workers: int | None = None, address: str | None = None, use_ray: bool | None = None,
          resume: bool = False, overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> Run:
    """Train GEARS on a store: the same run as ``gears-dist train``.

    Parameters
    ----------
    store : str, os.PathLike or Store
        A store from `ingest`. The split and graphs the config names are built into it when missing.
    config : str, os.PathLike, dict or RunConfig
        A preset name (``"demo"``: ``configs/demo.yaml``), a YAML path, a mapping like the YAML, or a RunConfig.
    out : str or os.PathLike, optional
        Run directory (default: ``runs/<config name>-<YYYYmmdd-HHMMSS>`` under the working directory). It must
        not hold a run already, unless `resume`.
    num_workers : int, optional
        Workers (overrides ``scaling.num_workers``).
    address : str, optional
        Ray cluster address (default: ``$RAY_ADDRESS``, else a local Ray).
    use_ray : bool, optional
        None (default): train in this process, without Ray, when there is one worker and no cluster address
        (argument or ``$RAY_ADDRESS``); otherwise with Ray Train. True: always Ray. False: never (one worker
        only). Both write the same run directory (``model/``, ``summary.json``, ``config.json``, MLflow).
    resume : bool
        Continue the run in `out` from its newest checkpoint.
    overrides : dict, optional
        Dotted field names to values, e.g. ``{"train.epochs": 2}``.
    **kwargs
        Overrides with ``__`` for the dots, e.g. ``train__epochs=2, model__prior="go"``.

    Returns
    -------
    Run

    Raises
    ------
    gears_dist.config.ConfigError
        (a ValueError) An unknown config field (named) or a bad value.
    TypeError
        Arguments of the wrong type.
    ValueError
        `out` already holds a run (and not `resume`), or Ray was refused where it is needed.

    Notes
    -----
    In-process training initializes a one-process ``torch.distributed`` group (gloo on CPU) that stays for the
    life of the Python process, and sets ``DS_ACCELERATOR`` when it is unset. A local Ray started for a run
    stays up for the next one; stop it with ``ray.shutdown()``.
    """
    from gears_dist.config import to_dict

    store_path = open_store(store).path  # a bad store fails here, before a run directory exists
    if num_workers is not None:
        overrides = {**(overrides or {}), "scaling.num_workers": num_workers}
    cfg = resolve_config(config, overrides, **kwargs)
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address: expected a Ray address (str) or None, received {address!r}")
    if use_ray not in (None, True, False):
        raise TypeError(f"use_ray: expected True, False or None (automatic), received {use_ray!r}")
    cluster = address or os.environ.get("RAY_ADDRESS") or None
    if use_ray is None:
        use_ray = cfg.scaling.num_workers > 1 or cluster is not None
    elif not use_ray and (cfg.scaling.num_workers > 1 or address):
        raise ValueError(f"use_ray=False trains one worker in this process; received num_workers "
                         f"{cfg.scaling.num_workers} and address {address!r}: drop use_ray=False")
    run_dir = _as_path(out, "out") if out is not None else _default_out(cfg.name)
    if resume and not _holds_run(run_dir, cfg.name):
        raise ValueError(f"resume: {str(run_dir)!r} holds no run {cfg.name!r} to continue; drop resume=True")
    if not resume and _holds_run(run_dir, cfg.name):
        raise ValueError(f"out: {str(run_dir)!r} already holds a run; pass resume=True to continue it, or "
                         f"another out")

    if use_ray:
        from gears_dist.distributed.launcher import train_with_ray

        train_with_ray(cfg, store_path, run_dir, address=address, resume=resume)
    else:
        import torch

        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available()
                              else "cpu")
        from gears_dist.distributed.launcher import warn_if_bf16_emulated
        from gears_dist.train.loop import run_single

        warn_if_bf16_emulated(cfg)  # with Ray, rank 0 warns on its own machine
        try:
            run_single(cfg, store_path, run_dir)
        finally:
            if run_dir.is_dir():  # what train_with_ray writes for every run
                (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    return Run(run_dir)


# ----------------------------------------------------------------------------------------------------
# hyperparameter search
# ----------------------------------------------------------------------------------------------------
def available_searches() -> list[str]:
    """Names of the search presets (``configs/tune_<name>.yaml``)."""
    d = _config_dir()
    return sorted(p.stem for p in d.glob("tune_*.yaml")) if d.is_dir() else []


def _search_data(search_config: Any) -> tuple[dict, str | None]:
    """Plain data of a search config and the directory its relative ``base`` is resolved against."""
    from gears_dist.config import load_yaml, to_dict
    from gears_dist.tune.config import TuneConfig

    if isinstance(search_config, TuneConfig):
        data = to_dict(search_config)
        return {k: v for k, v in data.items() if k != "source_dir"}, search_config.source_dir
    if isinstance(search_config, Mapping):
        data = json.loads(json.dumps(dict(search_config), default=_no_json))  # a deep copy; a RunConfig base -> dict
        return data, data.pop("source_dir", None)
    if isinstance(search_config, (str, os.PathLike)):
        text = os.fspath(search_config)
        path = pathlib.Path(text)
        if not (path.suffix in (".yaml", ".yml") or path.is_file() or os.sep in text):
            names = [text] if text.startswith("tune_") else [f"tune_{text}", text]
            found = [_config_dir() / f"{n}.yaml" for n in names if n.startswith("tune_")]
            found = [f for f in found if f.is_file()]
            if not found:
                raise ValueError(f"search_config: {text!r} is neither a YAML file nor a search preset; presets: "
                                 f"{available_searches()} (configs/tune_<name>.yaml), or pass a path, a dict or a "
                                 f"TuneConfig")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"search_config: {str(path)!r} does not exist")
        data = load_yaml(path)
        if "source_dir" in data:
            from gears_dist.config import ConfigError

            raise ConfigError("source_dir: set by the loader (the YAML file's directory); remove it from the file")
        return data, str(path.resolve().parent)
    raise TypeError(f"search_config: expected a search preset name, a YAML path, a dict or a TuneConfig, received "
                    f"{_type_name(search_config)} ({search_config!r})")


def _assign(data: dict, dotted: str, value: Any, merge: bool) -> dict:
    """`data` with the field at `dotted` set to `value` (merged into it when `merge` and both are mappings)."""
    from gears_dist.config import deep_merge

    parts = dotted.split(".")
    out = dict(data)
    here = out
    for i, part in enumerate(parts[:-1]):
        below = here.get(part)
        if below is not None and not isinstance(below, Mapping):
            from gears_dist.config import ConfigError

            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {dotted!r}: {where!r} is {below!r}, not a section; set {where!r} itself")
        here[part] = dict(below or {})
        here = here[part]
    last = parts[-1]
    if merge and isinstance(value, Mapping) and isinstance(here.get(last), Mapping):
        here[last] = deep_merge(dict(here[last]), dict(value))
    else:
        here[last] = value
    return out


def resolve_search_config(search_config: Any, **overrides: Any) -> TuneConfig:
    """The validated `gears_dist.tune.config.TuneConfig` that `tune` would run.

    Parameters
    ----------
    search_config : str, os.PathLike, dict or TuneConfig
        A search preset name (``"tune_demo"`` or ``"demo"``: ``configs/tune_demo.yaml``, see
        `available_searches`), a YAML path (its relative ``base`` is resolved against the file's directory),
        a mapping like the YAML (``base`` may be a training config dict or RunConfig; a relative base path is
        resolved against the working directory), or a TuneConfig (not modified).
    **overrides
        Fields of the search config, ``__`` for the dots: ``num_trials=2``, ``scheduler__max_epochs=2``,
        ``resources__num_workers=2``, ``overrides={"train": {"log_every": 1000}}``. A keyword replaces the
        field's value (``space={...}`` is the whole space), except that a dict given for a section
        (``scheduler``, ``resources``, ``tracking``) is merged into it.

    Raises
    ------
    gears_dist.config.ConfigError
        (a ValueError) An unknown field (named) or a bad value, including values of the training config the
        space would produce (checked at load, as ``gears-dist tune`` does).
    TypeError
        `search_config` of the wrong type.
    """
    from gears_dist.tune.config import TuneConfig, tune_config_from_dict

    data, source_dir = _search_data(search_config)
    if not overrides and isinstance(search_config, TuneConfig):
        return search_config
    for key, value in overrides.items():
        dotted = key.replace("__", ".")
        if dotted == "source_dir":
            raise TypeError("source_dir: set from where the search config was read; not an override")
        tp = _check_override(dotted, TuneConfig)
        data = _assign(data, dotted, value, merge=_is_section(tp))
    return tune_config_from_dict(data, source_dir=source_dir)


def tune(store: PathLike | DataStore, search_config: Any = "tune_demo", *, out: PathLike | None = None,
         address: str | None = None, resume: bool = False, **overrides: Any) -> TuneResult:
    """Hyperparameter search: the same search as ``gears-dist tune``.

    Ray Tune (ASHA early stopping, Optuna TPE or random search) over full training runs (Ray Train +
    DeepSpeed, one run per trial), each trial an MLflow child run of one parent run per search.

    Parameters
    ----------
    store : str, os.PathLike or Store
        A store from `ingest`. The splits and graphs the trials read are built into it before the first trial.
    search_config : str, os.PathLike, dict or TuneConfig
        A search preset name (``"tune_demo"``: ``configs/tune_demo.yaml``), a YAML path, a mapping like the
        YAML or a TuneConfig; see `resolve_search_config`.
    out : str or os.PathLike, optional
        Search directory (default: ``runs/<search name>`` under the working directory, as the command line).
        It must not hold a search already, unless `resume`.
    address : str, optional
        Ray cluster address (default: ``$RAY_ADDRESS``, else a local Ray, which stays up after the search; stop
        it with ``ray.shutdown()``).
    resume : bool
        Continue the interrupted search in `out` (``Tuner.restore``).
    **overrides
        Search config fields to change, ``__`` for the dots, e.g. ``num_trials=4, scheduler__max_epochs=2``
        (see `resolve_search_config`).

    Returns
    -------
    TuneResult
        The search directory: ``trials`` (a DataFrame, ranked best first), ``best`` (the best trial, its value,
        parameters and config), ``best_config`` (its RunConfig, for `train`), ``summary``.

    Raises
    ------
    gears_dist.config.ConfigError
        (a ValueError) An unknown search config field (named) or a bad value.
    gears_dist.data.store.StoreError
        (a ValueError) `store` is not a store.
    ValueError
        `out` already holds a search (and not `resume`), or `resume` without a search to continue.
    TypeError
        Arguments of the wrong type.

    Notes
    -----
    Tune prints its progress and the ranked table at the end, as on the command line. A failed trial is
    recorded as failed (``status`` ``"failed"``, ``error``) and the search goes on.
    """
    from gears_dist.tune.search import run_search

    store_path = open_store(store).path  # a bad store fails here, before a search directory exists
    tcfg = resolve_search_config(search_config, **overrides)
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address: expected a Ray address (str) or None, received {address!r}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume: expected True or False, received {resume!r}")
    out_dir = _as_path(out, "out") if out is not None else pathlib.Path("runs") / tcfg.name
    run_search(tcfg, store_path, out_dir, address=address, resume=resume)
    return TuneResult(out_dir)


class TuneResult:
    """A hyperparameter search directory (`tune` / ``gears-dist tune --out``): its trials, ranked, and the best.

    Parameters
    ----------
    path : str or os.PathLike
        The search directory (it holds ``summary.json`` once the search has ended or was interrupted).

    Attributes
    ----------
    path : pathlib.Path
    """

    def __init__(self, path: PathLike):
        self.path = _as_path(path, "path")
        if not (self.path / "summary.json").is_file():
            raise ValueError(f"{str(self.path)!r} holds no finished search (no summary.json, written by gd.tune or "
                             f"gears-dist tune when the search ends)")

    def __repr__(self) -> str:
        s = self.summary
        best = s.get("best") or {}
        return (f"TuneResult({str(self.path)!r}, trials={s.get('num_trials')}, metric={s.get('metric')!r}, "
                f"best_trial={best.get('trial_id')!r}, best_value={best.get('value')!r}"
                + (", interrupted=True" if self.interrupted else "") + ")")

    @property
    def summary(self) -> dict:
        """summary.json: ``name``, ``metric``, ``mode``, ``max_epochs``, ``trials`` (ranked), ``best``,
        ``parent_run_id``, ``tracking_uri``, ``experiment_id``."""
        return json.loads((self.path / "summary.json").read_text())

    @property
    def trials(self) -> pandas.DataFrame:
        """One row per trial, ranked best first (index ``rank``): ``trial_id``, ``status`` (completed,
        early_stopped, failed, interrupted), ``epochs``, ``best`` and ``best_epoch`` (the metric's best value
        and its epoch), ``last``, ``error``, ``checkpoint``, and one column per searched parameter (its dotted
        name, e.g. ``optim.lr``)."""
        import pandas as pd

        rows = [{**{k: v for k, v in r.items() if k != "params"}, **(r.get("params") or {})}
                for r in self.summary.get("trials", [])]
        df = pd.DataFrame(rows)
        return df.set_index("rank") if "rank" in df.columns else df

    @property
    def best(self) -> dict | None:
        """The best trial (best/best.json): ``trial_id``, ``value``, ``epoch``, ``params``, ``config`` (its
        training YAML), ``trial_dir``, ``model`` or ``checkpoint``, ``mlflow_run_id``; None when no trial
        reported a finite metric (or the search was interrupted)."""
        return self.summary.get("best")

    @property
    def best_config(self) -> RunConfig | None:
        """The best trial's training config (best/config.yaml): train it on more data or longer with
        ``gd.train(store, search.best_config, ...)``."""
        best = self.best
        return None if not best else resolve_config(pathlib.Path(best["config"]))

    @property
    def interrupted(self) -> bool:
        """The search was stopped before all its trials ended; continue it with ``gd.tune(..., resume=True)``."""
        s = self.summary
        return bool(s.get("interrupted")) or any(r.get("status") == "interrupted" for r in s.get("trials", []))

    @property
    def mlflow_parent_run_id(self) -> str | None:
        """The search's MLflow parent run (each trial is a child run of it)."""
        return self.summary.get("parent_run_id")

    @property
    def mlflow_tracking_uri(self) -> str | None:
        return self.summary.get("tracking_uri")

    def best_run(self) -> Run:
        """The best trial's training run directory as a `Run` (``predict``, ``evaluate``, ``history``)."""
        best = self.best
        if not best:
            raise ValueError(f"search {str(self.path)!r} has no best trial (no trial reported a finite metric)")
        return Run(best["trial_dir"])


# ----------------------------------------------------------------------------------------------------
# a trained run
# ----------------------------------------------------------------------------------------------------
class Run:
    """A training run directory: its config, summary, history, MLflow run, and the trained model.

    Parameters
    ----------
    path : str or os.PathLike
        The run directory (``out`` of `train` / ``gears-dist train``).
    store : str or os.PathLike, optional
        The training store, when it moved since training (default: the path the model recorded).
    device : str
        Torch device for predictions (``"cpu"``, ``"cuda"``).

    Attributes
    ----------
    path : pathlib.Path
    """

    def __init__(self, path: PathLike, *, store: PathLike | None = None, device: str = "cpu"):
        self.path = _as_path(path, "path")
        if not self.path.is_dir():
            raise FileNotFoundError(f"run directory {str(self.path)!r} does not exist")
        if not any((self.path / f).exists() for f in ("summary.json", "model", "checkpoints", "config.json")):
            raise ValueError(f"{str(self.path)!r} is not a gears_dist run directory: expected summary.json, model/ "
                             f"or checkpoints/ (written by gd.train or gears-dist train)")
        self._store = None if store is None else _as_path(store, "store")
        self._device = device
        self._predictor: TrainedPredictor | None = None

    def __repr__(self) -> str:
        s = self._summary_or_empty()
        best = s.get("best") or {}
        return (f"Run({str(self.path)!r}, epochs={len(s.get('history', []))}, best_epoch={best.get('epoch')}, "
                f"mlflow_run_id={s.get('mlflow_run_id')!r})")

    # -- records -------------------------------------------------------------------------------
    def _summary_or_empty(self) -> dict:
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    @property
    def summary(self) -> dict:
        """summary.json: ``best``, ``final`` (val/test metrics per category), ``history``, ``mlflow_run_id``,
        ``split``, ``world_size``. FileNotFoundError while the run has not finished."""
        p = self.path / "summary.json"
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} does not exist: the run has not finished (or it was interrupted; "
                                    f"continue it with gd.train(..., out={str(self.path)!r}, resume=True))")
        return json.loads(p.read_text())

    @property
    def config(self) -> RunConfig:
        """The run's `RunConfig` (config.json, else the model's or the newest checkpoint's record)."""
        from gears_dist.train.config import run_config_from_dict

        p = self.path / "config.json"
        if p.is_file():
            return run_config_from_dict(json.loads(p.read_text()))
        return run_config_from_dict(self.predictor().meta["config"])

    @property
    def history(self) -> pandas.DataFrame:
        """Per-epoch metrics (train_loss, val_mse, val_mse_de, val_pearson_delta, lr, cells_per_s, ...), one row
        per epoch, indexed by epoch."""
        import pandas as pd

        df = pd.DataFrame(self.summary.get("history", []))
        if "epoch" in df.columns:
            df["epoch"] = df["epoch"].astype(int)
            df = df.set_index("epoch")
        return df

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run the training logged to (None when tracking was off)."""
        return self._summary_or_empty().get("mlflow_run_id")

    @property
    def mlflow_tracking_uri(self) -> str | None:
        """Where that MLflow run lives: the config's ``tracking.uri``, else the run's own ``mlflow.db``, else
        ``$MLFLOW_TRACKING_URI``."""
        uri = self.config.tracking.uri
        db = self.path / "mlflow.db"
        return uri or (f"sqlite:///{db.resolve()}" if db.is_file() else os.environ.get("MLFLOW_TRACKING_URI"))

    # -- the model ------------------------------------------------------------------------------
    def predictor(self) -> TrainedPredictor:
        """The trained model (`gears_dist.evaluate.predict.TrainedPredictor`), loaded once."""
        if self._predictor is None:
            from gears_dist.evaluate.predict import TrainedPredictor

            self._predictor = TrainedPredictor.load(self.path, store=self._store, device=self._device)
        return self._predictor

    def predict(self, perturbations: str | Sequence[str | Sequence[str]], *, uncertainty: bool = False
                ) -> anndata.AnnData:
        """Predicted expression for perturbation sets.

        Parameters
        ----------
        perturbations : str or list
            Sets such as ``"KLF1"``, ``"KLF1+MAP2K6"`` (also ``"A,B"``), or tuples of genes; one string is one set.
            Any gene of the model's GO graph can be perturbed; old symbols are mapped through the alias table.
        uncertainty : bool
            Also return the uncertainty head's log-variance (``layers['logvar']``; models trained with
            ``model.uncertainty: true``).

        Returns
        -------
        anndata.AnnData
            One row per set (obs index: canonical set name such as ``'A+B'``; columns ``perturbation``,
            ``genes``, ``num_genes``), one column per measured gene. ``X``: predicted mean expression
            (log1p-normalized, control mean + predicted change); ``layers['delta']``: the change over the control
            mean; ``uns['gears_dist']``: run, model and store information. The layout of
            ``gears-dist predict --out FILE.h5ad``.

        Raises
        ------
        ValueError
            A gene that is not a node of the model's GO graph (every unknown gene named), an empty set or a
            repeated gene.
        TypeError
            `perturbations` of the wrong type.
        """
        from gears_dist.evaluate.predict import predictions_anndata

        if isinstance(perturbations, str):
            perturbations = [perturbations]
        if not isinstance(perturbations, Iterable):
            raise TypeError(f"perturbations: expected a set name ('A+B') or a list of them, received "
                            f"{_type_name(perturbations)} ({perturbations!r})")
        items = list(perturbations)
        if not items:
            raise ValueError("perturbations: expected at least one set such as 'A' or 'A+B', received none")
        for s in items:
            if not isinstance(s, str) and not (isinstance(s, Sequence) and all(isinstance(g, str) for g in s)):
                raise TypeError(f"perturbations: each set must be a string ('A+B') or a sequence of gene names, "
                                f"received {s!r}")
        model = self.predictor()
        sets = model.check_sets(items)  # ValueError naming every unknown gene
        mean, delta, logvar = model.predict_mean(sets, return_logvar=uncertainty)
        return predictions_anndata(sets, mean, delta, model.genes, logvar, self._info(model))

    def predict_pairs(self, genes: Sequence[str], *, uncertainty: bool = False) -> anndata.AnnData:
        """`predict` for every pair of `genes` (n(n-1)/2 sets, ``'A+B'`` with A < B)."""
        from gears_dist.evaluate.predict import all_pairs

        if isinstance(genes, str) or not isinstance(genes, Iterable):
            raise TypeError(f"genes: expected a list of gene names, received {_type_name(genes)} ({genes!r})")
        return self.predict(all_pairs(list(genes)), uncertainty=uncertainty)

    def _info(self, model: TrainedPredictor) -> dict:
        """Run and model information for ``uns`` (strings and numbers only: writable to .h5ad)."""
        meta = model.meta
        s = self._summary_or_empty()
        best = meta.get("best") or s.get("best") or {}
        info = {"run": str(self.path.resolve()), "store": str(model.store.path), "split": meta.get("split"),
                "config_name": (meta.get("config") or {}).get("name"),
                "config": json.dumps(meta.get("config") or {}, sort_keys=True),
                "mlflow_run_id": s.get("mlflow_run_id"), "best_epoch": best.get("epoch"),
                "best_val_mse_de": best.get("score"), "go_graph": (meta.get("graph_keys") or {}).get("go"),
                "prior": ((meta.get("config") or {}).get("model") or {}).get("prior")}
        return {k: v for k, v in info.items() if v is not None}

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, conditions: str = "test", baselines: str | Sequence[str] | None = None
                 ) -> pandas.DataFrame:
        """Metrics of the model and the baselines on the run's split, per category.

        Parameters
        ----------
        conditions : str
            ``"test"`` or ``"val"``.
        baselines : str or list of str, optional
            Baselines to report beside the model (default: all of control_mean, train_mean, additive, linear,
            go_prior; ``[]`` for none).

        Returns
        -------
        pandas.DataFrame
            One row per (predictor, category): ``predictor`` ('gears' and the baselines), ``category``
            (``all``, ``combo_seen0``, ..., ``unseen_single``), ``num_conditions``, ``coverage`` and the
            metrics (mse, mse_de, pearson_delta, ...). The table ``gears-dist evaluate`` prints and writes to
            metrics.csv.
        """
        from gears_dist.data.splits import load_split
        from gears_dist.evaluate.baselines import BASELINES
        from gears_dist.evaluate.pipeline import evaluate_split

        names = list(BASELINES) if baselines is None else _as_list(baselines, "baselines")
        model = self.predictor()
        split = load_split(model.store, model.meta["split"])
        ev = evaluate_split(model.store, split, {"gears": model}, baselines=names, conditions=conditions,
                            go=model.go_graph)
        return ev.table


def load_run(path: PathLike, *, store: PathLike | None = None, device: str = "cpu") -> Run:
    """Open a finished (or interrupted) run directory; see `Run`."""
    return Run(path, store=store, device=device)
