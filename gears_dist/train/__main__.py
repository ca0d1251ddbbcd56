"""``python -m gears_dist.train --config C STORE --out DIR``: the per-worker loop in one process, no Ray.

Used by tests and by the single-GPU benchmark; ``gears-dist train`` (Ray) is the user-facing command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gears_dist.train", description=__doc__.splitlines()[0])
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
