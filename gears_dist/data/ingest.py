"""``gears-dist ingest``: an AnnData .h5ad of any size -> a training-ready Zarr store, out of core.

Passes (memory is bounded by ``memory_budget_mb`` and the chunk size, not by the number of cells;
the only per-cell vectors held are an 8-byte hash per cell for the duplicate-name check, plus for
CSC sources the library sizes and destination rows, 16 bytes per cell):

0. obs: the condition column, cell names, cell type and batch are read as row ranges; conditions are
   parsed into canonical perturbation sets, genes resolved, and the pluggable condition order gives
   every condition its contiguous destination range.
1. X scan: values are checked (finite, non-negative), raw counts detected, per-gene moments for the
   highly variable gene selection accumulated, and the destination rows of each source block
   computed (if the source already is in destination order the spill is skipped).
2. X routing: each source block is normalized (counts: library size 1e4 + log1p), gene-selected
   and appended, row by row, to the spill file of its destination bucket (an external sort:
   ``spill.py``); CSC sources are read by column blocks and routed as (row, gene, value) triples.
3. X write: each bucket is read back alone, assembled into a dense float32 block and written as whole
   Zarr chunks, with its obs rows.
4. Tables, then statistics (``stats.write_stats``, Dask), then ``manifest.json`` last.

The store is built in a temporary directory beside the destination and renamed into place only when
complete (``store.building_store``); spill files live in another temporary sibling removed in all
cases, so an interrupted ingest leaves neither a valid-looking store nor temporary files.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from gears_dist.data import genes as gene_vocab
from gears_dist.data.conditions import DEFAULT_CONTROL_VALUES, ConditionError, condition_name, parse_condition
from gears_dist.data.h5ad import H5adSource
from gears_dist.data.spill import RowsRecord, SpillBuckets
from gears_dist.data.stats import write_stats
from gears_dist.data.store import (
    OBS_CHUNK_CELLS,  # noqa: F401 - the layout's constants live in store.py, still importable from here
    X_CODEC,  # noqa: F401
    X_CODEC_NAME,  # noqa: F401
    Store,
    StoreError,
    building_store,
    create_obs,
    create_x,
    file_fingerprint,
    open_store,
    owned_temp_dir,
    release_temp_dir,
    remove_stale_temp_dirs,
    write_conditions_table,
    write_genes_table,
    write_manifest,
    write_obs,
    write_root_attrs,
    x_manifest,
)
from gears_dist.progress import progress

TARGET_SUM = 1e4
CONDITION_KEYS = ("condition", "perturbation", "gene", "target_gene")
# X chunk size chosen by tools/bench_ingest.py (BENCHMARKS.md rows "Ingest, peak RSS vs cells" and "Store X codec and chunks")
X_CHUNK_BYTES = 4 << 20
NORMALIZATIONS = ("auto", "counts", "log1p")

# -- pluggable condition order -------------------------------------------------------------------
ConditionOrder = Callable[[list[tuple[str, ...]], np.ndarray], np.ndarray]
_ORDERS: dict[str, ConditionOrder] = {}


def register_condition_order(name: str, fn: ConditionOrder) -> None:
    """Register an order of conditions in the store: ``fn(condition_genes, num_cells) -> permutation``.

    `condition_genes[i]` is the sorted gene tuple of condition i (() = control) and `num_cells[i]` its
    cell count; the result lists condition indices in storage order.
    """
    _ORDERS[name] = fn


def registered_orders() -> list[str]:
    return sorted(_ORDERS)


def condition_permutation(name: str, condition_genes: list[tuple[str, ...]], num_cells: np.ndarray) -> np.ndarray:
    if name not in _ORDERS:
        raise ValueError(f"unknown condition order {name!r}; registered orders: {registered_orders()}")
    perm = np.asarray(_ORDERS[name](list(condition_genes), np.asarray(num_cells)), dtype=np.int64)
    if perm.shape != (len(condition_genes),) or not np.array_equal(np.sort(perm), np.arange(len(condition_genes))):
        raise ValueError(f"condition order {name!r} returned {perm.shape[0] if perm.ndim else perm!r} indices that "
                         f"are not a permutation of the {len(condition_genes)} conditions")
    return perm


def order_by_condition(condition_genes: list[tuple[str, ...]], num_cells: np.ndarray) -> np.ndarray:
    """Control first, then conditions sorted by canonical name."""
    keys = [(len(g) > 0, condition_name(g)) for g in condition_genes]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


register_condition_order("condition", order_by_condition)


# -- plan: everything decided from obs/var before X is touched ------------------------------------
@dataclasses.dataclass
class _Conditions:
    genes: list[tuple[str, ...]]          # storage order
    num_cells: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    of_code: np.ndarray                   # raw code of the condition column -> storage index
    cell_type: np.ndarray                 # majority cell type per condition
    num_cell_types: np.ndarray
    renamed: dict[str, str]
    separators: tuple[str, ...]
    control_values: tuple[str, ...]


@dataclasses.dataclass
class _Obs:
    condition: object                     # ObsColumn
    cell_type: object | None
    batch: object | None
    cell_types: list[str]                 # plus 'unknown' / 'none' appended when some cells lack one
    batches: list[str]


@dataclasses.dataclass
class _Scan:
    all_integer: bool = True
    max_value: float = 0.0
    lib_sum: float = 0.0
    lib_min: float = math.inf
    lib_max: float = 0.0
    identity: bool = True
    # per-gene moments for HVG: expm1 of the data (log hypothesis) and normalized counts
    log_moments: np.ndarray | None = None
    count_moments: np.ndarray | None = None
    lib_sizes: np.ndarray | None = None   # CSC only


def _pick_condition_key(src: H5adSource, key: str | None) -> str:
    cols = src.obs_columns
    if key is not None:
        if key not in cols:
            raise ValueError(f"condition column {key!r} not found in obs (columns: {cols}); pass the column that "
                             f"holds the perturbation with --condition-key")
        return key
    for k in CONDITION_KEYS:
        if k in cols:
            return k
    raise ValueError(f"no condition column in obs: looked for {list(CONDITION_KEYS)}, found {cols}; pass the "
                     f"column that holds the perturbation with --condition-key NAME")


def _optional_column(src: H5adSource, key: str | None, what: str, flag: str):
    if key is None:
        return None
    if key not in src.obs_columns:
        raise ValueError(f"{what} column {key!r} not found in obs (columns: {src.obs_columns}); fix {flag}")
    return src.obs_column(key)


def _hash_ids(ids: np.ndarray) -> np.ndarray:
    return pd.util.hash_array(ids.astype(object), categorize=False)


def _check_unique_cells(src: H5adSource, hashes: np.ndarray) -> None:
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if same.size == 0:
        return
    rows = np.unique(np.concatenate([order[same], order[same + 1]]))[:200]
    names = pd.Series([src.cell_ids(int(r), int(r) + 1)[0] for r in rows])
    dup = names[names.duplicated(keep=False)].unique().tolist()
    if dup:
        raise ValueError(f"duplicate cell names in obs_names, e.g. {dup[:5]}; cell names must be unique: "
                         f"run adata.obs_names_make_unique() and save the file again")


def progress_ranges(ranges, total: int, desc: str, unit: str):
    """The (start, stop) ranges of a pass, showing its progress (gears_dist.progress) by their lengths."""
    with progress(total, desc, unit, unit_scale=True) as bar:
        for a, b in ranges:
            yield a, b
            bar.update(int(b) - int(a))


def _scan_obs(src: H5adSource, condition_key, cell_type_key, batch_key, block: int):
    """Pass 0: counts per (condition value, cell type), category lists, unique cell names."""
    cond = src.obs_column(_pick_condition_key(src, condition_key))
    ctype = _optional_column(src, cell_type_key, "cell type", "--cell-type-key")
    batch = _optional_column(src, batch_key, "batch", "--batch-key")
    pair_counts: dict[tuple[int, int], int] = {}
    hashes = []
    num_missing = ct_missing = batch_missing = 0
    bar = progress(src.num_cells, "ingest: read obs", "cell", unit_scale=True)
    for a in range(0, src.num_cells, block):
        b = min(src.num_cells, a + block)
        bar.update(b - a)
        codes = cond.codes(a, b)
        num_missing += int((codes < 0).sum())
        ct = ctype.codes(a, b) if ctype is not None else np.zeros(b - a, np.int64)
        ct_missing += int((ct < 0).sum())
        if batch is not None:
            batch_missing += int((batch.codes(a, b) < 0).sum())  # also grows the category list
        pairs, counts = np.unique(np.stack([codes, ct]), axis=1, return_counts=True)
        for (c, t), n in zip(pairs.T.tolist(), counts.tolist()):
            pair_counts[(c, t)] = pair_counts.get((c, t), 0) + n
        hashes.append(_hash_ids(src.cell_ids(a, b)))
    bar.close()
    if num_missing:
        raise ValueError(f"{num_missing} cells have no value in obs[{cond.name!r}]; every cell needs a condition "
                         f"(e.g. the control value): fill or drop them before ingest")
    _check_unique_cells(src, np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))
    # cells without a cell type / batch get an extra 'unknown' / 'none' entry (index = len(categories))
    cell_types = list(ctype.categories) + (["unknown"] if ct_missing else []) if ctype is not None else ["unknown"]
    batches = list(batch.categories) + (["none"] if batch_missing else []) if batch is not None else ["none"]
    return _Obs(cond, ctype, batch, cell_types, batches), pair_counts


def _resolve_genes(src: H5adSource, gene_key: str | None):
    var = src.var()
    if gene_key is None:
        gene_key = "gene_name" if "gene_name" in var.columns else None
    if gene_key is not None and gene_key not in var.columns:
        raise ValueError(f"gene column {gene_key!r} not found in var (columns: {list(var.columns)}); fix "
                         f"--gene-key or leave it out to use var_names")
    names = (var[gene_key] if gene_key else var.index.to_series()).astype(str).to_numpy()
    if len(names) != src.num_genes:
        raise ValueError(f"var has {len(names)} rows but X has {src.num_genes} columns; the file is inconsistent")
    dup = pd.Series(names)[pd.Series(names).duplicated()].unique().tolist()
    if dup:
        where = f"var[{gene_key!r}]" if gene_key else "var_names"
        raise ValueError(f"duplicate gene names in {where}, e.g. {dup[:5]}; gene names must be unique: run "
                         f"adata.var_names_make_unique() (or pick another column with --gene-key) and save again")
    resolved, renamed = gene_vocab.resolve_symbols(names)
    # an alias must not collide with a gene that is measured under its current name
    taken = pd.Series(resolved).duplicated(keep=False).to_numpy()
    for i in np.flatnonzero(taken):
        if names[i] in renamed:
            resolved[i] = names[i]
            renamed.pop(names[i])
    if pd.Series(resolved).duplicated().any():
        raise ValueError("gene names are not unique after alias resolution; rename them in the source file")
    return list(names), list(resolved), renamed


def _guess_separators(values: list[str], controls: set[str], known: set[str]) -> tuple[str, ...]:
    """'_' separates genes too when the '_'-joined names are mostly pairs of known symbols (scPerturb A_B)."""
    under = [v for v in values if "_" in v and "+" not in v and v not in controls]
    if not under:
        return ("+",)
    known_pairs = sum(all(t in known for t in v.split("_")) for v in under)
    return ("+", "_") if known_pairs * 2 >= len(under) else ("+",)


def _build_conditions(obs: _Obs, pair_counts, control_values, separators, measured: list[str],
                      order: str) -> _Conditions:
    cats = obs.condition.categories
    used = sorted({c for c, _ in pair_counts})
    controls = tuple(control_values) if control_values else DEFAULT_CONTROL_VALUES
    go = gene_vocab.go_annotations()
    if separators is None:
        separators = _guess_separators([cats[c] for c in used], set(controls), set(measured) | set(go))
    parsed = {}
    for c in used:
        try:
            parsed[c] = parse_condition(cats[c], controls, separators)
        except ConditionError as exc:
            raise ValueError(f"{exc} (column obs[{obs.condition.name!r}]; control values {list(controls)}, "
                             f"separators {list(separators)}; fix with --control-value / --separator)") from None
    if not any(len(g) == 0 for g in parsed.values()):
        counts = pd.Series({cats[c]: sum(n for (cc, _), n in pair_counts.items() if cc == c) for c in used})
        top = counts.sort_values(ascending=False).head(8).index.tolist()
        raise ValueError(f"no control cells: no value of obs[{obs.condition.name!r}] is a control value "
                         f"{list(controls)} (most common values: {top}); name the control with --control-value")
    pert_genes = sorted({g for gs in parsed.values() for g in gs})
    resolved, renamed = gene_vocab.resolve_symbols(pert_genes, known=set(go) | set(measured))
    rename = dict(zip(pert_genes, resolved))
    canon = {c: tuple(sorted({rename[g] for g in gs})) for c, gs in parsed.items()}
    base = sorted(set(canon.values()), key=lambda g: (len(g) > 0, condition_name(g)))
    base_index = {g: i for i, g in enumerate(base)}
    num_cells = np.zeros(len(base), np.int64)
    type_counts: dict[int, dict[int, int]] = {}
    for (c, t), n in pair_counts.items():
        i = base_index[canon[c]]
        t = t if t >= 0 else len(obs.cell_types) - 1  # missing cell type: the appended 'unknown' 
        num_cells[i] += n
        type_counts.setdefault(i, {})
        type_counts[i][t] = type_counts[i].get(t, 0) + n
    perm = condition_permutation(order, base, num_cells)
    rank = np.empty(len(base), np.int64)
    rank[perm] = np.arange(len(base))
    ordered_counts = num_cells[perm]
    stop = np.cumsum(ordered_counts)
    of_code = np.full(max(len(cats), 1), -1, np.int64)
    for c in used:
        of_code[c] = rank[base_index[canon[c]]]
    majority = np.array([max(type_counts[i].items(), key=lambda kv: (kv[1], -kv[0]))[0] for i in perm], np.int32)
    num_types = np.array([len(type_counts[i]) for i in perm], np.int32)
    return _Conditions([base[i] for i in perm], ordered_counts, stop - ordered_counts, stop, of_code,
                       majority, num_types, renamed, tuple(separators), tuple(controls))


def _check_perturbed_genes(conds: _Conditions, measured: list[str]) -> tuple[list[str], list[str]]:
    pert = sorted({g for gs in conds.genes for g in gs})
    measured_set, go = set(measured), gene_vocab.go_annotations()
    unmeasured = [g for g in pert if g not in measured_set]
    no_go = [g for g in pert if g not in go]
    if pert and len(unmeasured) == len(pert) and len(no_go) == len(pert):
        raise ValueError(f"none of the {len(pert)} perturbed genes (e.g. {pert[:5]}) is a measured gene or a "
                         f"known human gene symbol with GO annotations, so GEARS can place none of them; check "
                         f"--condition-key / --gene-key and that names are gene symbols (not guide or Ensembl ids)")
    if unmeasured:
        warnings.warn(f"{len(unmeasured)} of {len(pert)} perturbed genes are not among the measured genes "
                      f"(kept: GEARS predicts them through the GO graph): {_short(unmeasured)}", stacklevel=3)
    if no_go:
        warnings.warn(f"{len(no_go)} perturbed genes have no GO annotation (GEARS cannot place them in the GO "
                      f"graph): {_short(no_go)}", stacklevel=3)
    return unmeasured, no_go


def _short(names: list[str], n: int = 30) -> str:
    return str(names) if len(names) <= n else f"{names[:n]} ... (+{len(names) - n} more)"


# -- destination rows ---------------------------------------------------------------------------
def _dest_rows(cond_idx: np.ndarray, cursor: np.ndarray) -> np.ndarray:
    """Destination row of each source row of a block; `cursor[c]` = next free row of condition c (updated)."""
    order = np.argsort(cond_idx, kind="stable")
    sorted_c = cond_idx[order]
    first = np.searchsorted(sorted_c, sorted_c, side="left")
    dest = np.empty(len(cond_idx), np.int64)
    dest[order] = cursor[sorted_c] + (np.arange(len(cond_idx)) - first)
    cursor += np.bincount(cond_idx, minlength=len(cursor))
    return dest


# -- X scan (pass 1) ----------------------------------------------------------------------------
def _check_values(values: np.ndarray, where: str) -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"X contains NaN or infinite values ({where}); expected finite expression values: fix or "
                         f"drop those cells before ingest")
    if values.size and values.min() < 0:
        raise ValueError(f"X contains negative values ({where}, min {values.min():g}); expected counts or log1p "
                         f"expression (>= 0): scaled/centered data (sc.pp.scale) cannot be ingested, use the "
                         f"unscaled layer")


def _note_values(scan: _Scan, values: np.ndarray) -> None:
    if values.size:
        scan.max_value = max(scan.max_value, float(values.max()))
        if scan.all_integer and values.dtype.kind == "f":
            scan.all_integer = bool(np.all(values == np.rint(values)))


def _note_libs(scan: _Scan, lib: np.ndarray) -> None:
    if lib.size:
        scan.lib_sum += float(lib.sum())
        scan.lib_min = min(scan.lib_min, float(lib.min()))
        scan.lib_max = max(scan.lib_max, float(lib.max()))


def _row_sums(block) -> np.ndarray:
    return np.asarray(block.sum(axis=1), dtype=np.float64).ravel()


def _moments(block, num_genes: int) -> np.ndarray:
    """Per-gene [sum, sum of squares] of a (sparse or dense) float64 block."""
    if sp.issparse(block):
        sq = block.multiply(block)
        return np.stack([np.asarray(block.sum(axis=0)).ravel(), np.asarray(sq.sum(axis=0)).ravel()])
    return np.stack([block.sum(axis=0), (block * block).sum(axis=0)])


def _scale_rows(block, factor: np.ndarray):
    if sp.issparse(block):
        return sp.csr_matrix(sp.diags(factor) @ block)
    return block * factor[:, None]


def _expm1(block):
    if sp.issparse(block):
        out = block.copy()
        np.expm1(out.data, out=out.data)
        return out
    return np.expm1(block)


def _scan_rows(src: H5adSource, obs: _Obs, conds: _Conditions, rows_per_block: int, want_hvg: bool) -> _Scan:
    scan = _Scan()
    if want_hvg:
        scan.log_moments = np.zeros((2, src.num_genes))
        scan.count_moments = np.zeros((2, src.num_genes))
    cursor = conds.start.copy()
    for a, b in progress_ranges(src.row_ranges(rows_per_block), src.num_cells, "ingest: scan X", "cell"):
        block = src.row_block(a, b)
        values = block.data if sp.issparse(block) else block
        _check_values(values, f"rows {a}..{b - 1}")
        _note_values(scan, values)
        lib = _row_sums(block)
        _note_libs(scan, lib)
        dest = _dest_rows(conds.of_code[obs.condition.codes(a, b)], cursor)
        scan.identity &= bool(np.array_equal(dest, np.arange(a, b)))
        if want_hvg:
            block = block.astype(np.float64)
            scan.log_moments += _moments(_expm1(block), src.num_genes)
            scan.count_moments += _moments(_scale_rows(block, TARGET_SUM / np.where(lib > 0, lib, 1)), src.num_genes)
    return scan


def _csc_gene_blocks(indptr: np.ndarray, max_nnz: int) -> list[tuple[int, int]]:
    out, g0, num_genes = [], 0, len(indptr) - 1
    while g0 < num_genes:
        g1 = int(np.searchsorted(indptr, indptr[g0] + max_nnz, side="right")) - 1
        g1 = min(num_genes, max(g1, g0 + 1))
        out.append((g0, g1))
        g0 = g1
    return out


def _scan_csc(src: H5adSource, indptr: np.ndarray, max_nnz: int, want_hvg: bool) -> _Scan:
    scan = _Scan(identity=False)
    libs = np.zeros(src.num_cells)
    blocks = _csc_gene_blocks(indptr, max_nnz)
    for g0, g1 in progress_ranges(blocks, src.num_genes, "ingest: scan X", "gene"):
        rows, _, vals = src.column_block(g0, g1, indptr)
        _check_values(vals, f"genes {g0}..{g1 - 1}")
        _note_values(scan, vals)
        libs += np.bincount(rows, weights=vals, minlength=src.num_cells)
    _note_libs(scan, libs)
    scan.lib_sizes = libs
    if want_hvg:
        scan.log_moments = np.zeros((2, src.num_genes))
        scan.count_moments = np.zeros((2, src.num_genes))
        scale = TARGET_SUM / np.where(libs > 0, libs, 1)
        # a second column pass: normalized counts need the finished library sizes
        for g0, g1 in progress_ranges(blocks, src.num_genes, "ingest: scan X (gene moments)", "gene"):
            rows, genes, vals = src.column_block(g0, g1, indptr)
            vals = vals.astype(np.float64)
            for target, v in ((scan.log_moments, np.expm1(vals)), (scan.count_moments, vals * scale[rows])):
                target[0] += np.bincount(genes, weights=v, minlength=src.num_genes)
                target[1] += np.bincount(genes, weights=v * v, minlength=src.num_genes)
    return scan


# -- normalization and gene selection ----------------------------------------------------------
def _choose_normalization(normalize: str, scan: _Scan, num_cells: int) -> dict:
    mean_lib = scan.lib_sum / max(num_cells, 1)
    evidence = {"all_integer": scan.all_integer, "max_value": scan.max_value, "mean_library_size": mean_lib,
                "min_library_size": scan.lib_min if num_cells else 0.0, "max_library_size": scan.lib_max}
    if normalize == "counts":
        if not scan.all_integer:
            warnings.warn("--normalize counts, but X has non-integer values: normalizing them as counts anyway",
                          stacklevel=3)
        return {"choice": "counts_normalize_log1p", "reason": "forced (--normalize counts)", "target_sum": TARGET_SUM,
                **evidence}
    if normalize == "log1p":
        return {"choice": "log1p_as_is", "reason": "forced (--normalize log1p)", **evidence}
    if scan.all_integer and scan.max_value > 0:
        return {"choice": "counts_normalize_log1p", "target_sum": TARGET_SUM,
                "reason": f"X is integer-valued (max {scan.max_value:g}, mean library size {mean_lib:.4g}): raw counts",
                **evidence}
    constant_libs = scan.lib_max > 0 and (scan.lib_max - scan.lib_min) <= 1e-3 * scan.lib_max
    if scan.max_value > 30 or (constant_libs and scan.lib_max > 100):
        warnings.warn(f"X looks normalized but not log-transformed (max {scan.max_value:g}, library sizes "
                      f"{scan.lib_min:.4g}..{scan.lib_max:.4g}); using it as is. Apply log1p first (sc.pp.log1p) or "
                      f"pass raw counts with --normalize counts", stacklevel=3)
        return {"choice": "log1p_as_is", "reason": "non-integer values; looks normalized but NOT log-transformed",
                **evidence}
    return {"choice": "log1p_as_is", "reason": f"non-integer values with max {scan.max_value:g}: log data",
            **evidence}


def seurat_dispersion_norm(sums: np.ndarray, sqs: np.ndarray, num_cells: int, num_bins: int = 20) -> np.ndarray:
    """Normalized dispersion of each gene as scanpy's ``highly_variable_genes(flavor='seurat')``.

    From per-gene sums of expm1(log data): mean, unbiased variance, log(var/mean), z-scored within 20
    equal-width bins of log1p(mean) (a bin holding one gene gets dispersion 1).
    """
    n = float(num_cells)
    mean = sums / n
    var = np.maximum(sqs / n - mean * mean, 0) * (n / (n - 1) if n > 1 else 1.0)
    mean = np.where(mean == 0, 1e-12, mean)
    disp = var / mean
    disp[disp == 0] = np.nan
    disp = np.log(disp)
    df = pd.DataFrame({"mean": np.log1p(mean), "disp": disp})
    df["bin"] = pd.cut(df["mean"], bins=num_bins)
    grouped = df.groupby("bin", observed=True)["disp"]
    avg, dev = grouped.transform("mean"), grouped.transform("std")
    single = dev.isna()
    dev = dev.where(~single, avg)
    avg = avg.where(~single, 0.0)
    return ((df["disp"] - avg) / dev).to_numpy()


def _select_genes(hvg: int | None, scan: _Scan, norm: dict, num_cells: int, symbols: list[str],
                  conds: _Conditions) -> tuple[np.ndarray, np.ndarray]:
    """Kept source gene indices (source order) and the HVG flag of each kept gene."""
    num_genes = len(symbols)
    perturbed = {g for gs in conds.genes for g in gs}
    if hvg is None or hvg >= num_genes:
        return np.arange(num_genes), np.zeros(num_genes, bool)
    moments = scan.count_moments if norm["choice"] == "counts_normalize_log1p" else scan.log_moments
    score = seurat_dispersion_norm(moments[0], moments[1], num_cells)
    score = np.nan_to_num(score, nan=-np.inf)
    top = np.argsort(-score, kind="stable")[:hvg]
    is_hvg = np.zeros(num_genes, bool)
    is_hvg[top] = True
    keep = is_hvg | np.array([s in perturbed for s in symbols])
    idx = np.flatnonzero(keep)
    return idx, is_hvg[idx]


def default_chunk_cells(num_genes: int) -> int:
    """Cells per X chunk: the power of two nearest X_CHUNK_BYTES of float32 rows, within [16, 16384]."""
    rows = X_CHUNK_BYTES / (4 * max(num_genes, 1))
    return int(min(16384, max(16, 2 ** round(math.log2(max(rows, 1))))))


# -- X routing and writing (passes 2 and 3) ------------------------------------------------------
@dataclasses.dataclass
class _Writer:
    root: zarr.Group
    conds: _Conditions
    num_genes: int

    def __post_init__(self):
        self.x = self.root["X"]
        self.cond_of_row_starts = self.conds.start
        self.is_control = np.array([len(g) == 0 for g in self.conds.genes])

    def write(self, a: int, dense: np.ndarray, source_row, cell_type, batch, cell_ids) -> None:
        b = a + dense.shape[0]
        self.x[a:b] = dense
        cond = (np.searchsorted(self.conds.stop, np.arange(a, b), side="right")).astype(np.int32)
        write_obs(self.root, a, condition=cond, is_control=self.is_control[cond], cell_type=cell_type, batch=batch,
                  source_row=source_row, cell_id=cell_ids)


def _normalize_block(block, norm: dict, keep: np.ndarray, all_genes: bool):
    """Source rows -> float32 log1p rows of the kept genes (CSR stays CSR)."""
    if norm["choice"] == "counts_normalize_log1p":
        lib = _row_sums(block)
        scale = TARGET_SUM / np.where(lib > 0, lib, 1)
        if sp.issparse(block):
            data = block.data.astype(np.float64)
            data *= np.repeat(scale, np.diff(block.indptr))
            np.log1p(data, out=data)
            block = sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)
        else:
            block = np.log1p(block * scale[:, None])
    if not all_genes:
        block = block[:, keep]
    return block.astype(np.float32)


class _ObsReader:
    def __init__(self, src: H5adSource, obs: _Obs):
        self.src, self.obs = src, obs

    def read(self, a: int, b: int):
        obs = self.obs
        ct = obs.cell_type.codes(a, b) if obs.cell_type is not None else np.zeros(b - a, np.int64)
        bt = obs.batch.codes(a, b) if obs.batch is not None else np.zeros(b - a, np.int64)
        # missing (-1) -> the 'unknown' / 'none' entry appended after the categories
        ct = np.where(ct < 0, len(obs.cell_types) - 1, ct)
        bt = np.where(bt < 0, len(obs.batches) - 1, bt)
        return ct.astype(np.int32), bt.astype(np.int32), self.src.cell_ids(a, b)


def _route_rows(src, obs, conds, norm, keep, writer: _Writer, spill: SpillBuckets | None, rows_per_block, bounds):
    all_genes = len(keep) == src.num_genes
    reader = _ObsReader(src, obs)
    cursor = conds.start.copy()
    ranges = list(itertools.pairwise(bounds)) if spill is None else list(src.row_ranges(rows_per_block))
    what = "ingest: write X" if spill is None else "ingest: sort X"
    for a, b in progress_ranges(ranges, src.num_cells, what, "cell"):
        a, b = int(a), int(b)
        block = _normalize_block(src.row_block(a, b), norm, keep, all_genes)
        dest = _dest_rows(conds.of_code[obs.condition.codes(a, b)], cursor)
        ct, bt, ids = reader.read(a, b)
        if spill is None:  # the source already is in destination order: write straight through
            assert np.array_equal(dest, np.arange(a, b)), "identity fast path with a non-identity order"
            dense = block.toarray() if sp.issparse(block) else np.ascontiguousarray(block)
            writer.write(a, dense, np.arange(a, b), ct, bt, ids)
            continue
        csr = block if sp.issparse(block) else sp.csr_matrix(block)
        csr.sort_indices()
        spill.add_rows(RowsRecord(dest, np.arange(a, b), ct, bt, ids, np.diff(csr.indptr).astype(np.int32),
                                  csr.indices, csr.data))


def _route_csc(src, obs, conds, norm, keep, spill: SpillBuckets, scan: _Scan, max_nnz: int, rows_per_block: int):
    reader = _ObsReader(src, obs)
    cursor = conds.start.copy()
    dest_of_row = np.empty(src.num_cells, np.int64)
    for a, b in src.row_ranges(rows_per_block):
        dest = _dest_rows(conds.of_code[obs.condition.codes(a, b)], cursor)
        dest_of_row[a:b] = dest
        ct, bt, ids = reader.read(a, b)
        spill.add_rows(RowsRecord(dest, np.arange(a, b), ct, bt, ids, np.zeros(b - a, np.int32),
                                  np.zeros(0, np.int32), np.zeros(0, np.float32)))
    new_col = np.full(src.num_genes, -1, np.int64)
    new_col[keep] = np.arange(len(keep))
    counts = norm["choice"] == "counts_normalize_log1p"
    scale = TARGET_SUM / np.where(scan.lib_sizes > 0, scan.lib_sizes, 1) if counts else None
    indptr = src.csc_indptr()
    for g0, g1 in progress_ranges(_csc_gene_blocks(indptr, max_nnz), src.num_genes, "ingest: sort X", "gene"):
        if not (new_col[g0:g1] >= 0).any():
            continue
        rows, genes, vals = src.column_block(g0, g1, indptr)
        sel = new_col[genes] >= 0
        rows, genes, vals = rows[sel], genes[sel], vals[sel].astype(np.float64)
        if counts:
            vals = np.log1p(vals * scale[rows])
        nz = vals != 0
        spill.add_coo(dest_of_row[rows[nz]], new_col[genes[nz]], vals[nz].astype(np.float32))


def _scatter_rows(dense: np.ndarray, rel: np.ndarray, row_nnz: np.ndarray, indices: np.ndarray,
                  data: np.ndarray, max_nnz: int = 1 << 20) -> None:
    """dense[rel[i], indices[...]] = data[...] for CSR rows, in slices of <= max_nnz non-zeros so that the
    index temporaries stay small (no second dense copy of the bucket either)."""
    ends = np.cumsum(row_nnz, dtype=np.int64)
    flat = dense.reshape(-1)
    num_genes = dense.shape[1]
    r0 = 0
    while r0 < len(rel):
        r1 = max(r0 + 1, int(np.searchsorted(ends, (ends[r0 - 1] if r0 else 0) + max_nnz, side="right")))
        lo, hi = (int(ends[r0 - 1]) if r0 else 0), int(ends[r1 - 1])
        pos = np.repeat(rel[r0:r1] * num_genes, row_nnz[r0:r1])
        pos += indices[lo:hi]
        flat[pos] = data[lo:hi]
        r0 = r1


def _write_buckets(spill: SpillBuckets, writer: _Writer, num_genes: int) -> None:
    block = np.empty((int(np.diff(spill.bounds).max(initial=0)), num_genes), np.float32)  # reused
    buckets = [(int(spill.bounds[k]), int(spill.bounds[k + 1])) for k in range(spill.num_buckets)]
    for k, (a, b) in enumerate(progress_ranges(buckets, int(spill.bounds[-1]), "ingest: write X", "cell")):
        rows, coo = spill.read(k)
        dense = block[: b - a]
        dense.fill(0)
        covered = np.zeros(b - a, np.int64)
        src_row = np.empty(b - a, np.int64)
        ct = np.empty(b - a, np.int32)
        bt = np.empty(b - a, np.int32)
        ids = np.empty(b - a, dtype=object)
        for r in rows:
            rel = r.dest - a
            covered[rel] += 1
            src_row[rel], ct[rel], bt[rel], ids[rel] = r.source_row, r.cell_type, r.batch, r.cell_ids
            if len(r.data):
                _scatter_rows(dense, rel, r.row_nnz, r.indices, r.data)
        flat = dense.reshape(-1)
        for dest, gene, value in coo:
            for lo in range(0, len(dest), 1 << 20):  # slices keep the index temporaries small
                pos = (dest[lo:lo + (1 << 20)] - a) * num_genes
                pos += gene[lo:lo + (1 << 20)]
                flat[pos] = value[lo:lo + (1 << 20)]
        assert np.all(covered == 1), "external sort lost or duplicated destination rows"
        writer.write(a, dense, src_row, ct, bt, ids)
        del rows, coo, ids


# -- entry point ----------------------------------------------------------------------------------
def ingest(input_path, store_path, *, condition_key=None, control_values=None, separators=None, gene_key=None,
           cell_type_key=None, batch_key=None, hvg=None, normalize="auto", chunk_cells=None, order="condition",
           memory_budget_mb=1024, overwrite=False, _max_block_rows=None, _max_block_nnz=None) -> Store:
    """Ingest an AnnData .h5ad into a gears_dist store (layout: gears_dist/data/store.py). Returns it opened.

    ``_max_block_rows`` / ``_max_block_nnz`` cap the source block, bucket and CSC column-block sizes
    below what the memory budget allows (tests use them to exercise many blocks on tiny files).
    """
    t0 = time.perf_counter()
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: expected one of {list(NORMALIZATIONS)}")
    if hvg is not None and (not isinstance(hvg, int) or hvg < 1):
        raise ValueError(f"hvg={hvg!r}: expected a positive number of genes, or None for all genes")
    if chunk_cells is not None and (not isinstance(chunk_cells, int) or chunk_cells < 1):
        raise ValueError(f"chunk_cells={chunk_cells!r}: expected a positive integer")
    if not isinstance(memory_budget_mb, int) or memory_budget_mb < 32:
        raise ValueError(f"memory_budget_mb={memory_budget_mb!r}: expected an integer >= 32")
    if order not in _ORDERS:
        raise ValueError(f"unknown condition order {order!r}; registered orders: {registered_orders()}")
    store_path = pathlib.Path(store_path)
    if store_path.exists() and not overwrite:
        raise StoreError(f"destination {str(store_path)!r} already exists; pass --overwrite to replace it or "
                         f"choose another path")
    budget = memory_budget_mb << 20
    with H5adSource(input_path) as src:
        if src.num_cells == 0 or src.num_genes == 0:
            raise ValueError(f"input has shape {src.shape}; expected at least one cell and one gene")
        obs_block = max(1024, min(1 << 18, budget // 64 // 64))
        obs, pair_counts = _scan_obs(src, condition_key, cell_type_key, batch_key, obs_block)
        source_names, symbols, renamed_genes = _resolve_genes(src, gene_key)
        conds = _build_conditions(obs, pair_counts, control_values, separators, symbols, order)
        unmeasured, no_go = _check_perturbed_genes(conds, symbols)

        avg_nnz = src.nnz() / max(src.num_cells, 1)
        src_row_bytes = (avg_nnz * 40 if src.x_format == "csr" else src.num_genes * 8 * 4) + 256
        rows_per_block = int(max(64, min(src.num_cells, budget // 8 // src_row_bytes)))
        max_nnz = int(max(1 << 16, budget // 8 // 48))
        if _max_block_rows:
            rows_per_block = min(rows_per_block, _max_block_rows)
        if _max_block_nnz:
            max_nnz = min(max_nnz, _max_block_nnz)
        want_hvg = hvg is not None and hvg < src.num_genes
        if src.x_format == "csc":
            indptr = src.csc_indptr()
            scan = _scan_csc(src, indptr, max_nnz, want_hvg)
        else:
            scan = _scan_rows(src, obs, conds, rows_per_block, want_hvg)
        norm = _choose_normalization(normalize, scan, src.num_cells)
        keep, is_hvg = _select_genes(hvg, scan, norm, src.num_cells, symbols, conds)
        num_genes = len(keep)
        chunk = chunk_cells or default_chunk_cells(num_genes)
        # a bucket holds its dense block and its spill records (8 bytes per non-zero, 16 for CSC's
        # (row, gene, value) triples, once decompressed; the compressed file is read beside them): each <= budget/8
        spill_row_bytes = (16 if src.x_format == "csc" else 8) * avg_nnz * num_genes / src.num_genes + 64
        bucket_rows = max(chunk, int(budget // 8 // max(4 * num_genes, spill_row_bytes)) // chunk * chunk)
        if _max_block_rows:
            bucket_rows = max(chunk, min(bucket_rows, _max_block_rows // chunk * chunk))
        bounds = np.unique(np.r_[np.arange(0, src.num_cells, bucket_rows), src.num_cells])

        with building_store(store_path, overwrite=overwrite) as tmp:
            root = zarr.open_group(tmp, mode="w")
            create_x(root, src.num_cells, num_genes, chunk)
            create_obs(root, src.num_cells, chunk)
            writer = _Writer(root, conds, num_genes)
            if scan.identity:
                _route_rows(src, obs, conds, norm, keep, writer, None, rows_per_block, bounds)
                spill_bytes = spill_raw_bytes = 0
            else:
                remove_stale_temp_dirs(store_path, "spill")  # left by ingests killed outright
                spill_dir = owned_temp_dir(store_path, "spill", create=False)
                try:
                    spill = SpillBuckets(spill_dir, bounds)
                    if src.x_format == "csc":
                        _route_csc(src, obs, conds, norm, keep, spill, scan, max_nnz, rows_per_block)
                    else:
                        _route_rows(src, obs, conds, norm, keep, writer, spill, rows_per_block, bounds)
                    spill_bytes, spill_raw_bytes = spill.bytes_written, spill.raw_bytes
                    _write_buckets(spill, writer, num_genes)
                    spill.cleanup()
                finally:
                    release_temp_dir(spill_dir)  # the spill files and the owner record, in every case
            write_root_attrs(root, cell_types=obs.cell_types, batches=obs.batches, condition_order=order,
                             normalization=norm["choice"])
            write_conditions_table(root, conds.genes, conds.num_cells, conds.cell_type, conds.num_cell_types)
            go, kept = gene_vocab.go_annotations(), [symbols[i] for i in keep]
            write_genes_table(root, kept, source_names=[source_names[i] for i in keep], source_index=keep,
                              perturbed={g for gs in conds.genes for g in gs}, has_go=[s in go for s in kept],
                              highly_variable=is_hvg)
            write_stats(root, memory_budget_mb=memory_budget_mb)
            seconds = time.perf_counter() - t0
            write_manifest(tmp, {
                "source": {**file_fingerprint(input_path), "x_format": src.x_format, "x_dtype": str(src.x_dtype),
                           "shape": list(src.shape)},
                "parameters": {"condition_key": obs.condition.name, "control_values": list(conds.control_values),
                               "separators": list(conds.separators), "gene_key": gene_key, "cell_type_key": cell_type_key,
                               "batch_key": batch_key, "hvg": hvg, "normalize": normalize, "chunk_cells": chunk,
                               "order": order, "memory_budget_mb": memory_budget_mb},
                "counts": {"num_cells": src.num_cells, "num_genes": num_genes, "num_conditions": len(conds.genes),
                           "num_control_cells": int(sum(n for g, n in zip(conds.genes, conds.num_cells) if not g)),
                           "num_source_genes": src.num_genes,
                           "num_perturbed_genes": len({g for gs in conds.genes for g in gs}),
                           "num_cell_types": len(obs.cell_types), "num_batches": len(obs.batches)},
                "normalization": norm,
                "renamed_genes": renamed_genes,
                "renamed_perturbation_genes": conds.renamed,
                "dropped_perturbations": [],
                "unmeasured_perturbed_genes": unmeasured,
                "perturbed_genes_without_go": no_go,
                "x": x_manifest(root),
                "ingest": {"seconds": round(seconds, 3), "spill_bytes": int(spill_bytes),
                           "spill_uncompressed_bytes": int(spill_raw_bytes),
                           "source_in_destination_order": bool(scan.identity)},
            })
    return open_store(store_path)
