"""Bounded external-sort buckets: route rows of a scattered source to contiguous destination ranges.

The destination rows [0, num_rows) are cut into buckets of at most ``bucket_rows`` rows (aligned to
X chunks). While the source is read block by block, every row (or, for CSC sources, every non-zero)
is appended to the spill file of its bucket; afterwards each bucket is read back alone, assembled
into a dense block and written to the store. Memory is one source block plus one bucket, whatever
the number of cells.

Disk: the non-zeros are the bulk (8 bytes each raw, 16 for CSC's triples), as large as an uncompressed
source, so with the source and the store beside it a genome-scale ingest would need ~2.5x the source's
size free. The non-zero arrays are therefore compressed (Blosc: byte shuffle + zstd level 1, fast enough
to stay well below the cost of the rest of the ingest): a row's gene indices are stored as differences
from the previous index in the row (small numbers: their high bytes are zero after the shuffle), the
values as they are (normalized log counts share their exponent bytes). ``bytes_written`` counts the
compressed bytes on disk, ``raw_bytes`` what they hold.

Record format (native byte order), repeated in a bucket file::

    header int64[8]: kind, n, nnz, nbytes_ids, nbytes_z0, nbytes_z1, nbytes_z2, 0
    kind ROWS (1): dest int64[n], source_row int64[n], cell_type int32[n], batch int32[n],
                   id_len int32[n], ids bytes[nbytes_ids], row_nnz int32[n],
                   z0: index deltas int32[nnz], z1: data float32[nnz]   (z: compressed)
    kind COO  (2): z0: dest int64[nnz], z1: gene int32[nnz], z2: value float32[nnz]
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

import numpy as np
from numcodecs import Blosc

ROWS, COO = 1, 2
HEADER = 8  # int64 words
_CODEC = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)


def _pack(arr: np.ndarray) -> bytes:
    return bytes(_CODEC.encode(np.ascontiguousarray(arr))) if len(arr) else b""


def _unpack(blob, dtype, count: int) -> np.ndarray:
    out = np.empty(count, dtype)
    if count:
        _CODEC.decode(blob, out=out)
    return out


def index_deltas(indices: np.ndarray, row_nnz: np.ndarray) -> np.ndarray:
    """Each row's indices as differences from the previous one in the row (the first kept as is)."""
    d = np.diff(indices.astype(np.int32), prepend=np.int32(0))
    starts = np.cumsum(row_nnz, dtype=np.int64)[:-1]
    starts = starts[starts < len(d)]
    d[starts] = indices[starts]
    return d


def index_from_deltas(deltas: np.ndarray, row_nnz: np.ndarray) -> np.ndarray:
    """Inverse of ``index_deltas``: a running sum that restarts at each row."""
    total = np.cumsum(deltas, dtype=np.int64)
    starts = np.cumsum(row_nnz, dtype=np.int64)[:-1]
    starts = starts[starts < len(deltas)]
    # position i's row starts at the last start <= i; subtract the running sum just before that start
    last = np.zeros(len(deltas), np.int64)
    last[starts] = starts
    np.maximum.accumulate(last, out=last)
    before = np.concatenate([[0], total[:-1]]) if len(total) else total
    return (total - before[last]).astype(np.int32)


@dataclasses.dataclass
class RowsRecord:
    dest: np.ndarray
    source_row: np.ndarray
    cell_type: np.ndarray
    batch: np.ndarray
    cell_ids: np.ndarray  # object array of str
    row_nnz: np.ndarray
    indices: np.ndarray
    data: np.ndarray


def encode_ids(ids: np.ndarray) -> tuple[np.ndarray, bytes]:
    encoded = [s.encode("utf-8") for s in ids]
    return np.fromiter((len(b) for b in encoded), np.int32, len(encoded)), b"".join(encoded)


def decode_ids(lens: np.ndarray, blob: bytes) -> np.ndarray:
    ends = np.cumsum(lens, dtype=np.int64)
    starts = ends - lens
    return np.array([blob[a:b].decode("utf-8") for a, b in zip(starts.tolist(), ends.tolist())], dtype=object)


class SpillBuckets:
    """Spill files for destination buckets, in a private directory removed by ``cleanup``."""

    def __init__(self, directory: pathlib.Path, bounds: np.ndarray):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True)
        self.bounds = np.asarray(bounds, np.int64)  # bucket b = rows [bounds[b], bounds[b+1])
        self.num_buckets = len(self.bounds) - 1
        self.bytes_written = 0  # on disk
        self.raw_bytes = 0  # what the records hold, uncompressed
        self._buffer: np.ndarray | None = None

    def _path(self, b: int) -> pathlib.Path:
        return self.dir / f"bucket-{b:06d}.bin"

    def bucket_of(self, dest: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bounds, dest, side="right") - 1

    def _append(self, b: int, header: list[int], parts: list[bytes], raw_bytes: int) -> None:
        head = np.zeros(HEADER, np.int64)
        head[:len(header)] = header
        with open(self._path(b), "ab") as fh:
            for p in [head.tobytes(), *parts]:
                fh.write(p)
                self.bytes_written += len(p)
        self.raw_bytes += raw_bytes

    def add_rows(self, rec: RowsRecord) -> None:
        """Route the rows of one source block (CSR parts already normalized, gene-selected)."""
        bucket = self.bucket_of(rec.dest)
        order = np.argsort(bucket, kind="stable")
        row_start = np.concatenate([[0], np.cumsum(rec.row_nnz, dtype=np.int64)])
        cuts = np.flatnonzero(np.diff(bucket[order])) + 1
        for rows in np.split(order, cuts):
            if len(rows) == 0:
                continue
            b = int(bucket[rows[0]])
            nz = _ranges(row_start[rows], row_start[rows + 1])
            lens, blob = encode_ids(rec.cell_ids[rows])
            row_nnz = rec.row_nnz[rows].astype(np.int32)
            z0 = _pack(index_deltas(rec.indices[nz], row_nnz))
            z1 = _pack(rec.data[nz].astype(np.float32))
            meta = [rec.dest[rows].astype(np.int64).tobytes(), rec.source_row[rows].astype(np.int64).tobytes(),
                    rec.cell_type[rows].astype(np.int32).tobytes(), rec.batch[rows].astype(np.int32).tobytes(),
                    lens.tobytes(), blob, row_nnz.tobytes()]
            self._append(b, [ROWS, len(rows), len(nz), len(blob), len(z0), len(z1)], [*meta, z0, z1],
                         sum(map(len, meta)) + 8 * len(nz))

    def add_coo(self, dest: np.ndarray, gene: np.ndarray, value: np.ndarray) -> None:
        bucket = self.bucket_of(dest)
        order = np.argsort(bucket, kind="stable")
        cuts = np.flatnonzero(np.diff(bucket[order])) + 1
        for idx in np.split(order, cuts):
            if len(idx) == 0:
                continue
            z = [_pack(dest[idx].astype(np.int64)), _pack(gene[idx].astype(np.int32)),
                 _pack(value[idx].astype(np.float32))]
            self._append(int(bucket[idx[0]]), [COO, 0, len(idx), 0, *map(len, z)], z, 16 * len(idx))

    def read(self, b: int) -> tuple[list[RowsRecord], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """All records of bucket b (then its file is deleted, freeing disk as the write advances).

        The metadata arrays returned are views into a buffer that the next ``read`` overwrites."""
        path = self._path(b)
        if not path.exists():
            return [], []
        size = path.stat().st_size
        if self._buffer is None or len(self._buffer) < size:
            # one buffer reused by every bucket (records are views into it, valid until the next read):
            # re-allocating ~budget-sized blocks per bucket fragments the heap
            self._buffer = None
            self._buffer = np.empty(int(size * 1.25) + 1024, np.uint8)
        with open(path, "rb") as fh:
            got = fh.readinto(memoryview(self._buffer)[:size])
        assert got == size, f"short read of spill file {path}"
        buf = memoryview(self._buffer)[:size]
        rows, coo, pos = [], [], 0

        def take(dtype, count):
            nonlocal pos
            arr = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
            pos += arr.nbytes
            return arr

        def blob(nbytes):
            nonlocal pos
            pos += nbytes
            return buf[pos - nbytes:pos]

        while pos < len(buf):
            kind, n, nnz, nids, z0, z1, z2, _ = (int(v) for v in take(np.int64, HEADER))
            if kind == ROWS:
                dest, src = take(np.int64, n), take(np.int64, n)
                ct, batch, lens = take(np.int32, n), take(np.int32, n), take(np.int32, n)
                ids = decode_ids(lens, bytes(blob(nids)))
                row_nnz = take(np.int32, n)
                indices = index_from_deltas(_unpack(blob(z0), np.int32, nnz), row_nnz)
                rows.append(RowsRecord(dest, src, ct, batch, ids, row_nnz, indices, _unpack(blob(z1), np.float32, nnz)))
            elif kind == COO:
                coo.append((_unpack(blob(z0), np.int64, nnz), _unpack(blob(z1), np.int32, nnz),
                            _unpack(blob(z2), np.float32, nnz)))
            else:
                raise AssertionError(f"corrupt spill record kind {kind} in {path}")
        path.unlink()
        return rows, coo

    def cleanup(self) -> None:
        self._buffer = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], stops[i]) without a Python loop."""
    lens = stops - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return np.arange(total, dtype=np.int64) + offsets

