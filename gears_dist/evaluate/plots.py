"""Evaluation figures (matplotlib figures rendered straight to PNG files, without pyplot).

- ``plot_top_de``: one condition's top-20 DE genes: the observed cells' change over the control
  mean as boxplots (cells read from the store's X rows of that condition only), the predicted
  change of each model / baseline as markers (GEARS' per-perturbation figure, with baselines).
- ``plot_delta_scatter``: predicted vs observed change over control on each test condition's
  top-20 DE genes, one panel per test category, one row per predictor.
- ``plot_learning_curves``: metrics history (list of dicts with 'epoch' or 'step') per metric.
- ``plot_gi_scatter``: GI magnitude vs correlation of fit, coloured by ground-truth type if known.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from gears_dist.train.figures import _Figures, _plt, _save, plot_learning_curves  # noqa: F401 (shared)

# Fixed colours so the same predictor looks the same in every figure.
_COLOURS = {"gears": "#d62728", "model": "#d62728", "additive": "#1f77b4", "linear": "#2ca02c",
            "train_mean": "#9467bd", "control_mean": "#7f7f7f"}
_GI_COLOURS = {"additive": "#bbbbbb", "synergy": "#d62728", "suppression": "#1f77b4", "neomorphism": "#2ca02c",
               "epistasis": "#ff7f0e", "redundancy": "#9467bd"}
_MARKERS = ("o", "D", "s", "^", "v", "P", "X")


def _colour(name: str, i: int) -> str:
    return _COLOURS.get(name, f"C{i % 10}")


def condition_cells(store, name: str, genes: np.ndarray, max_cells: int = 2000, seed: int = 0) -> np.ndarray:
    """The observed cells of one condition at some genes: reads only that condition's X rows."""
    index = store.condition_names.index(name)
    start = int(store.array("conditions/start")[index])
    stop = int(store.array("conditions/stop")[index])
    if stop - start > max_cells:  # a bounded, reproducible sample of a very large condition
        rows = np.sort(np.random.default_rng(seed).choice(np.arange(start, stop), max_cells, replace=False))
        return store.read_x_cells(rows, np.asarray(genes))
    return store.read_x_rows(start, stop, np.asarray(genes))


def plot_top_de(cells: np.ndarray, gene_names: Sequence[str], control_mean: np.ndarray,
                predicted: Mapping[str, np.ndarray], title: str, path: str | os.PathLike) -> pathlib.Path:
    """cells [n, 20] observed at the DE genes; control_mean [20]; predicted {name: mean [20]}."""
    plt = _plt()
    k = len(gene_names)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * k + 2), 4.6))
    delta_cells = np.asarray(cells, dtype=np.float64) - control_mean[None, :]
    ax.boxplot(delta_cells, positions=np.arange(1, k + 1), showfliers=False, widths=0.6,
               medianprops={"linewidth": 0}, boxprops={"color": "#555555"},
               whiskerprops={"color": "#555555"}, capprops={"color": "#555555"})
    ax.scatter(np.arange(1, k + 1), delta_cells.mean(axis=0), marker="_", s=260, color="black", zorder=3,
               label="observed mean")
    n = max(len(predicted), 1)
    for i, (name, pred) in enumerate(predicted.items()):
        offset = (i - (n - 1) / 2) * 0.12
        ax.scatter(np.arange(1, k + 1) + offset, np.asarray(pred) - control_mean, marker=_MARKERS[i % len(_MARKERS)],
                   s=36, color=_colour(name, i), edgecolor="white", linewidth=0.5, zorder=4, label=name)
    ax.axhline(0, linestyle="--", color="green", linewidth=0.8)
    ax.set_xticks(np.arange(1, k + 1))
    ax.set_xticklabels(list(gene_names), rotation=90)
    ax.set_ylabel("change in expression over control")
    ax.set_title(f"{title}: top-{k} DE genes ({delta_cells.shape[0]} cells)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def plot_delta_scatter(truth, predictions: Mapping[str, np.ndarray], categories: Mapping[str, Sequence[str]],
                       path: str | os.PathLike, use_de: bool = True) -> pathlib.Path:
    """Predicted vs observed change over control per test category (rows: predictors)."""
    from gears_dist.evaluate.metrics import rowwise_pearson

    plt = _plt()
    from gears_dist.evaluate.report import category_sort_key

    present = set(truth.names)
    cats = sorted((c for c, names in categories.items() if any(n in present for n in names)), key=category_sort_key)
    if not cats:
        cats = ["all"]
        categories = {"all": truth.names}
    rows = list(predictions)
    fig, axes = plt.subplots(len(rows), len(cats), figsize=(3.3 * len(cats), 3.1 * len(rows)), squeeze=False)
    index = {n: i for i, n in enumerate(truth.names)}
    ctrl = truth.control_mean
    for r, name in enumerate(rows):
        pred = predictions[name]
        for c, cat in enumerate(cats):
            ax = axes[r][c]
            sel = np.array([index[n] for n in categories[cat] if n in index], dtype=np.int64)
            obs = truth.mean[sel] - ctrl
            prd = pred[sel] - ctrl
            if use_de:
                idx = truth.top_de[sel]
                mask = idx >= 0
                obs = np.take_along_axis(obs, np.where(mask, idx, 0), 1)[mask]
                prd = np.take_along_axis(prd, np.where(mask, idx, 0), 1)[mask]
            obs, prd = obs.ravel(), prd.ravel()
            ax.scatter(obs, prd, s=6, alpha=0.5, color=_colour(name, r), linewidth=0)
            lim = np.abs(np.concatenate([obs, prd, [1e-3]])).max() * 1.05
            ax.plot([-lim, lim], [-lim, lim], color="black", linewidth=0.6, linestyle="--")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            r_all = rowwise_pearson(prd[None], obs[None])[0] if obs.size > 1 else float("nan")
            ax.set_title(f"{name} | {cat} (n={sel.size})\nr={r_all:.2f}", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("observed change" + (" (top-20 DE)" if use_de else ""))
            if c == 0:
                ax.set_ylabel("predicted change")
    fig.tight_layout()
    return _save(fig, path)


def plot_gi_scatter(scores, path: str | os.PathLike, truth: Mapping[str, str] | None = None,
                    title: str = "genetic interactions", annotate: int = 8) -> pathlib.Path:
    """Magnitude vs correlation of fit per pair; colours = ground-truth type when known."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    types = np.array([(truth or {}).get(p, "unknown") for p in scores.index])
    for t in dict.fromkeys(types):
        sel = types == t
        ax.scatter(scores["magnitude"].to_numpy()[sel], scores["corr_fit"].to_numpy()[sel], s=28,
                   color=_GI_COLOURS.get(t, "#444444"), label=f"{t} ({int(sel.sum())})", edgecolor="white",
                   linewidth=0.5)
    ax.axvline(np.sqrt(2), color="black", linestyle="--", linewidth=0.7)
    ax.text(np.sqrt(2), ax.get_ylim()[1], " additive", va="top", fontsize=8)
    # Label the most extreme pairs (far from additive on either axis).
    extremity = np.abs(np.log(np.maximum(scores["magnitude"].to_numpy(), 1e-6) / np.sqrt(2))) + \
        (1 - scores["corr_fit"].to_numpy())
    for i in np.argsort(-extremity)[:annotate]:
        ax.annotate(scores.index[i], (scores["magnitude"].iloc[i], scores["corr_fit"].iloc[i]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("magnitude sqrt(c1^2 + c2^2)  (synergy > sqrt 2 > suppression)")
    ax.set_ylabel("correlation of fit  (low: neomorphism)")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)
