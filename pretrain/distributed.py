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


def init(local_rank: int | None = None, device: str | torch.device | None = None, deepspeed: bool = True) -> World:
    """Start (or join) the process group and return this process's place in it.

    Training (`deepspeed=True`) always has a group, a world of one included, because DeepSpeed's
    engine needs one. Evaluation and benchmarks (`deepspeed=False`) join one only when a launcher
    started several processes. `device` overrides the default: this rank's GPU when CUDA is
    available, else the CPU; the backend follows it (NCCL on CUDA, gloo on CPU).
    """
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", local_rank or 0))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "OMP_NUM_THREADS" not in os.environ:
        # The deepspeed launcher never sets it; oversubscribed ranks run many times slower on CPU.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if deepspeed:
        _init_deepspeed(local_rank, backend)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world_size = 0, 1
    local = device.index if device.type == "cuda" and device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
    return World(rank=rank, local_rank=local, world_size=world_size, device=device)


def _init_deepspeed(local_rank: int | None, backend: str) -> None:
    _prepare_environment(local_rank)
    import deepspeed
    import deepspeed.ops as ds_ops

    # The CPU backend would JIT-compile an inference-only shared-memory all-reduce (~30 s, needs g++).
    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)


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


def gather_lists(items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank. A copy without a group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(items)
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports on 127.0.0.1 that are free now (held open together while chosen, so no two
    are the same), for single-node rendezvous."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed")
"""How gloo words a collective whose other side has exited; NCCL raises DistBackendError instead."""


def peer_lost(exc: BaseException) -> str | None:
    """How a collective failed because another rank is gone (killed, crashed), not through this one;
    None when it failed otherwise."""
    if isinstance(exc, getattr(torch.distributed, "DistBackendError", ())):
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return next((text for text in _PEER_GONE if text in str(exc)), None)


def shutdown() -> None:
    if torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
        except RuntimeError as exc:
            if not peer_lost(exc):  # a dead rank cannot join the last barrier; tear down regardless
                raise
        torch.distributed.destroy_process_group()
