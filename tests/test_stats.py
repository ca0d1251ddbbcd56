"""stats.write_stats against numpy/scipy computed independently, on a hand-built store group with
awkward cases: one-cell conditions, genes constant in both groups, genes zero only under control,
and conditions cut by window edges (a tiny memory budget forces many Dask windows)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import zarr

from gears_dist.data.stats import write_stats

NUM_GENES = 300


def build_group(tmp_path, sizes, seed=0, control_at=0, chunk=8):
    rng = np.random.default_rng(seed)
    num_cells = int(sum(sizes))
    x = np.log1p(rng.poisson(rng.gamma(0.5, 1.5, NUM_GENES), size=(num_cells, NUM_GENES))).astype(np.float32)
    stop = np.cumsum(sizes)
    start = stop - np.asarray(sizes)
    ctrl = slice(start[control_at], stop[control_at])
    x[:, 0] = 1.5                                   # constant everywhere: t = 0/0 -> 0
    x[:, 1] = 0.0                                   # zero everywhere: dropout in both -> still non-dropout
    x[ctrl, 2] = 0.0                                # zero under control only
    x[ctrl, 3] = 0.7                                # constant under control; constant per condition below
    for c, (a, b) in enumerate(zip(start, stop)):
        if c != control_at:
            x[a:b, 3] = 0.7 + 0.1 * (c % 3)         # equal means (t=0) or differing means with var 0 (t=inf)
            x[a:b, 4] = 0.0                         # zero under the condition, not under control: dropout
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    root.create_array("X", data=x, chunks=(chunk, NUM_GENES))
    root.create_array("conditions/start", data=start.astype(np.int64))
    root.create_array("conditions/stop", data=stop.astype(np.int64))
    root.create_array("conditions/is_control", data=np.arange(len(sizes)) == control_at)
    return root, x, start, stop


def expected(x, start, stop, control_at, k):
    ctrl = x[start[control_at]:stop[control_at]].astype(np.float64)
    out = {"mean": [], "var": [], "nonzero_frac": [], "de_score": [], "top_de": [], "top_de_non_dropout": []}
    for c, (a, b) in enumerate(zip(start, stop)):
        g = x[a:b].astype(np.float64)
        out["mean"].append(g.mean(0))
        out["var"].append(g.var(0, ddof=1) if len(g) > 1 else np.zeros(g.shape[1]))
        out["nonzero_frac"].append((g != 0).mean(0))
        if c == control_at:
            out["de_score"].append(np.zeros(g.shape[1]))
            out["top_de"].append([-1] * k)
            out["top_de_non_dropout"].append([-1] * k)
            continue
        with np.errstate(all="ignore"):
            t = scipy.stats.ttest_ind_from_stats(g.mean(0), np.sqrt(out["var"][-1]), len(g), ctrl.mean(0),
                                                 ctrl.std(0, ddof=1), len(ctrl), equal_var=False).statistic
        t = np.where(np.isnan(t), 0.0, t)
        out["de_score"].append(t)
        ranking = sorted(range(len(t)), key=lambda j: (-abs(t[j]), j))
        non_dropout = (g.mean(0) != 0) | ((g.mean(0) == 0) & (ctrl.mean(0) == 0))
        out["top_de"].append(ranking[:k])
        keep = [j for j in ranking if non_dropout[j]][:k]
        out["top_de_non_dropout"].append(keep + [-1] * (k - len(keep)))
    return {name: np.asarray(v) for name, v in out.items()}


@pytest.mark.parametrize("budget_mb, control_at", [(1, 0), (1, 3), (64, 2)])
def test_stats_match_numpy_and_scipy(tmp_path, budget_mb, control_at):
    sizes = [37, 1, 5, 60, 2, 23, 9, 41, 1, 17]
    root, x, start, stop = build_group(tmp_path, sizes, control_at=control_at)
    write_stats(root, memory_budget_mb=budget_mb)
    want = expected(x, start, stop, control_at, 20)
    s = root["stats"]
    np.testing.assert_allclose(s["control_mean"][...], want["mean"][control_at], rtol=1e-6, atol=1e-7)
    for name in ("mean", "var", "nonzero_frac"):
        np.testing.assert_allclose(s[name][...], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    got_t = s["de_score"][...]
    assert np.array_equal(np.isinf(got_t), np.isinf(want["de_score"]))
    assert np.isinf(got_t[:, 3]).any() and (got_t[:, 0] == 0).all()
    finite = np.isfinite(want["de_score"])
    np.testing.assert_allclose(got_t[finite], want["de_score"][finite], rtol=1e-4, atol=1e-4)
    for name in ("top_de", "top_de_non_dropout"):
        got = s[name][...]
        assert got.shape == (len(sizes), 20)
        for c in range(len(sizes)):
            if c == control_at:
                assert (got[c] == -1).all()
                continue
            # equal up to float ties: the k-th gene we rank carries the k-th expected |t|
            tt = np.abs(want["de_score"][c])
            np.testing.assert_allclose(tt[got[c]], tt[want[name][c]], rtol=1e-4, err_msg=f"{name}[{c}]")
    top_nd = s["top_de_non_dropout"][...]
    assert not np.isin(4, np.delete(top_nd, control_at, axis=0))  # gene 4 is a dropout gene under conditions


def test_one_control_condition_is_required(tmp_path):
    root, *_ = build_group(tmp_path, [10, 10])
    root["conditions/is_control"][...] = np.array([False, False])
    with pytest.raises(ValueError, match="exactly one control condition"):
        write_stats(root)


def test_top_k_is_capped_by_the_number_of_genes(tmp_path):
    rng = np.random.default_rng(1)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    root.create_array("X", data=rng.random((30, 5)).astype(np.float32), chunks=(4, 5))
    root.create_array("conditions/start", data=np.array([0, 10], np.int64))
    root.create_array("conditions/stop", data=np.array([10, 30], np.int64))
    root.create_array("conditions/is_control", data=np.array([True, False]))
    write_stats(root, num_top_de=20)
    assert root["stats/top_de"].shape == (2, 5)
    assert sorted(root["stats/top_de"][1].tolist()) == [0, 1, 2, 3, 4]
