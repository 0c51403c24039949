"""The one distributed helper: collectives on the process group's device, tested over real gloo ranks."""

import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pretrain import distributed

REPO = Path(__file__).resolve().parents[2]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        summed = distributed.all_reduce(torch.tensor([1.5, rank], dtype=torch.float64))
        biggest = distributed.all_reduce(torch.tensor([float(rank)]), op="max")
        results[rank] = (summed.tolist(), summed.dtype, biggest.item(), distributed.all_true(rank == 0),
                         distributed.any_true(rank == 1), distributed.all_true(torch.tensor(True)),
                         str(distributed.collective_device()))
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_over_two_gloo_ranks():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, distributed.free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        summed, dtype, biggest, all_zero, any_one, all_set, device = results[rank]
        assert summed == [3.0, 1.0] and dtype == torch.float64 and biggest == 1.0
        assert (all_zero, any_one, all_set, device) == (False, True, True, "cpu")


def test_outside_a_process_group_a_reduction_is_the_identity():
    t = torch.tensor([2.0, 3.0])
    assert torch.equal(distributed.all_reduce(t), t)
    assert distributed.all_true(True) and not distributed.all_true(False)


def test_nccl_collectives_go_to_this_ranks_gpu(monkeypatch):
    """Under NCCL every collective tensor is moved to the current CUDA device (a CPU tensor would make
    NCCL fail with "No backend type associated with device type cpu")."""
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)


def test_every_collective_goes_through_the_helper():
    """No module of the pipeline calls torch.distributed's reductions directly."""
    pattern = re.compile(r"\b(torch\.distributed|dist)\.(all_reduce|all_gather|reduce_scatter|broadcast)\(")
    offenders = []
    for folder in ("data_prep", "pretrain", "evaluation", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "distributed.py" and path.parent.name == "pretrain":
                continue
            offenders += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                          if pattern.search(line)]
    assert not offenders, offenders
    if (REPO / "quickstart.py").read_text().count("all_reduce("):
        pytest.fail("quickstart.py calls a collective directly")
