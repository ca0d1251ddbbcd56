"""Condition-level train/val/test splits, deterministic by seed, stored in the store.

Kinds (GEARS' semantics):

- ``simulation``: a fraction ``train_gene_frac`` of the perturbed genes is "seen". Train on the
  singles of seen genes and a fraction ``combo_seen2_train_frac`` of the combinations whose genes
  are all seen; test on the rest: ``unseen_single``, ``combo_seen0``, ``combo_seen1``,
  ``combo_seen2``. Validation is carved from train by the same procedure (0.9 / 0.9).
- ``single``: test on the singles of held-out genes; combinations touching a held-out gene are
  excluded, the others train.
- ``combo_seen0|1|2``: test on the combinations with exactly that many seen genes (for
  combo_seen2 a held-out fraction of them); train on seen singles and seen combinations not in
  test; singles of unseen genes are excluded.
- ``no_test``: everything trains, a random 10% of the perturbed conditions validates.
- ``custom``: a JSON file ``{"train": [...], "val": [...], "test": [...]}`` of condition names.

The control condition always trains. Every condition is in exactly one of train / val / test /
excluded. Test and val conditions carry a category: ``seen_single`` / ``unseen_single`` for singles,
``combo_seen{n}`` for combinations with n of their genes perturbed somewhere in train.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from gears_dist.data.conditions import condition_name, parse_condition
from gears_dist.data.store import Store, open_store

SPLIT_KINDS = ("simulation", "single", "combo_seen0", "combo_seen1", "combo_seen2", "no_test", "custom")
SET_NAMES = ("train", "val", "test", "excluded")
SET_CODES = {"train": 0, "val": 1, "test": 2, "excluded": -1}


@dataclasses.dataclass
class Split:
    kind: str
    seed: int
    train: list[str]
    val: list[str]
    test: list[str]
    excluded: list[str]
    categories: dict[str, list[str]]  # test (and val) conditions by category, e.g. "test/combo_seen1"
    params: dict
    # the key it is saved under in a store (set by load_split; None for a split not read from a store)
    key: str | None = dataclasses.field(default=None, compare=False)

    def sets(self) -> dict[str, list[str]]:
        return {s: getattr(self, s) for s in SET_NAMES}

    def test_categories(self) -> dict[str, list[str]]:
        return {k.split("/", 1)[1]: v for k, v in self.categories.items() if k.startswith("test/")}

    def codes(self, condition_names: Sequence[str]) -> np.ndarray:
        """int8 per condition: 0 train, 1 val, 2 test, -1 excluded."""
        where = {n: SET_CODES[s] for s, names in self.sets().items() for n in names}
        return np.array([where[n] for n in condition_names], dtype=np.int8)

    def summary(self) -> str:
        lines = [f"split {self.kind} (seed {self.seed}): " + ", ".join(
            f"{s} {len(getattr(self, s))}" for s in SET_NAMES)]
        for cat, names in sorted(self.categories.items()):
            lines.append(f"  {cat:<24} {len(names):>6}")
        return "\n".join(lines)


def _choose(rng: np.random.Generator, items: Sequence, fraction: float) -> set:
    items = list(items)
    n = int(round(fraction * len(items)))
    idx = rng.permutation(len(items))[:n]
    return {items[i] for i in idx}


def _simulation(conds: dict[str, tuple[str, ...]], rng, gene_frac: float, combo_frac: float):
    genes = sorted({g for gs in conds.values() for g in gs})
    seen = _choose(rng, genes, gene_frac)
    train, test = [], []
    seen2 = []
    for name, gs in conds.items():
        if len(gs) == 1:
            (train if gs[0] in seen else test).append(name)
        elif all(g in seen for g in gs):
            seen2.append(name)
        else:
            test.append(name)
    kept = _choose(rng, seen2, combo_frac)
    for name in seen2:
        (train if name in kept else test).append(name)
    return train, test


def make_split(condition_names: Sequence[str], kind: str = "simulation", seed: int = 1, *,
               train_gene_frac: float = 0.75, combo_seen2_train_frac: float = 0.75,
               custom: dict | None = None) -> Split:
    """Split canonical condition names (as stored in a store's conditions table)."""
    if kind not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {kind!r}; expected one of {list(SPLIT_KINDS)}")
    for field, v in (("train_gene_frac", train_gene_frac), ("combo_seen2_train_frac", combo_seen2_train_frac)):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{field} must be in (0, 1], received {v}")
    parsed = {n: parse_condition(n) for n in condition_names}
    controls = [n for n, g in parsed.items() if not g]
    perts = {n: g for n, g in parsed.items() if g}
    if not perts:
        raise ValueError("the store has no perturbed conditions to split")
    rng = np.random.default_rng(seed)
    excluded: list[str] = []
    val: list[str] = []
    params = {"train_gene_frac": train_gene_frac, "combo_seen2_train_frac": combo_seen2_train_frac}

    if kind == "simulation":
        train, test = _simulation(perts, rng, train_gene_frac, combo_seen2_train_frac)
        train, val = _simulation({n: perts[n] for n in train}, rng, 0.9, 0.9)
    elif kind == "single":
        genes = sorted({g for gs in perts.values() if len(gs) == 1 for g in gs})
        held = set(genes) - _choose(rng, genes, train_gene_frac)
        train, test = [], []
        for n, gs in perts.items():
            if len(gs) == 1:
                (test if gs[0] in held else train).append(n)
            else:
                (excluded if any(g in held for g in gs) else train).append(n)
        train, val = _carve_val(train, perts, rng)
    elif kind.startswith("combo_seen"):
        want = int(kind[-1])
        genes = sorted({g for gs in perts.values() for g in gs})
        seen = _choose(rng, genes, train_gene_frac)
        train, test = [], []
        all_seen = []
        for n, gs in perts.items():
            n_seen = sum(g in seen for g in gs)
            if len(gs) == 1:
                (train if n_seen else excluded).append(n)
            elif n_seen == len(gs):
                all_seen.append(n)
            elif n_seen == want:
                test.append(n)
            else:
                excluded.append(n)
        if want >= 2:
            kept = _choose(rng, all_seen, combo_seen2_train_frac)
            for n in all_seen:
                (train if n in kept else test).append(n)
        else:
            train.extend(all_seen)
        train, val = _carve_val(train, perts, rng)
    elif kind == "no_test":
        train, test = list(perts), []
        train, val = _carve_val(train, perts, rng)
    else:  # custom
        train, val, test, excluded = _custom(custom, perts, controls)
        controls = [c for c in controls if c not in train]

    train = sorted(controls + train)
    sets = {"train": train, "val": sorted(val), "test": sorted(test), "excluded": sorted(excluded)}
    seen_genes = {g for n in train for g in parsed[n]}
    categories: dict[str, list[str]] = {}
    for s in ("val", "test"):
        for n in sets[s]:
            gs = parsed[n]
            n_seen = sum(g in seen_genes for g in gs)
            cat = ("seen_single" if n_seen else "unseen_single") if len(gs) == 1 else f"combo_seen{n_seen}"
            categories.setdefault(f"{s}/{cat}", []).append(n)
    split = Split(kind=kind, seed=seed, categories=categories, params=params, **sets)
    _check_partition(split, condition_names)
    return split


def _carve_val(train: list[str], perts: dict, rng, fraction: float = 0.1) -> tuple[list[str], list[str]]:
    val = _choose(rng, sorted(train), fraction)
    if not val and len(train) > 1:
        val = {sorted(train)[int(rng.integers(len(train)))]}
    return [n for n in train if n not in val], sorted(val)


def _custom(custom: dict | None, perts: dict, controls: list[str]):
    if not isinstance(custom, dict):
        raise ValueError("split kind 'custom' needs --custom FILE.json with {\"train\": [...], \"val\": [...], "
                         "\"test\": [...]}")
    unknown_keys = sorted(set(custom) - {"train", "val", "test"})
    if unknown_keys:
        raise ValueError(f"custom split: unknown key(s) {unknown_keys}; expected train, val, test")
    known = set(perts) | set(controls)
    out, seen = [], {}
    for s in ("train", "val", "test"):
        names = custom.get(s, [])
        if not isinstance(names, list):
            raise ValueError(f"custom split: {s!r} must be a list of condition names, received {type(names).__name__}")
        canon = []
        for n in names:
            c = condition_name(parse_condition(n))
            if c not in known:
                raise ValueError(f"custom split: condition {n!r} in {s!r} is not in the store")
            if c in seen:
                raise ValueError(f"custom split: condition {n!r} is in both {seen[c]!r} and {s!r}")
            seen[c] = s
            canon.append(c)
        out.append(canon)
    excluded = [n for n in perts if n not in seen]
    return out[0], out[1], out[2], excluded


def _check_partition(split: Split, names: Sequence[str]) -> None:
    placed = [n for s in SET_NAMES for n in getattr(split, s)]
    assert sorted(placed) == sorted(names), "every condition must be in exactly one set"


def split_key(kind: str, seed: int) -> str:
    return f"{kind}_seed{seed}"


def save_split(store: Store, split: Split, key: str | None = None, overwrite: bool = False) -> str:
    key = key or split_key(split.kind, split.seed)
    attrs = {"kind": split.kind, "seed": split.seed, "params": split.params,
             "sets": split.sets(), "categories": split.categories,
             "counts": {s: len(v) for s, v in split.sets().items()}}
    with store.write_component("splits", key, attrs=attrs, overwrite=overwrite) as group:
        group.create_array("code", data=split.codes(store.condition_names))
    return key


def load_split(store: Store | str | pathlib.Path, key: str) -> Split:
    store = store if isinstance(store, Store) else open_store(store)
    attrs = dict(store.component("splits", key).attrs)
    sets = attrs["sets"]
    return Split(kind=attrs["kind"], seed=attrs["seed"], categories=attrs["categories"], params=attrs["params"],
                 key=key, **{s: list(sets.get(s, [])) for s in SET_NAMES})


def read_custom_split(path: str | pathlib.Path) -> dict:
    """A custom split file: JSON {train: [...], val: [...], test: [...]} (see make_split's `custom`)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"custom split file {str(path)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"custom split file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):  # the file's content is the bad value, not an argument
        raise ValueError(f"custom split file {str(path)!r} holds {type(data).__name__}, expected an object "  # noqa: TRY004
                         f"{{train: [...], val: [...], test: [...]}}")
    return data


def make_and_save_split(store_path: str | pathlib.Path, kind: str = "simulation", seed: int = 1,
                        key: str | None = None, overwrite: bool = False, custom_path: str | None = None,
                        **kwargs) -> str:
    store = open_store(store_path, mode="r+")
    custom = None if custom_path is None else read_custom_split(custom_path)
    split = make_split(store.condition_names, kind, seed, custom=custom, **kwargs)
    return save_split(store, split, key, overwrite)
