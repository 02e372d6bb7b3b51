"""Run a function on N forked processes joined in a gloo group (CPU tests of ``ultragen.parallel``).

Fork, not spawn: the children inherit the parent's imports and objects (a tiny model, inputs, reference outputs), so a
group starts in well under a second instead of importing torch and diffusers again in every child."""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, timeout_s, queue):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        buffer = io.BytesIO()  # plain bytes: a queued tensor would be shared memory that dies with this process
        torch.save(fn(rank, world), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        queue.put((rank, "error", traceback.format_exc()))
        raise


def start_ranks(world: int, fn: Callable[[int, int], object], timeout_s: float = 30.0):
    """Start ``fn(rank, world)`` on ``world`` forked processes; returns (processes, result queue)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, timeout_s, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    return procs, queue


def run_ranks(world: int, fn: Callable[[int, int], object], timeout_s: float = 60.0) -> list:
    """``fn(rank, world)`` on every rank of a fresh gloo group; the results in rank order (fails with a rank's
    traceback if one raised)."""
    procs, queue = start_ranks(world, fn)
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            rank, status, value = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
