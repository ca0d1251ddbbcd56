"""sync_batchnorm: two gloo ranks holding halves of a batch compute what one process computes on the whole."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_model import make_batch, make_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _objective(pred: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    # A sum over cells (additive across ranks), with a fixed weight per cell and gene.
    probe = torch.randn(12, pred.shape[1], generator=torch.Generator().manual_seed(7), dtype=pred.dtype)
    return (pred.square() * probe[cells]).sum()


def _split(rank: int):
    x, _y, perts, inverse, _mask, _ctrl = make_batch()
    cells = torch.arange(inverse.numel())[rank::2]
    return x[cells], perts, inverse[cells], cells


FAST_PATHS = ("off", "on")


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {}
    try:
        for fast_path in FAST_PATHS:
            model = make_model(sync_batchnorm=True, fast_path=fast_path).train()
            x, perts, inverse, cells = _split(rank)
            pred, _ = model(x, perts, inverse)
            _objective(pred, cells).backward()
            grads = {}
            for name, p in model.named_parameters():
                dist.all_reduce(p.grad)  # the data-parallel gradient (sum of the ranks' objectives)
                grads[name] = p.grad
            out[(rank, fast_path)] = {"pred": pred.detach(), "cells": cells, "grads": grads, "state": model.state_dict()}
        # Control: without synchronization each rank normalizes with its own half-batch statistics.
        local = make_model(sync_batchnorm=False).train()
        out[(rank, "local")] = local(x, perts, inverse)[0].detach()
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    # Results come back through files, not an mp.Manager: a Manager forks this (pytest) process, and forking a
    # process that may hold Ray's or gloo's threads is what the spawn start method is for avoiding.
    out_dir = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=2, start_method="spawn")
    results = {}
    for rank in range(2):
        results.update(torch.load(out_dir / f"rank{rank}.pt", weights_only=True))
    return results


@pytest.mark.parametrize("fast_path", FAST_PATHS)
def test_sync_batchnorm_two_ranks_equal_one_process(fast_path, two_rank_results):
    model = make_model(sync_batchnorm=True, fast_path=fast_path).train()
    x, _y, perts, inverse, _mask, _ctrl = make_batch()
    pred, _ = model(x, perts, inverse)
    _objective(pred, torch.arange(inverse.numel())).backward()
    for rank in (0, 1):
        res = two_rank_results[(rank, fast_path)]
        assert torch.allclose(res["pred"], pred.detach()[res["cells"]], atol=1e-10)
        for name, p in model.named_parameters():
            assert torch.allclose(res["grads"][name], p.grad, atol=1e-9 * (1 + p.grad.abs().max())), name
        for name, value in model.state_dict().items():
            assert torch.allclose(res["state"][name].double(), value.double(), atol=1e-10), name


def test_without_sync_the_ranks_differ_from_one_process(two_rank_results):
    model = make_model().train()
    x, _y, perts, inverse, _mask, _ctrl = make_batch()
    pred = model(x, perts, inverse)[0].detach()
    for rank in (0, 1):
        cells = two_rank_results[(rank, "on")]["cells"]
        assert (two_rank_results[(rank, "local")] - pred[cells]).abs().max() > 1e-3
