import itertools
import json

import numpy as np
import pytest
import zarr

from gears_dist.data import splits
from gears_dist.data.conditions import parse_condition
from gears_dist.data.store import StoreError, building_store, open_store, string_array, write_manifest

GENES = [f"G{i}" for i in range(12)]
NAMES = ["ctrl"] + GENES + ["+".join(p) for p in itertools.combinations(GENES[:8], 2)]


def _tiny_store(path, names=NAMES):
    with building_store(path) as tmp:
        root = zarr.open_group(tmp, mode="w")
        root.create_array("X", data=np.zeros((len(names), 4), dtype=np.float32))
        root.create_array("conditions/name", data=string_array(names))
        write_manifest(tmp, {"counts": {"num_cells": len(names), "num_genes": 4, "num_conditions": len(names)}})
    return path


@pytest.mark.parametrize("kind", [k for k in splits.SPLIT_KINDS if k != "custom"])
@pytest.mark.parametrize("seed", [1, 2])
def test_every_condition_in_exactly_one_set(kind, seed):
    s = splits.make_split(NAMES, kind, seed)
    placed = [n for name in splits.SET_NAMES for n in getattr(s, name)]
    assert sorted(placed) == sorted(NAMES)
    assert "ctrl" in s.train
    assert s.val, "validation must not be empty"
    # deterministic by seed
    assert splits.make_split(NAMES, kind, seed) == s


def test_seeds_differ():
    assert splits.make_split(NAMES, "simulation", 1).test != splits.make_split(NAMES, "simulation", 2).test


def test_simulation_categories_follow_seen_genes():
    s = splits.make_split(NAMES, "simulation", 3)
    train_genes = {g for n in s.train for g in parse_condition(n)}
    for cat, names in s.test_categories().items():
        for n in names:
            gs = parse_condition(n)
            n_seen = sum(g in train_genes for g in gs)
            if len(gs) == 1:
                assert cat == ("seen_single" if n_seen else "unseen_single")
            else:
                assert cat == f"combo_seen{n_seen}"
    # combos in train only use seen genes; unseen singles never train
    for n in s.train:
        assert all(g in train_genes for g in parse_condition(n))
    assert sum(len(v) for v in s.test_categories().values()) == len(s.test)


def test_combo_seen_kinds_test_only_that_category():
    for want in (0, 1, 2):
        s = splits.make_split(NAMES, f"combo_seen{want}", 5, train_gene_frac=0.5)
        cats = set(s.test_categories())
        assert cats <= {f"combo_seen{want}"}, cats


def test_bad_kind_and_fractions():
    with pytest.raises(ValueError, match="unknown split kind 'bogus'"):
        splits.make_split(NAMES, "bogus")
    with pytest.raises(ValueError, match="train_gene_frac"):
        splits.make_split(NAMES, "simulation", train_gene_frac=1.5)


def test_store_round_trip_and_atomicity(tmp_path):
    store_path = _tiny_store(tmp_path / "s.zarr")
    key = splits.make_and_save_split(store_path, "simulation", 7)
    assert key == "simulation_seed7"
    loaded = splits.load_split(store_path, key)
    assert loaded == splits.make_split(NAMES, "simulation", 7)
    store = open_store(store_path)
    codes = store.component("splits", key)["code"][...]
    assert list(codes) == list(loaded.codes(NAMES))
    with pytest.raises(StoreError, match="--overwrite"):
        splits.make_and_save_split(store_path, "simulation", 7)
    # a failure while writing leaves the previous split and the manifest untouched
    before = (store_path / "manifest.json").read_text()
    st = open_store(store_path, mode="r+")
    with pytest.raises(RuntimeError):
        with st.write_component("splits", key, attrs={"kind": "broken"}, overwrite=True):
            raise RuntimeError("disk full")
    assert (store_path / "manifest.json").read_text() == before
    assert splits.load_split(store_path, key) == loaded
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_custom_split(tmp_path):
    store_path = _tiny_store(tmp_path / "s.zarr")
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": ["G0", "G1+ctrl"], "val": ["G2"], "test": ["G1+G0"]}))
    key = splits.make_and_save_split(store_path, "custom", 0, custom_path=str(f))
    s = splits.load_split(store_path, key)
    assert s.train == ["G0", "G1", "ctrl"] and s.test == ["G0+G1"] and s.val == ["G2"]
    f.write_text(json.dumps({"train": ["G0"], "test": ["G0"]}))
    with pytest.raises(ValueError, match="both 'train' and 'test'"):
        splits.make_and_save_split(store_path, "custom", 0, custom_path=str(f), key="c2")
    f.write_text(json.dumps({"train": ["NOPE"]}))
    with pytest.raises(ValueError, match="'NOPE' in 'train' is not in the store"):
        splits.make_and_save_split(store_path, "custom", 0, custom_path=str(f), key="c3")


def test_cli_unknown_kind_exits_2(tmp_path, capsys):
    from gears_dist.cli import main

    store_path = _tiny_store(tmp_path / "s.zarr")
    assert main(["split", str(store_path), "--kind", "nope"]) == 2
    assert "unknown split kind 'nope'" in capsys.readouterr().err
    assert main(["split", str(store_path), "--kind", "simulation", "--seed", "1"]) == 0
    assert "unseen_single" in capsys.readouterr().out
