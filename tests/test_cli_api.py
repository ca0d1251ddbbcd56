"""Every `gears-dist` subcommand gives the same result as the matching Python call (the CLI is a thin layer over
the API and the typed library functions), and the package has no import cycles.

Each test runs the command through `gears_dist.cli.main` and the call it stands for, and compares what they
produce: AnnData content, store arrays, splits, graphs, predictions and metrics, not mocks. `demo` is the pipeline
of these API calls (gd.ingest, Store.split, Store.build_graphs, gd.train; gears_dist/demo.py) on the 'demo' screen
(minutes) and has no call of its own; tests/test_demo_console.py runs it and loads its run with gd.load_run.
"""

from __future__ import annotations

import ast
import json
import pathlib
import shutil

import numpy as np
import pytest
import yaml
from _cluster_support import tiny_search_config

import gears_dist as gd
from gears_dist.cli import main

PACKAGE = pathlib.Path(gd.__file__).resolve().parent

# the tiny screen perturbs one gene it does not measure; ingest says so, as it should
pytestmark = pytest.mark.filterwarnings("ignore:1 of 12 perturbed genes are not among the measured:UserWarning")


# -- no import cycles -------------------------------------------------------------------------------
def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> gears_dist modules it imports anywhere in its code (module level, in functions, under
    TYPE_CHECKING); ``from a import b`` counts as importing a.b when that is a module, else a."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.split(".")[0] == "gears_dist" else None
                if r and r != m:
                    edges[m].add(r)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


# data <- model <- train <- distributed / tune <- api <- cli; a layer imports only layers below it (or its own).
LAYERS = {"config": 0, "progress": 0, "data": 1, "graphs": 2, "model": 2, "train": 3, "distributed": 4, "evaluate": 5, "tune": 5,
          "api": 6, "demo": 6, "cli": 7}


def test_no_import_cycles_and_layers_point_down():
    edges = _import_graph()
    assert len(edges) > 40 and "gears_dist.cli" in edges["gears_dist.train.__main__"]
    assert _cycles(edges) == []
    assert "gears_dist.cli" not in edges["gears_dist.demo"] and "gears_dist.demo" not in edges["gears_dist.api"]
    upward = []
    for a, targets in edges.items():
        if a == "gears_dist" or a.endswith(".__main__"):  # the root's lazy attributes; entry points call the CLI
            continue
        la = LAYERS[a.split(".")[1]]
        upward += [f"{a} -> {b}" for b in targets if b != "gears_dist" and LAYERS[b.split(".")[1]] > la]
    assert upward == []


def test_argparse_only_in_the_cli():
    users = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "argparse" in p.read_text())
    assert users == ["gears_dist/cli.py"]


# -- simulate ---------------------------------------------------------------------------------------
def test_simulate_h5ad_equals_gd_simulate(tmp_path, capsys):
    import anndata

    assert main(["simulate", str(tmp_path / "s.h5ad"), "--preset", "tiny", "--num-cells", "600", "--seed", "3",
                 "--style", "scperturb", "--workers", "2"]) == 0
    assert "600 cells x 200 genes" in capsys.readouterr().out
    cli = anndata.read_h5ad(tmp_path / "s.h5ad")
    api = gd.simulate("tiny", num_cells=600, seed=3, style="scperturb")
    assert cli.shape == api.shape == (600, 200)
    assert (cli.X != api.X).nnz == 0 and cli.X.sum() > 0
    assert cli.obs.equals(api.obs) and cli.var.equals(api.var)
    assert json.dumps(cli.uns["gears_dist_truth"], default=str, sort_keys=True) == \
        json.dumps(api.uns["gears_dist_truth"], default=str, sort_keys=True)
    # a different seed is a different screen (the comparison can fail)
    assert (gd.simulate("tiny", num_cells=600, seed=4, style="scperturb").X != cli.X).nnz > 0
    # bad sizes name the field, as ValueErrors -> exit 2
    assert main(["simulate", str(tmp_path / "b.h5ad"), "--preset", "tiny", "--num-cells", "-5"]) == 2
    assert "num_cells" in capsys.readouterr().err


def test_simulate_store_has_the_layout_of_ingest_of_gd_simulate(tmp_path):
    """``--format store`` writes the store directly, sampling cells condition by condition: the same screen
    (genes, conditions, cells per condition, planted interactions) and layout as ingesting `gd.simulate`, though
    not the same random draws per cell."""
    from gears_dist.evaluate.pipeline import load_gi_truth

    assert main(["simulate", str(tmp_path / "cli.zarr"), "--preset", "tiny", "--format", "store"]) == 0
    cli = gd.open_store(tmp_path / "cli.zarr")
    api = gd.ingest(gd.simulate("tiny"), tmp_path / "api.zarr")
    assert (cli.num_cells, cli.genes, cli.condition_names) == (api.num_cells, api.genes, api.condition_names)
    assert cli.conditions().equals(api.conditions())
    assert load_gi_truth(cli) == load_gi_truth(api) and len(load_gi_truth(cli)) == 8
    # and it is exactly the store the library call behind the command writes (the same draws)
    from gears_dist.data.synthetic import write_screen

    write_screen(tmp_path / "direct.zarr", "tiny", format="store", num_workers=1)
    direct = gd.open_store(tmp_path / "direct.zarr")
    _same_store(cli, direct)
    for key in ("obs/condition", "obs/cell_type", "obs/cell_id", "genes/is_perturbed", "conditions/cell_type"):
        np.testing.assert_array_equal(cli.array(key), direct.array(key))


# -- ingest -----------------------------------------------------------------------------------------
def _same_store(a, b):
    assert (a.num_cells, a.num_genes, a.chunk_cells) == (b.num_cells, b.num_genes, b.chunk_cells)
    assert a.genes == b.genes and a.condition_names == b.condition_names
    assert a.conditions().equals(b.conditions())
    np.testing.assert_array_equal(a.read_x_rows(0, a.num_cells), b.read_x_rows(0, b.num_cells))
    for key in ("stats/control_mean", "stats/mean", "stats/top_de"):
        np.testing.assert_array_equal(a.array(key), b.array(key))
    for key in ("counts", "normalization"):
        assert a.manifest[key] == b.manifest[key]


@pytest.fixture(scope="module")
def tiny_h5ad(tmp_path_factory):
    from gears_dist.data import synthetic

    path = tmp_path_factory.mktemp("cli_api") / "tiny.h5ad"
    synthetic.write_h5ad(synthetic.preset("tiny"), path, style="scperturb")
    return path


def test_ingest_equals_gd_ingest(tiny_h5ad, tmp_path, capsys):
    flags = ["--hvg", "60", "--chunk-cells", "128", "--control-value", "control", "--separator", "_"]
    assert main(["ingest", str(tiny_h5ad), str(tmp_path / "cli.zarr"), *flags]) == 0
    out = capsys.readouterr()
    assert "ingested 1,500 cells x " in out.out and "gears-dist ingest: warning:" in out.err
    with pytest.warns(UserWarning, match="not among the measured"):
        api = gd.ingest(tiny_h5ad, tmp_path / "api.zarr", hvg=60, chunk_cells=128, control_values="control",
                        separators="_")
    cli = gd.open_store(tmp_path / "cli.zarr")
    _same_store(cli, api)
    assert cli.num_genes < 200 and cli.manifest["source"]["path"] == api.manifest["source"]["path"]
    # other options give another store (the comparison can fail)
    other = gd.ingest(tiny_h5ad, tmp_path / "other.zarr", hvg=40)
    assert other.num_genes != cli.num_genes
    # errors: the same exception text, as exit 2 on the command line
    with pytest.raises(ValueError, match="already exists") as err:
        gd.ingest(tiny_h5ad, tmp_path / "api.zarr")
    assert main(["ingest", str(tiny_h5ad), str(tmp_path / "api.zarr")]) == 2
    assert str(err.value) in capsys.readouterr().err


# -- split ------------------------------------------------------------------------------------------
@pytest.fixture()
def store_copy(tiny_train_store, tmp_path):
    return pathlib.Path(shutil.copytree(tiny_train_store["path"], tmp_path / "store.zarr"))


def test_split_equals_make_split(store_copy, tmp_path, capsys):
    from gears_dist.data.splits import load_split, make_split

    assert main(["split", str(store_copy), "--kind", "simulation", "--seed", "7", "--train-gene-frac", "0.6",
                 "--name", "mine"]) == 0
    assert "saved as splits/mine" in capsys.readouterr().out
    cli = load_split(store_copy, "mine")
    want = make_split(gd.open_store(store_copy).condition_names, "simulation", 7, train_gene_frac=0.6)
    assert (cli.train, cli.val, cli.test, cli.categories) == (want.train, want.val, want.test, want.categories)
    other = make_split(gd.open_store(store_copy).condition_names, "simulation", 8, train_gene_frac=0.6)
    assert (other.train, other.test) != (cli.train, cli.test)
    # a custom split from a file, as given
    names = [n for n in gd.open_store(store_copy).condition_names if n != "ctrl"]
    custom = {"train": ["ctrl", *names[:6]], "val": names[6:8], "test": names[8:]}
    (tmp_path / "custom.json").write_text(json.dumps(custom))
    assert main(["split", str(store_copy), "--kind", "custom", "--custom", str(tmp_path / "custom.json"),
                 "--name", "c"]) == 0
    got = load_split(store_copy, "c")
    want = make_split(gd.open_store(store_copy).condition_names, "custom", 1, custom=custom)
    assert (got.train, got.val, got.test) == (want.train, want.val, want.test)


# -- graph ------------------------------------------------------------------------------------------
def _component_arrays(store, key):
    group = store.component("graphs", key)
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


def test_graph_equals_ensure_graphs(tiny_train_store, tmp_path, capsys):
    from gears_dist.graphs.build import ensure_graphs, ensure_partition
    from gears_dist.graphs.config import GraphConfig

    split = tiny_train_store["split"]
    cli_path = shutil.copytree(tiny_train_store["path"], tmp_path / "cli.zarr")
    api_path = shutil.copytree(tiny_train_store["path"], tmp_path / "api.zarr")
    for p in (cli_path, api_path):  # start from no graphs (the shared store may hold some)
        shutil.rmtree(p / "graphs", ignore_errors=True)
        m = json.loads((p / "manifest.json").read_text())
        m.get("components", {}).pop("graphs", None)
        (p / "manifest.json").write_text(json.dumps(m))
    assert main(["graph", str(cli_path), "--split", split, "--parts", "2", "3", "--method", "contiguous"]) == 0
    assert "GO graph        graphs/" in capsys.readouterr().out

    cfg = GraphConfig()
    api = gd.open_store(api_path, mode="r+")
    bundle = ensure_graphs(api, cfg, split)
    parts = {w: ensure_partition(api, bundle.go, bundle.keys["go"], w, "contiguous", cfg.partition.seed, split)[1]
             for w in (2, 3)}
    cli, api = gd.open_store(cli_path), gd.open_store(api_path)
    assert set(cli.components("graphs")) == set(api.components("graphs")) == {*bundle.keys.values(), *parts.values()}
    for key in api.components("graphs"):
        a, b = _component_arrays(cli, key), _component_arrays(api, key)
        assert a.keys() == b.keys() and a
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{key}/{name}")
    # the library call (what the handler calls) refuses what argparse would
    from gears_dist.graphs.build import build_graphs

    with pytest.raises(ValueError, match="method"):
        build_graphs(cli_path, method="louvain")


# -- predict / evaluate -----------------------------------------------------------------------------
def test_predict_equals_run_predict(saved_model, tmp_path, capsys):
    import anndata

    run_dir, store, nodes = saved_model
    names = [n for n in store.condition_names if n != "ctrl"]
    sets = [next(n for n in names if "+" in n), next(n for n in names if "+" not in n)]
    genes = [g for g in nodes if g in set(store.genes)][:3]
    (tmp_path / "sets.txt").write_text("\n".join(sets) + "\n")
    assert main(["predict", str(run_dir), "--perts-file", str(tmp_path / "sets.txt"), "--all-pairs", *genes,
                 "--out", str(tmp_path / "p.h5ad")]) == 0
    cli = anndata.read_h5ad(tmp_path / "p.h5ad")
    run = gd.load_run(run_dir)
    api = anndata.concat([run.predict(sets), run.predict_pairs(genes)])
    assert list(cli.obs_names) == list(api.obs_names) and list(cli.var_names) == list(api.var_names)
    np.testing.assert_allclose(cli.X, api.X, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cli.layers["delta"], api.layers["delta"], rtol=1e-6, atol=1e-6)
    assert np.abs(api.layers["delta"]).max() > 0
    # csv: the same numbers
    assert main(["predict", str(run_dir), "--perts", *sets, "--out", str(tmp_path / "p.csv")]) == 0
    import pandas as pd

    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv", index_col=0).to_numpy(), api.X[:2], rtol=1e-6)
    # an unknown gene: the same error
    with pytest.raises(ValueError, match="NOT_A_GENE") as err:
        run.predict(["NOT_A_GENE"])
    assert main(["predict", str(run_dir), "--perts", "NOT_A_GENE", "--out", str(tmp_path / "x.h5ad")]) == 2
    assert str(err.value) in capsys.readouterr().err and not (tmp_path / "x.h5ad").exists()


@pytest.mark.parametrize("conditions", ["test", "val"])
def test_evaluate_equals_run_evaluate(saved_model, tmp_path, conditions, capsys):
    import pandas as pd

    run_dir, _, _ = saved_model
    out = tmp_path / "eval"
    assert main(["evaluate", str(run_dir), "--out", str(out), "--conditions", conditions, "--baselines",
                 "additive,control_mean", "--no-mlflow", "--no-figures", "--no-gi"]) == 0
    capsys.readouterr()
    cli = pd.read_csv(out / "metrics.csv")
    api = gd.load_run(run_dir).evaluate(conditions, baselines=["additive", "control_mean"])
    assert set(cli["predictor"]) == set(api["predictor"]) == {"gears", "additive", "control_mean"}
    key = ["predictor", "category"]
    cli, api = cli.set_index(key).sort_index(), api.set_index(key).sort_index()
    assert list(cli.index) == list(api.index)
    numeric = [c for c in api.columns if pd.api.types.is_numeric_dtype(api[c])]
    assert {"mse", "pearson_delta", "num_conditions"} <= set(numeric)
    np.testing.assert_allclose(cli[numeric].to_numpy(float), api[numeric].to_numpy(float), rtol=1e-6, atol=1e-9)
    assert cli.loc[("gears", "all"), "mse"] != cli.loc[("additive", "all"), "mse"]


def test_evaluate_run_is_the_cli_evaluate(saved_model, tmp_path, capsys):
    """The typed library function behind `gears-dist evaluate` (and the demo's evaluation step)."""
    import pandas as pd

    from gears_dist.evaluate.commands import evaluate_run

    run_dir, _, _ = saved_model
    result = evaluate_run(run_dir, out=tmp_path / "e", baselines=["train_mean"], mlflow=False, figures=False,
                          gi=False)
    assert "train_mean" in capsys.readouterr().out
    assert result["out"] == tmp_path / "e" and result["files"]["csv"].is_file() and result["mlflow_run_id"] is None
    pd.testing.assert_frame_equal(result["table"].reset_index(drop=True),
                                  pd.read_csv(result["files"]["csv"]).reset_index(drop=True), check_dtype=False,
                                  rtol=1e-6)
    with pytest.raises(ValueError, match="conditions"):
        evaluate_run(run_dir, conditions="train", out=tmp_path / "x")
    with pytest.raises(TypeError, match="baselines"):
        evaluate_run(run_dir, baselines="additive", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- train ------------------------------------------------------------------------------------------
def test_train_config_equals_resolve_config(tmp_path, monkeypatch, capsys):
    """`gears-dist train --config C --set F=V` trains the config `gd.resolve_config(C, {F: V})` gives (the
    launcher records what it receives instead of starting Ray)."""
    from gears_dist.api import resolve_config
    from gears_dist.config import to_dict
    from gears_dist.distributed import launcher

    seen = []
    monkeypatch.setattr(launcher, "cli_train", lambda cfg, store, **kw: seen.append((cfg, store, kw)) or 0)
    sets = {"train.epochs": 3, "model.hidden_size": 12, "optim.lr": 0.002, "model.prior": "go",
            "data.loader.batch_size": 16}
    argv = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    for config in ("demo", str(pathlib.Path(__file__).parents[1] / "configs" / "demo.yaml")):
        assert main(["train", "st.zarr", "--config", config, "--out", str(tmp_path / "r"), *argv]) == 0
        cfg, store, kw = seen.pop()
        assert to_dict(cfg) == to_dict(resolve_config(config, sets))
        assert to_dict(cfg) != to_dict(resolve_config(config))
        assert (store, kw["out"], kw["resume"]) == ("st.zarr", str(tmp_path / "r"), False)
    assert main(["train", "st.zarr", "--config", "demo", "--set", "model.hiden_size=3"]) == 2
    err = capsys.readouterr().err
    with pytest.raises(ValueError) as exc:
        resolve_config("demo", {"model.hiden_size": 3})
    assert str(exc.value) in err


def test_train_equals_gd_train(tiny_train_store, tmp_path, own_ray, capsys):
    """`gears-dist train` (always under Ray) and `gd.train` (one worker: in this process, no Ray) are the same run,
    bit for bit: the same per-epoch losses, final metrics and saved weights."""
    import torch

    import gears_dist as gd

    cfg = {"name": "cli_api_train", "seed": 3, "train": {"epochs": 2, "log_every": 1000, "max_steps_per_epoch": 4},
           "data": {"split": tiny_train_store["split"],
                    "loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
           "model": {"hidden_size": 8}, "tracking": {"enabled": False}, "scaling": {"num_workers": 1}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tiny_train_store["path"]), "--config", str(path), "--out", str(tmp_path / "cli")]) == 0
    run = gd.train(tiny_train_store["path"], str(path), out=tmp_path / "api")
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert [h["train_loss"] for h in cli["history"]] == [h["train_loss"] for h in run.summary["history"]]
    assert cli["final"] == run.summary["final"]
    a, b = (torch.load(p / "model" / "model.pt", weights_only=True) for p in (tmp_path / "cli", tmp_path / "api"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_python_m_train_errors_exit_2(tiny_train_store, tmp_path, capsys):
    from gears_dist.cli import train_single_main

    assert train_single_main([str(tiny_train_store["path"]), "--config", str(tmp_path / "none.yaml"), "--out",
                              str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("python -m gears_dist.train: error:")
    assert not (tmp_path / "r").exists()


# -- tune -------------------------------------------------------------------------------------------
TINY_SEARCH = tiny_search_config("cli_api_search", "cli_api_tune")


@pytest.fixture()
def own_ray():
    """A Ray of the test's own, stopped after it: a search's Ray Train runs can leave placement groups reserved on
    the Ray they ran on (see tests/test_tune.py), which the next Ray user of this module must not inherit."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_tune_equals_gd_tune(tiny_train_store, tmp_path, own_ray, capsys):
    """`gears-dist tune STORE --config S.yaml` runs the search `gd.tune(STORE, S)` runs: the seeded searcher
    proposes the same trial configs, which train (one seeded CPU worker) to the same metrics. One trial, one
    epoch of 6 steps each, on one copy of the tiny store (its graphs built by the first search)."""
    import warnings

    import yaml

    store = shutil.copytree(tiny_train_store["path"], tmp_path / "store.zarr")
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(TINY_SEARCH))
    argv = ["tune", str(store), "--config", str(tmp_path / "search.yaml")]
    # errors first (before Ray starts): the same exception text, as exit 2 on the command line
    with pytest.raises(ValueError, match="holds no search") as err:
        gd.tune(store, TINY_SEARCH, out=tmp_path / "none", resume=True)
    assert main([*argv, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert str(err.value) in capsys.readouterr().err

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
        api = gd.tune(store, TINY_SEARCH, out=tmp_path / "api")
    assert "MLflow parent run" in capsys.readouterr().out
    cli = gd.TuneResult(tmp_path / "cli")
    same = ["status", "epochs", "best_epoch", "optim.lr"]
    assert list(cli.trials.columns) == list(api.trials.columns) and len(api.trials) == 1
    assert cli.trials[same].to_dict("records") == api.trials[same].to_dict("records")
    assert (api.trials["status"] == "completed").all()
    np.testing.assert_allclose(cli.trials["best"].to_numpy(float), api.trials["best"].to_numpy(float), rtol=1e-5)
    assert cli.best["params"] == api.best["params"] and cli.best["value"] == pytest.approx(api.best["value"], rel=1e-5)
    assert cli.best_config.optim.lr == api.best_config.optim.lr and cli.best_config.model.hidden_size == 8
    # two searches, two MLflow parent runs (each search directory has its own tracking store)
    assert cli.mlflow_parent_run_id != api.mlflow_parent_run_id
    assert cli.mlflow_tracking_uri != api.mlflow_tracking_uri
    # what gd.tune returns (this is the package's one real API search: one Ray Tune trial costs ~1 min of CI)
    import mlflow

    assert isinstance(api, gd.TuneResult) and api.path == tmp_path / "api"
    assert api.summary == json.loads((tmp_path / "api" / "summary.json").read_text())
    assert np.isfinite(api.trials["best"].iloc[0]) and 1e-3 <= api.trials["optim.lr"].iloc[0] <= 1e-2
    assert api.best["value"] == pytest.approx(api.trials["best"].iloc[0])
    assert api.best_config.optim.lr == pytest.approx(api.trials["optim.lr"].iloc[0])
    client = mlflow.MlflowClient(tracking_uri=api.mlflow_tracking_uri)
    assert client.get_run(api.mlflow_parent_run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="already holds search"):
        gd.tune(store, TINY_SEARCH, out=tmp_path / "api")


# -- multisplit -------------------------------------------------------------------------------------
MULTISPLIT = {"name": "ms", "seed": 0, "train": {"epochs": 3, "log_every": 1000, "max_steps_per_epoch": 6},
              "data": {"loader": {"batch_size": 32, "buffer_chunks": 4, "control_pool_cells": 256}},
              "model": {"hidden_size": 8}, "sharding": {"mode": "random"}, "tracking": {"enabled": False}}


def test_multisplit_equals_run_multisplit(tiny_train_store, tmp_path, own_ray, capsys):
    """`gears-dist multisplit STORE --config C --epochs 1 ...` is `run_multisplit(STORE, C with train.epochs 1,
    ...)`: the same splits (seeds), the same per-split table (the baseline's numbers and each seeded run's). One
    variant, 2 splits, 1 epoch of 6 steps, each on its own copy of the tiny store (its splits built by each)."""
    import pandas as pd
    import yaml

    from gears_dist.config import deep_merge
    from gears_dist.data.splits import load_split
    from gears_dist.evaluate.multisplit import run_multisplit
    from gears_dist.train.config import run_config_from_dict

    stores = {k: shutil.copytree(tiny_train_store["path"], tmp_path / f"{k}.zarr") for k in ("cli", "api")}
    (tmp_path / "ms.yaml").write_text(yaml.safe_dump(MULTISPLIT))
    flags = ["--config", str(tmp_path / "ms.yaml"), "--epochs", "1", "--variants", "reference", "--baselines",
             "train_mean", "--parallel", "2"]
    cfg = run_config_from_dict(deep_merge(MULTISPLIT, {"train": {"epochs": 1}}))
    # errors: the same exception text, as exit 2 on the command line
    with pytest.raises(ValueError, match="distinct split seeds") as err:
        run_multisplit(stores["api"], cfg, tmp_path / "x", seeds=[1, 1])
    assert main(["multisplit", str(stores["cli"]), *flags, "--seeds", "1", "1", "--out", str(tmp_path / "x")]) == 2
    assert str(err.value) in capsys.readouterr().err

    assert main(["multisplit", str(stores["cli"]), *flags, "--seeds", "1", "2", "--out", str(tmp_path / "cli")]) == 0
    assert "± " in capsys.readouterr().out
    api = run_multisplit(stores["api"], cfg, tmp_path / "api", seeds=[1, 2], variants=["reference"],
                         baselines=["train_mean"], max_parallel=2)
    capsys.readouterr()
    cli_store, api_store = gd.open_store(stores["cli"]), gd.open_store(stores["api"])
    assert set(cli_store.components("splits")) == set(api_store.components("splits"))
    for key in api_store.components("splits"):
        a, b = load_split(cli_store, key), load_split(api_store, key)
        assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    key = ["predictor", "category", "split_seed"]
    cli = pd.read_csv(tmp_path / "cli" / "per_split.csv").set_index(key).sort_index()
    want = api["per_split"].set_index(key).sort_index()
    assert list(cli.index) == list(want.index) and {"reference", "train_mean"} <= set(cli.index.get_level_values(0))
    numeric = [c for c in want.columns if pd.api.types.is_numeric_dtype(want[c]) and c in cli.columns]
    assert {"mse", "pearson_delta", "num_conditions"} <= set(numeric)
    np.testing.assert_allclose(cli[numeric].to_numpy(float), want[numeric].to_numpy(float), rtol=1e-5, atol=1e-8)
    summary, cols = pd.read_csv(tmp_path / "cli" / "summary.csv"), ["predictor", "category", "num_splits"]
    assert summary.shape == api["summary"].shape and (summary["num_splits"] <= 2).all()
    assert summary[cols].to_dict("records") == api["summary"][cols].to_dict("records")
