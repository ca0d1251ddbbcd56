"""Streaming loader: bounded memory, mixing, determinism, equal steps per worker, control pairing."""

import itertools

import numpy as np
import pytest
import torch

from gears_dist.data.loader import LoaderConfig, ShardLoader, plan_shard
from gears_dist.data.splits import load_split
from gears_dist.data.store import open_store
from gears_dist.graphs.build import ensure_graphs
from gears_dist.graphs.config import GraphConfig
from gears_dist.graphs.graph import perturbation_index
from gears_dist.graphs.partition import partition_conditions


@pytest.fixture(scope="module")
def setup(tiny_train_store):
    store = open_store(tiny_train_store["path"])
    split = load_split(store, tiny_train_store["split"])
    names = store.condition_names
    train = np.array([names.index(n) for n in split.train])
    go = ensure_graphs(store, GraphConfig(), tiny_train_store["split"]).go
    pert_index = perturbation_index(go.nodes, store.condition_genes())
    return store, train, pert_index, go


def _loader(setup, rank=0, world=1, sharding="graph", seed=0, part=None, **cfg):
    store, train, pert_index, _ = setup
    plan = plan_shard(store, train, rank, world, sharding=sharding, part_of_condition=part, seed=seed)
    return ShardLoader(store, plan, pert_index, LoaderConfig(**{"batch_size": 16, "buffer_chunks": 3, **cfg}),
                       seed=seed)


def _train_rows(store, train):
    start, stop = store.array("conditions/start"), store.array("conditions/stop")
    is_ctrl = store.array("conditions/is_control").astype(bool)
    keep = np.zeros(len(start), bool)
    keep[train] = True
    keep |= is_ctrl
    return np.concatenate([np.arange(a, b) for a, b in zip(start[keep], stop[keep])])


def _plan_rows(plan):
    return np.concatenate([plan.unit_rows(u) for u in range(plan.unit_start.size)])


def test_bounded_buffer_and_each_chunk_read_once(setup):
    store = setup[0]
    loader = _loader(setup, buffer_chunks=2)
    batches = list(loader.epoch_batches(0))
    assert len(batches) == loader.steps_per_epoch
    # never more than the buffer (+ one batch of carry) in memory, far less than the shard
    assert loader.max_buffered_cells <= 3 * store.chunk_cells
    assert loader.max_buffered_cells < loader.plan.num_cells / 3
    # an epoch reads each unit of the shard at most once (plus at most one window when it wraps)
    shard_bytes = loader.plan.num_cells * store.num_genes * 4
    assert loader.bytes_read <= shard_bytes + 2 * store.chunk_cells * store.num_genes * 4


def test_mixing_grows_with_buffer_and_grouping_concentrates(setup):
    def mean_distinct(**cfg):
        loader = _loader(setup, **cfg)
        return np.mean([b.ucond.numel() for b in loader.epoch_batches(0)])

    one = mean_distinct(buffer_chunks=1)
    many = mean_distinct(buffer_chunks=16)
    grouped = mean_distinct(buffer_chunks=16, group_cells=8)
    assert many > one + 1.0, (one, many)
    assert grouped < many, (grouped, many)


def _resumed_after(make_loader, steps: int) -> list:
    """The rest of epoch 0 from a fresh loader resumed with the state saved after `steps` batches."""
    loader = make_loader()
    it = loader.epoch_batches(0)
    for _ in range(steps):
        next(it)
    state = loader.state_dict()
    it.close()
    resumed = make_loader()
    resumed.load_state_dict(state)
    return list(resumed.epoch_batches())


def _byte_budget_loader(setup, chunks: float, **cfg):
    """A loader whose window is sized by buffer_mb to `chunks` whole chunks of decoded cells."""
    store = setup[0]
    mb = chunks * store.chunk_cells * store.num_genes * 4 / 2**20
    return _loader(setup, buffer_chunks=None, buffer_mb=mb, **cfg)


def test_byte_budget_sizes_the_window_and_shuffles_small_shards_whole(setup):
    store = setup[0]
    default = _loader(setup, buffer_chunks=None)
    # the default budget (256 MB) holds this whole shard: one window, every cell shuffled with every other
    assert default.window_rows >= default.plan.num_cells
    assert len(list(itertools.islice(default._windows(0), 2))[0][2]) == default.plan.unit_start.size
    two = _byte_budget_loader(setup, 2.0)
    # windows of whole units (units are chunks cut at the split's condition boundaries) filled up to the
    # budget's rows, never past it
    assert two.window_rows == 2 * store.chunk_cells
    sizes = [int(two.plan.unit_count[u].sum()) for p, _, u in itertools.takewhile(lambda x: x[0] == 0, two._windows(0))]
    assert max(sizes) <= two.window_rows and sum(sizes) == two.plan.num_cells
    assert np.mean(sizes[:-1]) > two.window_rows - int(two.plan.unit_count.max())  # filled, not half empty
    tiny = _byte_budget_loader(setup, 0.01)
    assert tiny.window_rows == int(tiny.plan.unit_count.max())  # at least one unit, however small the budget
    batches = list(default.epoch_batches(0))
    assert default.max_buffered_cells <= default.plan.num_cells + default.cfg.batch_size

    # whole-shard shuffling: conditions per batch as for cells drawn uniformly from the shard (the reference's
    # DataLoader), more than with a two-chunk window of the same store
    counts = np.bincount(store.array("obs/condition")[_plan_rows(default.plan)])
    p = counts[counts > 0] / counts.sum()
    b = default.cfg.batch_size
    uniform = float(np.sum(1 - (1 - p) ** b))  # expected distinct conditions in b uniform draws
    whole = np.mean([x.ucond.numel() for x in batches])
    few = np.mean([x.ucond.numel() for x in two.epoch_batches(0)])
    assert abs(whole - uniform) < 0.15 * uniform, (whole, uniform)
    assert whole > few, (whole, few)


def test_byte_budget_window_resumes_exactly_and_reads_each_cell_once(setup):
    store = setup[0]
    full = _byte_budget_loader(setup, 2.5)
    a = list(full.epoch_batches(0))
    # each unit decoded once per epoch (plus at most one window when the stream wraps into a new pass)
    assert full.bytes_read <= (full.plan.num_cells + 3 * store.chunk_cells) * store.num_genes * 4
    assert full.max_buffered_cells <= full.window_rows + full.cfg.batch_size
    assert full.window_rows < full.plan.num_cells
    rest = _resumed_after(lambda: _byte_budget_loader(setup, 2.5), 5)
    assert len(rest) == len(a) - 5
    for x, y in zip(a[5:], rest):
        assert torch.equal(x.y, y.y) and torch.equal(x.x, y.x) and torch.equal(x.cond, y.cond)


def test_one_window_buffer_serves_every_epoch_and_open_iterators_stay_correct(setup):
    loader = _byte_budget_loader(setup, 2.5)
    first = list(loader.epoch_batches(0))
    buffer = loader._spare_buffer
    assert buffer is not None and buffer.shape[0] == loader.window_rows
    second = list(loader.epoch_batches(1))
    assert loader._spare_buffer is buffer  # reused, not reallocated, at the epoch boundary
    # an epoch's iterator left open while the next runs: each producer needs its own window, and both epochs
    # must still yield exactly their batches
    other = _byte_budget_loader(setup, 2.5)
    open_it = other.epoch_batches(0)
    head = [next(open_it) for _ in range(3)]
    both = list(other.epoch_batches(1))
    tail = list(open_it)
    assert len(head + tail) == len(first) and len(both) == len(second)
    for x, y in zip(first, head + tail):
        assert torch.equal(x.y, y.y) and torch.equal(x.cond, y.cond)
    for x, y in zip(second, both):
        assert torch.equal(x.y, y.y) and torch.equal(x.cond, y.cond)


@pytest.mark.parametrize("field,value,match", [("buffer_mb", 0, "buffer_mb: must be > 0"),
                                                ("buffer_chunks", 0, "buffer_chunks: must be >= 1")])
def test_window_config_errors_name_the_field(field, value, match):
    from gears_dist.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        LoaderConfig(**{field: value}).validate()


def test_deterministic_by_seed_epoch_rank_and_exact_resume(setup):
    a = list(_loader(setup).epoch_batches(0))
    b = list(_loader(setup).epoch_batches(0))
    assert all(torch.equal(x.y, y.y) and torch.equal(x.x, y.x) for x, y in zip(a, b))
    other_epoch = list(_loader(setup).epoch_batches(1))
    assert not torch.equal(a[0].y, other_epoch[0].y)
    other_seed = list(_loader(setup, seed=5).epoch_batches(0))
    assert not torch.equal(a[0].cond, other_seed[0].cond) or not torch.equal(a[0].x, other_seed[0].x)
    # resuming mid-epoch from the loader state gives exactly the remaining batches
    rest = _resumed_after(lambda: _loader(setup), 4)
    assert len(rest) == len(a) - 4
    for x, y in zip(a[4:], rest):
        assert torch.equal(x.y, y.y) and torch.equal(x.x, y.x) and torch.equal(x.perts, y.perts)


def test_state_mismatch_is_refused(setup):
    state = _loader(setup).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _loader(setup, seed=3).load_state_dict(state)


@pytest.mark.parametrize("sharding", ["graph", "random"])
@pytest.mark.parametrize("world", [2, 3])
def test_equal_steps_and_disjoint_cover(setup, sharding, world):
    store, train, _, go = setup
    part = None
    if sharding == "graph":
        part = partition_conditions(store.condition_genes(), store.array("conditions/num_cells"), go, world,
                                    method="metis").part_of_condition
    loaders = [_loader(setup, r, world, sharding, part=part) for r in range(world)]
    steps = {len(list(lo.epoch_batches(0))) for lo in loaders}
    assert steps == {loaders[0].steps_per_epoch}
    rows = [_plan_rows(lo.plan) for lo in loaders]
    allrows = np.concatenate(rows)
    assert allrows.size == np.unique(allrows).size  # disjoint
    np.testing.assert_array_equal(np.sort(allrows), np.sort(_train_rows(store, train)))


def test_control_pairing_and_batch_contents(setup):
    store, _, pert_index, _ = setup
    loader = _loader(setup)
    X = store.X[...]
    cond_of_row = store.array("obs/condition")
    is_ctrl_cond = store.array("conditions/is_control").astype(bool)
    ctrl_rows = np.flatnonzero(is_ctrl_cond[cond_of_row])
    ctrl_x = X[ctrl_rows]
    mask = store.root["stats/nonzero_frac"][...] > 0
    seen_pairs = []
    for epoch in (0, 1):
        b = next(iter(loader.epoch_batches(epoch)))
        assert b.x.shape == b.y.shape == (16, store.num_genes)
        torch.testing.assert_close(b.perts, torch.from_numpy(pert_index[b.ucond.numpy()]))
        assert torch.equal(b.ucond[b.inverse], b.cond)
        for i in range(16):
            c = int(b.cond[i])
            row_match = np.flatnonzero((ctrl_x == b.x[i].numpy()).all(1))
            assert row_match.size >= 1, "x must be a control cell"
            if is_ctrl_cond[c]:
                assert torch.equal(b.x[i], b.y[i])  # controls are trained on with x = y
            else:
                assert np.any((X[np.arange(store.num_cells)[cond_of_row == c]] == b.y[i].numpy()).all(1))
        for u, c in enumerate(b.ucond.tolist()):
            expect = np.ones(store.num_genes, bool) if is_ctrl_cond[c] else mask[c]
            np.testing.assert_array_equal(b.gene_mask[u].numpy(), expect)
        seen_pairs.append(b.x)
    # controls are drawn fresh each epoch
    assert not torch.equal(seen_pairs[0], seen_pairs[1])


def test_graph_sharding_reads_a_fraction_random_reads_everything(setup):
    store, train, _, go = setup
    train_cells = np.zeros(len(store.condition_names), np.int64)
    train_cells[train] = store.array("conditions/num_cells")[train]  # balance the training cells, as training does
    part = partition_conditions(store.condition_genes(), train_cells, go, 2, method="contiguous").part_of_condition

    def read_per_cell_delivered(sharding):
        out = []
        for r in range(2):
            lo = _loader(setup, r, 2, sharding, part=part if sharding == "graph" else None, buffer_chunks=64)
            cells = sum(b.num_cells for b in lo.epoch_batches(0))
            out.append(lo.bytes_read / (cells * store.num_genes * 4))
        return np.array(out)

    # graph shards: a worker decodes only its own cells (~1x); random: every chunk, so ~W x what it uses
    graph, rand = read_per_cell_delivered("graph"), read_per_cell_delivered("random")
    assert np.all(graph < 1.3), graph
    assert np.all(rand > 1.6), rand


def test_read_rows_in_any_order_is_x_at_those_rows(setup):
    # the control pool is read chunk by chunk into one array; rows arrive sorted by cell type, not by row
    store = setup[0]
    loader = _loader(setup)
    X = np.asarray(store.X[...], np.float32)
    rows = np.random.default_rng(0).permutation(store.num_cells)[:min(300, store.num_cells)]
    assert np.unique(rows // store.chunk_cells).size > 1
    before = loader.bytes_read
    np.testing.assert_array_equal(loader._read_rows(rows), X[rows])
    assert loader.bytes_read - before == rows.size * store.num_genes * 4
    assert loader._read_rows(np.zeros(0, np.int64)).shape == (0, store.num_genes)
