"""Graphs and partitions stored in the Zarr store, keyed by their parameters; ``gears-dist graph``.

Components under STORE/graphs/ (written atomically through ``Store.write_component``):

- ``go_<source>[-<file hash>]_k<k>_t<threshold>_<universe>[_nogo-coexpr-<split>]``: GO graph
- ``coexpr_<split|all>_k<k>_r<threshold>``: co-expression graph over the store's genes
- ``part_<method>_W<W>_s<seed>_<split|all>__<go key>``: worker partition of the conditions

Training calls ``ensure_graphs``/``ensure_partition``: they load what exists and build only what
is missing, so graphs are computed once per store and parameter set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib

import numpy as np

from gears_dist.config import from_dict, load_yaml
from gears_dist.data.store import Store, StoreError, file_fingerprint, open_store
from gears_dist.graphs.coexpr import build_coexpression_graph
from gears_dist.graphs.config import GraphConfig
from gears_dist.graphs.go import build_go_graph
from gears_dist.graphs.graph import GeneGraph
from gears_dist.graphs.partition import Partition, halo_sizes, partition_conditions

log = logging.getLogger("gears_dist.graphs")

PARTITION_METHODS = ("metis", "contiguous", "random")  # PartitionConfig.method


@dataclasses.dataclass
class GraphBundle:
    go: GeneGraph
    coexpr: GeneGraph
    keys: dict[str, str]  # {"go": key, "coexpr": key}


def _num(x: float) -> str:
    return f"{x:g}"


def go_key(cfg: GraphConfig, split_key: str | None = None) -> str:
    src = cfg.go.source
    if src != "builtin":
        # The file's identity (size, mtime, content hash), not its name, decides reuse.
        fp = file_fingerprint(cfg.go.path)
        src += "-" + hashlib.sha256(f"{fp['size']}:{fp['sha256_head_tail']}".encode()).hexdigest()[:10]
    key = f"go_{src}_k{cfg.go.k}_t{_num(cfg.go.threshold)}_{cfg.go.universe}"
    if cfg.no_go == "coexpression":
        key += f"_nogo-coexpr-{split_key or 'all'}"
    return key


def coexpr_key(cfg: GraphConfig, split_key: str | None = None) -> str:
    key = f"coexpr_{split_key or 'all'}_k{cfg.coexpr.k}_r{_num(cfg.coexpr.threshold)}"
    return key if cfg.coexpr.max_cells is None else f"{key}_n{cfg.coexpr.max_cells}"


def partition_key(
    go_graph_key: str, method: str, num_parts: int, seed: int, split_key: str | None = None
) -> str:
    return f"part_{method}_W{num_parts}_s{seed}_{split_key or 'all'}__{go_graph_key}"


def _open(store: Store | str | pathlib.Path) -> Store:
    return store if isinstance(store, Store) else open_store(store, mode="r+")


def perturbed_genes(store: Store) -> list[str]:
    return sorted({g for genes in store.condition_genes() for g in genes})


def perturbable_genes(store: Store) -> list[str]:
    """GO graph nodes for universe 'dataset': every perturbed gene and every measured gene."""
    return sorted(set(perturbed_genes(store)) | set(store.genes))


def training_conditions(store: Store, split_key: str | None) -> np.ndarray:
    """Condition indices of the control and single-gene conditions that train under the split
    (every control and single when split_key is None)."""
    genes = store.condition_genes()
    names = store.condition_names
    if split_key is None:
        allowed = set(names)
    else:
        from gears_dist.data.splits import load_split

        allowed = set(load_split(store, split_key).train)
    idx = [i for i, (n, g) in enumerate(zip(names, genes)) if len(g) <= 1 and n in allowed]
    if not any(len(genes[i]) == 0 for i in idx):
        log.warning("co-expression: the selected cells include no control cells")
    return np.asarray(idx, dtype=np.int64)


def load_graph(store: Store | str | pathlib.Path, key: str) -> GeneGraph:
    """A stored GO or co-expression graph, by key (see ensure_graphs / GraphBundle.keys)."""
    store = store if isinstance(store, Store) else open_store(store)
    return GeneGraph.read(store.component("graphs", key))


_load_graph = load_graph  # kept for callers that used the private name


def _store_graph(store: Store, key: str, graph: GeneGraph, overwrite: bool) -> None:
    attrs = {
        "type": "gene_graph",
        "kind": graph.info.get("kind"),
        "num_nodes": graph.num_nodes,
        "num_edges": graph.num_edges,
    }
    with store.write_component("graphs", key, attrs, overwrite=overwrite) as group:
        graph.write(group)


def ensure_graphs(
    store: Store | str | pathlib.Path, cfg: GraphConfig, split_key: str | None = None, overwrite: bool = False
) -> GraphBundle:
    """Load the GO and co-expression graphs for `cfg` from the store, building and storing any
    that are missing (or all of them with overwrite=True)."""
    store = _open(store)
    cfg.validate()
    keys = {"go": go_key(cfg, split_key), "coexpr": coexpr_key(cfg, split_key)}
    if store.has_component("graphs", keys["coexpr"]) and not overwrite:
        coexpr = _load_graph(store, keys["coexpr"])
    else:
        coexpr = build_coexpression_graph(store, training_conditions(store, split_key), cfg)
        coexpr.info["split"] = split_key
        _store_graph(store, keys["coexpr"], coexpr, overwrite)
    if store.has_component("graphs", keys["go"]) and not overwrite:
        go = _load_graph(store, keys["go"])
    else:
        go = build_go_graph(perturbable_genes(store), cfg, perturbed=perturbed_genes(store), fallback=coexpr)
        _store_graph(store, keys["go"], go, overwrite)
    return GraphBundle(go, coexpr, keys)


def _store_partition(store: Store, key: str, part: Partition, go_graph_key: str, overwrite: bool) -> None:
    attrs = {"type": "partition", "go_graph": go_graph_key, **part.to_attrs()}
    with store.write_component("graphs", key, attrs, overwrite=overwrite) as group:
        group.create_array("part_of_condition", data=part.part_of_condition)
        group.create_array("cells_per_part", data=part.cells_per_part)
        group.create_array("nodes_per_part", data=part.nodes_per_part)
        group.create_array("node_part", data=part.node_part)


def load_partition(store: Store | str | pathlib.Path, key: str) -> Partition:
    store = store if isinstance(store, Store) else open_store(store)
    g = store.component("graphs", key)
    a = dict(g.attrs)
    if a.get("type") != "partition":
        raise StoreError(f"graphs/{key} is not a partition (type {a.get('type')!r})")
    return Partition(
        a["method"],
        int(a["num_parts"]),
        int(a["seed"]),
        g["part_of_condition"][...],
        g["cells_per_part"][...],
        float(a["balance"]),
        int(a["edge_cut"]),
        int(a["num_pairs"]),
        g["nodes_per_part"][...],
        g["node_part"][...],
    )


def ensure_partition(
    store: Store | str | pathlib.Path,
    go_graph: GeneGraph,
    go_graph_key: str,
    num_parts: int,
    method: str = "metis",
    seed: int = 0,
    split_key: str | None = None,
    overwrite: bool = False,
) -> tuple[Partition, str]:
    """Load or build (and store) the partition of the store's conditions for W = num_parts.
    With a split, only its training cells count toward balance (other conditions still get a part)."""
    store = _open(store)
    key = partition_key(go_graph_key, method, num_parts, seed, split_key)
    if store.has_component("graphs", key) and not overwrite:
        return load_partition(store, key), key
    num_cells = store.array("conditions/num_cells").astype(np.int64)
    if split_key is not None:
        from gears_dist.data.splits import load_split

        train = set(load_split(store, split_key).train)
        num_cells = np.where([n in train for n in store.condition_names], num_cells, 0)
    part = partition_conditions(store.condition_genes(), num_cells, go_graph, num_parts, method, seed)
    _store_partition(store, key, part, go_graph_key, overwrite)
    return part, key


def load_graph_config(path: str | None) -> GraphConfig:
    """The ``graphs:`` section of a YAML config (or a file that is only that section)."""
    if path is None:
        return GraphConfig()
    data = load_yaml(path)
    section = data.get(
        "graphs", data if set(data) <= {f.name for f in dataclasses.fields(GraphConfig)} else {}
    )
    return from_dict(GraphConfig, section, "graphs")


def build_graphs(
    store: Store | str | pathlib.Path,
    *,
    config: str | pathlib.Path | GraphConfig | None = None,
    split: str | None = None,
    parts: list[int] | None = None,
    method: str | None = None,
    overwrite: bool = False,
    echo: bool = True,
) -> dict[str, str]:
    """``gears-dist graph``: the GO and co-expression graphs of `config` (a GraphConfig, a YAML with a
    ``graphs:`` section, or None for the defaults) and a worker partition for each count in `parts`
    (default: the config's ``partition.num_parts``), with `method` replacing ``partition.method``.

    `split` names the split whose training cells feed the co-expression graph. What exists is loaded, the rest
    built (all of it with `overwrite`). With `echo`, a summary of each is printed. Returns the component keys:
    ``{"go": ..., "coexpr": ..., "part_W<W>": ...}`` (partitions skipped for too few conditions are absent).
    """
    cfg = dataclasses.replace(config) if isinstance(config, GraphConfig) else load_graph_config(config)
    if parts:
        cfg.partition = dataclasses.replace(cfg.partition, num_parts=[int(w) for w in parts])
    if method:
        if method not in PARTITION_METHODS:
            raise ValueError(f"method: expected one of {list(PARTITION_METHODS)}, received {method!r}")
        cfg.partition = dataclasses.replace(cfg.partition, method=method)
    cfg.validate()
    say = print if echo else (lambda *a, **k: None)
    store = open_store(store.path if isinstance(store, Store) else store, mode="r+")
    bundle = ensure_graphs(store, cfg, split, overwrite=overwrite)
    keys = dict(bundle.keys)
    go, co = bundle.go, bundle.coexpr
    perturbed = set(perturbed_genes(store))
    isolated = sorted(g for g in (go.nodes[i] for i in go.isolated()) if g in perturbed)
    say(f"GO graph        graphs/{bundle.keys['go']}: {go.summary()}")
    say(
        f"co-expression   graphs/{bundle.keys['coexpr']}: {co.summary()} "
        f"from {co.info.get('num_cells')} cells"
    )
    missing = go.info.get("unannotated_perturbed", [])
    say(
        f"perturbed genes without GO annotation: {len(missing)}{': ' + ', '.join(missing) if missing else ''}"
    )
    say(
        f"isolated perturbed genes in the GO graph: {len(isolated)}"
        f"{': ' + ', '.join(isolated) if isolated else ''}"
    )
    if go.info.get("renamed"):
        say("matched through aliases: " + ", ".join(f"{a}->{b}" for a, b in go.info["renamed"].items()))
    genes = store.condition_genes()
    for w in cfg.partition.num_parts:
        if sum(1 for g in genes if g) < w:
            say(f"W={w}: skipped (fewer perturbed conditions than parts)")
            continue
        part, key = ensure_partition(
            store,
            go,
            bundle.keys["go"],
            w,
            cfg.partition.method,
            cfg.partition.seed,
            split,
            overwrite=overwrite,
        )
        keys[f"part_W{w}"] = key
        halos = halo_sizes(go, part, genes, 1)
        say(
            f"partition       graphs/{key}: {part.summary()}; "
            f"1-hop GO halo/part {halos.min()}..{halos.max()} "
            f"of {go.num_nodes} nodes"
        )
    return keys
