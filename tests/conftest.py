import os
import pathlib

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The launcher's Ray Train settings for a local Ray (~5 s less idle time per run), here also for the clusters the
# tests start themselves (multi-node, SLURM, job submission), whose processes inherit this environment.
from gears_dist.distributed.launcher import _LOCAL_TRAIN_ENV

for _k, _v in _LOCAL_TRAIN_ENV.items():
    os.environ.setdefault(_k, _v)

REPO = pathlib.Path(__file__).resolve().parents[1]
NORMAN_SUBSET = REPO / "tests" / "data" / "norman19_k562_subset.h5ad"  # vendored: tests/data/SOURCES.md


@pytest.fixture(scope="session")
def norman_path() -> pathlib.Path:
    if not NORMAN_SUBSET.is_file():
        pytest.skip(f"real Norman subset not found at {NORMAN_SUBSET} (vendored in tests/data/)")
    return NORMAN_SUBSET


@pytest.fixture(scope="session")
def tiny_train_store(tmp_path_factory):
    """The 'tiny' synthetic screen through the real pipeline (h5ad -> ingest -> split -> graphs), with
    small X chunks (64 cells) so that the loader has many chunks. Shared: treat it as read-only (training
    may add partition components, which is idempotent)."""
    from gears_dist.data import ingest, splits, synthetic
    from gears_dist.graphs.build import ensure_graphs
    from gears_dist.graphs.config import GraphConfig

    root = tmp_path_factory.mktemp("tiny_train")
    synthetic.write_h5ad(synthetic.preset("tiny"), root / "tiny.h5ad")
    ingest.ingest(root / "tiny.h5ad", root / "tiny.zarr", chunk_cells=64)
    key = splits.make_and_save_split(root / "tiny.zarr", kind="simulation", seed=1)
    ensure_graphs(root / "tiny.zarr", GraphConfig(), key)
    return {"path": root / "tiny.zarr", "split": key}


@pytest.fixture(scope="session")
def tiny_doubles_store(tmp_path_factory):
    """The 'tiny' synthetic store written directly (20 doubles) and its simulation split (seed 1), not saved in
    the store. Shared: read-only."""
    from gears_dist.data import synthetic
    from gears_dist.data.splits import make_split
    from gears_dist.data.store import open_store

    path = tmp_path_factory.mktemp("tiny_doubles") / "tiny.zarr"
    synthetic.write_store(synthetic.preset("tiny", num_doubles=20), path)
    store = open_store(path)
    return store, make_split(store.condition_names, "simulation", seed=1)


@pytest.fixture(scope="session")
def saved_model(tiny_train_store, tmp_path_factory):
    """An untrained GEARS model (random weights, seed 0) saved in a run directory as training saves it
    (model/, summary.json with a 2-epoch history), on `tiny_train_store` and its split: what predict and
    evaluate read, in seconds. Returns (run directory, Store, GO graph nodes). Shared: write outputs elsewhere."""
    import json

    import torch

    from gears_dist.config import to_dict
    from gears_dist.data.store import open_store
    from gears_dist.graphs.build import ensure_graphs
    from gears_dist.model import GEARSModel
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import save_model

    cfg = run_config_from_dict({"name": "t", "model": {"hidden_size": 16}})
    store = open_store(tiny_train_store["path"])
    bundle = ensure_graphs(store, cfg.graphs, tiny_train_store["split"])
    torch.manual_seed(0)
    model = GEARSModel(cfg.model, store.num_genes, bundle.go.num_nodes, *bundle.go.to_torch(), *bundle.coexpr.to_torch())
    run = tmp_path_factory.mktemp("saved_run")
    meta = {"config": to_dict(cfg), "genes": store.genes, "go_nodes": bundle.go.nodes, "conditions": store.condition_names,
            "split": tiny_train_store["split"], "graph_keys": {"split": tiny_train_store["split"], **bundle.keys},
            "store": str(store.path)}
    save_model(run / "model", {k: v.detach().clone() for k, v in model.state_dict().items()}, meta)
    (run / "summary.json").write_text(json.dumps({"history": [{"epoch": 0, "train_loss": 2.0, "val_mse": 0.3},
                                                              {"epoch": 1, "train_loss": 1.0, "val_mse": 0.2}]}))
    return run, store, bundle.go.nodes


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the test module that asks for it (starting Ray costs ~10 s): 127.0.0.1, no dashboard,
    small object store. Stopped when the module ends (see _no_ray_between_modules)."""
    import ray

    from gears_dist.distributed.launcher import ensure_ray
    from gears_dist.train.config import RunConfig

    ensure_ray(None, RunConfig())
    yield ray


@pytest.fixture(scope="module", autouse=True)
def _no_ray_between_modules():
    """No Ray outlives the module that started it (a fixture, or code under test calling ensure_ray). A CI run
    once ended with exit 1 and no report in the middle of a module that does not use Ray, while this process
    was still a driver of an earlier module's Ray; this process is a Ray driver only while a test needs it."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
