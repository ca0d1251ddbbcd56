"""Lazy, bounded-memory access to an AnnData ``.h5ad`` file (HDF5) for the ingest.

Nothing here loads a whole per-cell array: obs columns are read as row ranges through h5py, X is
read as row blocks (CSR through anndata's backed ``sparse_dataset``, dense through h5py slices) or,
for CSC, as column blocks (the only contiguous unit of a CSC matrix). ``var`` is small (genes) and is
read whole with anndata's ``read_elem``.

Cost of CSC: a block of *rows* of a CSC matrix touches every column, i.e. the whole file, so row
blocks would cost O(nnz) each and O(nnz x blocks) in all. The ingest therefore reads CSC by column
blocks (each entry read once) and routes every (row, column, value) to its destination through the
spill buckets -- one extra write and read of the non-zeros, plus two per-cell float64/int64 vectors
(library sizes and destination rows, 16 bytes per cell) held in memory.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

NUMERIC_KINDS = "iufb"


class H5adError(ValueError):
    """The file is not a readable h5ad; the message names the problem and the fix."""


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """HDF5's errors while reading `what` (damaged metadata, a compressed chunk that does not decode,
    data past a zero-filled tail) come out of h5py as bare OSError / RuntimeError: name the file,
    what was being read, and the fix."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise H5adError(f"cannot read {what} from {str(path)!r} ({type(exc).__name__}: {exc}): the file is "
                        f"truncated or damaged; re-export it (adata.write_h5ad) or copy it again") from exc


def _decode(values: np.ndarray) -> np.ndarray:
    """h5py returns bytes for some string datasets; make them str objects."""
    if values.dtype.kind == "S" or (values.dtype.kind == "O" and len(values) and isinstance(values[0], bytes)):
        return np.array([v.decode("utf-8") for v in values], dtype=object)
    return values.astype(object) if values.dtype.kind == "U" else values


class ObsColumn:
    """One obs (or var) column read as row ranges, exposed as integer codes into ``categories``.

    Categorical columns already are codes; string or numeric columns are factorized block by
    block, the categories growing as new values appear (order of first appearance).
    Missing values (NaN, categorical code -1) get code -1.
    """

    def __init__(self, node: h5py.Dataset | h5py.Group, name: str):
        self.name = name
        self._path = node.file.filename
        with reading(self._path, f"obs column {name!r}"):
            self._open(node, name)

    def _open(self, node: h5py.Dataset | h5py.Group, name: str) -> None:
        enc = node.attrs.get("encoding-type", "")
        enc = enc.decode() if isinstance(enc, bytes) else enc
        self._categorical = enc == "categorical"
        self._nullable = enc.startswith("nullable")
        if self._categorical:
            self._codes = node["codes"]
            cats = node["categories"]
            raw = cats.asstr()[...] if cats.dtype.kind in "OS" else cats[...]
            self.categories: list = [str(c) for c in raw]
            self._index = None
        elif self._nullable:
            self._values, self._mask = node["values"], node["mask"]
            self.categories = []
            self._index = {}
        elif isinstance(node, h5py.Dataset) and node.ndim == 1:
            self._values = node
            self._mask = None
            self.categories = []
            self._index = {}
        else:
            raise H5adError(f"obs column {name!r} has an encoding this reader does not know ({enc!r}); "
                            f"re-save the file with anndata >= 0.8 (adata.write_h5ad)")
        self.num_rows = int((self._codes if self._categorical else self._values).shape[0])

    def codes(self, start: int, stop: int) -> np.ndarray:
        with reading(self._path, f"obs column {self.name!r} rows {start}..{stop - 1}"):
            if self._categorical:
                return self._codes[start:stop].astype(np.int64)
            values = self._values
            block = values.asstr()[start:stop] if values.dtype.kind in "OS" else values[start:stop]
            block = np.asarray(block)
            mask = self._mask[start:stop].astype(bool) if self._mask is not None else None
        missing = pd.isna(block) if block.dtype.kind in "Ofc" else np.zeros(len(block), bool)
        if mask is not None:
            missing |= mask
        strings = pd.Series(block).astype(str).to_numpy(dtype=object)
        local, uniques = pd.factorize(strings)
        lookup = np.empty(len(uniques), np.int64)
        for i, u in enumerate(uniques):  # loop over distinct values of the block, not cells
            code = self._index.get(u)
            if code is None:
                code = self._index[u] = len(self.categories)
                self.categories.append(u)
            lookup[i] = code
        out = lookup[local]
        out[missing] = -1
        return out


class H5adSource:
    """An opened h5ad file. Use as a context manager; all reads are lazy row/column ranges."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"input file {str(self.path)!r} does not exist")
        if self.path.is_dir():
            raise H5adError(f"input {str(self.path)!r} is a directory; expected an .h5ad file")
        if self.path.stat().st_size == 0:
            raise H5adError(f"input {str(self.path)!r} is an empty file (0 bytes); expected an AnnData .h5ad "
                            f"written by adata.write_h5ad")
        if not h5py.is_hdf5(self.path):
            raise H5adError(f"input {str(self.path)!r} is not an HDF5 file (not an .h5ad, or its header is "
                            f"damaged); expected an AnnData .h5ad written by adata.write_h5ad")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise H5adError(f"input {str(self.path)!r} cannot be opened as HDF5 ({exc}); the file is probably "
                            f"truncated (an interrupted copy or download): copy or write it again") from None
        try:
            with reading(self.path, "the file's layout (X, obs, var)"):
                self._check_layout()
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> H5adSource:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    # -- structure -------------------------------------------------------------------------------
    def _check_layout(self) -> None:
        missing = [k for k in ("X", "obs", "var") if k not in self.file]
        if missing:
            raise H5adError(f"input {str(self.path)!r} is HDF5 but not an AnnData file: missing {missing} "
                            f"(found {sorted(self.file)}); expected an .h5ad written by adata.write_h5ad")
        x = self.file["X"]
        if isinstance(x, h5py.Group):
            enc = x.attrs.get("encoding-type", "")
            enc = enc.decode() if isinstance(enc, bytes) else enc
            if enc not in ("csr_matrix", "csc_matrix"):
                raise H5adError(f"X has encoding {enc!r}; expected csr_matrix, csc_matrix or a dense array")
            self.x_format = "csr" if enc == "csr_matrix" else "csc"
            self.shape = tuple(int(v) for v in x.attrs["shape"])
            dtype = x["data"].dtype
        else:
            self.x_format = "dense"
            if x.ndim != 2:
                raise H5adError(f"X is a {x.ndim}-d array; expected a 2-d cells x genes matrix")
            self.shape = tuple(int(v) for v in x.shape)
            dtype = x.dtype
        if dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"X holds non-numeric values (dtype {dtype}); expected integer counts or float "
                            f"expression values: convert X to numbers before ingest")
        self.x_dtype = dtype
        self._backed = None
        self.num_cells, self.num_genes = self.shape
        obs = self.file["obs"]
        if not isinstance(obs, h5py.Group) or "_index" not in obs.attrs:
            raise H5adError("obs is stored in a legacy layout this reader does not know; re-save the file with "
                            "anndata >= 0.8 (adata.write_h5ad)")

    @property
    def obs_columns(self) -> list[str]:
        with reading(self.path, "the obs table"):
            idx = self._attr(self.file["obs"], "_index")
            return [k for k in self.file["obs"] if k != idx and k != "__categories"]

    @staticmethod
    def _attr(node, key):
        v = node.attrs[key]
        return v.decode() if isinstance(v, bytes) else str(v)

    def obs_column(self, name: str) -> ObsColumn:
        with reading(self.path, f"obs column {name!r}"):
            node = self.file["obs"][name]
        return ObsColumn(node, name)

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        with reading(self.path, f"obs_names rows {start}..{stop - 1}"):
            ds = self.file["obs"][self._attr(self.file["obs"], "_index")]
            return np.asarray(ds.asstr()[start:stop], dtype=object)

    def var(self) -> pd.DataFrame:
        """The var table (genes; small)."""
        from anndata.io import read_elem

        with reading(self.path, "var"):
            return read_elem(self.file["var"])

    # -- X ---------------------------------------------------------------------------------------
    def nnz(self) -> int:
        if self.x_format == "dense":
            return self.num_cells * self.num_genes
        with reading(self.path, "X/indptr"):
            return int(self.file["X"]["indptr"][-1])

    def row_block(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Rows [start, stop) as CSR (sparse sources) or a dense ndarray; CSC is not row-readable."""
        with reading(self.path, f"X rows {start}..{stop - 1}"):
            if self.x_format == "dense":
                return self.file["X"][start:stop]
            assert self.x_format == "csr", "CSC is read by column blocks"
            if self._backed is None:
                from anndata.io import sparse_dataset

                self._backed = sparse_dataset(self.file["X"])
            block = self._backed[start:stop]
        return block if isinstance(block, sp.csr_matrix) else sp.csr_matrix(block)

    def csc_indptr(self) -> np.ndarray:
        with reading(self.path, "X/indptr"):
            return self.file["X"]["indptr"][...].astype(np.int64)

    def column_block(self, g0: int, g1: int, indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Non-zeros of genes [g0, g1) of a CSC X: (row, gene, value) arrays."""
        x = self.file["X"]
        lo, hi = int(indptr[g0]), int(indptr[g1])
        with reading(self.path, f"X columns {g0}..{g1 - 1}"):
            rows = x["indices"][lo:hi].astype(np.int64)
            vals = x["data"][lo:hi]
        genes = np.repeat(np.arange(g0, g1, dtype=np.int64), np.diff(indptr[g0:g1 + 1]))
        return rows, genes, vals

    def row_ranges(self, rows_per_block: int) -> Iterator[tuple[int, int]]:
        for a in range(0, self.num_cells, rows_per_block):
            yield a, min(self.num_cells, a + rows_per_block)
