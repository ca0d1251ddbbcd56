"""The gears_dist Zarr store: layout, opening with validation, and atomic writes.

Layout (Zarr v3 directory store; everything below is written by ``gears-dist ingest`` unless noted)::

    STORE.zarr/
      manifest.json            written last; its presence is what makes a store valid
      truth.json               only in stores written by ``gears-dist simulate --format store``: the
                               ground truth of the synthetic screen (spec; per double: genes, interaction
                               type, magnitude, c_a, c_b, neomorphic_ratio); manifest["truth"] names it
      X                        float32 (num_cells, num_genes), chunked by cells (whole gene rows),
                               compressed; log1p-normalized expression. Cells are grouped by
                               condition, conditions in the order of conditions/ (a pluggable order).
      obs/condition            int32 (num_cells,) index into conditions/
          is_control           bool (num_cells,)
          cell_type            int32 (num_cells,) index into attrs["cell_types"] (0 if none given)
          batch                int32 (num_cells,) index into attrs["batches"] (0 if none given)
          cell_id              str  (num_cells,) the source obs_names
          source_row           int64 (num_cells,) row in the source file
      conditions/name          str (C,) canonical names ('ctrl', 'A', 'A+B'; genes sorted)
                 genes         str (C,) same genes joined by '+' ('' for ctrl)
                 num_genes     int32 (C,) size of the perturbation set
                 num_cells     int64 (C,)
                 start, stop   int64 (C,) the cells of condition c are X[start[c]:stop[c]]
                 is_control    bool (C,)
                 cell_type     int32 (C,) the cell type (attrs["cell_types"]) holding most of its cells
                 num_cell_types int32 (C,) how many cell types its cells span (1 for most screens)
      genes/symbol             str (G,) current symbols (aliases resolved)
           source_name         str (G,) as in the source file
           is_perturbed        bool (G,) some condition perturbs this gene
           has_go              bool (G,) the symbol has GO annotations (genes.go_annotations)
           highly_variable     bool (G,) selected by --hvg (all False when all genes are kept)
           source_index        int64 (G,) column in the source file
      attrs: cell_types, batches (names indexed by obs/cell_type, obs/batch), condition_order,
             normalization ('counts_normalize_log1p' or 'log1p_as_is')
      stats/control_mean       float32 (G,)
           mean, var, nonzero_frac   float32 (C, G) per condition (var: unbiased, ddof=1)
           de_score            float32 (C, G) Welch t statistic, condition vs control
           top_de              int32 (C, 20) gene indices ranked by |t| (scanpy rankby_abs)
           top_de_non_dropout  int32 (C, 20) the same restricted to non-dropout genes
                               (control row and missing entries: -1; de_score keeps scanpy's +-inf
                               where both variances are 0; details in gears_dist/data/stats.py)
      splits/<key>/            (gears-dist split)  attrs: kind, seed, sets, categories
      graphs/<key>/            (gears-dist graph)  GO graph, co-expression graph, partitions

Derived components (splits/, graphs/) are built in a temporary directory beside the store and
renamed into place, then recorded in the manifest, so a failed write never leaves a component
that looks complete and never destroys the previous one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

SCHEMA_VERSION = 1
STORE_FORMAT = "gears_dist.store"
MANIFEST = "manifest.json"
COMPONENT_KINDS = ("splits", "graphs")


class StoreError(ValueError):
    """The store is missing, incomplete, damaged or from an incompatible version."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file so that readers see either the old or the new content, never a mix."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_fingerprint(path: str | os.PathLike, block: int = 1 << 20) -> dict:
    """Cheap identity of a (possibly huge) source file: size, mtime and a hash of its first/last MiB."""
    path = pathlib.Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(block))
        if st.st_size > 2 * block:
            fh.seek(st.st_size - block)
            h.update(fh.read(block))
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": int(st.st_mtime),
            "sha256_head_tail": h.hexdigest()}


def string_array(values) -> np.ndarray:
    """Strings in the form Zarr v3 stores as variable-length UTF-8 (no fixed-width dtype warning)."""
    return np.asarray([str(v) for v in values], dtype=np.dtypes.StringDType())


def temp_sibling(path: pathlib.Path, tag: str = "tmp") -> pathlib.Path:
    """A fresh temporary path on the same filesystem as `path` (so a rename into place is atomic)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def building_store(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Build a whole store in a temporary directory and move it to `dest` only on success.

    Usage::

        with building_store("out.zarr", overwrite=args.overwrite) as tmp:
            root = zarr.open_group(tmp, mode="w")
            ... write arrays ...
            write_manifest(tmp, {...})          # last
    """
    dest = pathlib.Path(dest)
    if dest.exists() and not overwrite:
        raise StoreError(f"destination {str(dest)!r} already exists; pass --overwrite to replace it "
                         f"or choose another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest, "building")
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise AssertionError("store built without a manifest")
        if dest.exists():
            old = temp_sibling(dest, "replaced")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(store_dir: str | os.PathLike, content: dict) -> dict:
    manifest = {"format": STORE_FORMAT, "schema_version": SCHEMA_VERSION,
                "created_unix": int(time.time()), "components": {}, **content}
    atomic_write_text(pathlib.Path(store_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


class Store:
    """A validated, opened gears_dist store. Cheap to open: arrays are read lazily."""

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise StoreError(f"store {str(self.path)!r} does not exist; create it with "
                             f"'gears-dist ingest INPUT.h5ad {self.path}'")
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{str(self.path)!r} is not a complete gears_dist store (no {MANIFEST}); it may be "
                             f"an interrupted ingest: re-run 'gears-dist ingest ... --overwrite'")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{str(mpath)!r} is not valid JSON ({exc}); re-run the ingest with --overwrite") from None
        if self.manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{str(self.path)!r}: manifest format is {self.manifest.get('format')!r}, "
                             f"expected {STORE_FORMAT!r}")
        version = self.manifest.get("schema_version")
        if not isinstance(version, int):
            raise StoreError(f"{str(mpath)!r}: schema_version missing or not an integer ({version!r})")
        if version > SCHEMA_VERSION:
            raise StoreError(f"store {str(self.path)!r} has schema version {version}, newer than this gears_dist "
                             f"reads (<= {SCHEMA_VERSION}); upgrade gears_dist")
        if version < SCHEMA_VERSION:
            raise StoreError(f"store {str(self.path)!r} has old schema version {version} (this gears_dist writes "
                             f"{SCHEMA_VERSION}); re-ingest it with 'gears-dist ingest --overwrite'")
        self.mode = mode
        self.root = zarr.open_group(self.path, mode="r" if mode == "r" else "r+")
        self._check_shapes()

    def _check_shapes(self) -> None:
        counts = self.manifest.get("counts", {})
        x = self.root["X"]
        expect = (counts.get("num_cells"), counts.get("num_genes"))
        if tuple(x.shape) != expect:
            raise StoreError(f"store {str(self.path)!r}: X has shape {tuple(x.shape)} but the manifest says "
                             f"{expect}; the store is damaged: re-run the ingest with --overwrite")
        nc = counts.get("num_conditions")
        if nc is not None and self.root["conditions/name"].shape[0] != nc:
            raise StoreError(f"store {str(self.path)!r}: conditions table has {self.root['conditions/name'].shape[0]} "
                             f"rows, manifest says {nc}; re-run the ingest with --overwrite")

    # -- shapes and tables ---------------------------------------------------------------------
    @property
    def X(self) -> zarr.Array:
        return self.root["X"]

    @property
    def num_cells(self) -> int:
        return int(self.X.shape[0])

    @property
    def num_genes(self) -> int:
        return int(self.X.shape[1])

    @property
    def chunk_cells(self) -> int:
        return int(self.X.chunks[0])

    def array(self, key: str) -> np.ndarray:
        """Read a whole (small) array, e.g. ``store.array('conditions/start')``."""
        return self.root[key][...]

    @property
    def genes(self) -> list[str]:
        return [str(s) for s in self.array("genes/symbol")]

    @property
    def condition_names(self) -> list[str]:
        return [str(s) for s in self.array("conditions/name")]

    def condition_genes(self) -> list[tuple[str, ...]]:
        return [tuple(s.split("+")) if s else () for s in map(str, self.array("conditions/genes"))]

    def conditions(self):
        """The conditions table as a pandas DataFrame indexed by condition index."""
        import pandas as pd

        cols = ["name", "genes", "num_genes", "num_cells", "start", "stop", "is_control"]
        df = pd.DataFrame({c: self.array(f"conditions/{c}") for c in cols})
        for c in ("name", "genes"):
            df[c] = df[c].astype(str)
        return df

    # -- derived components ----------------------------------------------------------------------
    def components(self, kind: str) -> dict[str, dict]:
        """Recorded components of a kind: {key: attrs recorded in the manifest}."""
        self._check_kind(kind)
        return dict(self.manifest.get("components", {}).get(kind, {}))

    def has_component(self, kind: str, key: str) -> bool:
        return key in self.components(kind)

    def component(self, kind: str, key: str) -> zarr.Group:
        self._check_kind(kind)
        if not self.has_component(kind, key):
            have = sorted(self.components(kind))
            raise StoreError(f"store {str(self.path)!r} has no {kind[:-1]} {key!r} (has: {have}); "
                             f"build it with 'gears-dist {kind[:-1]} {self.path} ...'")
        return zarr.open_group(self.path / kind / key, mode="r")

    @contextlib.contextmanager
    def write_component(self, kind: str, key: str, attrs: dict | None = None,
                        overwrite: bool = False) -> Iterator[zarr.Group]:
        """Write a derived component atomically; yields a fresh zarr group to fill.

        The group is built beside the store and renamed to STORE/<kind>/<key> on success; the
        manifest records it last. An exception inside the block leaves the store as it was.
        """
        self._check_kind(kind)
        if "/" in key or key.startswith(".") or not key:
            raise ValueError(f"component key {key!r}: expected a plain name without '/' or a leading '.'")
        if self.has_component(kind, key) and not overwrite:
            raise StoreError(f"store already has {kind[:-1]} {key!r}; pass --overwrite to rebuild it")
        dest = self.path / kind / key
        tmp = temp_sibling(self.path, f"{kind}-{key}")
        group = zarr.open_group(tmp, mode="w")
        if attrs:
            group.attrs.update(attrs)
        try:
            yield group
            parent = self.path / kind
            if not (parent / "zarr.json").exists():
                zarr.open_group(self.path, mode="r+").require_group(kind)
            if dest.exists():
                old = temp_sibling(self.path, "replaced")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        record = json.loads(json.dumps(dict(zarr.open_group(dest, mode="r").attrs)))
        self.manifest.setdefault("components", {}).setdefault(kind, {})[key] = record
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2, sort_keys=True))

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in COMPONENT_KINDS:
            raise ValueError(f"component kind {kind!r}: expected one of {list(COMPONENT_KINDS)}")


def open_store(path: str | os.PathLike, mode: str = "r") -> Store:
    return Store(path, mode)
