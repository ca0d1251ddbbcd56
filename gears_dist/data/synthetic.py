"""Synthetic Perturb-seq screens at any scale, with known ground truth.

What is generated (all deterministic by ``ScreenSpec.seed``):

- Measured genes and perturbed genes are real human symbols with GO annotations
  (``gears_dist.data.genes``). Perturbed genes are drawn partly from a few GO-term "modules" (so
  that the GO graph has dense neighbourhoods, as in real screens) and partly at random; most of
  them are also measured, a few are not.
- Effects are GO-structured. A set of latent expression programs (sparse loadings over the
  measured genes) is shared by the whole screen; every GO term gets a sparse mix of programs; a
  perturbed gene's downstream effect is the information-weighted (IDF) mean of its terms' mixes
  plus a gene-specific part, pushed through the programs. Genes that share specific GO terms
  therefore have correlated effect vectors, which is what makes the GO prior of GEARS useful.
  The perturbed gene's own expression goes up (CRISPRa, Norman-like) or down (CRISPRi,
  Replogle-like) when it is measured.
- Doubles are additive in log-fold space, except a known fraction of true interactions:
  ``synergy`` (both effects scaled by m > 1), ``suppression`` (m < 1), ``epistasis`` (one gene
  dominates: c = (1, w) with w small) and ``neomorphism`` (additive plus a new program). The truth
  table records, per double, ``c_a``, ``c_b`` (downstream log-fold = c_a·Δa + c_b·Δb + new) and
  ``magnitude`` = sqrt((c_a² + c_b²) / 2) (1 for additive, > 1 synergy, < 1 suppression).
  ``interaction_structure`` says which doubles interact: ``random`` (default; each pair at random, the
  null that no model can predict) or ``graph`` (as Norman et al. 2019 saw: genes sharing specific GO
  terms buffer each other -- suppression, epistasis --, genes of different GO neighbourhoods with
  similar single effects synergize, the rest are additive, neomorphism stays random), a function of
  the GO graph and the singles plus a little seeded noise, so a model that sees both can learn it.
  ``graded``: every pair's gains are a smooth function of the same two features (see _graded_gains):
  the more GO annotation two genes share, the more they buffer each other; genes with little shared
  annotation whose effects point the same way synergize, more the more alike their effects. The
  recorded type names the result (suppression below 0.8, synergy above 1.2). With
  ``related_pair_frac`` > 0, part of the doubles are drawn among GO-related pairs, as real
  combinatorial screens choose theirs.
- Counts are negative binomial (``nb_sparse``) around log-normal gene means times a log-normal
  library size (median ~10k UMIs for Norman-like screens), with a per-cell penetrance (a fraction
  of cells escape the perturbation). About 8% of cells are controls.

Cells are generated in fixed blocks of ``block_cells`` rows, each from its own random stream keyed
by (seed, block index), fully vectorized; so the h5ad written in streaming blocks is byte-identical
to the in-memory AnnData of the same spec, and the writers never hold more than a few blocks.

Outputs:

- ``simulate_screen(spec, style)`` -> in-memory AnnData (small sizes).
- ``write_h5ad(spec, path, style)``: streams CSR raw counts into an h5ad (AnnData on-disk format,
  written with h5py block by block), plus the truth as ``uns['gears_dist_truth']`` and as a JSON
  sidecar ``<path>.truth.json``. In the h5ad, cells are shuffled (as in real files).
- ``write_store(spec, path)``: writes the gears_dist Zarr store directly (cells grouped by
  condition, log1p of counts normalized to 1e4 per cell, float32), computes its statistics with
  ``gears_dist.data.stats.write_stats`` and puts the truth in ``truth.json`` beside the manifest.
  The store is a separate draw from the same model as the h5ad of the same spec (same genes,
  conditions, cell counts and truth; different cells).

Styles: ``gears`` (obs.condition = 'ctrl' / 'A+ctrl' / 'A+B', var.gene_name) and ``scperturb``
(obs.perturbation = 'control' / 'A' / 'A_B', symbols as var_names). Both have obs.cell_type.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from gears_dist.config import from_dict, require, to_dict
from gears_dist.data.conditions import condition_name
from gears_dist.data.genes import go_annotations

INTERACTION_TYPES = ("synergy", "suppression", "neomorphism", "epistasis")
INTERACTION_STRUCTURES = ("random", "graph", "graded")
TRUTH_KEY = "gears_dist_truth"
STYLES = ("gears", "scperturb")
TARGET_SUM = 1e4
# Random stream tags: each part of the model and every cell block draws from its own stream, so
# changing one size never reshuffles the others' randomness more than it must.
_TAG_GENES, _TAG_EFFECTS, _TAG_BASELINE, _TAG_LAYOUT, _TAG_BLOCK = 1, 2, 3, 4, 5


@dataclasses.dataclass
class ScreenSpec:
    """Everything that defines a synthetic screen. Same spec -> same bytes."""

    num_cells: int = 9000
    num_genes: int = 1000
    num_singles: int = 40
    num_doubles: int = 40
    control_frac: float = 0.08
    modality: str = "crispra"               # crispra: target gene up (Norman); crispri: down (Replogle)
    measured_perturbed_frac: float = 0.9    # perturbed genes that are also measured
    module_frac: float = 0.5                # perturbed genes drawn from a few GO-term modules
    interaction_frac: float = 0.2           # doubles that are true interactions (not additive)
    interaction_weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"synergy": 0.35, "suppression": 0.35, "neomorphism": 0.2, "epistasis": 0.1})
    # Which doubles interact and how: "random" (per pair at random, the null: not predictable;
    # interaction_weights are each interaction's type probabilities) or "graph" (from the pair's GO and
    # single-effect similarity, see _graph_interactions; the weights fix each type's count). The same
    # seed gives the same pairs either way.
    interaction_structure: Literal["random", "graph", "graded"] = "random"
    # Share of the doubles drawn among GO-related pairs (the top decile of all pairs by GO Jaccard), the rest at
    # random: real combinatorial screens pair related genes on purpose (Norman et al. 2019 chose pairs within
    # and across pathways); drawn at random among 40 genes, ~2 of 40 pairs fall within a GO module.
    related_pair_frac: float = 0.0
    num_programs: int = 60                  # latent expression programs
    program_density: float = 0.05           # fraction of measured genes a program touches
    programs_per_term: int = 2              # programs mixed by each GO term
    go_weight: float = 0.85                 # share of a gene's effect that comes from its GO terms
    idf_power: float = 1.0                  # weight of a GO term = log(genes / term size) ** idf_power
    neighbour_weight: float = 2.0           # pull of a gene's top-20 GO (Jaccard) neighbours on its effect
    effect_scale: float = 1.0               # median log-fold change at the 99th percentile gene
    effect_scale_sd: float = 0.5            # log-normal spread of effect sizes across perturbations
    null_frac: float = 0.1                  # perturbations with (almost) no downstream effect
    target_lfc: float = 2.5                 # |log-fold| of the perturbed gene itself when measured
    max_lfc: float = 3.0                    # soft cap (tanh) on a single perturbation's downstream |log-fold|
    library_median: float = 10000.0         # UMIs per cell over the whole transcriptome (median)
    measured_share: float | None = None     # share of UMIs on the measured genes (None: sqrt(num_genes / 20000))
    library_sd: float = 0.35                # log-normal sd of library size
    gene_mean_sd: float = 1.5               # log-normal sd of baseline gene expression
    dispersion: float = 4.0                 # median NB inverse dispersion (theta); var = mu + mu^2/theta
    penetrance_sd: float = 0.25             # per-cell log-normal spread of the perturbation's strength
    escape_frac: float = 0.08               # perturbed cells where the perturbation did not take
    condition_size_sd: float = 0.3          # log-normal spread of cells per condition
    cell_types: tuple[str, ...] = ("K562",)
    block_cells: int = 2048                 # cells per generation block (part of the identity)
    seed: int = 0

    def validate(self) -> None:
        require(self.num_cells >= 1, "num_cells", f"expected >= 1, received {self.num_cells}")
        require(self.num_genes >= 2, "num_genes", f"expected >= 2, received {self.num_genes}")
        require(self.num_singles >= 0, "num_singles", f"expected >= 0, received {self.num_singles}")
        require(self.num_doubles >= 0, "num_doubles", f"expected >= 0, received {self.num_doubles}")
        max_doubles = self.num_singles * (self.num_singles - 1) // 2
        require(self.num_doubles <= max_doubles, "num_doubles",
                f"{self.num_doubles} doubles need more genes: {self.num_singles} singles give at most "
                f"{max_doubles} pairs; raise num_singles or lower num_doubles")
        require(0.0 < self.control_frac < 1.0, "control_frac", f"expected in (0, 1), received {self.control_frac}")
        num_controls = self.num_controls
        num_perts = self.num_singles + self.num_doubles
        require(num_controls >= 1, "num_cells", f"{self.num_cells} cells leave no control cell at "
                f"control_frac={self.control_frac}; raise num_cells")
        require(self.num_cells - num_controls >= num_perts, "num_cells",
                f"{self.num_cells} cells cannot hold {num_controls} controls and at least one cell for each of "
                f"{num_perts} perturbations; raise num_cells to >= {num_controls + num_perts}")
        require(self.modality in ("crispra", "crispri"), "modality",
                f"expected 'crispra' or 'crispri', received {self.modality!r}")
        for name in ("measured_perturbed_frac", "module_frac", "interaction_frac", "go_weight", "null_frac",
                     "escape_frac", "related_pair_frac"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, name, f"expected in [0, 1], received {v}")
        require(0.0 < self.program_density <= 1.0, "program_density",
                f"expected in (0, 1], received {self.program_density}")
        unknown = sorted(set(self.interaction_weights) - set(INTERACTION_TYPES))
        require(not unknown, "interaction_weights", f"unknown interaction type(s) {unknown}; expected some of "
                f"{list(INTERACTION_TYPES)}")
        require(all(w >= 0 for w in self.interaction_weights.values())
                and (self.interaction_frac == 0 or sum(self.interaction_weights.values()) > 0),
                "interaction_weights", f"expected non-negative weights with a positive sum, received "
                f"{self.interaction_weights}")
        require(self.related_pair_frac == 0 or self.num_singles <= MAX_RELATED_PAIR_SINGLES, "related_pair_frac",
                f"scores every pair of the {self.num_singles} singles; expected at most "
                f"{MAX_RELATED_PAIR_SINGLES} singles, or related_pair_frac 0")
        require(self.interaction_structure in INTERACTION_STRUCTURES, "interaction_structure",
                f"expected one of {list(INTERACTION_STRUCTURES)}, received {self.interaction_structure!r}")
        for name in ("num_programs", "programs_per_term", "block_cells"):
            require(getattr(self, name) >= 1, name, f"expected >= 1, received {getattr(self, name)}")
        for name in ("effect_scale", "library_median", "dispersion", "target_lfc", "max_lfc"):
            require(getattr(self, name) > 0, name, f"expected > 0, received {getattr(self, name)}")
        for name in ("effect_scale_sd", "library_sd", "gene_mean_sd", "penetrance_sd", "condition_size_sd"):
            require(getattr(self, name) >= 0, name, f"expected >= 0, received {getattr(self, name)}")
        require(self.measured_share is None or 0.0 < self.measured_share <= 1.0, "measured_share",
                f"expected None or a value in (0, 1], received {self.measured_share}")
        require(len(self.cell_types) >= 1 and len(set(self.cell_types)) == len(self.cell_types), "cell_types",
                f"expected one or more distinct names, received {list(self.cell_types)}")
        require(self.seed >= 0, "seed", f"expected a non-negative integer, received {self.seed}")

    @property
    def num_controls(self) -> int:
        return round(self.control_frac * self.num_cells)

    @property
    def measured_library_median(self) -> float:
        # Highly variable / expressed genes carry more than their share of UMIs: ~sqrt of the gene fraction.
        share = self.measured_share if self.measured_share is not None else min(1.0, math.sqrt(self.num_genes / 20000))
        return self.library_median * share

    @property
    def num_blocks(self) -> int:
        return -(-self.num_cells // self.block_cells)

    def replace(self, **changes) -> ScreenSpec:
        spec = dataclasses.replace(self, **changes)
        spec.validate()
        return spec

    def to_dict(self) -> dict:
        return to_dict(self)


PRESETS: dict[str, ScreenSpec] = {
    # Seconds: for tests.
    "tiny": ScreenSpec(num_cells=1500, num_genes=200, num_singles=12, num_doubles=8, block_cells=512),
    # The README demo trains on it in a few minutes on 2 cores.
    "demo": ScreenSpec(num_cells=9000, num_genes=1000, num_singles=40, num_doubles=40, interaction_structure="graded",
                       related_pair_frac=0.5),
    # Norman et al. 2019 (GEARS' version): ~91k cells, 5,045 genes, 105 singles, 131 doubles, CRISPRa.
    "norman": ScreenSpec(num_cells=91000, num_genes=5045, num_singles=105, num_doubles=131,
                         control_frac=0.077, library_median=12000.0),
    # Replogle et al. 2022 K562 essential: ~310k cells, 8,563 genes, ~2,057 singles, CRISPRi.
    "k562": ScreenSpec(num_cells=310000, num_genes=8563, num_singles=2057, num_doubles=0,
                       control_frac=0.035, modality="crispri", measured_perturbed_frac=0.9,
                       module_frac=0.3, null_frac=0.3, library_median=11000.0),
    # Replogle et al. 2022 K562 genome-wide: ~2M cells, 8,248 genes, ~9,866 singles, CRISPRi;
    # most genome-wide targets are not expressed enough to be measured.
    "genome": ScreenSpec(num_cells=2000000, num_genes=8248, num_singles=9866, num_doubles=0,
                         control_frac=0.038, modality="crispri", measured_perturbed_frac=0.45,
                         module_frac=0.1, null_frac=0.6, library_median=11000.0),
}


def preset(name: str, **overrides) -> ScreenSpec:
    """A preset spec with some fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    # Through from_dict: unknown fields and wrong types are reported by name (ConfigError).
    return from_dict(ScreenSpec, {**PRESETS[name].to_dict(), **changes})


def _rng(spec: ScreenSpec, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=spec.seed, spawn_key=key)))


# ---------------------------------------------------------------------------------------------------
# The model: genes, conditions, effects, baseline. Small (conditions x genes); built once per spec.
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScreenModel:
    spec: ScreenSpec
    genes: list[str]                    # measured genes (var), sorted symbols
    perturbed: list[str]                # perturbed genes (the singles), in selection order
    conditions: list[tuple[str, ...]]   # () first, then singles, then doubles (each sorted)
    num_cells: np.ndarray               # int64 (C,) cells per condition
    effects: np.ndarray                 # float32 (C, G) mean log-fold change vs control
    downstream: np.ndarray              # float32 (P, G) single-gene effects before the own-gene entry is set
    log_base: np.ndarray                # float32 (T, G) log relative expression per cell type
    theta: np.ndarray                   # float32 (G,) NB inverse dispersion
    truth: dict[str, list]              # per double: condition, gene_a, gene_b, interaction, c_a, c_b, ...

    @property
    def condition_names(self) -> list[str]:
        return [condition_name(c) for c in self.conditions]


def _pick_perturbed(spec: ScreenSpec, go: dict[str, frozenset[int]], rng: np.random.Generator) -> list[str]:
    """Perturbed genes: well-annotated symbols, part from a few GO-term modules, the rest at random."""
    symbols = sorted(go)
    candidates = [s for s in symbols if len(go[s]) >= 3]
    if spec.num_singles > len(candidates):
        raise ValueError(f"num_singles={spec.num_singles}: at most {len(candidates)} human genes have >= 3 GO "
                         f"annotations; lower num_singles")
    members: dict[int, list[str]] = {}
    for s in candidates:
        for t in go[s]:
            members.setdefault(t, []).append(s)
    module_terms = sorted(t for t, m in members.items() if 15 <= len(m) <= 150)
    chosen: list[str] = []
    seen: set[str] = set()
    num_module = round(spec.module_frac * spec.num_singles)
    num_modules = max(1, spec.num_singles // 10)
    if num_module and module_terms:
        terms = rng.choice(len(module_terms), size=min(num_modules, len(module_terms)), replace=False)
        pool = sorted({s for i in terms for s in members[module_terms[i]]})
        take = rng.permutation(len(pool))[:num_module]
        for i in take:
            chosen.append(pool[i])
            seen.add(pool[i])
    rest = [s for s in candidates if s not in seen]
    weight = np.sqrt(np.array([len(go[s]) for s in rest], dtype=np.float64))
    more = rng.choice(len(rest), size=spec.num_singles - len(chosen), replace=False, p=weight / weight.sum())
    chosen.extend(rest[i] for i in more)
    return chosen


def _pick_measured(spec: ScreenSpec, symbols: list[str], perturbed: list[str], rng: np.random.Generator) -> list[str]:
    if spec.num_genes > len(symbols):
        raise ValueError(f"num_genes={spec.num_genes}: only {len(symbols)} annotated human symbols exist; "
                         f"lower num_genes")
    num_measured_pert = min(round(spec.measured_perturbed_frac * len(perturbed)), spec.num_genes)
    measured = [perturbed[i] for i in np.sort(rng.permutation(len(perturbed))[:num_measured_pert])]
    pert_set = set(perturbed)
    others = [s for s in symbols if s not in pert_set]
    need = spec.num_genes - len(measured)
    if need > len(others):
        raise ValueError(f"num_genes={spec.num_genes} with {len(perturbed)} perturbed genes: not enough other "
                         f"symbols ({len(others)}); lower num_genes or raise measured_perturbed_frac")
    measured.extend(others[i] for i in rng.choice(len(others), size=need, replace=False))
    return sorted(measured)


def _go_effects(spec: ScreenSpec, go: dict[str, frozenset[int]], perturbed: list[str], num_genes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Downstream effect vectors (P x G) of the perturbed genes, built from GO-term programs.

    Returns (effects, program loadings) -- the loadings are reused for neomorphic components.
    """
    num_prog = spec.num_programs
    mask = rng.random((num_prog, num_genes)) < spec.program_density
    programs = np.where(mask, rng.standard_normal((num_prog, num_genes)), 0.0)
    # Every GO term (of the whole annotation, so a gene's effect does not depend on which other genes
    # a screen perturbs) mixes a few programs with random signs and weights.
    symbols = sorted(go)
    sizes = _term_sizes()
    term_ids = sorted(sizes)
    term_index = {t: i for i, t in enumerate(term_ids)}
    num_terms = len(term_ids)
    per_term = min(spec.programs_per_term, num_prog)
    term_mix = np.zeros((num_terms, num_prog))
    pick = np.argsort(rng.random((num_terms, num_prog)), axis=1)[:, :per_term]
    np.put_along_axis(term_mix, pick, rng.standard_normal((num_terms, per_term)), axis=1)
    # Specific terms say more about function than ubiquitous ones ("protein binding"): IDF weights.
    idf = np.log(len(go) / np.array([sizes[t] for t in term_ids], dtype=np.float64)) ** spec.idf_power
    member = _membership(go, symbols, term_index)
    latent_all = _unit_rows(np.asarray((member @ sp.diags(idf)) @ term_mix))
    # GO-graph smoothing as GEARS assumes it: a gene's latent leans towards those of its top-k
    # Jaccard neighbours (Jaccard > 0.1), so neighbours in the GO graph have related effects.
    pidx = np.searchsorted(np.array(symbols), np.array(perturbed))
    latent_go = latent_all[pidx] + spec.neighbour_weight * _neighbour_mean(member, pidx, latent_all)
    latent_own = rng.standard_normal((len(perturbed), num_prog))
    latent = (math.sqrt(spec.go_weight) * _unit_rows(latent_go)
              + math.sqrt(1.0 - spec.go_weight) * _unit_rows(latent_own))
    size = spec.effect_scale * np.exp(spec.effect_scale_sd * rng.standard_normal(len(perturbed)))
    null = rng.random(len(perturbed)) < spec.null_frac
    size[null] *= 0.05
    # Effect = direction scaled so that its 99th-percentile |log-fold| is `size`; in row blocks so that
    # genome-wide screens (10k x 8k) never hold float64 copies of the whole matrix.
    effects = np.empty((len(perturbed), num_genes), dtype=np.float32)
    for s in range(0, len(perturbed), 1024):
        direction = latent[s:s + 1024] @ programs
        scale = np.quantile(np.abs(direction), 0.99, axis=1)
        scale[scale == 0] = 1.0
        effects[s:s + 1024] = direction * (size[s:s + 1024] / scale)[:, None]
    # Sparse programs give heavy tails; real single-gene log-fold changes saturate (soft cap).
    np.multiply(spec.max_lfc, np.tanh(effects / spec.max_lfc), out=effects)
    return effects, programs


@functools.cache
def _term_sizes() -> dict[int, int]:
    return dict(collections.Counter(t for terms in go_annotations().values() for t in terms))


def _membership(go: dict[str, frozenset[int]], symbols: list[str], term_index: dict[int, int]) -> sp.csr_matrix:
    rows = np.repeat(np.arange(len(symbols)), [len(go[g]) for g in symbols])
    cols = np.fromiter((term_index[t] for g in symbols for t in sorted(go[g])), dtype=np.int64, count=len(rows))
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(symbols), len(term_index)))


def _neighbour_mean(member: sp.csr_matrix, rows: np.ndarray, latent: np.ndarray, k: int = 20,
                    min_jaccard: float = 0.1, block: int = 512) -> np.ndarray:
    """Jaccard-weighted mean latent of each row's top-k GO neighbours (Jaccard > min_jaccard)."""
    sizes = np.asarray(member.sum(axis=1)).ravel()
    member_t = member.T.tocsr()
    out = np.zeros((len(rows), latent.shape[1]))
    for s in range(0, len(rows), block):
        r = rows[s:s + block]
        inter = (member[r] @ member_t).toarray()
        jac = inter / (sizes[r][:, None] + sizes[None, :] - inter)
        jac[np.arange(len(r)), r] = 0.0
        top = np.argpartition(-jac, k, axis=1)[:, :k]
        w = np.take_along_axis(jac, top, axis=1)
        w[w <= min_jaccard] = 0.0
        norm = w.sum(axis=1, keepdims=True)
        norm[norm == 0] = 1.0
        out[s:s + block] = np.einsum("bk,bkd->bd", w / norm, latent[top])
    return out


def _unit_rows(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return a / norm


def _pair_go_jaccard(go: dict[str, frozenset[int]], genes: list[str], ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Jaccard of the GO term sets of genes[ia[k]] and genes[ib[k]], for the listed pairs only."""
    terms = sorted({t for g in genes for t in go[g]})
    member = _membership(go, genes, {t: k for k, t in enumerate(terms)})
    sizes = np.diff(member.indptr)
    inter = np.asarray(member[ia].multiply(member[ib]).sum(axis=1)).ravel()
    union = sizes[ia] + sizes[ib] - inter
    return np.divide(inter, union, out=np.zeros(len(ia)), where=union > 0)


def _pair_effect_stats(downstream: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                       block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine of the pairs' downstream effect vectors and the two norms; in row blocks, because
    genome-wide screens have large (P x G) effect matrices and only the pairs are needed."""
    cos, norm_a, norm_b = (np.zeros(len(ia)) for _ in range(3))
    for s in range(0, len(ia), block):
        a = downstream[ia[s:s + block]].astype(np.float64)
        b = downstream[ib[s:s + block]].astype(np.float64)
        norm_a[s:s + block] = np.linalg.norm(a, axis=1)
        norm_b[s:s + block] = np.linalg.norm(b, axis=1)
        denom = norm_a[s:s + block] * norm_b[s:s + block]
        dot = np.einsum("ij,ij->i", a, b)
        cos[s:s + block] = np.divide(dot, denom, out=np.zeros(len(dot)), where=denom > 0)
    return cos, norm_a, norm_b


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[:total - int(counts.sum())]] += 1
    return counts


# Noise on the graph rule's scores (in the features' own units): enough to break ties and blur the
# thresholds, small next to the gap between related and unrelated pairs, so the type stays learnable.
_GRAPH_NOISE_JACCARD = 0.02
_GRAPH_NOISE_COSINE = 0.05


def _graph_interactions(spec: ScreenSpec, num_inter: int, jaccard: np.ndarray, cosine: np.ndarray,
                        rng: np.random.Generator) -> np.ndarray:
    """Interaction type of each double from its pair's features (interaction_structure='graph').

    The rule follows the pairs of Norman et al. 2019: genes with shared specific GO terms (one
    module) buffer each other, genes of different modules that drive the same programs synergize,
    the rest are mostly additive. `interaction_weights` fix how many of the `num_inter` interactions
    are of each type (largest-remainder rounding); the rule decides which pairs get them:

    - suppression + epistasis: the pairs of highest GO Jaccard. Of those, the ones whose effects agree
      most (redundant genes: the double saturates) suppress; the rest are epistatic (the genes act
      differently, the stronger one masks the other; see _doubles);
    - synergy: of the remaining pairs, the highest effect cosine minus 2 x GO Jaccard (convergence on a
      program through different GO neighbourhoods, not redundancy);
    - neomorphism: at random among the rest (new programs are not predictable from the singles).
    """
    num = len(jaccard)
    kinds = np.full(num, "additive", dtype=object)
    # Drawn whatever the weights, so changing one weight does not reshuffle the others' noise.
    buffer_score = jaccard + _GRAPH_NOISE_JACCARD * rng.standard_normal(num)
    agree_score = cosine + _GRAPH_NOISE_COSINE * rng.standard_normal(num)
    synergy_score = cosine - 2.0 * jaccard + _GRAPH_NOISE_COSINE * rng.standard_normal(num)
    if not num_inter:
        return kinds
    names = [t for t in INTERACTION_TYPES if spec.interaction_weights.get(t, 0) > 0]
    quota = dict(zip(names, _largest_remainder(np.array([spec.interaction_weights[t] for t in names]), num_inter)))
    free = np.ones(num, dtype=bool)

    def take(score: np.ndarray, count: int) -> np.ndarray:
        top = np.argsort(-np.where(free, score, -np.inf), kind="stable")[:count]
        free[top] = False
        return top

    buffered = take(buffer_score, quota.get("suppression", 0) + quota.get("epistasis", 0))
    by_agreement = buffered[np.argsort(-agree_score[buffered], kind="stable")]
    kinds[by_agreement[:quota.get("suppression", 0)]] = "suppression"
    kinds[by_agreement[quota.get("suppression", 0):]] = "epistasis"
    kinds[take(synergy_score, quota.get("synergy", 0))] = "synergy"
    if quota.get("neomorphism", 0):
        kinds[rng.choice(np.flatnonzero(free), size=quota["neomorphism"], replace=False)] = "neomorphism"
    return kinds


# Graded rule (interaction_structure='graded'): buffering grows from no GO overlap (Jaccard 0.05) to a lot (0.2),
# down to a gain of 0.2; synergy grows with the effects' cosine from 0.15 to 0.35 (the demo's unrelated pairs:
# 95th percentile 0.25), up to a gain of 2.5, for pairs with little GO overlap only.
_GRADED_JACCARD = (0.05, 0.2)
_GRADED_COSINE = (0.15, 0.35)


def _graded_gains(jaccard: np.ndarray, cosine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each pair's gain c (both genes' effects scaled by c) from its GO Jaccard and effect cosine."""
    jac = jaccard + _GRAPH_NOISE_JACCARD * rng.standard_normal(len(jaccard))
    cos = cosine + _GRAPH_NOISE_COSINE * rng.standard_normal(len(cosine))
    lo, hi = _GRADED_JACCARD
    buffering = np.clip((jac - lo) / (hi - lo), 0.0, 1.0)
    lo_c, hi_c = _GRADED_COSINE
    synergy = np.clip((cos - lo_c) / (hi_c - lo_c), 0.0, 1.0) * (buffering == 0)
    return 1.0 - 0.8 * buffering + 1.5 * synergy


# related_pair_frac scores every pair of the singles (n^2 / 2 Jaccards): combinatorial screens have ~100 genes.
MAX_RELATED_PAIR_SINGLES = 2000


def _doubles(spec: ScreenSpec, go: dict[str, frozenset[int]], perturbed: list[str], downstream: np.ndarray,
             programs: np.ndarray, own_cols: np.ndarray,
             rng: np.random.Generator) -> tuple[list[tuple[int, int]], np.ndarray, dict[str, list]]:
    """Pairs of perturbed genes, their downstream effects and the ground-truth table."""
    num_p = len(perturbed)
    num_pairs = num_p * (num_p - 1) // 2
    num_related = round(spec.related_pair_frac * spec.num_doubles)
    if num_related:
        # Pair k of the lexicographic order is (row[k], col[k]); the related pairs: the top decile by GO Jaccard.
        row, col = np.triu_indices(num_p, 1)
        jaccard = _pair_go_jaccard(go, perturbed, row, col)
        related = np.flatnonzero(jaccard >= np.quantile(jaccard, 0.9))
        chosen = rng.choice(related, size=min(num_related, len(related)), replace=False)
        others = np.setdiff1d(np.arange(num_pairs), chosen)
        flat = np.sort(np.concatenate([chosen, rng.choice(others, size=spec.num_doubles - len(chosen),
                                                          replace=False)]))
    else:
        flat = np.sort(rng.choice(num_pairs, size=spec.num_doubles, replace=False)) if spec.num_doubles else []
    # Unrank pair index k -> (i, j), i < j, in lexicographic order.
    pairs = []
    for k in flat:
        i = int((2 * num_p - 1 - math.sqrt((2 * num_p - 1) ** 2 - 8 * k)) // 2)
        while (i + 1) * (2 * num_p - i - 2) // 2 <= k:
            i += 1
        while i * (2 * num_p - i - 1) // 2 > k:
            i -= 1
        j = int(k - i * (2 * num_p - i - 1) // 2 + i + 1)
        pairs.append((i, j))
    num_inter = round(spec.interaction_frac * spec.num_doubles)
    kinds = np.array(["additive"] * spec.num_doubles, dtype=object)
    stronger_a = graded = None
    if spec.interaction_structure in ("graph", "graded"):
        first = np.array([i for i, _ in pairs], dtype=np.int64)
        second = np.array([j for _, j in pairs], dtype=np.int64)
        cosine, norm_i, norm_j = _pair_effect_stats(downstream, first, second)
    if spec.interaction_structure == "graded":
        graded = _graded_gains(_pair_go_jaccard(go, perturbed, first, second), cosine, rng)
        kinds = np.where(graded < 0.8, "suppression", np.where(graded > 1.2, "synergy", "additive")).astype(object)
    elif spec.interaction_structure == "graph":
        kinds = _graph_interactions(spec, num_inter, _pair_go_jaccard(go, perturbed, first, second), cosine, rng)
        # An epistatic pair follows its stronger single (predictable from the singles, unlike a coin
        # flip); the truth names a pair's genes in symbol order, so orient the comparison that way.
        i_first = np.array([perturbed[i] < perturbed[j] for i, j in pairs], dtype=bool)
        stronger_a = np.where(i_first, norm_i >= norm_j, norm_j > norm_i)
    elif num_inter:
        names = [t for t in INTERACTION_TYPES if spec.interaction_weights.get(t, 0) > 0]
        w = np.array([spec.interaction_weights[t] for t in names], dtype=np.float64)
        which = rng.choice(spec.num_doubles, size=num_inter, replace=False)
        kinds[which] = np.array(names, dtype=object)[rng.choice(len(names), size=num_inter, p=w / w.sum())]
    effects = np.zeros((spec.num_doubles, downstream.shape[1]))
    truth: dict[str, list] = {k: [] for k in ("condition", "gene_a", "gene_b", "interaction", "magnitude",
                                              "c_a", "c_b", "neomorphic_ratio")}
    for d, ((i, j), kind) in enumerate(zip(pairs, kinds)):
        a, b = sorted((perturbed[i], perturbed[j]))
        ia, ib = (i, j) if perturbed[i] == a else (j, i)
        c_a = c_b = 1.0
        neo_ratio = 0.0
        draw = rng.random(3)
        if graded is not None:
            c_a = c_b = float(graded[d])
        elif kind == "synergy":
            c_a = c_b = 1.5 + draw[0]
        elif kind == "suppression":
            c_a = c_b = 0.2 + 0.4 * draw[0]
        elif kind == "epistasis":
            weak = 0.2 * draw[0]
            a_dominates = draw[1] < 0.5 if stronger_a is None else stronger_a[d]
            c_a, c_b = (1.0, weak) if a_dominates else (weak, 1.0)
        delta = c_a * downstream[ia] + c_b * downstream[ib]
        if kind == "neomorphism":
            neo_ratio = 0.6 + 0.6 * draw[0]
            # The targets' own columns are set by the perturbation itself: keep them out of the new part.
            mask = np.ones(downstream.shape[1])
            mask[own_cols[[ia, ib]][own_cols[[ia, ib]] >= 0]] = 0.0
            new = (rng.standard_normal(programs.shape[0]) @ programs) * mask
            ref = np.linalg.norm((downstream[ia] + downstream[ib]) * mask) or 1.0
            delta = delta + new / (np.linalg.norm(new) or 1.0) * ref * neo_ratio
        effects[d] = delta
        truth["condition"].append(f"{a}+{b}")
        truth["gene_a"].append(a)
        truth["gene_b"].append(b)
        truth["interaction"].append(str(kind))
        truth["magnitude"].append(float(math.sqrt((c_a * c_a + c_b * c_b) / 2.0)))
        truth["c_a"].append(float(c_a))
        truth["c_b"].append(float(c_b))
        truth["neomorphic_ratio"].append(float(neo_ratio))
    return pairs, effects, truth


def _cells_per_condition(spec: ScreenSpec, num_perts: int, rng: np.random.Generator) -> np.ndarray:
    """Controls first; the rest split over perturbations with log-normal spread, at least one each."""
    num_controls = spec.num_controls
    rest = spec.num_cells - num_controls
    counts = np.ones(num_perts, dtype=np.int64)
    if num_perts:
        w = np.exp(spec.condition_size_sd * rng.standard_normal(num_perts))
        share = w / w.sum() * (rest - num_perts)
        extra = np.floor(share).astype(np.int64)
        left = int(rest - num_perts - extra.sum())
        extra[np.argsort(-(share - extra), kind="stable")[:left]] += 1
        counts += extra
    return np.concatenate([[num_controls], counts]).astype(np.int64)


def screen_model(spec: ScreenSpec) -> ScreenModel:
    """Build the (cell-independent) model of a screen: genes, conditions, true effects, baseline."""
    spec.validate()
    go = go_annotations()
    symbols = sorted(go)
    rng = _rng(spec, _TAG_GENES)
    perturbed = _pick_perturbed(spec, go, rng)
    genes = _pick_measured(spec, symbols, perturbed, rng)
    num_genes = len(genes)

    rng = _rng(spec, _TAG_EFFECTS)
    downstream, programs = _go_effects(spec, go, perturbed, num_genes, rng)
    gene_index = {g: i for i, g in enumerate(genes)}
    own_cols = np.array([gene_index.get(g, -1) for g in perturbed], dtype=np.int64)
    pairs, double_effects, truth = _doubles(spec, go, perturbed, downstream, programs, own_cols, rng)

    # The perturbed gene's own expression: up for CRISPRa, down (knock-down) for CRISPRi.
    sign = 1.0 if spec.modality == "crispra" else -1.0
    own = sign * spec.target_lfc * np.exp(0.2 * rng.standard_normal(len(perturbed)))
    singles = downstream.copy()
    for p, g in enumerate(perturbed):
        if g in gene_index:
            singles[p, gene_index[g]] = own[p]
    for d, (i, j) in enumerate(pairs):
        for p in (i, j):
            if perturbed[p] in gene_index:
                double_effects[d, gene_index[perturbed[p]]] = own[p]
    effects = np.zeros((len(perturbed) + len(pairs) + 1, num_genes), dtype=np.float32)
    effects[1:len(perturbed) + 1] = singles
    effects[len(perturbed) + 1:] = double_effects
    conditions = [()] + [(g,) for g in perturbed] + [tuple(sorted((perturbed[i], perturbed[j]))) for i, j in pairs]

    rng = _rng(spec, _TAG_BASELINE)
    log_rel = spec.gene_mean_sd * rng.standard_normal(num_genes)
    log_rel -= np.log(np.exp(log_rel).sum())
    offsets = np.zeros((len(spec.cell_types), num_genes))
    if len(spec.cell_types) > 1:
        offsets = 0.4 * rng.standard_normal((len(spec.cell_types), num_genes))
    log_base = log_rel[None, :] + offsets
    log_base -= np.log(np.exp(log_base).sum(axis=1, keepdims=True))
    theta = spec.dispersion * np.exp(0.4 * rng.standard_normal(num_genes))
    counts = _cells_per_condition(spec, len(conditions) - 1, rng)
    return ScreenModel(spec=spec, genes=genes, perturbed=perturbed, conditions=conditions, num_cells=counts,
                       effects=effects, downstream=downstream,
                       log_base=log_base.astype(np.float32), theta=theta.astype(np.float32), truth=truth)


# ---------------------------------------------------------------------------------------------------
# Cells: layout (which condition each row holds) and block sampling.
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CellLayout:
    codes: np.ndarray        # int32 (N,) condition index (into model.conditions) of each row
    cell_type: np.ndarray    # int32 (N,) index into spec.cell_types
    cell_index: np.ndarray   # int64 (N,) cell number (names are cell{number})


def cell_layout(model: ScreenModel, grouped: bool, condition_order: np.ndarray | None = None) -> CellLayout:
    """Rows of the output: shuffled like a real file (h5ad), or grouped by condition (store), the
    conditions then in `condition_order` (indices into model.conditions; default: as in the model).
    Codes always index model.conditions."""
    spec = model.spec
    rng = _rng(spec, _TAG_LAYOUT)
    codes = np.repeat(np.arange(len(model.conditions), dtype=np.int32), model.num_cells)
    cell_type = rng.integers(0, len(spec.cell_types), size=spec.num_cells, dtype=np.int32)
    order = rng.permutation(spec.num_cells)
    shuffled = codes[order]
    if not grouped:
        return CellLayout(codes=shuffled, cell_type=cell_type, cell_index=np.arange(spec.num_cells, dtype=np.int64))
    # Grouped; a cell keeps its number (its row in the h5ad layout) and its cell type.
    perm = np.arange(len(model.conditions)) if condition_order is None else np.asarray(condition_order)
    rank = np.empty(len(perm), dtype=np.int64)
    rank[perm] = np.arange(len(perm))
    rows = np.argsort(rank[shuffled], kind="stable")
    return CellLayout(codes=shuffled[rows], cell_type=cell_type[rows], cell_index=rows.astype(np.int64))


def sample_block(model: ScreenModel, layout: CellLayout, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw counts of the rows of one block as CSR parts (indptr int64, indices int32, data float32)."""
    spec = model.spec
    start = block * spec.block_cells
    stop = min(start + spec.block_cells, spec.num_cells)
    codes = layout.codes[start:stop]
    n, g = stop - start, len(model.genes)
    rng = _rng(spec, _TAG_BLOCK, block)
    log_lib = (math.log(spec.measured_library_median) + spec.library_sd * rng.standard_normal(n)).astype(np.float32)
    strength = np.exp(spec.penetrance_sd * rng.standard_normal(n)).astype(np.float32)
    strength[rng.random(n) < spec.escape_frac] = 0.0
    log_mu = model.effects[codes]
    log_mu *= strength[:, None]
    if len(model.log_base) == 1:
        log_mu += model.log_base[0]
    else:
        log_mu += model.log_base[layout.cell_type[start:stop]]
    log_mu += log_lib[:, None]
    # Numeric guard only (a synergy on two saturated genes): no entry above 1e5 expected UMIs.
    np.minimum(log_mu, np.float32(math.log(1e5)), out=log_mu)
    mu = np.exp(log_mu, out=log_mu)
    nz, counts = nb_sparse(mu, model.theta, rng)
    indices = (nz % g).astype(np.int32)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(nz // g, minlength=n), out=indptr[1:])
    return indptr, indices, counts.astype(np.float32)


def nb_sparse(mu: np.ndarray, theta: np.ndarray, rng: np.random.Generator, large: float = 12.0,
              dense_terms: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Exact negative-binomial draws (mean `mu` (n, g) float32, inverse dispersion `theta` (g,),
    variance mu + mu^2 / theta), returned sparse over the flattened matrix: (positions, counts > 0).

    Most entries of a single-cell matrix have means well below 1, where a gamma draw plus numpy's
    per-draw Poisson sampler is slow. Here one uniform per entry is inverted through the NB CDF,
    vectorized: a zero test on every entry, `dense_terms` CDF terms on the non-zero candidates, and
    the rare long tails compacted; means >= `large` use the gamma-Poisson mixture. Tail mass below
    1e-9 past the mode is cut (far below float32 resolution).
    """
    g = mu.shape[1]
    u = rng.random(mu.size, dtype=np.float32)
    q = mu / (mu + theta)                                   # NB "success" ratio of the pmf recursion
    p = np.exp(-theta * np.log1p(mu / theta)).ravel()       # P(X = 0) = (theta / (theta + mu))^theta
    cand = np.flatnonzero(u > p)
    th = theta[cand % g]
    m, qc, uc, pc = mu.ravel()[cand], q.ravel()[cand], u[cand], p[cand]
    is_large = m >= large
    x = np.ones(cand.size, dtype=np.int32)
    cdf = pc.copy()
    for k in range(1, dense_terms + 1):
        pc *= (th + np.float32(k - 1)) / np.float32(k) * qc
        cdf += pc
        x += uc > cdf
    left = np.flatnonzero((uc > cdf) & ~is_large)
    pl, cl, ul, ql, tl, ml = pc[left], cdf[left], uc[left], qc[left], th[left], m[left]
    k = dense_terms
    while left.size:
        k += 1
        pl *= (tl + np.float32(k - 1)) / np.float32(k) * ql
        cl += pl
        done = (ul <= cl) | ((pl < 1e-9) & (k > ml))        # past the mode with negligible mass left
        more = ~done
        x[left[more]] += 1
        left, pl, cl, ul, ql, tl, ml = left[more], pl[more], cl[more], ul[more], ql[more], tl[more], ml[more]
    big = np.flatnonzero(is_large)
    if big.size:
        shape = th[big].astype(np.float64)
        x[big] = rng.poisson(m[big] * rng.standard_gamma(shape) / shape)
    keep = x > 0
    return cand[keep], x[keep]


_WORKER_STATE: dict[str, Any] = {}


def _init_worker(model: ScreenModel, layout: CellLayout) -> None:
    _WORKER_STATE["model"], _WORKER_STATE["layout"] = model, layout


def _sample_in_worker(block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return sample_block(_WORKER_STATE["model"], _WORKER_STATE["layout"], block)


def iter_blocks(model: ScreenModel, layout: CellLayout, num_workers: int = 1
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks in order. With num_workers > 1, blocks are sampled in worker processes (same result:
    every block has its own random stream); at most 2 * num_workers blocks are in flight."""
    num_blocks = model.spec.num_blocks
    if num_workers <= 1 or num_blocks <= 1:
        for b in range(num_blocks):
            yield sample_block(model, layout, b)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(model, layout)) as pool:
        pending: list[concurrent.futures.Future] = []
        nxt = 0
        for b in range(num_blocks):
            while nxt < num_blocks and len(pending) < 2 * num_workers:
                pending.append(pool.submit(_sample_in_worker, nxt))
                nxt += 1
            yield pending.pop(0).result()


# ---------------------------------------------------------------------------------------------------
# obs / var / truth in each style
# ---------------------------------------------------------------------------------------------------
def style_condition_names(model: ScreenModel, style: str) -> list[str]:
    if style == "gears":
        return ["ctrl" if not c else (f"{c[0]}+ctrl" if len(c) == 1 else "+".join(c)) for c in model.conditions]
    if style == "scperturb":
        return ["control" if not c else "_".join(c) for c in model.conditions]
    raise ValueError(f"style {style!r}: expected one of {list(STYLES)}")


def _cell_names(index: np.ndarray, num_cells: int) -> np.ndarray:
    width = len(str(max(num_cells - 1, 0)))
    return np.char.add("cell", np.char.zfill(index.astype(str), width)).astype(object)


def _obs_frame(model: ScreenModel, layout: CellLayout, style: str):
    import pandas as pd

    names = style_condition_names(model, style)
    cond = pd.Categorical.from_codes(layout.codes, categories=names)
    ctype = pd.Categorical.from_codes(layout.cell_type, categories=list(model.spec.cell_types))
    index = pd.Index(_cell_names(layout.cell_index, model.spec.num_cells), name=None)
    if style == "gears":
        data = {"condition": cond, "cell_type": ctype,
                "control": (layout.codes == 0).astype(np.int8)}
    else:
        data = {"perturbation": cond, "cell_type": ctype}
    return pd.DataFrame(data, index=index)


def _var_frame(model: ScreenModel, style: str):
    import pandas as pd

    index = pd.Index(model.genes, name=None)
    if style == "gears":
        return pd.DataFrame({"gene_name": model.genes}, index=index)
    return pd.DataFrame(index=index)


def truth_table(model: ScreenModel, style: str = "gears") -> dict[str, list]:
    """Ground truth per double: canonical condition ('A+B'), its name in the file's style, genes,
    interaction type, magnitude, c_a, c_b, neomorphic_ratio (plain lists)."""
    file_names = dict(zip(model.condition_names, style_condition_names(model, style)))
    table = {k: list(v) for k, v in model.truth.items()}
    table["condition_in_file"] = [file_names[c] for c in table["condition"]]
    return table


def _truth_uns(table: dict[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in table.items():
        if k in ("magnitude", "c_a", "c_b", "neomorphic_ratio"):
            out[k] = np.asarray(v, dtype=np.float64)
        else:
            out[k] = np.asarray(v, dtype=object) if v else np.zeros(0, dtype=object)
    return out


def _truth_json(model: ScreenModel, table: dict[str, list]) -> str:
    doc = {"format": "gears_dist.synthetic_truth", "spec": model.spec.to_dict(),
           "interaction_types": ["additive", *INTERACTION_TYPES],
           "model": "downstream log-fold(A+B) = c_a*LFC(A) + c_b*LFC(B) + new, |new| = neomorphic_ratio*|LFC(A)+LFC(B)|;"
                    " magnitude = sqrt((c_a^2 + c_b^2) / 2)",
           "doubles": [dict(zip(table, row)) for row in zip(*table.values())]}
    return json.dumps(doc, indent=1)


def _uns(model: ScreenModel, style: str) -> dict:
    spec_json = json.dumps(model.spec.to_dict(), sort_keys=True)
    return {TRUTH_KEY: _truth_uns(truth_table(model, style)),
            "gears_dist_synthetic": {"spec": spec_json, "style": style, "modality": model.spec.modality}}


# ---------------------------------------------------------------------------------------------------
# Public writers
# ---------------------------------------------------------------------------------------------------
def simulate_screen(spec: ScreenSpec, style: str = "gears", num_workers: int = 1):
    """The whole screen in memory as an AnnData of raw counts (CSR float32). For small sizes."""
    import anndata

    model = screen_model(spec)
    style_condition_names(model, style)
    layout = cell_layout(model, grouped=False)
    indptrs, indices, data = [np.zeros(1, dtype=np.int64)], [], []
    offset = 0
    for ip, ix, dt in iter_blocks(model, layout, num_workers):
        indptrs.append(ip[1:] + offset)
        offset += int(ip[-1])
        indices.append(ix)
        data.append(dt)
    x = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptrs)),
                      shape=(spec.num_cells, len(model.genes)))
    return anndata.AnnData(X=x, obs=_obs_frame(model, layout, style), var=_var_frame(model, style),
                           uns=_uns(model, style))


def truth_path(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    return path.with_name(path.name + ".truth.json")


def _check_dest(path: pathlib.Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ValueError(f"output {str(path)!r} already exists; pass --overwrite (overwrite=True) to replace it "
                         f"or choose another path")


def write_h5ad(spec: ScreenSpec, path: str | os.PathLike, style: str = "gears", overwrite: bool = False,
               num_workers: int = 1, compression: str | None = None) -> dict:
    """Stream the screen into an h5ad (raw counts, CSR) block by block; returns a small report.

    Written to a temporary file beside `path` and renamed on success, so an interrupted run leaves
    nothing that looks complete. Also writes the truth sidecar ``<path>.truth.json``.
    """
    import h5py
    from anndata.io import write_elem

    path = pathlib.Path(path)
    _check_dest(path, overwrite)
    model = screen_model(spec)
    style_condition_names(model, style)
    layout = cell_layout(model, grouped=False)
    num_genes = len(model.genes)
    tmp = path.with_name(f".{path.name}.writing-{os.getpid()}")
    t0 = time.perf_counter()
    nnz = 0
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            write_elem(f, "obs", _obs_frame(model, layout, style))
            write_elem(f, "var", _var_frame(model, style))
            write_elem(f, "uns", _uns(model, style))
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(f, key, {})
            x = f.create_group("X")
            x.attrs["encoding-type"] = "csr_matrix"
            x.attrs["encoding-version"] = "0.1.0"
            x.attrs["shape"] = np.array([spec.num_cells, num_genes], dtype=np.int64)
            # byte shuffle before the codec: counts' and sorted indices' high bytes compress to nearly nothing
            kw = {"compression": compression, "shuffle": True} if compression else {}
            chunk = 1 << 18
            data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(chunk,), **kw)
            indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(chunk,),
                                       **kw)
            indptr = x.create_dataset("indptr", shape=(spec.num_cells + 1,), dtype=np.int64)
            indptr[0] = 0
            row = 0
            for ip, ix, dt in iter_blocks(model, layout, num_workers):
                n, k = len(ip) - 1, len(ix)
                data.resize((nnz + k,))
                indices.resize((nnz + k,))
                data[nnz:] = dt
                indices[nnz:] = ix
                indptr[row + 1:row + n + 1] = ip[1:] + nnz
                nnz += k
                row += n
        tpath = truth_path(path)
        ttmp = tpath.with_name(f".{tpath.name}.writing-{os.getpid()}")
        ttmp.write_text(_truth_json(model, truth_table(model, style)))
        os.replace(tmp, path)
        os.replace(ttmp, tpath)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    return {"path": str(path), "truth": str(truth_path(path)), "num_cells": spec.num_cells, "num_genes": num_genes,
            "num_conditions": len(model.conditions), "nnz": nnz, "seconds": seconds,
            "cells_per_s": spec.num_cells / seconds if seconds else float("inf"), "bytes": path.stat().st_size}


STORE_TRUTH = "truth.json"


def write_store(spec: ScreenSpec, path: str | os.PathLike, overwrite: bool = False, num_workers: int = 1,
                chunk_cells: int | None = None, order: str = "condition", memory_budget_mb: int = 1024) -> dict:
    """Write the screen directly as a gears_dist store (for sizes where an h5ad is a waste).

    The same layout, codec, chunking and condition order as ``gears-dist ingest`` of raw counts
    (cells grouped by condition in the registered `order`, X = log1p(counts / total * 1e4)),
    statistics from ``gears_dist.data.stats.write_stats``, ground truth in ``STORE/truth.json``.
    Built in a temporary directory and renamed into place (``building_store``); manifest last.
    """
    import zarr

    from gears_dist.data import ingest, stats
    from gears_dist.data import store as writer

    dest = pathlib.Path(path)
    if dest.exists() and not overwrite:
        raise ValueError(f"output {str(dest)!r} already exists; pass --overwrite (overwrite=True) to replace it "
                         f"or choose another path")
    t0 = time.perf_counter()
    model = screen_model(spec)
    perm = ingest.condition_permutation(order, model.conditions, model.num_cells)
    layout = cell_layout(model, grouped=True, condition_order=perm)
    num_genes = len(model.genes)
    chunk = min(chunk_cells or ingest.default_chunk_cells(num_genes), spec.num_cells)
    with writer.building_store(dest, overwrite=overwrite) as tmp:
        root = zarr.open_group(tmp, mode="w")
        x = writer.create_x(root, spec.num_cells, num_genes, chunk)
        writer.create_obs(root, spec.num_cells, chunk)
        _write_store_tables(root, model, layout, perm, order)
        pending: list[np.ndarray] = []
        buffered = written = 0
        for ip, ix, dt in iter_blocks(model, layout, num_workers):
            pending.append(_log1p_normalized(ip, ix, dt, num_genes))
            buffered += len(ip) - 1
            # Write whole chunks only (no read-modify-write of partially written chunks).
            full = buffered if written + buffered == spec.num_cells else buffered // chunk * chunk
            if full:
                buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
                x[written:written + full] = buf[:full]
                written += full
                pending = [buf[full:]] if full < len(buf) else []
                buffered -= full
        assert written == spec.num_cells
        seconds_x = time.perf_counter() - t0
        stats.write_stats(root, memory_budget_mb=memory_budget_mb)
        seconds_stats = time.perf_counter() - t0 - seconds_x
        writer.atomic_write_text(tmp / STORE_TRUTH, _truth_json(model, truth_table(model, "gears")))
        seconds = time.perf_counter() - t0
        writer.write_manifest(tmp, {
            "source": {"kind": "synthetic", "generator": "gears_dist.data.synthetic", "spec": spec.to_dict()},
            "parameters": {"chunk_cells": chunk, "order": order, "normalize": "counts",
                           "memory_budget_mb": memory_budget_mb},
            "counts": {"num_cells": spec.num_cells, "num_genes": num_genes, "num_conditions": len(perm),
                       "num_control_cells": int(model.num_cells[0]), "num_source_genes": num_genes,
                       "num_perturbed_genes": len(model.perturbed), "num_cell_types": len(spec.cell_types),
                       "num_batches": 1},
            "normalization": {"choice": "counts_normalize_log1p", "target_sum": TARGET_SUM,
                              "reason": "synthetic raw counts"},
            "renamed_genes": {}, "renamed_perturbation_genes": {}, "dropped_perturbations": [],
            "unmeasured_perturbed_genes": sorted(set(model.perturbed) - set(model.genes)),
            "perturbed_genes_without_go": [],
            "x": writer.x_manifest(root),
            "truth": STORE_TRUTH,
            "simulate": {"seconds": round(seconds, 3), "seconds_x": round(seconds_x, 3),
                         "seconds_stats": round(seconds_stats, 3)},
        })
    seconds = time.perf_counter() - t0
    return {"path": str(dest), "num_cells": spec.num_cells, "num_genes": num_genes, "num_conditions": len(perm),
            "seconds": seconds, "seconds_x": seconds_x, "seconds_stats": seconds_stats,
            "cells_per_s": spec.num_cells / seconds if seconds else float("inf")}


def _log1p_normalized(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, num_genes: int) -> np.ndarray:
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n), np.diff(indptr))
    totals = np.bincount(rows, weights=data, minlength=n)
    totals[totals == 0] = 1.0
    out = np.zeros((n, num_genes), dtype=np.float32)
    out[rows, indices] = np.log1p(data * (TARGET_SUM / totals)[rows].astype(np.float32))
    return out


def _write_store_tables(root, model: ScreenModel, layout: CellLayout, perm: np.ndarray, order: str) -> None:
    """obs/ (created by `create_obs`), conditions/, genes/ and the root attrs, through the store's layout writer."""
    from gears_dist.data import store as writer

    spec = model.spec
    rank = np.empty(len(perm), dtype=np.int32)
    rank[perm] = np.arange(len(perm), dtype=np.int32)
    codes = rank[layout.codes]
    writer.write_root_attrs(root, cell_types=spec.cell_types, batches=["none"], condition_order=order,
                            normalization="counts_normalize_log1p")
    writer.write_obs(root, 0, condition=codes, is_control=codes == rank[0], cell_type=layout.cell_type,
                     batch=np.zeros(spec.num_cells, dtype=np.int32), source_row=layout.cell_index,
                     cell_id=_cell_names(layout.cell_index, spec.num_cells))
    # Majority cell type of each condition and how many types it has.
    num_types = len(spec.cell_types)
    pair = np.bincount(codes.astype(np.int64) * num_types + layout.cell_type, minlength=len(perm) * num_types)
    pair = pair.reshape(len(perm), num_types)
    writer.write_conditions_table(root, [model.conditions[i] for i in perm], model.num_cells[perm],
                                  pair.argmax(axis=1), (pair > 0).sum(axis=1))
    genes = model.genes
    writer.write_genes_table(root, genes, source_names=genes, source_index=np.arange(len(genes)),
                             perturbed=model.perturbed, has_go=np.ones(len(genes), dtype=bool),
                             highly_variable=np.zeros(len(genes), dtype=bool))


# ---------------------------------------------------------------------------------------------------
# a screen written to disk (`gears-dist simulate`)
# ---------------------------------------------------------------------------------------------------
def write_screen(out: str | os.PathLike, preset_name: str = "demo", *, num_cells: int | None = None,
                 num_genes: int | None = None, num_singles: int | None = None, num_doubles: int | None = None,
                 seed: int = 0, style: str = "gears", format: str = "h5ad", num_workers: int | None = None,
                 overwrite: bool = False) -> dict:
    """Generate a preset screen (sizes overridden where given) and write it to `out`, block by block.

    ``format="h5ad"``: raw counts in an .h5ad (`write_h5ad`, condition names in `style`); ``"store"``: a
    gears_dist store directly (`write_store`). `num_workers` (default: min(2, CPUs)) does not change the
    output. Returns the writer's report (path, num_cells, num_genes, num_conditions, seconds, cells_per_s).
    Raises ValueError: an unknown preset, format or style, a bad size (`ConfigError`, naming the field), or
    `out` exists and not `overwrite`.
    """
    if format not in ("h5ad", "store"):
        raise ValueError(f"format: expected 'h5ad' or 'store', received {format!r}")
    if style not in STYLES:
        raise ValueError(f"style: expected one of {list(STYLES)}, received {style!r}")
    spec = preset(preset_name, num_cells=num_cells, num_genes=num_genes, num_singles=num_singles,
                  num_doubles=num_doubles, seed=seed)
    workers = num_workers or min(2, os.cpu_count() or 1)
    out = pathlib.Path(out)
    if format == "store":
        return write_store(spec, out, overwrite=overwrite, num_workers=workers)
    return write_h5ad(spec, out, style=style, overwrite=overwrite, num_workers=workers)
