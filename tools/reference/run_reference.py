"""Drive the reference implementation (cell-gears 0.1.2) for benchmarks. Run with the REFERENCE venv's python:

    PY=$(.venv/bin/python tools/reference/env.py)                         # creates .bench/reference-venv
    .venv/bin/python tools/reference/go_files.py DATA_DIR --h5ad H5AD      # its GO files, from our GO table
    $PY tools/reference/run_reference.py prepare H5AD DATA_DIR [--name NAME] [--out JSON]
    $PY tools/reference/run_reference.py steps   DATA_DIR --num-steps N --batch 32 [--out JSON]
    $PY tools/reference/run_reference.py train   DATA_DIR --epochs 15 --seed 1 --out JSON
    $PY tools/reference/run_reference.py predict DATA_DIR --conditions A+ctrl A+B ... | --test [--out JSON]
    $PY tools/reference/run_reference.py all     H5AD DATA_DIR --num-steps N [--out JSON]   # prepare+graphs+steps+predict

`DATA_DIR` is the reference's PertData data_path (holds the GO files); the processed dataset lives in
DATA_DIR/NAME (NAME defaults to 'screen'). `prepare` (or `train`/`all` given an H5AD) processes an h5ad in
GEARS style (obs.condition 'ctrl'/'A+ctrl'/'A+B', obs.cell_type, var.gene_name; X log-normalized);
`steps`, `train` and `predict` reuse the processed DATA_DIR/NAME when it exists.

Only the reference's download helpers are patched, at run time (see README.md beside this file): they do
nothing when the file is present and raise a clear error instead of reaching the internet when it is not.
Each command prints one JSON object (and writes it to --out). Times are wall seconds; memory is this
process's high-water RSS (VmHWM) read after each phase; minor faults from getrusage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

DEFAULT_NAME = "screen"


# ------------------------------------------------------------------------------------------ measuring
def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phase:
    """Wall time, minor faults and the high-water RSS at the end of a phase."""

    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self):
        self.t0, self.f0, self.c0 = time.perf_counter(), _minflt(), _cpu_s()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.record[self.name] = {"wall_s": round(time.perf_counter() - self.t0, 3),
                                      "cpu_s": round(_cpu_s() - self.c0, 2),
                                      "minor_faults": _minflt() - self.f0,
                                      "peak_rss_mb_after": round(_hwm_mb(), 1), "rss_mb_after": round(_rss_mb(), 1)}


# ------------------------------------------------------------------------------------------ patching
def patch_downloads() -> list[str]:
    """Replace the reference's download helpers by local-only versions (module attributes, at run time).

    The originals already skip a download when the target exists; the replacements keep that and, when it
    does not exist, raise FileNotFoundError naming the file and how to make it, instead of a network call.
    Returns the patched names (for the record).
    """
    import gears.pertdata
    import gears.utils

    def local_only(url, save_path, *rest):
        # dataverse_download(url, save_path); {zip,tar}_data_download_wrapper(url, save_path, data_path)
        if os.path.exists(save_path):
            return None
        raise FileNotFoundError(
            f"the reference wants {save_path!r} (it would download {url}); there is no internet here: write it "
            f"with '.venv/bin/python tools/reference/go_files.py {os.path.dirname(save_path) or '.'} --h5ad H5AD'"
            f" (GO files), or process the dataset from a local h5ad")

    patched = []
    for module in (gears.utils, gears.pertdata):
        for name in ("dataverse_download", "zip_data_download_wrapper", "tar_data_download_wrapper"):
            if hasattr(module, name):
                setattr(module, name, local_only)
                patched.append(f"{module.__name__}.{name}")
    return patched


def _quiet_reference_output() -> None:
    # tqdm bars and print_sys lines go to stderr; keep stdout for the JSON result.
    os.environ.setdefault("TQDM_DISABLE", "1")


# ------------------------------------------------------------------------------------------ phases
def _check_go_files(data_dir: Path) -> None:
    missing = [p for p in ("gene2go_all.pkl", "essential_all_data_pert_genes.pkl",
                           "go_essential_all/go_essential_all.csv") if not (data_dir / p).exists()]
    if missing:
        raise SystemExit(f"{data_dir}: missing the reference's GO files {missing}; write them first with "
                         f"'.venv/bin/python tools/reference/go_files.py {data_dir} --h5ad H5AD'")


def process(h5ad: str, data_dir: Path, name: str, record: dict, batch: int = 32):
    """The reference's own data preparation, from an h5ad: PertData.new_data_process (DE genes, non-dropout
    genes, one PyG Data per cell with a sampled control, pickled), simulation split seed 1, dataloaders."""
    import scanpy as sc
    from gears import PertData

    _check_go_files(data_dir)
    dataset = data_dir / name
    if dataset.exists():
        shutil.rmtree(dataset)  # its caches (split, co-expression csv, cell graphs) must not be reused
    with Phase(record, "prepare"):
        adata = sc.read_h5ad(h5ad)
        pert_data = PertData(str(data_dir))
        pert_data.new_data_process(dataset_name=name, adata=adata)
        pert_data.prepare_split(split="simulation", seed=1)
        pert_data.get_dataloader(batch_size=batch, test_batch_size=128)
    record["num_cells"], record["num_genes"] = int(pert_data.adata.n_obs), int(pert_data.adata.n_vars)
    record["num_conditions"] = int(pert_data.adata.obs["condition"].nunique())
    return pert_data


def load(data_dir: Path, name: str, record: dict, batch: int = 32, seed: int = 1):
    """Reload a dataset processed by `process` (PertData.load of DATA_DIR/NAME, cached split)."""
    from gears import PertData

    _check_go_files(data_dir)
    dataset = data_dir / name
    if not (dataset / "perturb_processed.h5ad").exists():
        raise SystemExit(f"{dataset}: no processed dataset; run 'prepare H5AD {data_dir} --name {name}' first")
    with Phase(record, "load"):
        pert_data = PertData(str(data_dir))
        pert_data.load(data_path=str(dataset))
        pert_data.prepare_split(split="simulation", seed=seed)
        pert_data.get_dataloader(batch_size=batch, test_batch_size=128)
    record["num_cells"], record["num_genes"] = int(pert_data.adata.n_obs), int(pert_data.adata.n_vars)
    return pert_data


def initialize(pert_data, record: dict, hidden: int = 64, seed: int = 1):
    """GEARS(...).model_initialize: builds the co-expression graph from the training split and reads the
    GO graph (top k+1 per target) -- the rest of the reference's preparation."""
    import numpy as np
    import torch
    from gears import GEARS

    torch.manual_seed(seed)
    np.random.seed(seed)
    with Phase(record, "model_initialize"):
        model = GEARS(pert_data, device="cpu")
        model.model_initialize(hidden_size=hidden)
    record["num_go_nodes"] = len(model.pert_list)
    record["num_go_edges"] = int(model.config["G_go"].shape[1])
    record["num_coexpr_edges"] = int(model.config["G_coexpress"].shape[1])
    return model


def timed_steps(model, num_steps: int, warmup: int, record: dict, lr: float = 1e-3, weight_decay: float = 5e-4):
    """`num_steps` training steps with the body of GEARS.train (its loader, model, loss_fct, clipping, Adam),
    after `warmup` untimed ones. The loader's collation is part of each step, as in GEARS.train."""
    import numpy as np
    import torch
    from gears.utils import loss_fct

    net = model.model
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    loader = model.dataloader["train_loader"]
    times, fetch, cells, losses = [], [], [], []
    f0 = c0 = None
    it = iter(loader)
    for step in range(warmup + num_steps):
        if step == warmup:
            f0, c0 = _minflt(), _cpu_s()
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        optimizer.zero_grad()
        pred = net(batch)
        loss = loss_fct(pred, batch.y, batch.pert, ctrl=model.ctrl_expression, dict_filter=model.dict_filter,
                        direction_lambda=model.config["direction_lambda"])
        loss.backward()
        torch.nn.utils.clip_grad_value_(net.parameters(), clip_value=1.0)
        optimizer.step()
        t2 = time.perf_counter()
        if step >= warmup:
            times.append(t2 - t0)
            fetch.append(t1 - t0)
            cells.append(int(batch.num_graphs))
            losses.append(float(loss.detach()))
    total = sum(times)
    record["steps"] = {
        "num_steps": num_steps, "warmup": warmup, "batch": int(loader.batch_size),
        "step_s_median": float(np.median(times)), "step_s_mean": total / len(times),
        "loader_s_mean": sum(fetch) / len(fetch), "cells_per_s": sum(cells) / total,
        "train_batches_per_epoch": len(loader), "train_cells_per_epoch": len(loader) * int(loader.batch_size),
        "epoch_s_extrapolated": len(loader) * total / len(times),
        "minor_faults_per_step": (_minflt() - f0) / len(times), "cpu_s_per_step": (_cpu_s() - c0) / len(times), "peak_rss_mb_after": round(_hwm_mb(), 1),
        "loss_first_last": [losses[0], losses[-1]],
    }


def _gene_lists(conditions):
    return [[g for g in c.split("+") if g != "ctrl"] for c in conditions]


def timed_predict(model, conditions, record: dict, seed: int = 1):
    """GEARS.predict on the given conditions ('A+ctrl' / 'A+B'); its result cache is emptied first."""
    import numpy as np

    np.random.seed(seed)
    model.saved_pred = {}
    genes = _gene_lists(conditions)
    with Phase(record, "predict"):
        out = model.predict(genes)
    record["predict"]["num_conditions"] = len(genes)
    record["predict"]["conditions"] = list(conditions)
    record["predict"]["s_per_condition"] = record["predict"]["wall_s"] / max(len(genes), 1)
    record["predict"]["num_genes_out"] = int(len(next(iter(out.values())))) if out else 0
    return out


def _float_dict(d: dict) -> dict:
    import numpy as np

    out = {}
    for k, v in d.items():
        if isinstance(v, (float, int, np.floating, np.integer)):
            out[k] = float(v)
    return out


def train_epochs(model, epochs: int, record: dict, lr: float = 1e-3, weight_decay: float = 5e-4):
    """Run the reference's own GEARS.train(epochs, lr, weight_decay) and observe it.

    GEARS.train logs its per-epoch metrics but returns nothing, so `evaluate` and `compute_metrics` in the
    gears.gears module are wrapped by pass-through observers (they call the originals and return their
    results unchanged): each validation evaluation closes an epoch (its wall time since the previous one,
    minus the observer's own work) and its metrics are recorded, plus pearson_delta from the reference's
    deeper_analysis; the test evaluation of the best model is captured and summarised afterwards.
    """
    import gears.gears as gg
    import numpy as np
    from gears.inference import deeper_analysis

    original_evaluate = gg.evaluate
    val_loader, test_loader = model.dataloader["val_loader"], model.dataloader.get("test_loader")
    epochs_out: list[dict] = []
    state = {"t_last": time.perf_counter(), "observer_s": 0.0, "test_res": None}
    t_start = state["t_last"]

    def observed_evaluate(loader, net, uncertainty, device):
        res = original_evaluate(loader, net, uncertainty, device)
        if loader is val_loader:
            t_end = time.perf_counter()
            metrics, _ = gg.compute_metrics(res)
            deeper = deeper_analysis(model.adata, res)
            metrics["pearson_delta"] = float(np.mean([m["pearson_delta"] for m in deeper.values()
                                                      if "pearson_delta" in m]))
            wall = t_end - state["t_last"] - state["observer_s"]
            epochs_out.append({"epoch": len(epochs_out), "wall_s": wall,
                               "elapsed_s": (epochs_out[-1]["elapsed_s"] if epochs_out else 0.0) + wall,
                               "val": _float_dict(metrics)})
            print(f"[reference] epoch {len(epochs_out) - 1}: val mse_de {metrics['mse_de']:.5f} "
                  f"pearson_delta {metrics['pearson_delta']:.4f} ({wall:.1f} s)", file=sys.stderr, flush=True)
            state["t_last"], state["observer_s"] = t_end, time.perf_counter() - t_end
        elif loader is test_loader:
            state["test_res"] = res
        return res

    gg.evaluate = observed_evaluate
    try:
        model.train(epochs=epochs, lr=lr, weight_decay=weight_decay)
    finally:
        gg.evaluate = original_evaluate
    record["epochs"] = epochs_out
    record["train_s"] = time.perf_counter() - t_start
    if state["test_res"] is not None:
        record["test"] = _test_metrics(model, state["test_res"])


def _test_metrics(model, test_res) -> dict:
    """The test metrics GEARS.train computes for its best model (overall, per simulation subgroup, its deeper
    and non-dropout analyses), from the test results it evaluated."""
    import numpy as np
    from gears.inference import compute_metrics, deeper_analysis, non_dropout_analysis

    metrics, per_pert = compute_metrics(test_res)
    out = {"overall": _float_dict(metrics)}
    deeper = deeper_analysis(model.adata, test_res)
    non_dropout = non_dropout_analysis(model.adata, test_res)
    extra = ["pearson_delta", "pearson_delta_de"]
    extra_nd = ["frac_opposite_direction_top20_non_dropout", "frac_sigma_below_1_non_dropout",
                "mse_top20_de_non_dropout"]
    for m in extra:
        out["overall"][m] = float(np.mean([d[m] for d in deeper.values() if m in d]))
    for m in extra_nd:
        out["overall"][m] = float(np.mean([d[m] for d in non_dropout.values() if m in d]))
    subgroups = {}
    if model.subgroup is not None:
        for name, perts in model.subgroup["test_subgroup"].items():
            perts = [p for p in perts if p in per_pert]
            if not perts:
                continue
            sub = {m: float(np.mean([per_pert[p][m] for p in perts])) for m in per_pert[perts[0]]}
            for m in extra:
                sub[m] = float(np.mean([deeper[p][m] for p in perts if m in deeper[p]]))
            for m in extra_nd:
                sub[m] = float(np.mean([non_dropout[p][m] for p in perts if m in non_dropout[p]]))
            sub["num_conditions"] = len(perts)
            subgroups[name] = sub
    out["subgroups"] = subgroups
    out["per_condition"] = {p: _float_dict(v) for p, v in per_pert.items()}
    return out


def _split(pert_data) -> dict:
    return {k: sorted(str(c) for c in v) for k, v in pert_data.set2conditions.items()}


# ------------------------------------------------------------------------------------------ commands
def _prepare_or_load(args, record):
    data_dir = Path(args.data_dir)
    if getattr(args, "h5ad", None):
        return process(args.h5ad, data_dir, args.name, record, batch=args.batch)
    return load(data_dir, args.name, record, batch=args.batch, seed=getattr(args, "seed", 1))


def cmd_prepare(args, record):
    pert_data = process(args.h5ad, Path(args.data_dir), args.name, record, batch=args.batch)
    record["split_sizes"] = {k: len(v) for k, v in pert_data.set2conditions.items()}
    if args.graphs:
        initialize(pert_data, record, hidden=args.hidden)


def cmd_steps(args, record):
    pert_data = _prepare_or_load(args, record)
    model = initialize(pert_data, record, hidden=args.hidden)
    timed_steps(model, args.num_steps, args.warmup, record)


def cmd_train(args, record):
    import numpy as np
    import torch

    pert_data = _prepare_or_load(args, record)
    record["prepare_s"] = record.get("prepare", record.get("load", {})).get("wall_s")
    record["split"] = _split(pert_data)
    model = initialize(pert_data, record, hidden=args.hidden, seed=args.seed)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    train_epochs(model, args.epochs, record)


def cmd_predict(args, record):
    pert_data = _prepare_or_load(args, record)
    model = initialize(pert_data, record, hidden=args.hidden)
    conditions = list(pert_data.set2conditions["test"]) if args.test else list(args.conditions or [])
    if not conditions:
        raise SystemExit("predict: give --conditions A+ctrl A+B ... or --test")
    timed_predict(model, conditions, record)


def cmd_all(args, record):
    processed = Path(args.data_dir) / args.name / "data_pyg" / "cell_graphs.pkl"
    if args.reuse and processed.exists():
        pert_data = load(Path(args.data_dir), args.name, record, batch=args.batch)
    else:
        pert_data = process(args.h5ad, Path(args.data_dir), args.name, record, batch=args.batch)
    record["split_sizes"] = {k: len(v) for k, v in pert_data.set2conditions.items()}
    record["split"] = _split(pert_data)
    model = initialize(pert_data, record, hidden=args.hidden)
    if args.num_steps:
        timed_steps(model, args.num_steps, args.warmup, record)
    test = [c for c in pert_data.set2conditions["test"] if c != "ctrl"]
    timed_predict(model, test[:args.predict_max] if args.predict_max else test, record)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, h5ad_positional=False):
        if h5ad_positional:
            s.add_argument("h5ad")
        s.add_argument("data_dir")
        if not h5ad_positional:
            s.add_argument("--h5ad", default=None, help="process this h5ad first (default: reuse DATA_DIR/NAME)")
        s.add_argument("--name", default=DEFAULT_NAME)
        s.add_argument("--batch", type=int, default=32)
        s.add_argument("--hidden", type=int, default=64)
        s.add_argument("--out", default=None, help="also write the JSON here")

    s = sub.add_parser("prepare", help="PertData.new_data_process + simulation split + dataloaders")
    common(s, h5ad_positional=True)
    s.add_argument("--graphs", action="store_true", help="also GEARS.model_initialize (co-expression + GO graph)")
    s.set_defaults(func=cmd_prepare)
    s = sub.add_parser("steps", help="N training steps with GEARS.train's loop body")
    common(s)
    s.add_argument("--num-steps", type=int, required=True)
    s.add_argument("--warmup", type=int, default=2)
    s.set_defaults(func=cmd_steps)
    s = sub.add_parser("train", help="GEARS.train semantics with per-epoch validation; test metrics; the split")
    common(s)
    s.add_argument("--epochs", type=int, default=15)
    s.add_argument("--seed", type=int, default=1)
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("predict", help="GEARS.predict on conditions")
    common(s)
    s.add_argument("--conditions", nargs="*", default=None)
    s.add_argument("--test", action="store_true", help="the split's test conditions")
    s.set_defaults(func=cmd_predict)
    s = sub.add_parser("all", help="prepare + model_initialize + steps + predict(test) in one process")
    common(s, h5ad_positional=True)
    s.add_argument("--num-steps", type=int, default=0)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--predict-max", type=int, default=0, help="predict only the first N test conditions (0: all)")
    s.add_argument("--reuse", action="store_true", help="reload DATA_DIR/NAME if already processed")
    s.set_defaults(func=cmd_all)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_reference_output()
    import gears
    import torch

    record: dict = {"command": args.command, "reference": "cell-gears " + getattr(gears, "__version__", "0.1.2"),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "patched": patch_downloads()}
    t0 = time.perf_counter()
    # The reference prints progress to stdout too (e.g. prepare_split's 'here1'): keep stdout for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        args.func(args, record)
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    record["peak_rss_mb"] = round(_hwm_mb(), 1)
    record["minor_faults"] = _minflt()
    text = json.dumps(record)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
