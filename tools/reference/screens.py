"""Input files shared by both implementations in the side-by-side benchmark (run with the project's .venv).

Both sides read the same GEARS-style h5ad: obs.condition 'ctrl' / 'A+ctrl' / 'A+B', obs.cell_type,
var.gene_name, X = log1p(counts / total * 1e4) as CSR float32 (the reference does not normalize; it
expects GEARS' processed data, and our ingest detects log data and uses it as is).

    .venv/bin/python tools/reference/screens.py synthetic .bench/reference/norman_91000.h5ad --cells 91000
    .venv/bin/python tools/reference/screens.py subset tests/data/norman19_k562_subset.h5ad OUT.h5ad
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_ROW_BLOCK = 8192


def normalize_h5ad_inplace(path: Path, target_sum: float = 1e4) -> None:
    """Raw-count CSR X of an h5ad -> log1p(x / row total * target_sum), block of rows by block (bounded memory)."""
    import h5py

    with h5py.File(path, "r+") as f:
        x = f["X"]
        indptr = x["indptr"][:]
        data = x["data"]
        for start in range(0, len(indptr) - 1, _ROW_BLOCK):
            stop = min(start + _ROW_BLOCK, len(indptr) - 1)
            lo, hi = int(indptr[start]), int(indptr[stop])
            values = data[lo:hi].astype(np.float64)
            counts = np.diff(indptr[start:stop + 1])
            totals = np.add.reduceat(values, (indptr[start:stop] - lo)[counts > 0]) if hi > lo else np.zeros(0)
            row_total = np.zeros(stop - start)
            row_total[counts > 0] = totals
            scale = np.repeat(np.where(row_total > 0, target_sum / np.maximum(row_total, 1e-12), 0.0), counts)
            data[lo:hi] = np.log1p(values * scale).astype(np.float32)


def synthetic_screen(path: Path, num_cells: int, preset: str = "norman", seed: int = 0, workers: int = 2) -> dict:
    """The `preset` screen at `num_cells` cells (same genes and conditions at every size), GEARS style, log1p."""
    from gears_dist.data.synthetic import preset as make_spec
    from gears_dist.data.synthetic import write_h5ad

    path = Path(path)
    if path.exists():
        return {"path": str(path), "reused": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.raw-{os.getpid()}.h5ad")
    spec = make_spec(preset, num_cells=num_cells, seed=seed)
    report = write_h5ad(spec, tmp, style="gears", overwrite=True, num_workers=workers)
    normalize_h5ad_inplace(tmp)
    os.replace(tmp, path)
    Path(str(tmp) + ".truth.json").unlink(missing_ok=True)
    report["path"] = str(path)
    return report


def gears_style_subset(src: Path, dst: Path) -> dict:
    """The real Norman subset (obs.condition 'control' / 'A' / 'A+B', symbols in var_names, log1p) rewritten
    in GEARS style: 'ctrl' / 'A+ctrl' / 'A+B', var.gene_name, obs = condition + cell_type only.

    Conditions naming a gene without GO annotation in our table are dropped (reported), for both sides:
    PertData.new_data_process keeps such cells while PertData.load drops them, so the reference's cached split
    and its reloaded data would disagree (KeyError in its test analysis)."""
    import anndata as ad
    import pandas as pd

    from gears_dist.data.genes import go_annotations

    dst = Path(dst)
    if dst.exists():
        return {"path": str(dst), "reused": True}
    a = ad.read_h5ad(src)
    cond = a.obs["condition"].astype(str)
    cond = cond.where(cond.str.contains(r"\+") | (cond == "control"), cond + "+ctrl").replace({"control": "ctrl"})
    go = go_annotations()
    ok = cond.map(lambda c: all(g in go for g in c.split("+") if g != "ctrl"))
    dropped = sorted(cond[~ok].unique())
    a, cond = a[ok.values], cond[ok]
    obs = pd.DataFrame({"condition": pd.Categorical(cond.values),
                        "cell_type": pd.Categorical(a.obs["cell_type"].astype(str).values)}, index=a.obs_names)
    var = pd.DataFrame({"gene_name": a.var_names.astype(str)}, index=a.var_names.astype(str))
    out = ad.AnnData(X=a.X.astype(np.float32), obs=obs, var=var)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.writing-{os.getpid()}.h5ad")
    out.write_h5ad(tmp)
    os.replace(tmp, dst)
    return {"path": str(dst), "num_cells": int(out.n_obs), "num_genes": int(out.n_vars),
            "num_conditions": int(obs["condition"].nunique()), "dropped_conditions_without_go": dropped}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("out")
    s.add_argument("--cells", type=int, default=91000)
    s.add_argument("--preset", default="norman")
    s = sub.add_parser("subset")
    s.add_argument("src")
    s.add_argument("out")
    args = p.parse_args(argv)
    if args.what == "synthetic":
        print(json.dumps(synthetic_screen(Path(args.out), args.cells, args.preset)))
    else:
        print(json.dumps(gears_style_subset(Path(args.src), Path(args.out))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
