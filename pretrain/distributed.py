"""Process-group start-up for every launcher (python, torchrun, deepspeed, SLURM) on CPU or GPU.

One place knows the DeepSpeed-on-CPU quirks (see shared/design/deepspeed-cpu.md): the CPU
accelerator with gloo, skipping the shared-memory op that would JIT-compile at start-up, the
per-step FutureWarnings of torch's collectives, and the MPI discovery DeepSpeed attempts when no
launcher set RANK/WORLD_SIZE (a lone `python -m pretrain` becomes a world of one).
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prepare_environment(local_rank: int | None) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if "RANK" not in os.environ:
        # No launcher: a world of one instead of DeepSpeed's MPI discovery.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"(?s).*(all_gather_into_tensor|reduce_scatter_tensor)")


def init(local_rank: int | None = None) -> World:
    """Start (or join) the process group and return this process's place in it."""
    _prepare_environment(local_rank)
    import deepspeed
    import deepspeed.ops as ds_ops

    # The CPU backend would JIT-compile an inference-only shared-memory all-reduce (~30 s, needs g++).
    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    cuda = torch.cuda.is_available()
    if "OMP_NUM_THREADS" not in os.environ:
        # The deepspeed launcher never sets it; oversubscribed ranks run many times slower on CPU.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return World(rank=rank, local_rank=local, world_size=torch.distributed.get_world_size(), device=device)


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if every rank passes True (so all ranks take the same branch)."""
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value.item() == 0.0


def any_true(flag: bool, device: torch.device) -> bool:
    return not all_true(not flag, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
