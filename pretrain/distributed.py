"""Process-group start-up for every launcher (python, torchrun, deepspeed, SLURM) on CPU or GPU.

One place knows the DeepSpeed-on-CPU quirks, all listed here: the CPU
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


def _prepare_environment(local_rank: int | None) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if "RANK" not in os.environ:
        # No launcher: a world of one instead of DeepSpeed's MPI discovery.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
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


def collective_device() -> torch.device:
    """Where a collective's tensors must live for the current process group's backend.

    NCCL only reduces CUDA tensors (a CPU tensor fails with "No backend type associated with device
    type cpu"); gloo reduces CPU tensors. Every collective of training and evaluation goes through
    `all_reduce` below, so a tensor built on the wrong side cannot reach the backend.
    """
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over all ranks ("sum" or "max"), on the device and in the dtype it came in.

    Outside a process group (a single process without a launcher) it is returned unchanged.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
    buffer = tensor.detach().to(collective_device(), copy=True)
    torch.distributed.all_reduce(buffer, op=ops[op])
    return buffer.to(tensor.device)


def all_true(flag: bool | torch.Tensor) -> bool:
    """True only if every rank passes True (so all ranks take the same branch). One host sync."""
    failed = torch.as_tensor(flag).logical_not().to(torch.float32).reshape(1)
    return all_reduce(failed, op="max").item() == 0.0


def any_true(flag: bool | torch.Tensor) -> bool:
    return not all_true(torch.as_tensor(flag).logical_not())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a single-node rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
