"""Process groups for several GPUs: torch.distributed under torchrun, with timeouts and clear errors.

    ctx = init_distributed(expected_world_size=2)     # torchrun --nproc-per-node 2 your_script.py
    ...
    close_distributed()

NCCL between GPUs (rank r on cuda:LOCAL_RANK), gloo on the CPU. Every group this module makes has a
timeout (`timeout_s`): a rank that crashes makes its peers fail at once (gloo sees the connection
close; NCCL's watchdog reports it), one that hangs makes them fail when the timeout runs out, and a
launch with the wrong number of ranks fails before or at the rendezvous. Every failure is raised as
a `DistributedError` that says what was being exchanged and what to check, never a silent hang.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "DistContext", "DistributedError", "agree", "close_distributed", "comm_device",
           "comm_errors", "init_distributed"]

# Long enough for a first block that autotunes Triton kernels and plans cuDNN (tens of seconds at
# 1.3B shapes) while a peer waits for it; short enough that a hung rank is reported, not waited on.
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A rank is missing, crashed, hung, or disagrees with the others (world size, model, protocol)."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device      # where this rank computes: cuda:LOCAL_RANK with NCCL, else the CPU
    timeout_s: float


@contextmanager
def comm_errors(what: str) -> Iterator[None]:
    """Re-raise a failed collective or point-to-point call as a DistributedError naming `what`."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError, DistStoreError, gloo/NCCL errors: all RuntimeErrors
        raise DistributedError(f"{what} failed: {e} -- another rank crashed, left early, hung past the "
                               "group's timeout, was started with another world size, or runs something else "
                               "(check the other ranks' logs)") from e


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(expected_world_size: int | None = None, *, backend: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S, rank: int | None = None, world_size: int | None = None,
                     init_method: str = "env://", purpose: str = "longlive-triton") -> DistContext:
    """Join (or reuse) the default process group; returns this rank's context.

    rank, world_size and local rank come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) unless given. expected_world_size: the number of ranks the caller's
    mode needs; another count is refused before any rendezvous. backend: "nccl" when CUDA is
    available, else "gloo". After the rendezvous the ranks compare (world size, backend, purpose):
    ranks launched for different jobs or with different counts fail with a DistributedError.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if dist.is_initialized():
        ctx = _context(dist.get_backend(), timeout_s)
        _check_world(expected_world_size, ctx.world_size, "the process group that is already initialised")
        return ctx
    rank = _env_int("RANK") if rank is None else rank
    world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    if rank is None or world_size is None:
        raise DistributedError("no process group: RANK and WORLD_SIZE are not set; launch with torchrun "
                               f"--nproc-per-node {expected_world_size or 'N'} (or pass rank, world_size, init_method)")
    _check_world(expected_world_size, world_size, "WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is outside a world of {world_size} ranks")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                                   "start at most one rank per GPU")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError, ValueError) as e:
        raise DistributedError(f"rank {rank}: the rendezvous of {world_size} ranks ({init_method}) did not complete "
                               f"within {timeout_s:g} s: {e} -- is every rank started, and with the same world size "
                               f"(torchrun --nproc-per-node {world_size})?") from e
    ctx = _context(backend, timeout_s)
    agree("the start-up handshake", {"world_size": world_size, "backend": backend, "purpose": purpose})
    return ctx


def _check_world(expected: int | None, actual: int, source: str) -> None:
    if expected is not None and actual != expected:
        raise DistributedError(f"this needs {expected} ranks, but {source} says {actual}: launch with "
                               f"torchrun --nproc-per-node {expected}")


def _context(backend: str, timeout_s: float) -> DistContext:
    local_rank = torch.cuda.current_device() if backend == "nccl" else (_env_int("LOCAL_RANK") or 0)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device, timeout_s)


def comm_device(group=None) -> torch.device:
    """Where tensors must live to be sent on `group`: this rank's GPU with NCCL, the CPU with gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(what: str, value, group=None) -> None:
    """Every rank of `group` must pass an equal `value` (small and picklable); else a DistributedError
    on every rank naming the ranks that differ from rank 0."""
    values = [None] * dist.get_world_size(group)
    with comm_errors(f"{what} (rank {dist.get_rank(group)} of {len(values)})"):
        dist.all_gather_object(values, value, group=group)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise DistributedError(f"{what}: ranks disagree -- rank 0 has {values[0]!r}, "
                               + ", ".join(f"rank {r} has {values[r]!r}" for r in differ))


def close_distributed() -> None:
    """Leave the default process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
