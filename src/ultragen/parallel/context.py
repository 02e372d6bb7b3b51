"""The process group a parallel run communicates over, with every collective it uses counted in bytes sent."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from enum import Enum

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0  # a collective that waits longer than this fails (a peer died or hangs)


class ParallelMode(str, Enum):
    """How the hires pass is split over ranks (both exact; they differ in the traffic around attention)."""

    ULYSSES = "ulysses"  # all-to-all sequence shard <-> head shard around attention
    HALO = "halo"  # keep the windows, receive the neighbours' key/value blocks the plan says are read


def parse_parallel_mode(name: ParallelMode | str) -> ParallelMode:
    try:
        return ParallelMode(name)
    except ValueError:
        raise ValueError(f"unknown parallel mode {name!r}; choose one of {[m.value for m in ParallelMode]}") from None


class ProcessGroupContext:
    """Rank, world size and the collectives of one process group; ``bytes_sent`` counts what this rank sent to the
    other ranks (payload only, its own chunk of an all-to-all excluded). With ``timed`` on, ``comm_s`` adds up the
    wall time of every collective, the device synchronised before and after each (which removes any overlap, so time
    steps with it off and read the communication time from a separate timed run)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; start with `torchrun --nproc-per-node N ...` "
                               "(or call ultragen.parallel.launch.init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bytes_sent = 0
        self.timed = False
        self.comm_s = 0.0

    @contextlib.contextmanager
    def _collective(self, sent_bytes: int, device: torch.device):
        self.bytes_sent += sent_bytes
        if not self.timed:
            yield
            return
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.comm_s += time.perf_counter() - start

    def all_to_all(self, send: torch.Tensor, send_elems: list[int], recv_elems: list[int]) -> torch.Tensor:
        """Flat all-to-all: ``send`` (1D) holds ``send_elems[j]`` elements for rank j in rank order; returns the 1D
        tensor of ``recv_elems[i]`` elements from each rank i, in rank order."""
        recv = send.new_empty(sum(recv_elems))
        with self._collective((sum(send_elems) - send_elems[self.rank]) * send.element_size(), send.device):
            dist.all_to_all_single(recv, send, recv_elems, send_elems, group=self.group)
        return recv

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x`` (same shape on all ranks), in rank order."""
        out = [torch.empty_like(x) for _ in range(self.world)]
        with self._collective((self.world - 1) * x.numel() * x.element_size(), x.device):
            dist.all_gather(out, x.contiguous(), group=self.group)
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` as rank ``src`` has it, on every rank (in place; returned for convenience)."""
        sent = (self.world - 1) * x.numel() * x.element_size() if self.rank == src else 0
        with self._collective(sent, x.device):
            dist.broadcast(x, dist.get_global_rank(self.group, src) if self.group else src, group=self.group)
        return x

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when every rank passes ``ok=True`` (an all-reduce of the minimum)."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else "cpu"
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessGroupContext:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): NCCL with one
    GPU per process (LOCAL_RANK) when CUDA is available, else gloo. ``timeout_s``: how long a collective may wait."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"{missing} not set: start several processes with `torchrun --nproc-per-node N -m "
                         f"ultragen.cli generate ...`")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return ProcessGroupContext()
