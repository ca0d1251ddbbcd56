"""Evaluate predictors (the model and the baselines) on a store's split, per test category.

``evaluate_split(store, split, predictors)`` reads the test conditions' truth summaries from the
store's stats (conditions x genes rows, never cells), fits the baselines on the training split's
condition means, runs every predictor, and returns per-condition metrics, the long results table
(predictor x category) and the predictions. ``gi_evaluation`` scores genetic interactions of pairs
for the observed data, the additive baseline and any predictor, with precision@k against a
ground truth when one is known (synthetic screens). ``write_report`` writes tables, figures and
the cell-eval export into a directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from gears_dist.evaluate import baselines as B
from gears_dist.evaluate import gi as GI
from gears_dist.evaluate.metrics import (
    METRICS,
    ConditionTruth,
    Predictor,
    evaluate_predictor,
    summarize,
    truth_from_store,
)


@dataclasses.dataclass
class Evaluation:
    table: object                           # DataFrame: predictor, category, num_conditions, coverage, metrics
    per_condition: dict[str, object]        # predictor -> DataFrame [conditions x metrics]
    predictions: dict[str, np.ndarray]      # predictor -> [U, G] predicted means (rows = truth.names)
    truth: ConditionTruth
    categories: dict[str, list[str]]
    coverage: dict[str, dict[str, float]]   # predictor -> category -> covered fraction


def _genes_lookup(store):
    table = dict(zip(store.condition_names, store.condition_genes()))

    def genes_of(name: str) -> tuple[str, ...]:
        return tuple(table[name])

    return genes_of


def store_go_graph(store, graph_key: str | None = None):
    """The GO graph for the go_prior baseline: the store's `graph_key` (a run's own graph), else the default
    graph config's if stored, else built in memory from the store's genes (nothing is written)."""
    from gears_dist.graphs.build import go_key, load_graph, perturbable_genes, perturbed_genes
    from gears_dist.graphs.config import GraphConfig
    from gears_dist.graphs.go import build_go_graph

    cfg = GraphConfig()
    for key in (graph_key, go_key(cfg)):
        if key and store.has_component("graphs", key):
            return load_graph(store, key)
    return build_go_graph(perturbable_genes(store), cfg, perturbed=perturbed_genes(store))


def evaluate_split(store, split, predictors: Mapping[str, Predictor] | None = None,
                   baselines: Sequence[str] = tuple(B.BASELINES), conditions: str = "test",
                   block: int = 512, go=None) -> Evaluation:
    """Metrics of every predictor and baseline on the split's `conditions` set ('test' or 'val').
    go: the GO graph for the go_prior baseline (default: `store_go_graph(store)`)."""
    import pandas as pd

    if conditions not in ("test", "val"):
        raise ValueError(f"conditions: expected 'test' or 'val', received {conditions!r}")
    names = [n for n in getattr(split, conditions) if n != "ctrl"]
    genes_of = _genes_lookup(store)
    names = [n for n in names if genes_of(n)]
    if not names:
        raise ValueError(f"split {getattr(split, 'kind', '?')!r} has no perturbed {conditions} conditions to evaluate; "
                         f"use a split with a {conditions} set (e.g. 'gears-dist split STORE --kind simulation')")
    prefix = f"{conditions}/"
    categories = {k[len(prefix):]: [n for n in v if n in set(names)] for k, v in split.categories.items()
                  if k.startswith(prefix)}
    truth = truth_from_store(store, names)
    train = B.training_profiles(store, split.train)
    if go is None and any(b in B.NEEDS_GO for b in baselines):
        go = store_go_graph(store)
    fitted = B.fit_baselines(train, baselines, go=go) if baselines else {}
    everyone: dict[str, Predictor] = {**(predictors or {}), **fitted}
    per_condition, preds, coverage, rows = {}, {}, {}, []
    for pname, predictor in everyone.items():
        df, p = evaluate_predictor(predictor, truth, genes_of, block=block, desc=f"evaluate {pname} ({conditions})")
        per_condition[pname], preds[pname] = df, p
        covers = getattr(predictor, "covers", None)
        covered = dict(zip(names, covers([genes_of(n) for n in names]) if covers else np.ones(len(names), bool)))
        cov = {}
        summary = summarize(df, categories)
        for cat, row in summary.iterrows():
            members = categories.get(cat, names)
            cov[cat] = float(np.mean([covered[n] for n in members])) if members else float("nan")
            rows.append({"predictor": pname, "category": cat, "num_conditions": int(row["num_conditions"]),
                         "coverage": cov[cat], **{m: float(row[m]) for m in METRICS}})
        coverage[pname] = cov
    table = pd.DataFrame(rows, columns=["predictor", "category", "num_conditions", "coverage", *METRICS])
    return Evaluation(table=table, per_condition=per_condition, predictions=preds, truth=truth,
                      categories=categories, coverage=coverage)


# -- genetic interactions -------------------------------------------------------------------------

def load_gi_truth(source) -> dict[str, str]:
    """Ground-truth GI type per double ('A+B' -> 'synergy' / 'additive' / ...).

    `source`: a store (its truth.json, or the sidecar of the h5ad it was ingested from), a truth JSON path (``<file>.truth.json``), or an h5ad's
    ``uns['gears_dist_truth']`` mapping. Empty dict when the store has no truth (real data).
    """
    from gears_dist.data.conditions import condition_name

    doc = None
    if hasattr(source, "path") and hasattr(source, "manifest"):
        rel = source.manifest.get("truth")
        path = source.path / rel if rel else source.path / "truth.json"
        if not path.is_file():
            # An ingested synthetic h5ad keeps its truth in the sidecar <file>.truth.json.
            src = (source.manifest.get("source") or {}).get("path")
            path = pathlib.Path(f"{src}.truth.json") if src else path
        if not path.is_file():
            return {}
        doc = json.loads(path.read_text())
    elif isinstance(source, (str, os.PathLike)):
        doc = json.loads(pathlib.Path(source).read_text())
    elif isinstance(source, Mapping):
        cols = {k: list(np.asarray(v).tolist()) for k, v in source.items()}
        doc = {"doubles": [dict(zip(cols, row)) for row in zip(*cols.values())]}
    else:
        raise TypeError(f"load_gi_truth: expected a Store, a JSON path or a mapping, received {type(source).__name__}")
    out = {}
    for row in doc.get("doubles", []):
        genes = row.get("condition", "").split("+")
        out[condition_name(genes)] = str(row["interaction"])
    return out


def gi_evaluation(store, pairs: Sequence[str], predictors: Mapping[str, Predictor] | None = None,
                  truth: Mapping[str, str] | None = None, k: int = 10, method: str = "huber",
                  genes: np.ndarray | None = None, train: B.TrainingProfiles | None = None):
    """GI scores of `pairs` ('A+B') for the observed data, the additive baseline and each predictor.

    Observed: singles and double means from the store's stats (pairs whose singles are measured).
    Additive: the measured singles' deltas summed (a prediction of no interaction at all; its
    precision@k is the base rate: every pair ties). Predictors: their predicted singles and double.
    Returns (scores {source: DataFrame}, precision DataFrame [source x GI type]).
    """
    import pandas as pd

    genes_of = _genes_lookup(store)
    measured = set(store.condition_names)
    control = store.array("stats/control_mean").astype(np.float64)
    genes = GI.well_expressed_genes(control) if genes is None else np.asarray(genes)
    two = [tuple(genes_of(p)) if p in measured else tuple(p.split("+")) for p in pairs]
    two = [g for g in two if len(g) == 2]
    if not two:
        raise ValueError("gi_evaluation: no two-gene pair to score; pass conditions named 'A+B'")
    scores = {}
    obs_pairs = [g for g in two if all(n in measured for n in (g[0], g[1], f"{g[0]}+{g[1]}"))]
    if obs_pairs:
        needed = sorted({n for g in obs_pairs for n in (g[0], g[1], f"{g[0]}+{g[1]}")})
        t = truth_from_store(store, needed)
        means = dict(zip(t.names, t.mean))
        scores["observed"] = GI.gi_from_profiles(obs_pairs, means, control, genes=genes, method=method)
        singles_sum = {n: means[n] for n in means}
        for a, b in obs_pairs:
            singles_sum[f"{a}+{b}"] = means[a] + means[b] - control
        scores["additive"] = GI.gi_from_profiles(obs_pairs, singles_sum, control, genes=genes, method=method)
    for pname, predictor in (predictors or {}).items():
        sets = sorted({s for a, b in two for s in ((a,), (b,), (a, b))})
        p = np.asarray(predictor(sets))
        means = {"+".join(s): p[i] for i, s in enumerate(sets)}
        scores[pname] = GI.gi_from_profiles(two, means, control, genes=genes, method=method)
    rows = {}
    if truth:
        for src, df in scores.items():
            rows[src] = GI.gi_precision(df, truth, k=k)
            labelled = [p for p in df.index if p in truth]
            rows[src]["num_pairs"] = len(labelled)
    precision = pd.DataFrame.from_dict(rows, orient="index")
    if truth and len(precision):
        labelled = [p for p in next(iter(scores.values())).index if p in truth]
        base = {t: float(np.mean([truth[p] == t for p in labelled])) for t in GI.GI_RULES}
        precision.loc["base_rate"] = {**{t: base[t] for t in precision.columns if t in base},
                                      "num_pairs": len(labelled)}
    return scores, precision


# -- figures and files ----------------------------------------------------------------------------

def make_figures(store, ev: Evaluation, out_dir: str | os.PathLike, num_conditions: int = 3,
                 focus: Sequence[str] = ("gears", "model", "additive", "linear"),
                 history: Sequence[Mapping] | None = None) -> list[pathlib.Path]:
    """Top-DE boxplots for a few test conditions per category, delta scatters, learning curves."""
    from gears_dist.evaluate import plots

    out = pathlib.Path(out_dir)
    paths = []
    shown = [p for p in ev.predictions if p in focus] or list(ev.predictions)[:3]
    scatter_preds = {p: ev.predictions[p] for p in shown}
    paths.append(plots.plot_delta_scatter(ev.truth, scatter_preds, ev.categories, out / "delta_scatter.png"))
    index = {n: i for i, n in enumerate(ev.truth.names)}
    symbols = np.array(store.genes)
    chosen = []
    for cat, names in sorted(ev.categories.items()):
        for n in names[:num_conditions]:
            chosen.append((cat, n))
    for cat, n in chosen:
        i = index[n]
        de = ev.truth.top_de_non_dropout[i]
        de = de[de >= 0]
        cells = plots.condition_cells(store, n, de)
        preds = {p: ev.predictions[p][i][de] for p in ev.predictions if p in focus or p == "train_mean"}
        safe = n.replace("+", "_").replace("/", "_")
        paths.append(plots.plot_top_de(cells, symbols[de], ev.truth.control_mean[de], preds, f"{n} ({cat})",
                                       out / f"top_de_{safe}.png"))
    if history:
        paths.append(plots.plot_learning_curves(history, out / "learning_curves.png"))
    return paths
