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

Writing: the functions under "writing the layout" below (`create_x`, `create_obs`, `write_obs`,
`write_conditions_table`, `write_genes_table`, `write_root_attrs`, `x_manifest`) are the one writer of this
layout; ``gears-dist ingest`` and ``gears-dist simulate --format store`` both build their stores with them.

Derived components (splits/, graphs/) are built in a temporary directory beside the store and
renamed into place, then recorded in the manifest, so a failed write never leaves a component
that looks complete and never destroys the previous one.

Reading: every read of X and of the per-cell arrays goes through `read_checked` (or the `Store`
methods built on it: `read`, `read_x_rows`, `read_x_cells`, `array`), which turns a chunk that
Zarr's codecs cannot decode (truncated, zeroed, garbage) into a `StoreError` naming the store, the
array, the chunk file and its rows, and the fix. A chunk *file* that is missing reads as the fill
value (Zarr's semantics); a store's completeness is what the manifest, written last, vouches for.

Temporary build directories (``.NAME.building-XXXXXXXX`` beside the destination) come with an owner
record beside them (``.NAME.building-XXXXXXXX.owner.json``: pid, host, boot id, PID namespace,
process start time), written before the directory exists. A build killed without cleanup
(SIGKILL, power loss) leaves its directory behind; the next build of the same destination removes
those whose owner process is gone on this host, never one whose owner is alive, and warns about
the ones it cannot judge (other hosts, no owner record).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pathlib
import shutil
import socket
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from gears_dist.data.conditions import condition_name

SCHEMA_VERSION = 1
STORE_FORMAT = "gears_dist.store"
MANIFEST = "manifest.json"
COMPONENT_KINDS = ("splits", "graphs")
# Beside a temporary build directory TMP, the file TMP + OWNER_SUFFIX records who builds it. Beside, not
# inside: builders may wipe their directory (zarr.open_group(tmp, mode="w") does).
OWNER_SUFFIX = ".owner.json"
# X codec chosen by tools/bench_ingest.py (BENCHMARKS.md row "Store X codec and chunks"); obs/ chunks hold
# about OBS_CHUNK_CELLS cells, a whole number of X chunks
X_CODEC = ZstdCodec(level=1)
X_CODEC_NAME = "zstd(level=1)"
OBS_CHUNK_CELLS = 1 << 16
OBS_COLUMNS = (("condition", "int32"), ("is_control", "bool"), ("cell_type", "int32"), ("batch", "int32"),
               ("source_row", "int64"), ("cell_id", str))

# What a damaged chunk raises from Zarr's codecs: zstd/blosc RuntimeError, gzip zlib.error or
# EOFError, a short uncompressed chunk ValueError (it does not reshape), an unreadable file OSError.
CHUNK_READ_ERRORS = (RuntimeError, ValueError, OSError, EOFError, zlib.error)


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


# -- temporary directories and their owners -------------------------------------------------------
def _boot_id() -> str:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> float | None:
    """Start time of a live process (None when it is gone); NaN when it exists but cannot be inspected."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:  # includes zombies: they hold a pid but no longer build anything
        return None
    except psutil.AccessDenied:
        return float("nan")


def owner_record() -> dict:
    """Who is building a temporary directory: enough to tell later whether that process still exists."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace(), "process_start": _process_start(os.getpid()),
            "created_unix": time.time()}


def owner_file(tmp: str | os.PathLike) -> pathlib.Path:
    """Where the owner record of the temporary directory `tmp` lives (beside it)."""
    tmp = pathlib.Path(tmp)
    return tmp.with_name(tmp.name + OWNER_SUFFIX)


def owned_temp_dir(dest: str | os.PathLike, tag: str, create: bool = True) -> pathlib.Path:
    """A fresh temporary sibling of `dest` (``.NAME.TAG-XXXXXXXX``), its owner record written first
    (`create=False`: only the record; the caller makes the directory).

    When done (renamed into place or removed), call `release_temp_dir`; `remove_stale_temp_dirs(dest, tag)`
    cleans up after processes that died before they could.
    """
    tmp = temp_sibling(pathlib.Path(dest), tag)
    atomic_write_text(owner_file(tmp), json.dumps(owner_record()))
    if create:
        tmp.mkdir()
    return tmp


def release_temp_dir(tmp: str | os.PathLike) -> None:
    """Remove a temporary directory made by `owned_temp_dir` (if still there) and then its owner record."""
    tmp = pathlib.Path(tmp)
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    owner_file(tmp).unlink(missing_ok=True)


def owner_state(tmp: str | os.PathLike) -> tuple[str, dict]:
    """('gone' | 'alive' | 'elsewhere' | 'unknown', owner record) of a temporary directory.

    'gone': the owner ran on this host and no longer exists (or the host rebooted since, or its pid
    now belongs to a younger process); 'elsewhere': another host or PID namespace, which cannot be
    checked from here; 'unknown': no readable owner record (a build from before owner records, or one
    killed in the instant between creating the directory and writing the record).
    """
    try:
        rec = json.loads(owner_file(tmp).read_text())
        pid, host = int(rec["pid"]), str(rec["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown", {}
    if host != socket.gethostname() or rec.get("pid_namespace", "") != _pid_namespace():
        return "elsewhere", rec
    if rec.get("boot_id") and rec["boot_id"] != _boot_id():
        return "gone", rec
    start = _process_start(pid)
    if start is None:
        return "gone", rec
    recorded = rec.get("process_start")
    if isinstance(recorded, (int, float)) and not np.isnan(start) and abs(start - recorded) > 1.0:
        return "gone", rec  # the pid was reused by a process started later
    return "alive", rec


def remove_stale_temp_dirs(dest: str | os.PathLike, tag: str) -> list[pathlib.Path]:
    """Remove the temporary siblings ``.NAME.TAG-*`` of `dest` whose owner process is gone; returns them.

    Never touches one whose owner is alive; warns about the ones it cannot judge (another host, no
    owner record) so that the user can delete them once sure no build is running there.
    """
    dest = pathlib.Path(dest)
    if not dest.parent.is_dir():
        return []
    prefix = f".{dest.name}.{tag}-"
    found = set()
    for entry in dest.parent.iterdir():
        if entry.name.startswith(prefix) and not entry.is_symlink():
            if entry.name.endswith(OWNER_SUFFIX) and entry.is_file():
                found.add(entry.name[:-len(OWNER_SUFFIX)])
            elif entry.is_dir():
                found.add(entry.name)
    removed, alive, unjudged = [], [], []
    for name in sorted(found):
        tmp = dest.parent / name
        state, rec = owner_state(tmp)
        if state == "gone":
            release_temp_dir(tmp)
            removed.append(tmp)
        elif state == "alive":
            alive.append(f"{name} (pid {rec['pid']})")
        else:
            where = f"host {rec.get('host')!r}, pid {rec.get('pid')}" if rec else "no owner record"
            unjudged.append(f"{name} ({where})")
    if removed:
        import logging

        logging.getLogger("gears_dist.data").info("removed %d temporary directories of %s left by killed builds: %s",
                                                  len(removed), dest, [p.name for p in removed])
    if alive:
        warnings.warn(f"another process on this host is writing {str(dest)!r} right now ({', '.join(alive)}); "
                      f"both write their own temporary directory and the last to finish wins", stacklevel=3)
    if unjudged:
        warnings.warn(f"{len(unjudged)} temporary directories beside {str(dest)!r} may belong to builds elsewhere "
                      f"and were left alone: {', '.join(unjudged)}; delete them by hand once no build of "
                      f"{dest.name} is running there", stacklevel=3)
    return removed


def _remove_replaced_dirs(dest: pathlib.Path) -> None:
    """Old copies renamed aside by a replacement (``.NAME.replaced-*``) are garbage once `dest` is complete
    again: a replacement killed while deleting its old copy leaves one."""
    if not (dest / MANIFEST).is_file():
        return  # a replacement may be between its two renames: the old copy may be the only one
    for old in dest.parent.glob(f".{glob.escape(dest.name)}.replaced-*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building_store(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Build a whole store in a temporary directory and move it to `dest` only on success.

    Usage::

        with building_store("out.zarr", overwrite=overwrite) as tmp:
            root = zarr.open_group(tmp, mode="w")
            ... write arrays ...
            write_manifest(tmp, {...})          # last

    Temporary directories of earlier builds of `dest` whose process was killed are removed first
    (see `remove_stale_temp_dirs`).
    """
    dest = pathlib.Path(dest)
    if dest.exists() and not overwrite:
        raise StoreError(f"destination {str(dest)!r} already exists; pass --overwrite to replace it "
                         f"or choose another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(dest, "building")
    _remove_replaced_dirs(dest)
    tmp = owned_temp_dir(dest, "building")
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
    finally:
        release_temp_dir(tmp)  # on success only the owner record is left to remove


# -- checked reads ----------------------------------------------------------------------------------
def read_checked(array: zarr.Array, selection: Any = Ellipsis, *, orthogonal: bool = False) -> np.ndarray:
    """``array[selection]`` (``array.oindex[selection]`` if `orthogonal`), with a damaged chunk reported as a
    `StoreError` naming the store, the array, the chunk file and its rows, and the fix.

    The happy path costs one try block; only after a failure are the selection's chunks probed one by
    one to find the damaged one (an error that no single chunk reproduces is re-raised as it was).
    """
    try:
        return array.oindex[selection] if orthogonal else array[selection]
    except StoreError:
        raise
    except CHUNK_READ_ERRORS as exc:
        raise_if_damaged(array, selection, exc)
        raise


@contextlib.contextmanager
def reading(array: zarr.Array, selection: Any = Ellipsis) -> Iterator[None]:
    """For reads `read_checked` cannot wrap (Dask graphs over `array`): a codec error inside the block
    becomes the `StoreError` of the damaged chunk among `selection`'s rows."""
    try:
        yield
    except StoreError:
        raise
    except CHUNK_READ_ERRORS as exc:
        raise_if_damaged(array, selection, exc)
        raise


def raise_if_damaged(array: zarr.Array, selection: Any, exc: BaseException) -> None:
    """Probe the chunks under `selection`; raise `StoreError` (from `exc`) for the first that cannot be read."""
    for coords, region in _chunks_under(array, selection):
        try:
            array[region]
        except CHUNK_READ_ERRORS as probe:
            raise StoreError(_damaged_message(array, coords, region, probe)) from exc


def _first_axis(selection: Any) -> Any:
    if isinstance(selection, tuple):
        return selection[0] if selection else Ellipsis
    return selection


def _chunks_under(array: zarr.Array, selection: Any) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(chunk coordinates, region) of every chunk in the rows `selection` touches (all columns)."""
    import itertools

    shape, chunks = tuple(array.shape), tuple(array.chunks)
    if not shape:
        yield (), ()
        return
    n, c = shape[0], chunks[0]
    first = _first_axis(selection)
    rows: Any
    if isinstance(first, slice):
        start, stop, _ = first.indices(n)
        rows = range(start // c, (stop - 1) // c + 1) if stop > start else range(0)
    elif first is Ellipsis or first is None:
        rows = range(-(-n // c))
    else:
        try:
            idx = np.asarray(first).ravel()
            idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64) % max(n, 1)
            rows = np.unique(idx // c).tolist()
        except (TypeError, ValueError):
            rows = range(-(-n // c))
    others = [range(-(-s // k)) for s, k in zip(shape[1:], chunks[1:])]
    for coords in itertools.product(rows, *others):
        yield coords, tuple(slice(i * k, min((i + 1) * k, s)) for i, k, s in zip(coords, chunks, shape))


def _array_location(array: zarr.Array) -> tuple[str, str]:
    """(directory of the gears_dist store holding `array`, the array's path inside it), for messages."""
    name = array.path or ""
    root = getattr(array.store_path.store, "root", None)
    if root is None:
        return str(array.store_path), name
    full = pathlib.Path(root) / name if name else pathlib.Path(root)
    for d in [full, *full.parents][:8]:
        if (d / MANIFEST).is_file():
            return str(d), full.relative_to(d).as_posix()
    return str(root), name or full.name


def _rebuild_hint(store_dir: str, name: str) -> str:
    """The command that rebuilds what holds the damaged array."""
    kind = name.split("/", 1)[0]
    if kind in COMPONENT_KINDS:
        return f"rebuild it with 'gears-dist {kind[:-1]} {store_dir} ... --overwrite'"
    try:
        source = json.loads((pathlib.Path(store_dir) / MANIFEST).read_text()).get("source") or {}
    except (OSError, ValueError):
        source = {}
    if source.get("kind") == "synthetic":
        return "re-run the 'gears-dist simulate ... --format store' that wrote it, with --overwrite"
    src = source.get("path") or "INPUT.h5ad"
    return f"re-run 'gears-dist ingest {src} {store_dir} --overwrite'"


def _damaged_message(array: zarr.Array, coords: tuple[int, ...], region: tuple[slice, ...],
                     exc: BaseException) -> str:
    store_dir, name = _array_location(array)
    try:
        shards = getattr(array, "shards", None)
        key_coords = tuple(i * c // s for i, c, s in zip(coords, array.chunks, shards)) if shards else coords
        key = array.metadata.encode_chunk_key(key_coords)
        chunk = f"chunk {name}/{key}" if name else f"chunk {key}"
    except Exception:  # noqa: BLE001 - naming the file is a courtesy; the rows below identify the chunk
        chunk = f"a chunk of {name}"
    rows = f" (rows {region[0].start}..{region[0].stop - 1} of {name!r})" if region else ""
    return (f"store {store_dir!r}: {chunk}{rows} cannot be read ({type(exc).__name__}: {exc}); the chunk file is "
            f"truncated or corrupt, so the store is damaged: {_rebuild_hint(store_dir, name)}")


# -- writing the layout (the one writer of the arrays documented above) -----------------------------
def create_x(root: zarr.Group, num_cells: int, num_genes: int, chunk_cells: int) -> zarr.Array:
    """The empty X: float32, chunks of `chunk_cells` whole gene rows, X_CODEC; filled in row ranges."""
    return root.create_array("X", shape=(num_cells, num_genes), dtype="float32", compressors=[X_CODEC],
                             chunks=(max(1, min(chunk_cells, max(num_cells, 1))), max(num_genes, 1)), fill_value=0.0)


def x_manifest(root: zarr.Group) -> dict:
    """The manifest's "x" entry: X's chunks, codec and dtype."""
    return {"chunks": [int(v) for v in root["X"].chunks], "codec": X_CODEC_NAME, "dtype": "float32"}


def create_obs(root: zarr.Group, num_cells: int, chunk_cells: int) -> zarr.Group:
    """The empty obs/ arrays (OBS_COLUMNS), chunked by a whole number of X chunks; filled by `write_obs`."""
    obs = root.require_group("obs")
    chunk = max(1, min(num_cells, OBS_CHUNK_CELLS // chunk_cells * chunk_cells or chunk_cells))
    for name, dtype in OBS_COLUMNS:
        obs.create_array(name, shape=(num_cells,), chunks=(chunk,), dtype=dtype)
    return obs


def write_obs(root: zarr.Group, start: int, **columns: np.ndarray) -> None:
    """Rows ``start..`` of every obs/ array (keyword per OBS_COLUMNS name: condition, is_control, ...)."""
    if set(columns) != {name for name, _ in OBS_COLUMNS}:
        raise ValueError(f"write_obs: expected the columns {[n for n, _ in OBS_COLUMNS]}, received {sorted(columns)}")
    obs = root["obs"]
    for name, dtype in OBS_COLUMNS:
        values = np.asarray(columns[name])
        obs[name][start:start + len(values)] = values.astype(np.dtypes.StringDType() if dtype is str else dtype)


def _table(group: zarr.Group, name: str, values) -> None:
    values = np.asarray(values)
    if values.dtype.kind in "UOT":  # variable-length strings (fixed-width unicode has no Zarr v3 spec)
        values = values.astype(np.dtypes.StringDType())
    group.create_array(name, data=values)


def write_conditions_table(root: zarr.Group, genes: list[tuple[str, ...]], num_cells, cell_type,
                           num_cell_types) -> None:
    """conditions/: one row per perturbation set in storage order (`genes[c]`: sorted genes, () = control),
    its cell count (cells are grouped: start/stop follow), majority cell type and how many types it spans."""
    num_cells = np.asarray(num_cells, np.int64)
    stop = np.cumsum(num_cells)
    c = root.require_group("conditions")
    for name, values in (("name", np.array([condition_name(g) for g in genes], dtype=object)),
                         ("genes", np.array(["+".join(g) for g in genes], dtype=object)),
                         ("num_genes", np.array([len(g) for g in genes], np.int32)), ("num_cells", num_cells),
                         ("start", stop - num_cells), ("stop", stop),
                         ("is_control", np.array([len(g) == 0 for g in genes], bool)),
                         ("cell_type", np.asarray(cell_type, np.int32)),
                         ("num_cell_types", np.asarray(num_cell_types, np.int32))):
        _table(c, name, values)


def write_genes_table(root: zarr.Group, symbols, *, source_names, source_index, perturbed, has_go,
                      highly_variable) -> None:
    """genes/: the measured genes in X's column order; `perturbed`: the symbols some condition perturbs."""
    perturbed = set(perturbed)
    g = root.require_group("genes")
    for name, values in (("symbol", np.array(symbols, dtype=object)),
                         ("source_name", np.array(source_names, dtype=object)),
                         ("is_perturbed", np.array([s in perturbed for s in symbols], bool)),
                         ("has_go", np.asarray(has_go, bool)), ("highly_variable", np.asarray(highly_variable, bool)),
                         ("source_index", np.asarray(source_index, np.int64))):
        _table(g, name, values)


def write_root_attrs(root: zarr.Group, *, cell_types, batches, condition_order: str, normalization: str) -> None:
    """The root group's attrs: names of obs/cell_type and obs/batch codes, condition order, normalization."""
    root.attrs.update({"cell_types": list(cell_types), "batches": list(batches), "condition_order": condition_order,
                       "normalization": normalization})


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

    def __repr__(self) -> str:
        counts = self.manifest.get("counts", {})
        held = self.manifest.get("components", {})
        return (f"{type(self).__name__}({str(self.path)!r}, cells={self.num_cells:,}, genes={self.num_genes:,}, "
                f"conditions={counts.get('num_conditions', '?')}, splits={sorted(held.get('splits', {}))}, "
                f"graphs={sorted(held.get('graphs', {}))}, mode={self.mode!r})")

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
        """The raw Zarr array; read it through `read_x_rows` / `read_x_cells` (damaged chunks named)."""
        x = self.__dict__.get("_x")
        if x is None:
            x = self.__dict__["_x"] = self.root["X"]
        return x

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
        return read_checked(self.root[key])

    def read(self, key: str, selection: Any = Ellipsis, *, orthogonal: bool = False) -> np.ndarray:
        """``root[key][selection]`` (``.oindex`` if `orthogonal`); a damaged chunk raises `StoreError`."""
        return read_checked(self.X if key == "X" else self.root[key], selection, orthogonal=orthogonal)

    def read_x_rows(self, start: int, stop: int, genes: np.ndarray | None = None) -> np.ndarray:
        """X[start:stop] (optionally only the columns `genes`): cells `start..stop-1`, one contiguous read."""
        if genes is None:
            return read_checked(self.X, slice(int(start), int(stop)))
        return read_checked(self.X, (slice(int(start), int(stop)), np.asarray(genes)), orthogonal=True)

    def read_x_cells(self, rows: np.ndarray, genes: np.ndarray | None = None) -> np.ndarray:
        """X at the cells `rows` (sorted reads fastest), all genes or the columns `genes`."""
        rows = np.asarray(rows, dtype=np.int64)
        sel = (rows, slice(None) if genes is None else np.asarray(genes))
        return read_checked(self.X, sel, orthogonal=True)

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
        remove_stale_temp_dirs(self.path, f"{kind}-{key}")
        tmp = owned_temp_dir(self.path, f"{kind}-{key}")
        try:
            group = zarr.open_group(tmp, mode="w")
            if attrs:
                group.attrs.update(attrs)
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
        finally:
            release_temp_dir(tmp)  # after a success only the owner record is left to remove
        record = json.loads(json.dumps(dict(zarr.open_group(dest, mode="r").attrs)))
        self.manifest.setdefault("components", {}).setdefault(kind, {})[key] = record
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2, sort_keys=True))

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in COMPONENT_KINDS:
            raise ValueError(f"component kind {kind!r}: expected one of {list(COMPONENT_KINDS)}")


def open_store(path: str | os.PathLike, mode: str = "r") -> Store:
    return Store(path, mode)
