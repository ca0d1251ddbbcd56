"""Synthetic screen generator: shapes, conventions, determinism, streaming == in memory, GO structure,
ground truth, store output."""

from __future__ import annotations

import json

import anndata
import h5py
import numpy as np
import pytest

from gears_dist.cli import main as cli_main
from gears_dist.config import ConfigError
from gears_dist.data import synthetic
from gears_dist.data.conditions import parse_condition
from gears_dist.data.genes import go_annotations

TINY = synthetic.PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_adata():
    return synthetic.simulate_screen(TINY)


@pytest.fixture(scope="module")
def tiny_h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "tiny.h5ad"
    synthetic.write_h5ad(TINY, path)
    return path


def _canonical(names, separators=("+",)):
    return ["+".join(parse_condition(n, separators=separators)) or "ctrl" for n in names]


def test_tiny_shapes_and_gears_conditions(tiny_adata):
    a = tiny_adata
    assert a.shape == (TINY.num_cells, TINY.num_genes)
    cond = a.obs["condition"].astype(str)
    names = set(cond)
    assert len(names) == 1 + TINY.num_singles + TINY.num_doubles
    assert (cond == "ctrl").sum() == round(TINY.control_frac * TINY.num_cells)
    singles = [n for n in names if n.endswith("+ctrl")]
    doubles = [n for n in names if n != "ctrl" and not n.endswith("+ctrl")]
    assert len(singles) == TINY.num_singles and len(doubles) == TINY.num_doubles
    assert all(len(n.split("+")) == 2 for n in doubles)
    # Every condition has cells, every gene of a double is also perturbed alone.
    single_genes = {n.split("+")[0] for n in singles}
    assert {g for n in doubles for g in n.split("+")} <= single_genes
    # Real GO-annotated symbols; most perturbed genes are measured, var carries gene_name.
    go = go_annotations()
    assert all(g in go for g in a.var_names) and all(g in go for g in single_genes)
    assert list(a.var["gene_name"]) == list(a.var_names)
    measured = len(single_genes & set(a.var_names))
    assert measured == round(TINY.measured_perturbed_frac * TINY.num_singles)
    assert set(a.obs["cell_type"].astype(str)) == {"K562"}
    assert a.obs_names.is_unique and a.var_names.is_unique


def test_counts_are_nonnegative_integers_with_realistic_libraries(tiny_adata):
    x = tiny_adata.X
    assert x.dtype == np.float32
    assert (x.data > 0).all() and np.array_equal(x.data, np.round(x.data))
    assert x.has_canonical_format
    totals = np.asarray(x.sum(axis=1)).ravel()
    median = np.median(totals)
    expect = TINY.measured_library_median
    assert 0.5 * expect < median < 2.0 * expect
    # Overdispersed (NB), not Poisson: variance > mean for the control cells' well-expressed genes.
    ctrl = x[(tiny_adata.obs["condition"] == "ctrl").to_numpy()].toarray()
    mean, var = ctrl.mean(0), ctrl.var(0)
    well = mean > 5
    assert well.sum() > 10 and np.median(var[well] / mean[well]) > 1.5


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_h5ad):
    again = tmp_path / "again.h5ad"
    other = tmp_path / "other.h5ad"
    synthetic.write_h5ad(TINY, again)
    synthetic.write_h5ad(TINY.replace(seed=1), other)
    with h5py.File(tiny_h5ad) as f1, h5py.File(again) as f2, h5py.File(other) as f3:
        for key in ("data", "indices", "indptr"):
            assert f1["X"][key][...].tobytes() == f2["X"][key][...].tobytes()
        assert f1["X"]["data"].shape != f3["X"]["data"].shape or \
            f1["X"]["data"][...].tobytes() != f3["X"]["data"][...].tobytes()
    assert tiny_h5ad.with_name(tiny_h5ad.name + ".truth.json").read_text() == \
        again.with_name(again.name + ".truth.json").read_text()


def test_streamed_h5ad_equals_in_memory_and_reads_backed(tiny_h5ad, tiny_adata):
    disk = anndata.read_h5ad(tiny_h5ad)
    assert (disk.X != tiny_adata.X).nnz == 0
    assert disk.obs.equals(tiny_adata.obs) and disk.var.equals(tiny_adata.var)
    backed = anndata.read_h5ad(tiny_h5ad, backed="r")
    rows = backed.X[100:140]
    assert (rows != tiny_adata.X[100:140]).nnz == 0
    backed.file.close()


def test_worker_processes_give_the_same_screen(tmp_path, tiny_h5ad):
    path = tmp_path / "workers.h5ad"
    synthetic.write_h5ad(TINY, path, num_workers=2)
    with h5py.File(tiny_h5ad) as f1, h5py.File(path) as f2:
        for key in ("data", "indices", "indptr"):
            assert np.array_equal(f1["X"][key][...], f2["X"][key][...])


def test_scperturb_style(tmp_path, tiny_adata):
    path = tmp_path / "sc.h5ad"
    synthetic.write_h5ad(TINY, path, style="scperturb")
    a = anndata.read_h5ad(path)
    assert "perturbation" in a.obs and "condition" not in a.obs and "gene_name" not in a.var
    names = a.obs["perturbation"].astype(str)
    assert (names == "control").sum() == round(TINY.control_frac * TINY.num_cells)
    assert not any("+" in n for n in names)
    assert sum("_" in n for n in set(names)) == TINY.num_doubles
    # Same screen as the gears style, only named differently.
    assert (a.X != tiny_adata.X).nnz == 0
    got = _canonical(names, separators=("_",))
    want = _canonical(tiny_adata.obs["condition"].astype(str))
    assert got == want
    truth = a.uns[synthetic.TRUTH_KEY]
    assert all("_" in n for n in truth["condition_in_file"])


def test_go_sharing_genes_have_correlated_effects():
    spec = synthetic.ScreenSpec(num_cells=5000, num_genes=1500, num_singles=400, num_doubles=0, seed=3)
    model = synthetic.screen_model(spec)
    go = go_annotations()
    effects = model.downstream.astype(np.float64)
    strong = np.linalg.norm(effects, axis=1) > 0.2 * np.median(np.linalg.norm(effects, axis=1))
    genes = [g for g, s in zip(model.perturbed, strong) if s]
    effects = effects[strong]
    corr = np.corrcoef(effects)
    sets = [go[g] for g in genes]
    iu = np.triu_indices(len(genes), k=1)
    jac = np.array([len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in zip(*iu)])
    c = corr[iu]
    high = jac >= 0.3
    assert high.sum() >= 20
    assert c[high].mean() > c.mean() + 0.3
    # And the relation is graded: correlation rises with GO similarity, from unrelated genes through
    # the GEARS GO-graph edge range (Jaccard > 0.1) to near-identical annotations.
    bins = [c[(jac >= lo) & (jac < hi)].mean() for lo, hi in [(0, 1e-9), (0.1, 0.2), (0.2, 0.3), (0.3, 1.01)]]
    assert abs(bins[0]) < 0.05
    assert np.all(np.diff(bins) > 0.03), bins


def test_truth_table_matches_conditions_and_effects(tiny_adata, tiny_h5ad):
    truth = tiny_adata.uns[synthetic.TRUTH_KEY]
    conds = set(tiny_adata.obs["condition"].astype(str))
    doubles = {n for n in conds if n != "ctrl" and not n.endswith("+ctrl")}
    assert set(truth["condition"]) == doubles == set(truth["condition_in_file"])
    for name, a, b in zip(truth["condition"], truth["gene_a"], truth["gene_b"]):
        assert name == f"{a}+{b}" and a < b
    kinds = list(truth["interaction"])
    assert set(kinds) <= {"additive", *synthetic.INTERACTION_TYPES}
    assert sum(k != "additive" for k in kinds) == round(TINY.interaction_frac * TINY.num_doubles)
    mag = dict(zip(kinds, truth["magnitude"]))
    if "synergy" in mag:
        assert mag["synergy"] > 1
    if "suppression" in mag:
        assert mag["suppression"] < 1
    sidecar = json.loads(tiny_h5ad.with_name(tiny_h5ad.name + ".truth.json").read_text())
    assert [d["condition"] for d in sidecar["doubles"]] == list(truth["condition"])
    assert [d["interaction"] for d in sidecar["doubles"]] == kinds


@pytest.mark.parametrize("structure", ["random", "graph", "graded"])
def test_double_effects_follow_their_recorded_interaction(structure):
    spec = synthetic.ScreenSpec(num_cells=4000, num_genes=300, num_singles=30, num_doubles=60,
                                interaction_frac=0.5, interaction_structure=structure, seed=5)
    model = synthetic.screen_model(spec)
    names = model.condition_names
    row = {n: i for i, n in enumerate(names)}
    single = {g: model.downstream[p] for p, g in enumerate(model.perturbed)}
    seen = set()
    for i, cond in enumerate(model.truth["condition"]):
        a, b = model.truth["gene_a"][i], model.truth["gene_b"][i]
        kind = model.truth["interaction"][i]
        seen.add(kind)
        # Everything but the targets' own columns (those carry the CRISPRa/i effect itself).
        keep = np.setdiff1d(np.arange(len(model.genes)), [model.genes.index(g) for g in (a, b) if g in model.genes])
        got = model.effects[row[cond], keep]
        pred = model.truth["c_a"][i] * single[a][keep] + model.truth["c_b"][i] * single[b][keep]
        if kind == "neomorphism":
            ratio = np.linalg.norm(got - pred) / np.linalg.norm(single[a][keep] + single[b][keep])
            assert ratio == pytest.approx(model.truth["neomorphic_ratio"][i], rel=1e-4)
        else:
            np.testing.assert_allclose(got, pred, atol=1e-5)
    assert seen >= ({"additive", "synergy", "suppression"} if structure == "graded"
                    else {"additive", "synergy", "suppression", "neomorphism"})


GRAPH = synthetic.ScreenSpec(num_cells=4000, num_genes=300, num_singles=60, num_doubles=300, interaction_frac=0.3,
                             module_frac=0.8, interaction_structure="graph", seed=0)


def _pair_features(model):
    """GO Jaccard and downstream-effect cosine of each double, computed here from the GO sets."""
    go = go_annotations()
    row = {g: p for p, g in enumerate(model.perturbed)}
    a, b = model.truth["gene_a"], model.truth["gene_b"]
    jac = np.array([len(go[x] & go[y]) / len(go[x] | go[y]) for x, y in zip(a, b)])
    eff = model.downstream.astype(np.float64)
    eff /= np.linalg.norm(eff, axis=1, keepdims=True)
    cos = np.array([eff[row[x]] @ eff[row[y]] for x, y in zip(a, b)])
    return np.array(model.truth["interaction"]), jac, cos


def _auc(pos, neg):
    return (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()


def test_graph_interactions_follow_go_and_effect_similarity():
    model = synthetic.screen_model(GRAPH)
    kinds, jac, cos = _pair_features(model)
    # interaction_frac holds, and interaction_weights fix each type's count (largest remainder).
    num_inter = round(GRAPH.interaction_frac * GRAPH.num_doubles)
    counts = {k: int((kinds == k).sum()) for k in synthetic.INTERACTION_TYPES}
    assert sum(counts.values()) == num_inter == 90
    assert counts == {"synergy": 32, "suppression": 31, "neomorphism": 18, "epistasis": 9}
    buffer = np.isin(kinds, ["suppression", "epistasis"])
    additive, synergy = kinds == "additive", kinds == "synergy"
    # Genes that share GO terms buffer each other; synergy comes from similar effects across GO
    # neighbourhoods, not from GO overlap.
    assert jac[buffer].mean() > 3 * jac[additive].mean()
    assert jac[synergy].mean() < 0.5 * jac[buffer].mean()
    assert cos[synergy].mean() > cos[additive].mean() + 0.15
    assert cos[kinds == "suppression"].mean() > cos[kinds == "epistasis"].mean()
    # Predictable from the pair's features: the rule's scores separate the types well.
    assert _auc(jac[buffer], jac[~buffer]) > 0.9
    assert _auc((cos - 2 * jac)[synergy], (cos - 2 * jac)[additive]) > 0.9
    # An epistatic double follows its stronger single.
    norm = dict(zip(model.perturbed, np.linalg.norm(model.downstream, axis=1)))
    for i in np.flatnonzero(kinds == "epistasis"):
        a, b = model.truth["gene_a"][i], model.truth["gene_b"][i]
        assert (model.truth["c_a"][i] == 1.0) == (norm[a] >= norm[b])
    # Deterministic: the same spec gives the same truth and effects.
    again = synthetic.screen_model(GRAPH)
    assert again.truth == model.truth
    assert np.array_equal(again.effects, model.effects)


GRADED = GRAPH.replace(interaction_structure="graded", related_pair_frac=0.5)


def test_graded_interactions_are_a_smooth_function_of_go_and_effect_similarity():
    model = synthetic.screen_model(GRADED)
    kinds, jac, cos = _pair_features(model)
    gain = np.array(model.truth["c_a"])
    assert np.array_equal(gain, np.array(model.truth["c_b"])) and np.allclose(gain, model.truth["magnitude"])
    # The type names the gain: suppression below 0.8, synergy above 1.2.
    assert set(kinds) == {"additive", "suppression", "synergy"}
    assert (gain[kinds == "suppression"] < 0.8).all() and (gain[kinds == "synergy"] > 1.2).all()
    # Buffering grows with shared annotation, smoothly: 1 - 0.8 clip((J - 0.05) / 0.15), up to the rule's noise
    # (sd 0.02 on J, i.e. 0.11 on the gain).
    expected = 1.0 - 0.8 * np.clip((jac - 0.05) / 0.15, 0.0, 1.0)
    buffered = (jac > 0.05) & (kinds != "synergy")
    assert buffered.sum() >= 50
    assert np.abs(gain[buffered] - expected[buffered]).max() < 0.45
    assert np.abs(gain[buffered] - expected[buffered]).mean() < 0.1
    assert np.corrcoef(jac[buffered], gain[buffered])[0, 1] < -0.5
    assert (gain[jac < 0.01] >= 0.99).all()          # no shared annotation: never buffered
    # Synergy only between genes with little shared annotation whose effects agree.
    assert jac[kinds == "synergy"].max() < 0.1 and cos[kinds == "synergy"].min() > 0.1
    # related_pair_frac: half the doubles come from the top decile of all pairs by GO Jaccard, far more than chance.
    go = go_annotations()
    genes = model.perturbed
    all_jac = np.array([len(go[x] & go[y]) / len(go[x] | go[y]) for i, x in enumerate(genes) for y in genes[i + 1:]])
    assert (jac >= np.quantile(all_jac, 0.9)).mean() >= 0.5
    null = synthetic.screen_model(GRAPH)
    assert (_pair_features(null)[1] >= np.quantile(all_jac, 0.9)).mean() < 0.25
    # The random null of the same spec draws the same pairs.
    assert synthetic.screen_model(GRADED.replace(interaction_structure="random")).truth["condition"] == \
        model.truth["condition"]


def test_random_interactions_are_the_unchanged_null():
    assert synthetic.ScreenSpec().interaction_structure == "random"
    assert synthetic.PRESETS["demo"].interaction_structure == "graded"
    model = synthetic.screen_model(TINY)
    # Pinned from before interaction_structure existed: the random structure did not change.
    assert model.truth["condition"] == ["ERLEC1+MARCHF6", "ERLEC1+RNF5", "ERLEC1+XKR9", "MARCHF6+TFEC", "GHR+RHBDD1",
                                        "RNF5+SYVN1", "RNF185+TFEC", "GHR+TFEC"]
    assert model.truth["interaction"] == ["additive", "suppression", "additive", "additive", "additive", "additive",
                                          "additive", "synergy"]
    # Same seed, same pairs under either structure; only which of them interact differs.
    graph = synthetic.screen_model(GRAPH)
    null = synthetic.screen_model(GRAPH.replace(interaction_structure="random"))
    assert null.truth["condition"] == graph.truth["condition"]
    assert np.array_equal(null.downstream, graph.downstream)
    kinds, _, _ = _pair_features(null)
    assert sum(k != "additive" for k in kinds) == round(GRAPH.interaction_frac * GRAPH.num_doubles)


def test_bad_interaction_structure_names_the_field():
    with pytest.raises(ConfigError, match="interaction_structure: expected one of \\['random', 'graph', 'graded'\\]"):
        synthetic.preset("tiny", interaction_structure="modules")
    with pytest.raises(ConfigError, match="interaction_structure"):
        TINY.replace(interaction_structure="Graph")
    with pytest.raises(ConfigError, match="related_pair_frac: expected in \\[0, 1\\], received 1.5"):
        TINY.replace(related_pair_frac=1.5)


def test_observed_responses_follow_the_true_effects(tiny_adata):
    model = synthetic.screen_model(TINY)
    a = tiny_adata
    x = a.X.toarray().astype(np.float64)
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    cond = a.obs["condition"].astype(str).to_numpy()
    ctrl = x[cond == "ctrl"].mean(0)
    file_names = synthetic.style_condition_names(model, "gears")
    corrs = []
    for name, effect, size in zip(file_names[1:], model.effects[1:], model.num_cells[1:]):
        delta = x[cond == name].mean(0) - ctrl
        top = np.argsort(-np.abs(effect))[:20]
        if np.abs(effect[top]).min() > 0.3:
            corrs.append(np.corrcoef(delta[top], effect[top])[0, 1])
    assert len(corrs) >= 5 and np.median(corrs) > 0.7
    # CRISPRa: the measured target gene goes up in its single.
    for g in model.perturbed:
        if g in model.genes:
            j = model.genes.index(g)
            assert x[cond == f"{g}+ctrl", j].mean() > ctrl[j] + 0.5


def test_multiple_cell_types():
    spec = TINY.replace(cell_types=("K562", "RPE1"), num_cells=600, num_singles=5, num_doubles=2)
    a = synthetic.simulate_screen(spec)
    counts = a.obs["cell_type"].value_counts()
    assert set(counts.index) == {"K562", "RPE1"} and counts.min() > 200


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        synthetic.preset("huge")
    with pytest.raises(ConfigError, match="num_doubles"):
        synthetic.preset("tiny", num_singles=4, num_doubles=7)
    with pytest.raises(ConfigError, match="num_cells"):
        synthetic.preset("tiny", num_cells=20)
    with pytest.raises(ConfigError, match="num_genes: expected an integer"):
        synthetic.preset("tiny", num_genes="many")
    with pytest.raises(ConfigError, match="unknown config key"):
        synthetic.preset("tiny", num_celss=100)
    with pytest.raises(ConfigError, match="interaction_weights"):
        TINY.replace(interaction_weights={"telepathy": 1.0})
    with pytest.raises(ValueError, match="style 'seurat'"):
        synthetic.simulate_screen(TINY, style="seurat")
    path = tmp_path / "x.h5ad"
    path.write_text("keep me")
    with pytest.raises(ValueError, match="already exists"):
        synthetic.write_h5ad(TINY, path)
    assert path.read_text() == "keep me"


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def failing(model, layout, num_workers=1):
        yield synthetic.sample_block(model, layout, 0)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "iter_blocks", failing)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_h5ad(TINY, tmp_path / "x.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_cli_simulate(tmp_path, capsys):
    out = tmp_path / "cli.h5ad"
    assert cli_main(["simulate", str(out), "--preset", "tiny", "--num-cells", "800", "--num-doubles", "4",
                     "--style", "scperturb", "--seed", "7"]) == 0
    a = anndata.read_h5ad(out)
    assert a.n_obs == 800 and a.obs["perturbation"].nunique() == 1 + TINY.num_singles + 4
    assert "800 cells" in capsys.readouterr().out
    assert cli_main(["simulate", str(out), "--preset", "tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["simulate", str(tmp_path / "b.h5ad"), "--preset", "nope"]) == 2


def _stats_available() -> bool:
    try:
        from gears_dist.data import stats
    except ImportError:
        return False
    return hasattr(stats, "write_stats")


@pytest.mark.skipif(not _stats_available(), reason="gears_dist.data.stats.write_stats not available yet")
def test_store_output_opens_and_matches_the_model(tmp_path):
    from gears_dist.data.store import open_store

    path = tmp_path / "tiny.zarr"
    synthetic.write_store(TINY, path, chunk_cells=256)
    store = open_store(path)
    model = synthetic.screen_model(TINY)
    assert (store.num_cells, store.num_genes) == (TINY.num_cells, TINY.num_genes)
    assert store.genes == model.genes
    table = store.conditions()
    assert sorted(table["name"]) == sorted(model.condition_names)
    assert table["name"].iloc[0] == "ctrl" and list(table["name"][1:]) == sorted(table["name"][1:])
    assert (table["stop"] - table["start"] == table["num_cells"]).all()
    assert table["start"].iloc[0] == 0 and table["stop"].iloc[-1] == TINY.num_cells
    codes = store.array("obs/condition")
    assert np.array_equal(codes, np.repeat(np.arange(len(table)), table["num_cells"].to_numpy()))
    assert np.array_equal(store.array("obs/is_control"), table["is_control"].to_numpy()[codes])
    x = store.X[...]
    assert x.dtype == np.float32 and (x >= 0).all()
    # log1p of counts normalized to 1e4 per cell.
    np.testing.assert_allclose(np.expm1(x.astype(np.float64)).sum(1), 1e4, rtol=1e-3)
    truth = json.loads((path / synthetic.STORE_TRUTH).read_text())
    assert {d["condition"] for d in truth["doubles"]} == set(model.truth["condition"])
    assert store.manifest["truth"] == synthetic.STORE_TRUTH
    assert "control_mean" in store.root["stats"]
    with pytest.raises(ValueError, match="already exists"):
        synthetic.write_store(TINY, path)


@pytest.mark.parametrize("mean,theta", [(0.05, 4.0), (0.7, 1.2), (4.0, 4.0), (10.0, 0.8), (40.0, 6.0)])
def test_nb_sampler_matches_the_negative_binomial_law(mean, theta):
    from scipy import stats

    n = 200_000
    rng = np.random.default_rng(12)
    mu = np.full((n // 100, 100), mean, dtype=np.float32)
    pos, counts = synthetic.nb_sparse(mu, np.full(100, theta, dtype=np.float32), rng)
    assert (counts > 0).all() and np.all(np.diff(pos) > 0)
    x = np.zeros(n, dtype=np.int64)
    x[pos] = counts
    law = stats.nbinom(theta, theta / (theta + mean))
    kmax = int(law.ppf(0.999)) + 1
    observed = np.bincount(np.minimum(x, kmax), minlength=kmax + 1)
    expected = np.append(law.pmf(np.arange(kmax)), law.sf(kmax - 1)) * n
    ok = expected > 5
    chi2 = ((observed[ok] - expected[ok]) ** 2 / expected[ok]).sum()
    assert stats.chi2.sf(chi2, ok.sum() - 1) > 1e-3


@pytest.mark.skipif(not _stats_available(), reason="gears_dist.data.stats.write_stats not available yet")
def test_direct_store_matches_ingest_of_the_h5ad(tmp_path, tiny_h5ad):
    """write_store is a shortcut for simulate -> ingest: same layout and tables, statistically the same X."""
    import warnings

    from gears_dist.data.ingest import ingest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the unmeasured perturbed gene is reported by ingest
        via_ingest = ingest(tiny_h5ad, tmp_path / "ingested.zarr")
    synthetic.write_store(TINY, tmp_path / "direct.zarr")
    from gears_dist.data.store import open_store

    direct = open_store(tmp_path / "direct.zarr")
    assert direct.condition_names == via_ingest.condition_names
    assert direct.genes == via_ingest.genes
    for key in ("conditions/num_cells", "conditions/start", "conditions/is_control", "genes/is_perturbed",
                "obs/condition"):
        assert np.array_equal(direct.array(key), via_ingest.array(key)), key
    assert direct.X.chunks == via_ingest.X.chunks
    mean_a, mean_b = direct.array("stats/mean"), via_ingest.array("stats/mean")
    assert np.corrcoef(mean_a.ravel(), mean_b.ravel())[0, 1] > 0.97
    assert sorted(direct.root["stats"].keys()) == sorted(via_ingest.root["stats"].keys())
