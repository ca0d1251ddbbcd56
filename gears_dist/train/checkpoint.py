"""Training checkpoints: DeepSpeed engine state + JSON metadata, written atomically, loaded safely.

A checkpoint is a directory::

    engine/                  DeepSpeed's own files (model states, one ZeRO optimizer shard per rank)
    meta.json                rank 0: epoch, config, gene / perturbation vocabularies, metrics, run ids
    loader_rank{r}.json      each rank's loader state (epoch, step, seed)
    files_rank{r}.json       each rank's file list with sizes and SHA-256, written after its files

The standalone loop writes it as ``<root>/.<tag>.partial`` and renames it to ``<root>/<tag>`` only
when every rank's files are complete; ``<root>/latest`` names the newest good one and is replaced
atomically, so an interrupted write never replaces the previous good checkpoint. Under Ray each rank
writes into its own directory and Ray merges them into one checkpoint in storage.

Loading never unpickles arbitrary objects: JSON for metadata, ``torch.load(weights_only=True)`` for
DeepSpeed's files with a short allowlist of the plain DeepSpeed classes its optimizer states hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import shutil
import zipfile
from typing import Any

import torch

from gears_dist.data.store import atomic_write_text

ENGINE_DIR = "engine"
ENGINE_TAG = "state"
META = "meta.json"
LATEST = "latest"
FORMAT = "gears_dist.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged; the message names the file and what to do."""


def _sha256(path: pathlib.Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _safe_globals() -> list:
    """DeepSpeed classes found in its optimizer states: plain data holders, no code run on load."""
    allowed: list = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover - depends on the DeepSpeed version
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return allowed


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be loaded safely ({str(exc).splitlines()[0]}); "
                              f"it is damaged or not a gears_dist checkpoint: resume from an earlier one or "
                              f"start a fresh run") from None


def make_engine_loading_safe(engine) -> None:
    """DeepSpeed's torch checkpoint engine loads with weights_only=False; load with our safe loader."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is not None:
        ce.load = lambda path, map_location=None: safe_torch_load(path, map_location)


def write_checkpoint(engine, directory: str | os.PathLike, *, rank: int, meta: dict | None,
                     loader_state: dict, tensors: dict[str, dict] | None = None) -> pathlib.Path:
    """All ranks call this with the same `directory` (shared) or each its own (Ray). Rank 0 passes
    `meta` and optional `tensors` ({file name: state dict}, e.g. the best model so far)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
    (directory / f"loader_rank{rank}.json").write_text(json.dumps(loader_state, sort_keys=True))
    if rank == 0:
        if meta is None:
            raise AssertionError("rank 0 must pass checkpoint metadata")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        (directory / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        for name, state in (tensors or {}).items():
            torch.save(state, directory / name)
    _barrier()  # DeepSpeed's files of every rank are written before any rank lists its own
    _write_file_list(directory, rank)
    return directory


def _write_file_list(directory: pathlib.Path, rank: int) -> None:
    # Each rank lists the files it wrote (ZeRO shards carry the rank in their name); rank 0 owns
    # the shared ones. A missing or mismatching entry later means a damaged checkpoint.
    mine = []
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name.startswith("files_rank") or p.name.endswith(".py"):
            continue
        rel = p.relative_to(directory).as_posix()
        if _owner(rel) == rank:
            mine.append({"path": rel, "size": p.stat().st_size, "sha256": _sha256(p)})
    atomic_write_text(directory / f"files_rank{rank}.json", json.dumps(mine, indent=1))


def _owner(rel: str) -> int:
    name = rel.rsplit("/", 1)[-1]
    for prefix in ("loader_rank", "zero_pp_rank_", "bf16_zero_pp_rank_"):
        if name.startswith(prefix):
            digits = name[len(prefix):].split("_", 1)[0].split(".", 1)[0]
            if digits.isdigit():
                return int(digits)
    return 0


def save_checkpoint(engine, root: str | os.PathLike, tag: str, *, rank: int, meta: dict | None,
                    loader_state: dict, tensors: dict[str, dict] | None = None) -> pathlib.Path:
    """Write ``root/tag`` atomically (all ranks share `root`) and point ``root/latest`` at it."""
    root = pathlib.Path(root)
    partial = root / f".{tag}.partial"
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    write_checkpoint(engine, partial, rank=rank, meta=meta, loader_state=loader_state, tensors=tensors)
    _barrier()
    if rank == 0:
        verify_checkpoint(partial, world_size=meta.get("world_size") if meta else None)
        if final.exists():
            old = root / f".{tag}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        atomic_write_text(root / LATEST, tag)
    _barrier()
    return final


def latest_checkpoint(root: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint under `root`, or None when there is none yet."""
    root = pathlib.Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = root / tag
    if not tag or "/" in tag or not path.is_dir():
        raise CheckpointError(f"{str(pointer)!r} names checkpoint {tag!r}, which does not exist; the run directory "
                              f"is damaged: remove {str(pointer)!r} to start over or restore the checkpoint")
    return path


def read_meta(directory: str | os.PathLike) -> dict:
    path = pathlib.Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a gears_dist checkpoint (no {META}); point --resume at a "
                              f"run directory or checkpoint written by gears-dist train")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r}: checkpoint format {meta.get('format_version')} is newer than this "
                              f"gears_dist reads ({FORMAT_VERSION}); upgrade gears_dist")
    return meta


def verify_checkpoint(directory: str | os.PathLike, world_size: int | None = None) -> dict:
    """Check every listed file's size and SHA-256; return the metadata. Raises CheckpointError."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} does not exist")
    meta = read_meta(directory)
    world_size = int(world_size or meta.get("world_size", 1))
    for r in range(world_size):
        listing = directory / f"files_rank{r}.json"
        if not listing.is_file():
            raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: {listing.name} is missing (rank {r} "
                                  f"did not finish writing); resume from an earlier checkpoint")
        try:
            entries = json.loads(listing.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{str(listing)!r} is not valid JSON; the checkpoint is damaged") from None
        for e in entries:
            p = directory / e["path"]
            if not p.is_file():
                raise CheckpointError(f"checkpoint {str(directory)!r}: file {e['path']!r} is missing")
            if p.stat().st_size != e["size"] or _sha256(p) != e["sha256"]:
                raise CheckpointError(f"checkpoint {str(directory)!r}: file {e['path']!r} is corrupted (size or "
                                      f"SHA-256 differs from when it was written); resume from an earlier checkpoint")
    return meta


def load_checkpoint(engine, directory: str | os.PathLike, *, rank: int, world_size: int) -> tuple[dict, dict]:
    """Restore the engine (model, optimizer, scheduler) in place; return (meta, this rank's loader state)."""
    directory = pathlib.Path(directory)
    meta = verify_checkpoint(directory)
    if int(meta.get("world_size", world_size)) != world_size:
        raise CheckpointError(f"checkpoint {str(directory)!r} was written by {meta.get('world_size')} workers but this "
                              f"run has {world_size}; resume with the same number of workers")
    loader_path = directory / f"loader_rank{rank}.json"
    loader_state = json.loads(loader_path.read_text())
    make_engine_loading_safe(engine)
    try:
        path, _ = engine.load_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except RuntimeError as err:
        # A run directory reused after the config, the data or the library changed (the prior's fitted tables
        # are buffers whose shapes follow the data): say so instead of PyTorch's list of tensors.
        if "size mismatch" not in str(err) and "Missing key" not in str(err) and "Unexpected key" not in str(err):
            raise
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"checkpoint {str(directory)!r} holds a model of another shape than this run builds "
                              f"({first}): it was written with another config, training split, store or library "
                              f"version. Train into a new output directory, or delete that checkpoint to start "
                              f"over") from None
    if path is None:
        raise CheckpointError(f"checkpoint {str(directory)!r}: DeepSpeed found no engine state under {ENGINE_DIR}/")
    return meta, loader_state
