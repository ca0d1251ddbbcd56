"""Streaming training loader: a worker's shard of the store, read chunk by chunk, never whole.

Epoch semantics (the same on every worker, so collectives never hang):

- ``steps_per_epoch = max(1, total training cells // (world_size * batch_size))``; every worker
  yields exactly that many batches of ``batch_size`` cells per epoch, so one epoch sees about
  every training cell once across all workers (a worker whose shard is shorter wraps into a
  fresh pass; one whose shard is longer leaves a different random remainder each epoch).
- A worker's shard is a set of *units*: a store chunk intersected with the training cells the
  worker owns. Each epoch (and each pass) the units are visited in a fresh random order; cells
  are shuffled within a window of units (bounded memory, many conditions per batch even though
  the store groups cells by condition), and batches are consecutive slices of that stream. A
  window is the next units of the random order up to ``buffer_mb`` of decoded cells (256 MB by
  default: a whole shard of up to ~13k cells at 5,000 genes, ~8k at 8,000), or ``buffer_chunks``
  units when that is set. A window of few conditions gives batches of few conditions, and
  BatchNorm's running statistics, which evaluation uses, then follow whichever conditions came
  last (BENCHMARKS.md, "Time to the reference's quality"): the budget is in bytes so that small
  shards are shuffled whole. With ``group_cells > 1`` the window is instead cut into runs of that
  many cells of one condition, the runs shuffled (the model's exact fast path computes one row per
  distinct perturbation set).
- Every random choice is a pure function of ``(seed, epoch, rank, ...)`` and of store metadata,
  so the loader state is just ``(epoch, step)``: resuming at a step recomputes the plan without
  reading X and continues with exactly the batches an uninterrupted run would have seen.
- Each perturbed cell (y) is paired with a control cell (x) drawn fresh per batch from an
  in-memory control pool of the same cell type; control cells are themselves trained on with
  x = y, as in the reference.

Memory per worker: one window (``buffer_mb``, or ``buffer_chunks`` chunks), reused from window to
window and epoch to epoch, + one decoded chunk + ``prefetch_batches`` batches + the control pool +
per-condition gene masks (C x G bool), independent of the number of cells.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from gears_dist.config import require
from gears_dist.data.store import Store, read_checked

Sharding = Literal["graph", "random"]


@dataclasses.dataclass
class LoaderConfig:
    batch_size: int = 32                 # cells per micro-batch per worker
    buffer_mb: float = 256.0             # decoded cells shuffled together per worker (the memory bound)
    buffer_chunks: int | None = None     # units shuffled together instead of the byte budget
    prefetch_batches: int = 4            # batches prepared ahead by the background thread
    control_pool_cells: int = 4096       # control cells kept in memory per worker for pairing
    include_controls: bool = True        # train on control cells too (x = y), as the reference does
    group_cells: int = 1                 # >1: batches made of runs of this many cells of one condition

    def validate(self) -> None:
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, received {self.batch_size}")
        require(self.buffer_mb > 0, "buffer_mb", f"must be > 0 (MB of decoded cells), received {self.buffer_mb}")
        require(self.buffer_chunks is None or self.buffer_chunks >= 1, "buffer_chunks",
                f"must be >= 1, or null to size the window by buffer_mb; received {self.buffer_chunks}")
        require(self.prefetch_batches >= 1, "prefetch_batches", f"must be >= 1, received {self.prefetch_batches}")
        require(self.control_pool_cells >= 1, "control_pool_cells",
                f"must be >= 1, received {self.control_pool_cells}")
        require(1 <= self.group_cells <= self.batch_size, "group_cells",
                f"must be between 1 and batch_size ({self.batch_size}), received {self.group_cells}")


@dataclasses.dataclass
class Batch:
    """One micro-batch, ready for ``GEARSModel.forward(x, perts, inverse)`` and ``gears_loss``."""

    x: torch.Tensor          # [B, G] float32: the paired control cell (the cell itself for controls)
    y: torch.Tensor          # [B, G] float32: the observed cell
    perts: torch.Tensor      # [U, K] int64: GO-node indices of the distinct perturbation sets, -1 padded
    inverse: torch.Tensor    # [B] int64: row of `perts` for each cell
    cond: torch.Tensor       # [B] int64: store condition index of each cell
    gene_mask: torch.Tensor  # [U, G] bool: genes with non-zero mean under that condition (loss mask)
    ucond: torch.Tensor      # [U] int64: store condition index of each row of `perts`

    @property
    def num_cells(self) -> int:
        return int(self.y.shape[0])

    def pin(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in dataclasses.fields(self)})


# ------------------------------------------------------------------------------------------------
# shard plan: metadata only


@dataclasses.dataclass
class ShardPlan:
    """The units (chunk ∩ owned training rows) one worker reads."""

    rank: int
    world_size: int
    sharding: str
    seed: int
    unit_start: np.ndarray   # int64 [N] first global row of the unit
    unit_stop: np.ndarray    # int64 [N] one past the last row
    unit_count: np.ndarray   # int64 [N] rows the worker keeps from the unit
    total_train_cells: int   # over all workers: defines steps per epoch

    @property
    def num_cells(self) -> int:
        return int(self.unit_count.sum())

    def unit_rows(self, u: int) -> np.ndarray:
        """Global row ids kept from unit u (deterministic; recomputed, never stored)."""
        start, stop = int(self.unit_start[u]), int(self.unit_stop[u])
        rows = np.arange(start, stop, dtype=np.int64)
        if self.sharding == "random":
            rows = rows[_random_owner(self.seed, start, stop, self.world_size) == self.rank]
        return rows


def _random_owner(seed: int, start: int, stop: int, world_size: int) -> np.ndarray:
    # Owner of each row in [start, stop), keyed by the unit's first row so that it does not depend
    # on which worker asks: every cell has exactly one owner.
    return np.random.default_rng([seed, 0x5A4D, start]).integers(0, world_size, size=stop - start)


def _segments_to_units(starts: np.ndarray, stops: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut row segments at chunk boundaries (vectorized)."""
    keep = stops > starts
    starts, stops = starts[keep].astype(np.int64), stops[keep].astype(np.int64)
    if starts.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # merge touching segments first, so that a unit is a whole chunk whenever the worker owns all of it
    # (conditions are small in genome-wide screens: per-condition units would make the buffer tiny)
    order = np.argsort(starts, kind="stable")
    starts, stops = starts[order], stops[order]
    new_run = np.r_[True, starts[1:] > np.maximum.accumulate(stops)[:-1]]
    stops = np.maximum.reduceat(stops, np.flatnonzero(new_run))
    starts = starts[new_run]
    first = starts // chunk
    last = (stops - 1) // chunk
    pieces = last - first + 1
    seg = np.repeat(np.arange(starts.size), pieces)
    offset = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    chunk_id = first[seg] + offset
    u_start = np.maximum(starts[seg], chunk_id * chunk)
    u_stop = np.minimum(stops[seg], (chunk_id + 1) * chunk)
    order = np.argsort(u_start, kind="stable")
    return u_start[order], u_stop[order]


def plan_shard(store: Store, train_conditions: Sequence[int], rank: int, world_size: int, *,
               sharding: str = "graph", part_of_condition: np.ndarray | None = None,
               include_controls: bool = True, seed: int = 0) -> ShardPlan:
    """Which rows of the store worker `rank` trains on.

    graph: the worker owns the training conditions whose part (``part_of_condition``, one of
    0..W-1 per store condition) is its rank, and a contiguous 1/W slice of the control cells.
    random: every training cell (controls included) goes to a random worker (the baseline; each
    worker then reads every chunk).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    if sharding not in ("graph", "random"):
        raise ValueError(f"sharding {sharding!r}: expected 'graph' or 'random'")
    start, stop = store.array("conditions/start"), store.array("conditions/stop")
    is_ctrl = store.array("conditions/is_control").astype(bool)
    num_conditions = start.shape[0]
    train = np.zeros(num_conditions, bool)
    train[np.asarray(list(train_conditions), dtype=np.int64)] = True
    if include_controls:
        train |= is_ctrl
    else:
        train &= ~is_ctrl
    total = int((stop - start)[train].sum())
    if total == 0:
        raise ValueError("the split has no training cells in this store; check the split key and the store")
    if sharding == "random":
        seg_start, seg_stop = start[train], stop[train]
        u_start, u_stop = _segments_to_units(seg_start, seg_stop, store.chunk_cells)
        counts = np.array([int((_random_owner(seed, a, b, world_size) == rank).sum())
                           for a, b in zip(u_start.tolist(), u_stop.tolist())], dtype=np.int64)
    else:
        if world_size > 1:
            if part_of_condition is None:
                raise ValueError("graph sharding needs part_of_condition (from the graphs' partition); "
                                 "pass it, or use sharding='random'")
            part = np.asarray(part_of_condition)
            if part.shape != (num_conditions,):
                raise ValueError(f"part_of_condition: expected shape ({num_conditions},), received {part.shape}")
            mine = train & ~is_ctrl & (part == rank)
        else:
            mine = train & ~is_ctrl
        seg_start, seg_stop = [start[mine]], [stop[mine]]
        ctrl_train = train & is_ctrl
        for c in np.flatnonzero(ctrl_train):
            # controls are shared out as W contiguous, equal row ranges
            bounds = np.linspace(start[c], stop[c], world_size + 1).round().astype(np.int64)
            seg_start.append(bounds[rank:rank + 1])
            seg_stop.append(bounds[rank + 1:rank + 2])
        u_start, u_stop = _segments_to_units(np.concatenate(seg_start), np.concatenate(seg_stop),
                                             store.chunk_cells)
        counts = u_stop - u_start
    keep = counts > 0
    return ShardPlan(rank, world_size, sharding, seed, u_start[keep], u_stop[keep], counts[keep], total)


# ------------------------------------------------------------------------------------------------
# the loader


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class ShardLoader:
    """Iterates one worker's batches for an epoch; see the module docstring for the semantics.

    Args:
        store: the opened store.
        plan: this worker's `ShardPlan`.
        pert_index: (C, K) int64, GO-node indices of each store condition's genes, -1 padded.
        cfg: `LoaderConfig`.
        seed: run seed (with epoch and rank, it fixes every random choice).
        device: where batches go; on CUDA they are pinned and copied asynchronously.
    """

    def __init__(self, store: Store, plan: ShardPlan, pert_index: np.ndarray, cfg: LoaderConfig,
                 seed: int = 0, device: torch.device | str = "cpu"):
        cfg.validate()
        self.store, self.plan, self.cfg, self.seed = store, plan, cfg, int(seed)
        self.device = torch.device(device)
        self.rank, self.world_size = plan.rank, plan.world_size
        num_conditions = store.array("conditions/start").shape[0]
        pert_index = np.asarray(pert_index, dtype=np.int64)
        if pert_index.ndim != 2 or pert_index.shape[0] != num_conditions:
            raise ValueError(f"pert_index: expected shape ({num_conditions}, K), received {pert_index.shape}")
        self.pert_index = torch.from_numpy(pert_index)
        self.gene_mask = torch.from_numpy(self._gene_mask(store))
        self.steps_per_epoch = max(1, plan.total_train_cells // (plan.world_size * cfg.batch_size))
        if plan.num_cells == 0:
            raise ValueError(f"worker {self.rank} of {self.world_size} owns no training cells; use fewer "
                             f"workers or sharding='random'")
        self._X = store.X
        self._obs_cond = store.root["obs/condition"]
        self._obs_type = store.root["obs/cell_type"]
        self._load_control_pool()
        self.window_rows = self._window_rows()
        self._spare_buffer: np.ndarray | None = None
        self._buffer_lock = threading.Lock()
        self.bytes_read = 0
        self.conditions_read = np.zeros(num_conditions, dtype=bool)  # whose training cells were read (records)
        self.max_buffered_cells = 0  # most cells held in the shuffle buffer at once (memory bound check)
        self.epoch = 0
        self.step = 0

    # -- setup ----------------------------------------------------------------------------------
    @staticmethod
    def _gene_mask(store: Store) -> np.ndarray:
        # the reference's loss keeps, per condition, the genes with non-zero mean; every gene for controls
        stats = store.root["stats"]
        if "nonzero_frac" in stats:
            src, nonzero = stats["nonzero_frac"], np.greater
        else:
            src, nonzero = stats["mean"], np.not_equal
        # block by block along conditions: the float table (C x G x 4 B, 325 MB at genome scale) is never whole
        mask = np.empty(src.shape, bool)
        step = max(1, int(src.chunks[0]))
        for a in range(0, src.shape[0], step):
            nonzero(read_checked(src, slice(a, a + step)), 0, out=mask[a:a + step])
        mask[store.array("conditions/is_control").astype(bool)] = True
        return mask

    def _load_control_pool(self) -> None:
        start, stop = self.store.array("conditions/start"), self.store.array("conditions/stop")
        is_ctrl = self.store.array("conditions/is_control").astype(bool)
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(start[is_ctrl], stop[is_ctrl])]
                              or [np.zeros(0, np.int64)])
        if rows.size == 0:
            raise ValueError("the store has no control cells; GEARS pairs each perturbed cell with a control cell")
        if rows.size > self.cfg.control_pool_cells:
            rows = np.sort(_rng(self.seed, self.rank, 0xC7).choice(rows, self.cfg.control_pool_cells, replace=False))
        types = np.asarray(read_checked(self._obs_type, rows, orthogonal=True)).astype(np.int64)
        order = np.argsort(types, kind="stable")
        rows, types = rows[order], types[order]
        self.pool = torch.from_numpy(self._read_rows(rows))
        counts = np.bincount(types)
        starts = np.cumsum(counts) - counts
        # a cell type absent from the pool (or beyond it) is paired with controls of any type
        missing = counts == 0
        starts[missing], counts[missing] = 0, rows.size
        self._pool_start, self._pool_count = starts, counts

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """X at global `rows` (any order), read chunk by chunk into one preallocated array.

        Each store chunk the rows touch is decoded once (a pool of scattered control cells would otherwise
        decode a whole chunk per cell), and the result is allocated before the reads: with the allocator
        settings used for training (no mmap, no trim) per-read result pieces interleaved with the freed
        decode buffers leave heap holes that raise the worker's peak with every read.
        """
        out = np.empty((rows.size, self.store.num_genes), np.float32)
        if rows.size == 0:
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        chunk_of = sorted_rows // self.store.chunk_cells
        bounds = np.r_[0, np.flatnonzero(np.diff(chunk_of)) + 1, rows.size]
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            first, last = int(sorted_rows[lo]), int(sorted_rows[hi - 1])
            block = read_checked(self._X, slice(first, last + 1))
            out[order[lo:hi]] = block[sorted_rows[lo:hi] - first]
        self.bytes_read = getattr(self, "bytes_read", 0) + out.nbytes
        return out

    def _window_rows(self) -> int:
        """Most rows one window holds: the ``buffer_chunks`` largest units, or ``buffer_mb`` of decoded cells
        (at least the largest unit)."""
        counts = self.plan.unit_count
        if self.cfg.buffer_chunks is not None:
            return int(np.sort(counts)[::-1][:self.cfg.buffer_chunks].sum())
        budget = int(self.cfg.buffer_mb * 2**20 // (4 * self.store.num_genes))
        return max(budget, int(counts.max()) if counts.size else 1)

    def _read_units(self, units: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Rows kept from `units`, with their X rows (written into `out[:n]` when given, so that one window
        buffer serves every window), condition and cell type. One contiguous slice per unit (a unit lies
        inside one chunk, so each chunk is decoded once), then the kept rows."""
        n = int(self.plan.unit_count[units].sum())
        if out is None:
            out = np.empty((n, self.store.num_genes), np.float32)
        assert out.shape[0] >= n, (out.shape, n)  # the window buffer holds window_rows, the most any window has
        y = out[:n]
        rows, conds, types = [], [], []
        at = 0
        for u in units.tolist():
            a, b = int(self.plan.unit_start[u]), int(self.plan.unit_stop[u])
            keep = self.plan.unit_rows(u) - a
            block = read_checked(self._X, slice(a, b))
            self.bytes_read += block.nbytes
            whole = keep.size == b - a
            y[at:at + keep.size] = block if whole else block[keep]
            at += keep.size
            rows.append(keep + a)
            c = np.asarray(read_checked(self._obs_cond, slice(a, b))).astype(np.int64)
            t = np.asarray(read_checked(self._obs_type, slice(a, b))).astype(np.int64)
            conds.append(c if whole else c[keep])
            types.append(t if whole else t[keep])
            self.conditions_read[conds[-1]] = True
        assert at == n, (at, n)
        return np.concatenate(rows), y, np.concatenate(conds), np.concatenate(types)

    # -- the deterministic plan ------------------------------------------------------------------
    def _windows(self, epoch: int) -> Iterator[np.ndarray]:
        """Unit ids of each window, pass after pass (an endless stream for this epoch): ``buffer_chunks`` units
        at a time, or consecutive units of the pass's random order up to ``window_rows`` rows."""
        for pass_ in range(1 << 30):
            order = _rng(self.seed, epoch, self.rank, pass_, 0x0D).permutation(self.plan.unit_start.size)
            if self.cfg.buffer_chunks is not None:
                cuts = list(range(0, order.size, self.cfg.buffer_chunks)) + [order.size]
            else:
                cuts, rows = [0], 0
                for i, c in enumerate(self.plan.unit_count[order].tolist()):
                    if rows + c > self.window_rows:
                        cuts.append(i)
                        rows = 0
                    rows += c
                cuts.append(order.size)
            for w, (a, b) in enumerate(itertools.pairwise(cuts)):
                yield pass_, w, order[a:b]

    def _window_order(self, epoch: int, pass_: int, w: int, rows: np.ndarray, cond: np.ndarray) -> np.ndarray:
        rng = _rng(self.seed, epoch, self.rank, pass_, w, 0x5F)
        g = self.cfg.group_cells
        if g == 1:
            return rng.permutation(rows.size)
        # runs of g cells of one condition, runs shuffled (a shorter run ends each condition)
        within = rng.permutation(rows.size)
        by_cond = within[np.argsort(cond[within], kind="stable")]
        c_sorted = cond[by_cond]
        first = np.r_[0, np.flatnonzero(np.diff(c_sorted)) + 1]
        pos_in_cond = np.arange(rows.size) - np.repeat(first, np.diff(np.r_[first, rows.size]))
        run_id = np.cumsum(np.r_[True, (pos_in_cond[1:] % g == 0)]) - 1
        run_perm = rng.permutation(run_id[-1] + 1)
        return by_cond[np.argsort(run_perm[run_id], kind="stable")]

    def _skip_windows(self, epoch: int, position: int):
        """Advance the window stream to the one holding `position` (metadata only, no reads)."""
        windows = self._windows(epoch)
        done = 0
        for pass_, w, units in windows:
            size = int(self.plan.unit_count[units].sum())
            if done + size > position:
                return (pass_, w, units), windows, position - done
            done += size
        raise AssertionError("window stream ended")

    def _cells(self, epoch: int, start_step: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(y, cond, cell_type, row) batches of exactly batch_size cells from `start_step` on: consecutive
        slices of the stream of shuffled windows."""
        # One window buffer serves every window (batches are gathered copies, so a window can be read over the
        # previous one once its last cells are taken) and every epoch: a fresh 0.25-0.5 GB array per epoch
        # would pay its page faults again. A producer that finds it taken (an earlier epoch's iterator still
        # open) gets its own.
        with self._buffer_lock:
            buffer, self._spare_buffer = self._spare_buffer, None
        if buffer is None:
            buffer = np.empty((self.window_rows, self.store.num_genes), np.float32)
        try:
            yield from self._window_slices(epoch, start_step, buffer)
        finally:
            with self._buffer_lock:
                self._spare_buffer = buffer

    def _window_slices(self, epoch: int, start_step: int,
                       buffer: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """The batches of `_cells`, each window read into `buffer`."""
        b = self.cfg.batch_size
        window, windows, offset = self._skip_windows(epoch, start_step * b)
        perm = np.zeros(0, np.int64)
        pos = 0
        for _ in range(self.steps_per_epoch - start_step):
            parts, have = [], 0
            while have < b:
                if pos >= perm.size:
                    pass_, w, units = window
                    rows, y, cond, ctype = self._read_units(np.sort(units), buffer)
                    perm = self._window_order(epoch, pass_, w, rows, cond)
                    pos, offset = offset, 0
                    window = next(windows)
                    self.max_buffered_cells = max(self.max_buffered_cells, int(y.shape[0]) + have)
                take = perm[pos:pos + b - have]
                pos += take.size
                have += take.size
                parts.append((y[take], cond[take], ctype[take], rows[take]))
            yield parts[0] if len(parts) == 1 else tuple(np.concatenate(a) for a in zip(*parts))

    def _make_batch(self, epoch: int, step: int, y: np.ndarray, cond: np.ndarray, ctype: np.ndarray) -> Batch:
        rng = _rng(self.seed, epoch, self.rank, step, 0xB7)
        known = ctype < self._pool_start.size
        safe = np.where(known, ctype, 0)
        p_start = np.where(known, self._pool_start[safe], 0)
        p_count = np.where(known, self._pool_count[safe], self.pool.shape[0])
        pick = p_start + np.floor(rng.random(cond.size) * p_count).astype(np.int64)
        y_t = torch.from_numpy(y)
        x_t = self.pool[torch.from_numpy(pick)]
        cond_t = torch.from_numpy(cond)
        is_ctrl = (self.pert_index[cond_t] < 0).all(dim=1)
        x_t[is_ctrl] = y_t[is_ctrl]
        ucond, inverse = torch.unique(cond_t, return_inverse=True)
        return Batch(x=x_t, y=y_t, perts=self.pert_index[ucond], inverse=inverse, cond=cond_t,
                     gene_mask=self.gene_mask[ucond], ucond=ucond)

    def _produce(self, epoch: int, start_step: int) -> Iterator[Batch]:
        pin = self.device.type == "cuda"
        for i, (y, cond, ctype, _rows) in enumerate(self._cells(epoch, start_step)):
            batch = self._make_batch(epoch, start_step + i, y, cond, ctype)
            yield batch.pin() if pin else batch

    # -- public ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "step": int(self.step), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "steps_per_epoch"):
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise ValueError(f"loader state: {key} is {state[key]} in the checkpoint but {getattr(self, key)} "
                                 f"in this run; resume with the same seed, workers and batch size")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def epoch_batches(self, epoch: int | None = None, start_step: int | None = None) -> Iterator[Batch]:
        """The batches of an epoch (default: the current one, from the current step), prefetched on a
        background thread. ``self.step`` counts the batches handed out, for checkpoints."""
        if epoch is not None:
            self.epoch = int(epoch)
            self.step = 0 if start_step is None else int(start_step)
        elif start_step is not None:
            self.step = int(start_step)
        epoch, start = self.epoch, self.step
        if start >= self.steps_per_epoch:
            return
        q: queue.Queue = queue.Queue(maxsize=self.cfg.prefetch_batches)
        stop = threading.Event()
        done = object()

        def work():
            try:
                for batch in self._produce(epoch, start):
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                q.put(exc)

        thread = threading.Thread(target=work, name=f"gears-loader-r{self.rank}", daemon=True)
        thread.start()
        non_blocking = self.device.type == "cuda"
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                self.step += 1
                yield item.to(self.device, non_blocking=non_blocking) if self.device.type != "cpu" else item
        finally:
            stop.set()
            thread.join(timeout=10)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch_batches()

    def __len__(self) -> int:
        return self.steps_per_epoch
