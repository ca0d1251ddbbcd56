"""Training figures (matplotlib figures rendered straight to PNG files, without pyplot): the learning curves
a run saves, and the figure helpers the evaluation figures (gears_dist.evaluate.plots) share."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np


class _Figures:
    """The two pyplot calls used here, on `matplotlib.figure.Figure` objects made without pyplot: rendering to
    PNG needs no backend, so the process's backend is left alone (a notebook's inline figures keep showing after
    `gd.train`, which saves learning curves) and no figure stays in pyplot's registry."""

    @staticmethod
    def subplots(*args, figsize=None, **kwargs):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    @staticmethod
    def close(fig) -> None:
        """Nothing to release: pyplot never saw the figure."""


def _plt() -> type[_Figures]:
    return _Figures


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def plot_learning_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike,
                         metrics: Sequence[str] | None = None) -> pathlib.Path:
    """history: one dict per epoch/step, e.g. {'epoch': 1, 'train_loss': .., 'val_pearson_delta': ..}."""
    plt = _plt()
    if not history:
        raise ValueError("learning curves: the metrics history is empty; train at least one epoch")
    xkey = "epoch" if "epoch" in history[0] else ("step" if "step" in history[0] else None)
    xs = np.array([h.get(xkey, i) for i, h in enumerate(history)] if xkey else np.arange(len(history)), float)
    # By default only what measures the model (losses and prediction metrics), not throughput or memory.
    keys = list(metrics) if metrics else sorted({k for h in history for k, v in h.items()
                                                  if isinstance(v, (int, float)) and "num_" not in k
                                                  and any(t in k for t in ("loss", "mse", "pearson", "frac_"))})
    if not keys:
        raise ValueError("learning curves: no numeric metric in the history")
    # Group metrics by what they measure: losses together, correlations together, the rest alone.
    groups: dict[str, list[str]] = {}
    for k in keys:
        g = "loss" if "loss" in k else ("pearson" if "pearson" in k else ("mse" if "mse" in k else k))
        groups.setdefault(g, []).append(k)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (g, ks) in zip(axes[0], groups.items()):
        for i, k in enumerate(ks):
            ys = np.array([h.get(k, np.nan) for h in history], dtype=float)
            ok = np.isfinite(ys)
            ax.plot(xs[ok], ys[ok], marker="o", markersize=3, label=k, color=f"C{i}")
        ax.set_xlabel(xkey or "index")
        ax.set_title(g)
        if g in ("loss", "mse"):
            vals = [h.get(k) for h in history for k in ks if isinstance(h.get(k), (int, float))]
            if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
                ax.set_yscale("log")
        ax.legend(fontsize=7, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)
