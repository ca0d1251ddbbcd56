"""The `gears-dist` command line: small, one subcommand per pipeline step.

Arguments are declared here; implementations are imported lazily inside each handler so that
`gears-dist --help` does not pay for importing torch and Ray. Presets are YAML files in configs/,
not flags. User errors (ValueError/TypeError raised by the library) print one clear line and exit 2.
Warnings print one line each, and libraries' FutureWarnings not at all; Ray's own output stays in the run
directory's logs. `--verbose` (or GEARS_DIST_VERBOSE=1) shows both as Ray and Python would.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from gears_dist.progress import close_all, write


def _cmd_simulate(args: argparse.Namespace) -> int:
    from gears_dist.config import ConfigError
    from gears_dist.data.synthetic import write_screen

    try:
        report = write_screen(args.out, args.preset, num_cells=args.num_cells, num_genes=args.num_genes,
                              num_singles=args.num_singles, num_doubles=args.num_doubles, seed=args.seed,
                              style=args.style, format=args.format, num_workers=args.workers,
                              overwrite=args.overwrite)
    except ConfigError as exc:  # a bad size: name the command, as for the other errors
        raise ValueError(f"simulate: {exc}") from None
    print(f"simulate: wrote {report['num_cells']:,} cells x {report['num_genes']:,} genes, "
          f"{report['num_conditions']:,} conditions to {report['path']} in {report['seconds']:.1f} s "
          f"({report['cells_per_s']:,.0f} cells/s)")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    import time

    from gears_dist import api  # registers the 'graph' condition order when asked for

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            store = api.ingest(args.input, args.store, condition_key=args.condition_key,
                               control_values=args.control_value, separators=args.separator, gene_key=args.gene_key,
                               cell_type_key=args.cell_type_key, batch_key=args.batch_key, hvg=args.hvg,
                               normalize=args.normalize, chunk_cells=args.chunk_cells, order=args.order,
                               memory_budget_mb=args.memory_budget_mb, overwrite=args.overwrite)
        finally:
            for w in caught:  # one readable line each, not Python's source-line format
                print(f"gears-dist ingest: warning: {w.message}", file=sys.stderr)
    m = store.manifest
    c = m["counts"]
    print(f"ingested {c['num_cells']:,} cells x {c['num_genes']:,} genes, {c['num_conditions']:,} conditions "
          f"({c['num_control_cells']:,} control cells); normalization: {m['normalization']['choice']}; "
          f"{time.perf_counter() - t0:.1f} s -> {store.path}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from gears_dist.data.splits import load_split, make_and_save_split

    key = make_and_save_split(args.store, args.kind, args.seed, key=args.name, overwrite=args.overwrite,
                              custom_path=args.custom, train_gene_frac=args.train_gene_frac,
                              combo_seen2_train_frac=args.combo_seen2_train_frac)
    print(load_split(args.store, key).summary())
    print(f"saved as splits/{key} in {args.store}")
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from gears_dist.graphs.build import build_graphs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_graphs(args.store, config=args.config, split=args.split, parts=args.parts, method=args.method,
                 overwrite=args.overwrite)
    return 0


def _parse_sets(pairs: list[str] | None) -> dict:
    """``--set a.b=value`` pairs -> {dotted name: value}; values are read as YAML (2, 3e-4, true, go, [1, 2])."""
    import yaml

    out = {}
    for pair in pairs or []:
        name, eq, text = pair.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with a dotted field, e.g. --set train.epochs=2")
        try:
            out[name.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {pair!r}: the value is not valid YAML ({exc})") from None
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from gears_dist.api import resolve_config
    from gears_dist.distributed import launcher

    cfg = resolve_config(args.config, _parse_sets(args.set))
    return launcher.cli_train(cfg, args.store, out=args.out, address=args.address, resume=args.resume)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from gears_dist.evaluate.commands import evaluate_run

    evaluate_run(args.target, store=args.store, split=args.split, conditions=args.conditions,
                 baselines=[b for b in args.baselines.split(",") if b] if args.baselines else [],
                 out=args.out, tracking_uri=args.tracking_uri, mlflow_run_id=args.mlflow_run_id,
                 mlflow=not args.no_mlflow, gi=not args.no_gi, gi_k=args.gi_k, gi_truth=args.gi_truth,
                 figures=not args.no_figures, num_plot_conditions=args.num_plot_conditions,
                 export_cell_eval=args.export_cell_eval, export_cell_eval_mode=args.export_cell_eval_mode,
                 export_cell_eval_max_cells=args.export_cell_eval_max_cells,
                 export_cell_eval_max_control_cells=args.export_cell_eval_max_control_cells, device=args.device)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import pathlib

    from gears_dist.evaluate import predict as P
    from gears_dist.evaluate.commands import predict_to_file

    sets: list = [P.parse_set(s) for s in args.perts or []]
    if args.perts_file:
        sets += P.read_sets_file(args.perts_file)
    pair_genes = list(args.all_pairs or [])
    if args.all_pairs_file:
        text = pathlib.Path(args.all_pairs_file).read_text()
        pair_genes += [g for g in text.replace(",", " ").split() if g]
    if pair_genes:
        sets += P.all_pairs(pair_genes)
    predict_to_file(args.target, sets, args.out, store=args.store, device=args.device, uncertainty=args.uncertainty)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    import pathlib

    from gears_dist.tune.config import load_tune_config
    from gears_dist.tune.search import run_search

    tcfg = load_tune_config(args.config)
    out = pathlib.Path(args.out or pathlib.Path("runs") / tcfg.name)
    summary = run_search(tcfg, args.store, out, address=args.address, resume=args.resume)
    print(f"gears-dist tune: output in {out} (summary.json, best/); MLflow parent run {summary['parent_run_id']} "
          f"at {summary['tracking_uri']}")
    return 0


def _cmd_multisplit(args: argparse.Namespace) -> int:
    from gears_dist.evaluate.multisplit import run_multisplit
    from gears_dist.train.config import load_run_config

    cfg = load_run_config(args.config)
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    baselines = None if args.baselines is None else [b for b in args.baselines.split(",") if b]
    out = args.out or f"runs/multisplit_{cfg.name}"
    run_multisplit(args.store, cfg, out, seeds=args.seeds, variants=args.variants, split_kind=args.split_kind,
                   baselines=baselines, address=args.address, max_parallel=args.parallel)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gears_dist.demo import run_demo

    return run_demo(args.out, args.config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gears-dist", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="generate a synthetic Perturb-seq screen (h5ad or store)")
    s.add_argument("out", help="output path (.h5ad, or .zarr with --format store)")
    s.add_argument("--preset", default="demo", help="size preset: tiny, demo, norman, k562, genome")
    s.add_argument("--num-cells", type=int, help="override the preset's total number of cells")
    s.add_argument("--num-genes", type=int, help="override the number of measured genes")
    s.add_argument("--num-singles", type=int, help="override the number of single-gene perturbations")
    s.add_argument("--num-doubles", type=int, help="override the number of two-gene perturbations")
    s.add_argument("--style", choices=["gears", "scperturb"], default="gears",
                   help="condition naming convention of the h5ad (gears: ctrl/A+ctrl/A+B; scperturb: control/A/A_B)")
    s.add_argument("--format", choices=["h5ad", "store"], default="h5ad")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None,
                   help="processes sampling cell blocks (default: min(2, CPUs)); the output does not depend on it")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_simulate)

    s = sub.add_parser("ingest", help="AnnData .h5ad -> training-ready Zarr store (out of core)")
    s.add_argument("input", help="source .h5ad file")
    s.add_argument("store", help="destination store directory (e.g. screen.zarr)")
    s.add_argument("--condition-key", default=None, help="obs column with the perturbation (default: auto-detect "
                   "'condition', 'perturbation', 'gene', 'target_gene')")
    s.add_argument("--control-value", action="append", default=None,
                   help="value(s) of the condition column that mean control (repeatable; default: ctrl, control, "
                        "non-targeting, NT)")
    s.add_argument("--separator", action="append", default=None,
                   help="separator(s) between genes of a combination (repeatable; default '+', and '_' when the "
                        "file uses it)")
    s.add_argument("--gene-key", default=None, help="var column with gene symbols (default: 'gene_name' if "
                   "present, else var_names)")
    s.add_argument("--cell-type-key", default=None, help="obs column with cell type / cell line")
    s.add_argument("--batch-key", default=None, help="obs column with batch (e.g. gemgroup)")
    s.add_argument("--hvg", type=int, default=None, help="keep the top-N highly variable genes plus every measured "
                   "perturbed gene (default: keep all genes)")
    s.add_argument("--normalize", choices=["auto", "counts", "log1p"], default="auto",
                   help="auto: detect raw counts (normalize to 1e4 + log1p) vs log data (as is)")
    s.add_argument("--chunk-cells", type=int, default=None, help="cells per X chunk (default chosen by size)")
    s.add_argument("--order", default="condition", help="order of conditions in the store: 'condition' "
                   "(sorted names) or 'graph' (GO-graph locality, for graph-partitioned training)")
    s.add_argument("--memory-budget-mb", type=int, default=1024,
                   help="bound on the ingest's working memory (default 1024)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing store")
    s.set_defaults(func=_cmd_ingest)

    s = sub.add_parser("split", help="condition-level train/val/test split, saved in the store")
    s.add_argument("store")
    s.add_argument("--kind", default="simulation",
                   help="simulation, single, combo_seen0, combo_seen1, combo_seen2, no_test, custom")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--train-gene-frac", type=float, default=0.75, help="simulation: fraction of genes 'seen'")
    s.add_argument("--combo-seen2-train-frac", type=float, default=0.75,
                   help="simulation: fraction of seen-seen combinations used for training")
    s.add_argument("--custom", default=None, help="custom: JSON file {train: [...], val: [...], test: [...]}")
    s.add_argument("--name", default=None, help="key to store it under (default: KIND_seedSEED)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_split)

    s = sub.add_parser("graph", help="build the GO and co-expression graphs and worker partitions into the store")
    s.add_argument("store")
    s.add_argument("--config", default=None, help="YAML with a 'graphs' section (see configs/)")
    s.add_argument("--split", default=None, help="split key whose training cells feed the co-expression graph")
    s.add_argument("--parts", type=int, nargs="+", default=None,
                   help="worker counts W to partition for (default: the config's graphs.partition.num_parts, 2 4)")
    s.add_argument("--method", choices=["metis", "contiguous", "random"], default=None,
                   help="partition method (default: the config's graphs.partition.method, metis)")
    s.add_argument("--overwrite", action="store_true", help="rebuild graphs and partitions that are already stored")
    s.set_defaults(func=_cmd_graph)

    s = sub.add_parser("train", help="train GEARS with Ray Train + DeepSpeed (local Ray if no cluster address)")
    s.add_argument("store")
    s.add_argument("--config", required=True, help="training preset (configs/*.yaml)")
    s.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    s.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    s.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set train.epochs=2 --set model.prior=go (repeatable)")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("evaluate", help="metrics per test category for a trained model and the baselines; GI, "
                       "figures, cell-eval export, MLflow")
    s.add_argument("target", metavar="RUN_OR_CHECKPOINT",
                   help="run directory, model directory or checkpoint (or a STORE with --split: baselines only)")
    s.add_argument("--store", default=None, help="the training store (default: the one the run recorded)")
    s.add_argument("--split", default=None, help="split key (default: the run's split)")
    s.add_argument("--conditions", choices=["test", "val"], default="test")
    s.add_argument("--baselines", default="control_mean,train_mean,additive,linear,go_prior",
                   help="comma-separated baselines to report beside the model ('' for none)")
    s.add_argument("--out", default=None, help="output directory (default: RUN/evaluation)")
    s.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the run's, or "
                   "$MLFLOW_TRACKING_URI)")
    s.add_argument("--mlflow-run-id", default=None, help="MLflow run to log to (default: the training run)")
    s.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    s.add_argument("--no-gi", action="store_true", help="skip genetic-interaction scoring of test pairs")
    s.add_argument("--gi-k", type=int, default=10, help="precision@k for GI types (default 10)")
    s.add_argument("--gi-truth", default=None, help="ground-truth GI JSON (synthetic screens; default: the store's "
                   "truth.json or the ingested h5ad's .truth.json sidecar)")
    s.add_argument("--no-figures", action="store_true")
    s.add_argument("--num-plot-conditions", type=int, default=2, help="top-DE figures per test category")
    s.add_argument("--export-cell-eval", action="store_true", help="also write cell-eval real/pred AnnData "
                   "(OUT/cell_eval/; cell-eval's pearson_delta/mse/mae on them equal ours)")
    s.add_argument("--export-cell-eval-mode", choices=["cells", "pseudobulk"], default="cells",
                   help="cells (default): every cell of each condition and of the control, predicted cells = "
                   "control cells shifted to the predicted mean; pseudobulk: one row per perturbation (mean-based "
                   "metrics only)")
    s.add_argument("--export-cell-eval-max-cells", type=int, default=None, metavar="N",
                   help="at most N cells per condition (a sample, for memory; default: all); the gap it makes to our "
                   "metrics is written to cell_eval/gears_dist_metrics.csv")
    s.add_argument("--export-cell-eval-max-control-cells", type=int, default=None, metavar="N",
                   help="at most N control cells (default: as --export-cell-eval-max-cells, i.e. all unless that is "
                   "given; a sample adds its noise to the real deltas)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("predict", help="predict expression for any perturbation sets with a trained model")
    s.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="run directory, model directory or checkpoint")
    s.add_argument("--perts", nargs="+", default=None, metavar="SET", help="sets such as KLF1 KLF1+MAP2K6 A+B+C")
    s.add_argument("--perts-file", default=None, help="file with one set per line")
    s.add_argument("--all-pairs", nargs="+", default=None, metavar="GENE", help="predict every pair of these genes")
    s.add_argument("--all-pairs-file", default=None, help="file of genes (whitespace/comma separated): every pair")
    s.add_argument("--out", required=True, help="output .h5ad (X = mean, layers delta/logvar) or .csv")
    s.add_argument("--uncertainty", action="store_true", help="also output the uncertainty head's log-variance")
    s.add_argument("--store", default=None, help="the training store (default: the one the run recorded)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("tune", help="hyperparameter search: Ray Tune (ASHA + Optuna) over distributed training runs, "
                                     "tracked in MLflow")
    s.add_argument("store")
    s.add_argument("--config", required=True, help="search preset (configs/tune_*.yaml)")
    s.add_argument("--out", default=None, help="search directory (default: runs/<search name>)")
    s.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    s.add_argument("--resume", action="store_true", help="continue the interrupted search in --out (Tuner.restore)")
    s.set_defaults(func=_cmd_tune)

    s = sub.add_parser("multisplit", help="train and evaluate one config (variants of it) on K splits as parallel "
                                           "Ray tasks; mean ± sd over splits per category, model(s) and baselines")
    s.add_argument("store")
    s.add_argument("--config", required=True, help="training preset (configs/*.yaml)")
    s.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="split seeds (one split each)")
    s.add_argument("--split-kind", default="simulation", help="split kind (default: simulation)")
    s.add_argument("--variants", nargs="+", default=["reference", "prior"],
                   help="'reference' (model.prior none), 'prior' (model.prior go), or NAME:key=value,... overrides")
    s.add_argument("--baselines", default=None, help="comma-separated baselines (default: all)")
    s.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    s.add_argument("--parallel", type=int, default=None, help="runs at a time (default: the Ray cluster's CPUs)")
    s.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    s.add_argument("--out", default=None, help="output directory (default: runs/multisplit_<config name>)")
    s.set_defaults(func=_cmd_multisplit)

    s = sub.add_parser("demo", help="the whole pipeline on generated data: simulate, ingest, graph, split, train, evaluate")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--config", default=None, help="training preset (default: configs/demo.yaml)")
    s.set_defaults(func=_cmd_demo)

    for s in sub.choices.values():
        s.add_argument("--verbose", action="store_true", help="also show Ray's own output (controller, every "
                       "worker's stdout / stderr) and libraries' FutureWarnings; same as GEARS_DIST_VERBOSE=1")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["GEARS_DIST_VERBOSE"] = "1"  # read by the launcher (log_to_driver) and passed to its workers

    def one_line(message, category, filename, lineno, file=None, line=None):
        write(f"gears-dist {args.command}: warning: {message}", file=file or sys.stderr)  # a bar stays whole

    try:
        with warnings.catch_warnings():
            if os.environ.get("GEARS_DIST_VERBOSE", "") in ("", "0"):
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!gears_dist\.)")  # libraries'
                warnings.showwarning = one_line
                # MLflow's own INFO lines (its SQLite schema set-up when the driver opens a run) are not ours; MLflow
                # sets its loggers' level from this variable when it is imported
                os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
                # Ray's notice, on every local start with RAY_AUTH_MODE unset, that it enabled token auth
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        close_all()  # a bar of the pass that raised
        print(f"gears-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_all()
        print(f"gears-dist {args.command}: interrupted", file=sys.stderr)
        return 130


def train_single_main(argv: list[str] | None = None) -> int:
    """``python -m gears_dist.train --config C STORE --out DIR``: the per-worker loop in one process, no Ray.

    Used by tests and by the single-GPU benchmark; ``gears-dist train`` (Ray) is the user-facing command.
    """
    p = argparse.ArgumentParser(prog="python -m gears_dist.train", description=train_single_main.__doc__.splitlines()[0])
    p.add_argument("store", help="gears_dist store (gears-dist ingest)")
    p.add_argument("--config", required=True, help="run preset (configs/*.yaml)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, model/, summary.json, mlflow.db)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="override train.max_steps_per_epoch")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from gears_dist.train.config import load_run_config
    from gears_dist.train.loop import run_single

    overrides: dict = {"train": {}}
    if args.epochs is not None:
        overrides["train"]["epochs"] = args.epochs
    if args.max_steps_per_epoch is not None:
        overrides["train"]["max_steps_per_epoch"] = args.max_steps_per_epoch
    try:
        cfg = load_run_config(args.config, overrides)
        run_single(cfg, args.store, args.out)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"python -m gears_dist.train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
