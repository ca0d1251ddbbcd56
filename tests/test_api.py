"""The notebook API (gears_dist.api, ``import gears_dist as gd``): simulate -> ingest -> train -> predict /
evaluate, on the tiny screen, in process (no Ray), plus its input checks."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from _cluster_support import tiny_search_config

import gears_dist as gd
from gears_dist.config import ConfigError

# the tiny screen perturbs one gene it does not measure; ingest says so, as it should
pytestmark = pytest.mark.filterwarnings("ignore:1 of 12 perturbed genes are not among the measured:UserWarning")

# 1 epoch, hidden 8, batch 32, MLflow on: trains on the tiny store in seconds.
SMALL = {"name": "api", "seed": 3, "train": {"epochs": 1, "log_every": 1000},
         "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
         "model": {"hidden_size": 8}, "tracking": {"enabled": True}}


def test_import_is_cheap_and_lazy():
    code = ("import sys, gears_dist as gd; heavy = [m for m in ('torch', 'ray', 'zarr', 'anndata', 'gears_dist.api') "
            "if m in sys.modules]; assert not heavy, heavy; assert callable(gd.train) and gd.Run.__name__ == 'Run'; "
            "assert {'ingest', 'open_store', 'describe', 'simulate', 'train', 'load_run', 'Run'} <= set(dir(gd)); "
            "assert gd.__version__")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_is_both_the_function_and_the_package():
    """gears_dist.train is a subpackage; it is made callable so that gd.train survives its import."""
    import inspect

    import gears_dist.train.loop as loop_module
    from gears_dist.train import config as config_module

    assert callable(gd.train) and gd.train.loop is loop_module and gd.train.config is config_module
    assert "num_workers" in inspect.signature(gd.train).parameters
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gd.nope  # noqa: B018


@pytest.fixture(scope="module")
def tiny_adata():
    return gd.simulate("tiny")


def test_simulate_returns_anndata(tiny_adata):
    import anndata

    assert isinstance(tiny_adata, anndata.AnnData)
    assert tiny_adata.shape == (1500, 200)
    assert "ctrl" in set(tiny_adata.obs["condition"])
    assert gd.simulate("tiny", num_cells=600).n_obs == 600
    with pytest.raises(ConfigError, match="num_celss"):
        gd.simulate("tiny", num_celss=600)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        gd.simulate("huge")
    with pytest.raises(TypeError, match="preset"):
        gd.simulate(3)


def _same_store(a, b):
    assert (a.num_cells, a.num_genes) == (b.num_cells, b.num_genes)
    assert a.genes == b.genes
    assert a.condition_names == b.condition_names
    assert a.conditions().equals(b.conditions())
    np.testing.assert_array_equal(a.read_x_rows(0, a.num_cells), b.read_x_rows(0, b.num_cells))


def test_ingest_in_memory_equals_cli_ingest_of_h5ad(tiny_adata, tmp_path):
    from gears_dist.cli import main

    store = gd.ingest(tiny_adata, tmp_path / "mem.zarr")
    # the temporary .h5ad is gone, and the manifest names no deleted file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.zarr"]
    assert store.manifest["source"]["path"] is None and store.manifest["source"]["in_memory"]
    tiny_adata.write_h5ad(tmp_path / "screen.h5ad")
    assert main(["ingest", str(tmp_path / "screen.h5ad"), str(tmp_path / "cli.zarr")]) == 0
    cli = gd.open_store(tmp_path / "cli.zarr")
    _same_store(store, cli)
    # the planted interactions travel into the store (what evaluate's GI scoring reads)
    from gears_dist.evaluate.pipeline import load_gi_truth

    truth = load_gi_truth(store)
    assert len(truth) == 8 and set(truth) <= set(store.condition_names)
    text = gd.describe(store)
    assert "1,500" in text and "200 measured" in text and "21:" in text and "splits      none" in text


def test_ingest_path_and_backed(tiny_adata, tmp_path):
    import anndata

    tiny_adata.write_h5ad(tmp_path / "screen.h5ad")
    by_path = gd.ingest(tmp_path / "screen.h5ad", tmp_path / "p.zarr", control_values="ctrl")
    backed = anndata.read_h5ad(tmp_path / "screen.h5ad", backed="r")
    no_copy = gd.ingest(backed, tmp_path / "b.zarr")
    assert no_copy.manifest["source"]["path"] == str((tmp_path / "screen.h5ad").resolve())
    _same_store(by_path, no_copy)
    view = gd.ingest(backed[backed.obs["condition"].isin(["ctrl", "GHR+ctrl"])], tmp_path / "v.zarr")
    assert view.condition_names == ["ctrl", "GHR"]
    with pytest.raises(ValueError, match="already exists"):
        gd.ingest(tiny_adata, tmp_path / "p.zarr")
    with pytest.raises(TypeError, match="source: expected a path to an .h5ad file or an anndata.AnnData"):
        gd.ingest(np.zeros((3, 3)), tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="condition column 'nope' not found"):
        gd.ingest(tiny_adata, tmp_path / "x.zarr", condition_key="nope")
    assert not (tmp_path / "x.zarr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zarr", "p.zarr", "screen.h5ad", "v.zarr"]


# -- configs ---------------------------------------------------------------------------------------
def test_config_forms_and_overrides(tmp_path):
    from gears_dist.api import resolve_config
    from gears_dist.train.config import RunConfig

    demo = resolve_config("demo", {"train.epochs": 2}, model__prior="none", model__hidden_size=8)
    assert (demo.name, demo.train.epochs, demo.model.prior, demo.model.hidden_size) == ("demo", 2, "none", 8)
    assert demo.scaling.num_workers == 2  # from configs/demo.yaml
    path = tmp_path / "c.yaml"
    path.write_text("name: fromfile\ntrain: {epochs: 5}\n")
    assert resolve_config(path, train__epochs=1).train.epochs == 1
    base = resolve_config(SMALL)
    again = resolve_config(base, optim__lr=1e-2)
    assert again.optim.lr == 1e-2 and base.optim.lr != 1e-2  # the RunConfig given is not modified
    assert isinstance(again, RunConfig)
    assert resolve_config(SMALL, deepspeed__extra__anything=1).deepspeed.extra == {"anything": 1}


def test_bad_config_errors(tiny_train_store, tmp_path):
    from gears_dist.api import resolve_config

    with pytest.raises(ConfigError, match=r"'train\.epoch'.*no field 'epoch'.*train\.epochs"):
        resolve_config(SMALL, train__epoch=2)
    with pytest.raises(ConfigError, match=r"'epochs'.*did you mean 'train\.epochs' \(keyword train__epochs\)"):
        resolve_config(SMALL, epochs=2)
    with pytest.raises(ConfigError, match=r"'model\.hiden_size'"):
        resolve_config(SMALL, overrides={"model.hiden_size": 8})
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, received 'two'"):
        resolve_config(SMALL, train__epochs="two")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim\.learning_rate'\]"):
        resolve_config({**SMALL, "optim": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="neither a YAML file nor a preset.*demo"):
        resolve_config("no_such_preset")
    for bad in (3, ["demo"], None):
        with pytest.raises(TypeError, match=r"config: expected a preset name \(str\), a YAML path, a dict or a "
                                            r"RunConfig, received"):
            gd.train(tiny_train_store["path"], config=bad, out=tmp_path / "never")
    with pytest.raises(TypeError, match="overrides: expected a dict"):
        resolve_config(SMALL, overrides=[("train.epochs", 2)])
    with pytest.raises(ConfigError, match="train__epoch|train.epoch"):
        gd.train(tiny_train_store["path"], SMALL, out=tmp_path / "never", train__epoch=2)
    with pytest.raises(ValueError, match="use_ray=False"):
        gd.train(tiny_train_store["path"], SMALL, out=tmp_path / "never", num_workers=2, use_ray=False)
    assert not (tmp_path / "never").exists()


# -- a trained run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tiny_train_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("api_run")
    store = shutil.copytree(tiny_train_store["path"], root / "store.zarr")
    return gd.train(store, SMALL, out=root / "run", num_workers=1, data__split=tiny_train_store["split"])


def _sets(run):
    names = [n for n in gd.open_store(run.predictor().store.path).condition_names if n != "ctrl"]
    pair = next(n for n in names if "+" in n)
    single = next(n for n in names if "+" not in n and n not in pair.split("+"))
    return [pair, single]


def test_train_returns_run(run, tiny_train_store):
    assert isinstance(run, gd.Run)
    assert len(run.history) == 1 and "train_loss" in run.history.columns and run.history.index.name == "epoch"
    assert run.config.model.hidden_size == 8 and run.config.data.loader.batch_size == 32
    assert run.config.scaling.num_workers == 1
    assert run.summary["split"] == tiny_train_store["split"]
    assert run.mlflow_run_id and run.mlflow_run_id == run.summary["mlflow_run_id"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=run.mlflow_tracking_uri)
    assert client.get_run(run.mlflow_run_id).info.status == "FINISHED"
    assert "epochs=1" in repr(run)
    with pytest.raises(ValueError, match="already holds a run"):
        gd.train(run.predictor().store.path, SMALL, out=run.path)


def test_predict(run, tmp_path):
    import anndata

    from gears_dist.evaluate.predict import TrainedPredictor

    sets = _sets(run)
    pred = run.predict(sets)
    assert isinstance(pred, anndata.AnnData)
    assert list(pred.obs_names) == sets and list(pred.obs["num_genes"]) == [2, 1]
    store = run.predictor().store
    assert list(pred.var_names) == store.genes
    assert set(pred.layers) == {"delta"}
    assert pred.uns["gears_dist"]["mlflow_run_id"] == run.mlflow_run_id
    reference = TrainedPredictor.load(run.path)
    np.testing.assert_allclose(pred.X, reference(sets), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pred.layers["delta"], reference.predict_delta(sets), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pred.X - pred.layers["delta"], np.broadcast_to(reference.control_mean, pred.shape),
                               rtol=1e-5, atol=1e-5)
    pred.write_h5ad(tmp_path / "pred.h5ad")  # uns holds only what .h5ad can store
    # the same run, opened again
    again = gd.load_run(run.path).predict(sets)
    np.testing.assert_array_equal(again.X, pred.X)
    # one string is one set; tuples of genes work too
    a, b = sets[0].split("+")
    assert list(run.predict(sets[0]).obs_names) == [sets[0]]
    assert list(run.predict([(b, a)]).obs_names) == [sets[0]]
    pairs = run.predict_pairs([a, b, sets[1]])
    assert pairs.n_obs == 3 and all("+" in n for n in pairs.obs_names)


def test_predict_errors(run):
    with pytest.raises(ValueError, match="NOT_A_GENE"):
        run.predict(["NOT_A_GENE", _sets(run)[1]])
    with pytest.raises(ValueError, match="at least one set"):
        run.predict([])
    with pytest.raises(TypeError, match="perturbations"):
        run.predict(5)
    with pytest.raises(TypeError, match="genes: expected a list"):
        run.predict_pairs("AB")


def test_evaluate(run):
    import pandas as pd

    table = run.evaluate()
    assert isinstance(table, pd.DataFrame)
    assert {"gears", "control_mean", "train_mean", "additive", "linear", "go_prior"} == set(table["predictor"])
    assert {"predictor", "category", "num_conditions", "mse", "pearson_delta"} <= set(table.columns)
    assert "all" in set(table["category"])
    # the training's own test evaluation and the evaluation pipeline agree (as for gears-dist evaluate)
    ours = table.set_index(["predictor", "category"]).loc[("gears", "all"), "mse"]
    assert ours == pytest.approx(run.summary["final"]["test_mse"], rel=1e-3)
    only = run.evaluate("val", baselines="additive")
    assert set(only["predictor"]) == {"gears", "additive"}
    with pytest.raises(ValueError, match="unknown baseline"):
        run.evaluate(baselines=["nope"])


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gd.load_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a gears_dist run directory"):
        gd.load_run(tmp_path)
    with pytest.raises(TypeError, match="path"):
        gd.load_run(3)


def test_describe_trained_store(run, tiny_train_store):
    text = gd.describe(run.predictor().store.path)
    assert tiny_train_store["split"] in text and "go graph" in text and "coexpression graph" in text


# -- store.split / store.build_graphs: the CLI's split and graph ------------------------------------
def _fresh_store_copy(tiny_train_store, dest):
    """A copy of the tiny store without its splits and graphs."""
    import json

    path = shutil.copytree(tiny_train_store["path"], dest)
    for kind in ("splits", "graphs"):
        shutil.rmtree(path / kind, ignore_errors=True)
    m = json.loads((path / "manifest.json").read_text())
    m["components"] = {}
    (path / "manifest.json").write_text(json.dumps(m))
    return path


def _arrays(store, kind, key):
    return {name: np.asarray(arr[...]) for name, arr in store.component(kind, key).arrays()}


def test_store_split_equals_cli_split(tiny_train_store, tmp_path, capsys):
    import json

    from gears_dist.cli import main
    from gears_dist.data.splits import load_split, make_split

    cli_path = _fresh_store_copy(tiny_train_store, tmp_path / "cli.zarr")
    api_path = _fresh_store_copy(tiny_train_store, tmp_path / "api.zarr")
    assert main(["split", str(cli_path), "--kind", "simulation", "--seed", "7", "--train-gene-frac", "0.6",
                 "--name", "mine"]) == 0
    capsys.readouterr()
    store = gd.open_store(api_path)  # mode 'r': the method writes anyway, like the command
    assert isinstance(store, gd.Store) and "splits=[]" in repr(store)
    split = store.split("simulation", 7, name="mine", train_gene_frac=0.6)
    assert split.key == "mine"
    cli = gd.open_store(cli_path)
    assert split == load_split(cli, "mine") == make_split(cli.condition_names, "simulation", 7, train_gene_frac=0.6)
    np.testing.assert_array_equal(_arrays(store, "splits", "mine")["code"], _arrays(cli, "splits", "mine")["code"])
    assert store.components("splits") == cli.components("splits")
    assert gd.open_store(api_path).components("splits") == cli.components("splits")  # on disk, not only in memory
    # the store's repr and describe list it
    assert "splits=['mine']" in repr(store) and "mine: simulation seed 7" in gd.describe(store)
    # the default key is the one training looks for; another seed is another split (the comparison can fail)
    other = store.split(seed=8)
    assert other.key == "simulation_seed8" and (other.train, other.test) != (split.train, split.test)
    # making the same split again returns it; a different one under the same key needs overwrite=True
    assert store.split("simulation", 7, name="mine", train_gene_frac=0.6) == split
    with pytest.raises(ValueError, match="already has a different split 'mine'.*overwrite=True"):
        store.split("simulation", 8, name="mine")
    assert store.split("simulation", 8, name="mine", overwrite=True) == other
    # a custom split, as a dict or as the CLI's JSON file
    names = [n for n in store.condition_names if n != "ctrl"]
    custom = {"train": ["ctrl", *names[:6]], "val": names[6:8], "test": names[8:]}
    (tmp_path / "custom.json").write_text(json.dumps(custom))
    assert main(["split", str(cli_path), "--kind", "custom", "--custom", str(tmp_path / "custom.json"),
                 "--name", "c"]) == 0
    got = store.split("custom", custom=custom, name="c")
    assert got == load_split(cli_path, "c") == store.split("custom", custom=tmp_path / "custom.json", name="c")
    # errors
    with pytest.raises(ValueError, match="unknown split kind 'nope'"):
        store.split("nope")
    with pytest.raises(ValueError, match="train_gene_frac"):
        store.split(seed=9, train_gene_frac=1.5)
    with pytest.raises(TypeError, match="seed"):
        store.split(seed="1")
    with pytest.raises(ValueError, match="only used with kind='custom'"):
        store.split(custom=custom)
    with pytest.raises(ValueError, match="kind='custom' needs custom="):
        store.split("custom")


def test_store_build_graphs_equals_cli_graph(tiny_train_store, tmp_path, capsys):
    from gears_dist.cli import main
    from gears_dist.graphs.build import load_graph
    from gears_dist.graphs.config import GraphConfig

    cli_path = _fresh_store_copy(tiny_train_store, tmp_path / "cli.zarr")
    api_path = _fresh_store_copy(tiny_train_store, tmp_path / "api.zarr")
    assert main(["split", str(cli_path)]) == 0
    assert main(["graph", str(cli_path), "--split", "simulation_seed1", "--parts", "2", "3",
                 "--method", "contiguous"]) == 0
    capsys.readouterr()
    store = gd.open_store(api_path)
    split = store.split()
    bundle = store.build_graphs(split=split, parts=[2, 3], method="contiguous")
    assert capsys.readouterr().out == ""  # the API does not print
    cli = gd.open_store(cli_path)
    assert set(store.components("graphs")) == set(cli.components("graphs")) == set(bundle.keys.values())
    assert set(bundle.keys) == {"go", "coexpr", "part_W2", "part_W3"}
    for key in cli.components("graphs"):
        a, b = _arrays(cli, "graphs", key), _arrays(store, "graphs", key)
        assert a.keys() == b.keys() and a
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{key}/{name}")
    assert bundle.go.nodes == load_graph(cli, bundle.keys["go"]).nodes
    assert bundle.coexpr.num_edges == load_graph(cli, bundle.keys["coexpr"]).num_edges > 0
    assert bundle.keys["coexpr"] in repr(store) and "go graph" in gd.describe(store)
    # stored graphs are loaded, not rebuilt; a split key works as well as the Split
    again = store.build_graphs(split="simulation_seed1", parts=[2, 3], method="contiguous")
    assert again.keys == bundle.keys and again.go.nodes == bundle.go.nodes
    # the graphs section of a training config (here: a different co-expression threshold -> another key)
    other = store.build_graphs({"graphs": {"coexpr": {"threshold": 0.2}}}, split=split, parts=[2])
    assert other.keys["coexpr"] != bundle.keys["coexpr"] and other.keys["go"] == bundle.keys["go"]
    assert store.build_graphs(GraphConfig(), split=split, parts=[2]).keys["coexpr"] == bundle.keys["coexpr"]
    # errors
    with pytest.raises(ValueError, match="has no split 'nope'"):
        store.build_graphs(split="nope")
    with pytest.raises(ValueError, match="method"):
        store.build_graphs(split=split, method="louvain")
    with pytest.raises(ValueError, match="not saved in a store"):
        from gears_dist.data.splits import make_split

        store.build_graphs(split=make_split(store.condition_names, "simulation", 1))
    with pytest.raises(ConfigError, match="coexpr.nope"):
        store.build_graphs({"coexpr": {"nope": 1}})
    with pytest.raises(TypeError, match="split"):
        store.build_graphs(split=3)


# -- gd.tune -----------------------------------------------------------------------------------------
TINY_SEARCH = tiny_search_config("api_search", "api_tune_test")


def test_tune_is_exported_and_the_package_still_imports():
    import inspect

    import gears_dist.tune.search as search_module
    from gears_dist.tune import config as config_module

    assert callable(gd.tune) and gd.tune.search is search_module and gd.tune.config is config_module
    params = inspect.signature(gd.tune).parameters
    assert {"store", "search_config", "out", "address", "resume", "overrides"} <= set(params)
    assert {"tune", "Store", "TuneResult"} <= set(dir(gd)) and gd.TuneResult.__name__ == "TuneResult"


def test_resolve_search_config_forms_and_overrides(tmp_path):
    import yaml

    from gears_dist.api import resolve_search_config
    from gears_dist.config import CONFIGS
    from gears_dist.tune.config import TuneConfig, load_tune_config

    preset = load_tune_config(CONFIGS / "tune_demo.yaml")
    for form in ("tune_demo", "demo", CONFIGS / "tune_demo.yaml", str(CONFIGS / "tune_demo.yaml"), preset):
        assert resolve_search_config(form) == preset, form
    assert resolve_search_config(preset) is preset
    # overrides: plain fields, sections merged, whole fields replaced
    got = resolve_search_config("tune_demo", num_trials=2, scheduler__max_epochs=2, resources={"cpus_per_worker": 2},
                                space={"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
                                points_to_evaluate=[])
    assert got.num_trials == 2 and got.scheduler.max_epochs == 2 and got.scheduler.kind == preset.scheduler.kind
    assert got.resources.cpus_per_worker == 2 and got.resources.num_workers == preset.resources.num_workers
    assert list(got.space) == ["optim.lr"] and preset.num_trials == 8 and len(preset.space) > 1  # not modified
    assert resolve_search_config(preset, num_trials=3).num_trials == 3 and preset.num_trials == 8
    # a dict, with the base training config inline; and the same as a YAML file
    tc = resolve_search_config(TINY_SEARCH)
    assert isinstance(tc, TuneConfig) and tc.base_run_dict()["model"]["hidden_size"] == 8
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(TINY_SEARCH))
    assert to_plain(resolve_search_config(tmp_path / "s.yaml")) == to_plain(tc)
    # errors name the field
    with pytest.raises(ConfigError, match="num_trial.*did you mean 'num_trials'"):
        resolve_search_config("tune_demo", num_trial=2)
    with pytest.raises(ConfigError, match="scheduler.max_epoch"):
        resolve_search_config("tune_demo", scheduler__max_epoch=2)
    with pytest.raises(ConfigError, match="num_trials"):
        resolve_search_config("tune_demo", num_trials=0)
    with pytest.raises(ConfigError, match="'base' is 'demo.yaml', not a section"):
        resolve_search_config("tune_demo", base__train__epochs=2)
    with pytest.raises(ValueError, match="neither a YAML file nor a search preset.*tune_demo"):
        resolve_search_config("nope")
    with pytest.raises(TypeError, match="search_config"):
        resolve_search_config(3)


def to_plain(tc):
    from gears_dist.config import to_dict

    return {k: v for k, v in to_dict(tc).items() if k != "source_dir"}


def test_tune_checks_arguments_before_searching(tiny_train_store, tmp_path):
    from gears_dist.data.store import StoreError

    with pytest.raises(StoreError):
        gd.tune(tmp_path / "no_store.zarr", TINY_SEARCH, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="num_trial"):
        gd.tune(tiny_train_store["path"], TINY_SEARCH, out=tmp_path / "b", num_trial=2)
    with pytest.raises(TypeError, match="address"):
        gd.tune(tiny_train_store["path"], TINY_SEARCH, out=tmp_path / "c", address=5)
    with pytest.raises(TypeError, match="search_config"):
        gd.tune(tiny_train_store["path"], None, out=tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_tune_result_reads_a_search_directory(tmp_path):
    import json

    import yaml

    out = tmp_path / "search"
    (out / "best").mkdir(parents=True)
    (out / "best" / "config.yaml").write_text(yaml.safe_dump({"name": "s-best", "model": {"hidden_size": 16}}))
    trials = [{"rank": 1, "trial_id": "b", "status": "completed", "epochs": 2, "best": 0.1, "best_epoch": 1,
               "last": 0.1, "params": {"optim.lr": 3e-3}, "checkpoint": None, "error": None},
              {"rank": 2, "trial_id": "a", "status": "failed", "epochs": 0, "best": None, "best_epoch": None,
               "last": None, "params": {"optim.lr": 1.0}, "checkpoint": None, "error": "ValueError: x"}]
    best = {"trial_id": "b", "value": 0.1, "config": str(out / "best" / "config.yaml"),
            "trial_dir": str(out / "trials" / "b")}
    (out / "summary.json").write_text(json.dumps({"name": "s", "metric": "val_mse_de", "mode": "min", "num_trials": 2,
                                                  "trials": trials, "best": best, "parent_run_id": "p",
                                                  "tracking_uri": "sqlite:///x"}))
    result = gd.TuneResult(out)
    df = result.trials
    assert list(df.index) == [1, 2] and list(df["trial_id"]) == ["b", "a"] and list(df["optim.lr"]) == [3e-3, 1.0]
    assert list(df["status"]) == ["completed", "failed"]
    assert result.best["trial_id"] == "b" and result.best_config.model.hidden_size == 16
    assert result.mlflow_parent_run_id == "p" and not result.interrupted
    assert "best_trial='b'" in repr(result)
    with pytest.raises(ValueError, match="no finished search"):
        gd.TuneResult(tmp_path)


