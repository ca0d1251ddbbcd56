"""Predictions of a trained model for any perturbation sets, and the `predict` / `evaluate` commands.

``TrainedPredictor.load(RUN_OR_MODEL_DIR)`` rebuilds the trained GEARSModel from a run directory
(``run/model/``, written at the end of training), a saved model directory, or an epoch checkpoint
(``run/checkpoints/epoch_NNNN``, using its best weights), together with the store's graphs.
Prediction is per perturbation set (no control cells are sampled): mean expression = control
mean + F(S). Any gene that is a node of the GO graph can be perturbed, including genes that were
never perturbed in training; old symbols are mapped to current ones through the alias table.

Input sets: 'A', 'A+B', 'A+B+C' (also 'A,B' or 'A B'); an empty set, a repeated gene or a gene
that is not a node of the model's GO graph is an error that names it. ``all_pairs(genes)`` gives
the n(n-1)/2 pairs of a gene list, predicted in batches (one forward pass per chunk of sets).
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

MODEL_DIR = "model"


# -- perturbation sets -------------------------------------------------------------------------

def parse_set(text: str) -> tuple[str, ...]:
    """'A+B' / 'A,B' / 'A B' -> ('A', 'B') sorted. Errors name the problem."""
    if not isinstance(text, str):
        raise TypeError(f"perturbation set {text!r}: expected a string such as 'A+B', received {type(text).__name__}")
    genes = [g for g in re.split(r"[+,\s]+", text.strip()) if g and g.lower() not in ("ctrl", "control")]
    if not genes:
        raise ValueError(f"perturbation set {text!r} is empty; name at least one gene, e.g. 'KLF1' or 'KLF1+MAP2K6'")
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        raise ValueError(f"perturbation set {text!r}: gene(s) {dup} appear more than once; a set names each gene once")
    return tuple(sorted(genes))


def read_sets_file(path: str | os.PathLike) -> list[tuple[str, ...]]:
    """One set per line ('#' comments and blank lines skipped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perturbation file {str(path)!r} does not exist")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            out.append(parse_set(line))
        except ValueError as exc:
            raise ValueError(f"{path}:{i}: {exc}") from None
    if not out:
        raise ValueError(f"perturbation file {str(path)!r} holds no perturbation set (one per line, e.g. 'A+B')")
    return out


def all_pairs(genes: Sequence[str]) -> list[tuple[str, str]]:
    genes = list(dict.fromkeys(genes))  # order-preserving de-duplication
    if len(genes) < 2:
        raise ValueError(f"all pairs: need at least 2 distinct genes, received {genes}")
    return [tuple(sorted(p)) for p in itertools.combinations(genes, 2)]


def set_name(genes: Iterable[str]) -> str:
    return "+".join(sorted(genes))


# -- loading a trained model --------------------------------------------------------------------

def _locate(path: str | os.PathLike) -> tuple[pathlib.Path, str]:
    """(directory, kind) with kind 'model' (model.pt + model.json) or 'checkpoint' (epoch checkpoint)."""
    from gears_dist.train import loop

    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist; pass a run directory (with model/), a model directory "
                                f"or a checkpoint directory")
    if (p / loop.MODEL_FILE).is_file():
        return p, "model"
    if (p / MODEL_DIR / loop.MODEL_FILE).is_file():
        return p / MODEL_DIR, "model"
    if (p / loop.BEST_FILE).is_file():
        return p, "checkpoint"
    from gears_dist.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(p / "checkpoints") if (p / "checkpoints").is_dir() else None
    if latest is not None and (latest / loop.BEST_FILE).is_file():
        return latest, "checkpoint"
    raise ValueError(f"{str(p)!r} holds no trained model: expected {loop.MODEL_FILE} (a model directory), "
                     f"{MODEL_DIR}/{loop.MODEL_FILE} (a finished run) or {loop.BEST_FILE} (a checkpoint)")


class TrainedPredictor:
    """A trained GEARS model ready to predict; callable as a metrics Predictor (sets -> means [U, G])."""

    def __init__(self, model, meta: dict, store, go_nodes: Sequence[str], device: str = "cpu"):
        import torch

        self.model = model.eval()
        self.meta = meta
        self.store = store
        self.nodes = list(go_nodes)
        self.node_index = {g: i for i, g in enumerate(self.nodes)}
        self.genes = list(meta.get("genes") or store.genes)
        self.device = torch.device(device)
        self.control_mean = store.array("stats/control_mean").astype(np.float64)
        self.uncertainty = self.model.uncertainty_head is not None
        self.go_graph = None  # the model's GeneGraph (set by load): the go_prior baseline uses the same graph
        from gears_dist.data.genes import aliases

        self._aliases = aliases()

    @classmethod
    def load(cls, path: str | os.PathLike, store: str | os.PathLike | None = None, device: str = "cpu"):
        import torch

        from gears_dist.data.store import open_store
        from gears_dist.graphs.build import _load_graph
        from gears_dist.model.build import build_model
        from gears_dist.train import checkpoint as ckpt
        from gears_dist.train import loop
        from gears_dist.train.config import run_config_from_dict

        where, kind = _locate(path)
        if kind == "model":
            state, meta = loop.load_model_state(where)
        else:
            state = ckpt.safe_torch_load(where / loop.BEST_FILE, map_location="cpu")
            meta = ckpt.read_meta(where)
        cfg = run_config_from_dict(meta["config"])
        store_path = store or meta.get("store")
        if not store_path:
            raise ValueError(f"{str(where)!r} does not record its store; pass --store STORE.zarr")
        st = open_store(store_path)
        if meta.get("genes") and list(meta["genes"]) != st.genes:
            raise ValueError(f"store {str(st.path)!r} measures other genes than the model was trained on "
                             f"({st.num_genes} vs {len(meta['genes'])}); pass the training store with --store")
        keys = meta.get("graph_keys") or {}
        if not keys.get("go") or not keys.get("coexpr"):
            raise ValueError(f"{str(where)!r} does not record its graph keys; retrain with this gears_dist version")
        go = _load_graph(st, keys["go"])
        coexpr = _load_graph(st, keys["coexpr"])
        if meta.get("go_nodes") and list(meta["go_nodes"]) != go.nodes:
            raise ValueError(f"GO graph {keys['go']!r} in {str(st.path)!r} differs from the one the model was trained "
                             f"with; rebuild it with the run's graph config")
        model = build_model(cfg.model, st.num_genes, go, coexpr, state=state, where=repr(str(where)))
        model.to(torch.device(device))
        predictor = cls(model, meta, st, go.nodes, device)
        predictor.go_graph = go
        return predictor

    # -- validation
    def check_sets(self, sets: Sequence[Sequence[str] | str]) -> list[tuple[str, ...]]:
        """Canonical sets; maps aliases; raises one ValueError listing every unknown gene."""
        out, unknown = [], set()
        for s in sets:
            genes = parse_set(s) if isinstance(s, str) else parse_set("+".join(s))
            mapped = []
            for g in genes:
                if g not in self.node_index and self._aliases.get(g) in self.node_index:
                    g = self._aliases[g]
                if g not in self.node_index:
                    unknown.add(g)
                mapped.append(g)
            if len(set(mapped)) != len(mapped):
                raise ValueError(f"perturbation set {set_name(genes)!r}: two names map to the same gene after alias "
                                 f"resolution ({mapped})")
            out.append(tuple(sorted(mapped)))
        if unknown:
            u = sorted(unknown)
            raise ValueError(f"{len(u)} gene(s) are not nodes of the model's GO graph and cannot be perturbed: "
                             f"{u[:50]}{' ...' if len(u) > 50 else ''}; the graph has {len(self.nodes)} genes "
                             f"(perturbed and measured genes of the store, or every GO-annotated gene with graph "
                             f"universe 'all')")
        return out

    def _index(self, sets: Sequence[tuple[str, ...]]):
        import torch

        kmax = max([1] + [len(s) for s in sets])
        idx = np.full((len(sets), kmax), -1, dtype=np.int64)
        for i, s in enumerate(sets):
            idx[i, :len(s)] = [self.node_index[g] for g in s]
        return torch.from_numpy(idx).to(self.device)

    def predict_delta(self, sets, return_logvar: bool = False, chunk: int = 1024):
        """Predicted change over the control mean [U, G] (and log-variance [U, G] when asked)."""
        sets = self.check_sets(sets)
        deltas, logvars = [], []
        for lo in range(0, len(sets), chunk):
            part = self._index(sets[lo:lo + chunk])
            if return_logvar:
                d, lv = self.model.predict_delta(part, return_logvar=True)
                if lv is None:
                    raise ValueError("this model was trained without the uncertainty head (model.uncertainty: "
                                     "false); drop --uncertainty")
                logvars.append(lv.float().cpu().numpy())
            else:
                d = self.model.predict_delta(part)
            deltas.append(d.float().cpu().numpy())
        g = len(self.genes)
        delta = np.concatenate(deltas) if deltas else np.zeros((0, g), np.float32)
        if return_logvar:
            return delta, (np.concatenate(logvars) if logvars else np.zeros((0, g), np.float32))
        return delta

    def predict_mean(self, sets, return_logvar: bool = False):
        """(mean [U, G], delta [U, G], logvar or None): the predicted mean expression, clipped at 0 (log-normalized
        expression is never negative, and a cell-eval file can only hold values >= 0), and the change over the
        control mean that this mean makes."""
        if return_logvar:
            delta, logvar = self.predict_delta(sets, return_logvar=True)
        else:
            delta, logvar = self.predict_delta(sets), None
        mean = np.maximum(self.control_mean[None, :] + delta.astype(np.float64), 0.0)
        return mean, mean - self.control_mean[None, :], logvar

    def __call__(self, sets) -> np.ndarray:
        return self.predict_mean(sets)[0]


# -- outputs -------------------------------------------------------------------------------------

def predictions_anndata(sets: Sequence[tuple[str, ...]], mean: np.ndarray, delta: np.ndarray, genes: Sequence[str],
                        logvar: np.ndarray | None = None, meta: dict | None = None):
    """AnnData of predictions: X = predicted mean, layers delta (and logvar), obs = set name / genes / size,
    var = genes, uns['gears_dist'] = meta (made JSON-safe)."""
    import warnings

    import anndata as ad
    import pandas as pd

    names = [set_name(s) for s in sets]
    obs = pd.DataFrame({"perturbation": names, "genes": ["+".join(s) for s in sets],
                        "num_genes": [len(s) for s in sets]}, index=pd.Index(names, name="condition"))
    layers = {"delta": np.asarray(delta, np.float32)}
    if logvar is not None:
        layers["logvar"] = np.asarray(logvar, np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*obs_names.*not unique.*")  # the same set asked twice
        return ad.AnnData(X=np.asarray(mean, np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")),
                          layers=layers, uns={"gears_dist": json.loads(json.dumps(meta or {}, default=str))})


def write_predictions(sets: Sequence[tuple[str, ...]], mean: np.ndarray, delta: np.ndarray, genes: Sequence[str],
                      out: str | os.PathLike, logvar: np.ndarray | None = None, meta: dict | None = None
                      ) -> list[pathlib.Path]:
    """.h5ad: X = predicted mean, layers delta (and logvar), obs = set name / genes / size.
    .csv: OUT (mean, sets x genes), OUT with '.delta.csv' (and '.logvar.csv')."""
    import pandas as pd

    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [set_name(s) for s in sets]
    if out.suffix == ".h5ad":
        adata = predictions_anndata(sets, mean, delta, genes, logvar, meta)
        tmp = out.with_name(f".{out.name}.tmp")
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
        return [out]
    if out.suffix != ".csv":
        raise ValueError(f"output {str(out)!r}: expected a .h5ad or .csv file name")
    paths = []
    stem = out.with_suffix("")
    for suffix, arr in (("", mean), (".delta", delta), (".logvar", logvar)):
        if arr is None:
            continue
        p = pathlib.Path(f"{stem}{suffix}.csv")
        tmp = p.with_name(f".{p.name}.tmp")
        pd.DataFrame(np.asarray(arr, np.float32), index=pd.Index(names, name="perturbation"), columns=list(genes)).to_csv(tmp)
        os.replace(tmp, p)
        paths.append(p)
    return paths
