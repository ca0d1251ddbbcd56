"""How much of a generated screen's combo_seen2 error could knowing the interactions remove?

For a store written by the synthetic generator (``STORE/truth.json`` holds each double's true gains c_a, c_b of
``LFC(A+B) = c_a LFC(A) + c_b LFC(B) + new``), on K simulation splits, three predictors of the test pairs whose
two singles were trained are scored with the project's own metrics (``evaluate_split``):

- ``additive``: the observed training singles' deltas summed;
- ``oracle_gains``: the true c_a, c_b applied to those observed deltas, outside the targets' own columns (a
  perturbation sets its target's own expression whatever its partner does);
- ``oracle_gains_all``: the same gains on every column, targets included (what a gain on the whole prior does).

The gap between additive and oracle_gains is the most any interaction model could gain on that split with these
noisy singles; the rest of the error is measurement noise and neomorphic parts no gain can express.

It also prints how far the buffered pairs (suppression, epistasis: chosen by GO Jaccard under
``interaction_structure='graph'``) stand out from the additive pairs by that Jaccard: a pair inside the additive
pairs' range cannot be told apart by its GO relationship, whatever the model.

    python tools/probe_interaction_ceiling.py STORE --seeds 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings

import numpy as np
import pandas as pd


def _print_separability(doubles: list[dict]) -> None:
    """GO Jaccard of each buffered pair (the generator's own score, _pair_go_jaccard) against the additive pairs'."""
    from gears_dist.data.genes import go_annotations
    from gears_dist.data.synthetic import _pair_go_jaccard

    genes = sorted({g for d in doubles for g in (d["gene_a"], d["gene_b"])})
    column = {g: i for i, g in enumerate(genes)}
    score = _pair_go_jaccard(go_annotations(), genes, np.array([column[d["gene_a"]] for d in doubles]),
                             np.array([column[d["gene_b"]] for d in doubles]))
    kinds = np.array([d["interaction"] for d in doubles])
    additive = score[kinds == "additive"]
    if not len(additive):
        return
    top = float(additive.max())
    for kind in ("suppression", "epistasis"):
        values = sorted(score[kinds == kind].tolist(), reverse=True)
        if values:
            above = sum(v > top for v in values)
            print(f"{kind}: GO Jaccard {[round(v, 3) for v in values]}; {above} of {len(values)} above every "
                  f"additive pair (additive median {np.median(additive):.3f}, max {top:.3f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = ap.parse_args(argv)

    from gears_dist.data.splits import make_split
    from gears_dist.data.store import open_store
    from gears_dist.evaluate import baselines
    from gears_dist.evaluate.pipeline import evaluate_split, store_go_graph

    warnings.filterwarnings("ignore")
    store = open_store(args.store)
    truth_file = pathlib.Path(args.store) / "truth.json"
    if not truth_file.is_file():
        raise SystemExit(f"{truth_file} not found: the store must come from the synthetic generator (write_store)")
    doubles = json.loads(truth_file.read_text())["doubles"]
    gains = {d["condition"]: (d["gene_a"], d["c_a"], d["gene_b"], d["c_b"]) for d in doubles}
    kinds = pd.Series([d["interaction"] for d in doubles]).value_counts().to_dict()
    go = store_go_graph(store)
    _print_separability(doubles)

    class Oracle:
        def __init__(self, train, own_columns: bool):
            delta = train.means - train.control_mean[None]
            self.control = train.control_mean
            self.single = {p[0]: delta[i] for i, p in enumerate(train.perts) if len(p) == 1}
            self.column = {g: j for j, g in enumerate(train.gene_symbols)}
            self.own_columns = own_columns

        def __call__(self, perts):
            out = []
            for s in perts:
                if len(s) == 2 and all(g in self.single for g in s):
                    key = "+".join(sorted(s))
                    ga, ca, gb, cb = gains.get(key, (s[0], 1.0, s[1], 1.0))
                    pred = ca * self.single[ga] + cb * self.single[gb]
                    if self.own_columns:
                        own = [self.column[g] for g in s if g in self.column]
                        pred[own] = (self.single[ga] + self.single[gb])[own]
                else:
                    pred = sum((self.single.get(g, 0.0) for g in s), np.zeros_like(self.control))
                out.append(self.control + pred)
            return np.stack(out)

    rows = []
    for seed in args.seeds:
        split = make_split(store.condition_names, "simulation", seed)
        train = baselines.training_profiles(store, split.train)
        preds = {"oracle_gains": Oracle(train, True), "oracle_gains_all": Oracle(train, False)}
        table = evaluate_split(store, split, preds, baselines=("additive",), go=go).table
        table = table[table.category == "combo_seen2"].assign(seed=seed)
        rows.append(table)
    t = pd.concat(rows)
    summary = t.groupby("predictor")[["pearson_delta", "mse_de"]].agg(["mean", "std"]).round(4)
    print(f"{args.store}: doubles by interaction {kinds}; combo_seen2 over seeds {args.seeds} "
          f"({int(t.num_conditions.mean())} test pairs per split on average)")
    print(summary.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
