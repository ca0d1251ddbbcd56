"""The fitted predictors that need no training (the GO prior and the baselines) over many splits.

`gears-dist multisplit` trains the network on each split, minutes per split; the GO prior that the
prior-anchored model starts from, and every baseline, fit in well under a second. This scores them on many
more splits than training would allow, with the project's own metrics (``evaluate_split``), and prints the mean
± sd over splits per test category (splits without a category's conditions are left out of its mean):

    python tools/baselines_over_splits.py STORE --seeds 1-20 [--out table.csv]
"""

from __future__ import annotations

import argparse
import warnings

import pandas as pd

PREDICTORS = ("go_prior", "train_mean", "additive", "linear")
CATEGORIES = ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2", "all")


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--seeds", default="1-20", help="'1-20' or '1,2,3'")
    ap.add_argument("--split-kind", default="simulation")
    ap.add_argument("--out", default=None, help="also write the per-split rows as CSV")
    args = ap.parse_args(argv)

    from gears_dist.data.splits import make_split
    from gears_dist.data.store import open_store
    from gears_dist.evaluate import baselines as B
    from gears_dist.evaluate.multisplit import GI_K, gi_rows, summarize_splits
    from gears_dist.evaluate.pipeline import evaluate_split, store_go_graph

    warnings.filterwarnings("ignore")
    store = open_store(args.store)
    go = store_go_graph(store)
    rows, gi = [], []
    for seed in _seeds(args.seeds):
        split = make_split(store.condition_names, args.split_kind, seed=seed)
        fitted = B.fit_baselines(B.training_profiles(store, split.train), PREDICTORS, go=go)
        table = evaluate_split(store, split, predictors=fitted, baselines=(), go=go).table
        rows.append(table.assign(split_seed=seed))
        # The additive baseline ranks every pair alike: its precision is the base rate (chance).
        gi += [dict(r, split_seed=seed)
               for r in gi_rows(store, split, {"go_prior": fitted["go_prior"]}, chance=True)]
    per_split = pd.concat(rows)
    per_split = per_split[per_split.num_conditions > 0]
    if args.out:
        per_split.to_csv(args.out, index=False)
    summary = summarize_splits(per_split).set_index(["category", "predictor"])
    print(f"{args.store}: {args.split_kind} splits {args.seeds}; pearson_delta / mse_de, mean ± sd over the splits "
          f"that have the category (their number in brackets)\n")
    print("| category | " + " | ".join(PREDICTORS) + " |")
    print("|---|" + "---|" * len(PREDICTORS))
    for cat in CATEGORIES:
        cells = [f"{r.pearson_delta_mean:.3f} ± {r.pearson_delta_sd:.3f} / {r.mse_de_mean:.4f} ± {r.mse_de_sd:.4f}"
                 for r in (summary.loc[(cat, name)] for name in PREDICTORS)]
        print(f"| {cat} ({int(summary.loc[(cat, PREDICTORS[0]), 'num_splits'])}) | " + " | ".join(cells) + " |")
    if gi:
        metric = f"gi_precision_at_{GI_K}"
        table = pd.DataFrame(gi).groupby(["category", "predictor"])[metric].agg(["mean", "std"]).unstack("predictor")
        print(f"\nGI precision@{GI_K} on the test pairs, mean ± sd over splits (additive ties every pair: chance)\n")
        sources = [s for s in ("go_prior", "additive", "base_rate") if ("mean", s) in table.columns]
        print("| GI type | " + " | ".join(sources) + " |")
        print("|---|" + "---|" * len(sources))
        for cat, r in table.iterrows():
            print(f"| {cat[3:]} | " + " | ".join(f"{r[('mean', s)]:.3f} ± {r[('std', s)]:.3f}" for s in sources) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
