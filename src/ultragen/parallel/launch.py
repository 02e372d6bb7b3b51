"""Running one command over N processes: join the group, fail together, write once.

Under ``torchrun`` every process runs the same command. A process that fails prints one line (its rank and the
error) and exits at once; its peers, waiting in a collective, then fail too: gloo sees the closed connection at once,
and under NCCL ``torchrun`` stops the remaining workers as soon as one exits with an error (the process-group timeout
is the last resort). Peers that fail only because another rank died exit quietly, so the user reads one line: the
cause. Files are written by rank 0 alone, atomically, and only after every rank has agreed it finished
(:meth:`ProcessGroupContext.all_ok`), so a failure anywhere leaves no file, partial or whole, of that prompt.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import replace

import torch.distributed as dist

from ultragen.parallel.context import (
    DEFAULT_TIMEOUT_S,
    ParallelMode,
    ProcessGroupContext,
    init_process_group,
    parse_parallel_mode,
)
from ultragen.parallel.sequence import SequenceParallel
from ultragen.parallel.shards import HiresShards
from ultragen.parallel.ulysses import check_heads

# what a collective reports when another rank died under it (gloo; NCCL reports a DistError)
PEER_FAILURE_TEXT = ("Connection closed by peer", "Connection reset by peer", "remote worker", "Broken pipe")


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank stopped (not this rank's own fault)."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in PEER_FAILURE_TEXT)


def exit_status(error: BaseException) -> int:
    """The CLI's exit status for ``error``: 2 bad input (ValueError), 130 interrupted, else 1."""
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 2 if isinstance(error, ValueError) else 1


@contextlib.contextmanager
def fail_together(comm: ProcessGroupContext | None, prog: str = "ultragen") -> Iterator[None]:
    """Around a rank's whole run: on an exception, one line ``PROG: error on rank R of N: ERROR`` on stderr (none
    when the error is only a peer's failure seen through a collective) and an immediate ``os._exit`` with
    :func:`exit_status` (no cleanup that could wait on the dead peer; atomic writes have already removed their
    temporary files on the way out)."""
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - every failure must stop this rank at once
        if not is_peer_failure(error):
            where = f" on rank {comm.rank} of {comm.world}" if comm is not None else ""
            print(f"{prog}: error{where}: {error}", file=sys.__stderr__, flush=True)
        sys.stdout.flush()
        os._exit(exit_status(error))


def join_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessGroupContext:
    """The process group of this ``torchrun`` launch (see :func:`ultragen.parallel.context.init_process_group`)."""
    if "RANK" not in os.environ:
        raise ValueError("--parallel needs several processes: start the command with `torchrun --nproc-per-node N "
                         "-m ultragen.cli generate ... --parallel ulysses|halo`")
    return init_process_group(timeout_s)


class _Discard:
    """A text stream that drops what is written (the other ranks' progress bars, logs and copies of rank 0's
    messages)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def quiet_other_ranks() -> None:
    """On every rank but 0 of a torchrun launch, drop what goes to ``sys.stderr`` (progress, logs, and input errors,
    which every rank finds alike): the user reads rank 0. :func:`fail_together` writes to the real stderr, so a
    rank's own failure is always shown."""
    if os.environ.get("RANK", "0") != "0":
        sys.stderr = _Discard()


def rank_device(device: str) -> str:
    """This process's device: ``cuda`` (or ``cuda:N``) becomes the GPU torchrun gave it (LOCAL_RANK)."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device.startswith("cuda") else device


def check_job(job, mode: ParallelMode | str, world: int) -> None:
    """Refuse, before anything is loaded, a parallel run that cannot split: too few windows for the processes, or
    (Ulysses) heads that do not divide over them. Raises ValueError with the fix."""
    from ultragen.pipeline.loading import inspect_model

    for layout in job.config.layouts():
        HiresShards.of(layout, world)
    if parse_parallel_mode(mode) is ParallelMode.ULYSSES:
        check_heads(inspect_model(job.config.model).heads, world)


def generate_files_parallel(job, mode: ParallelMode | str, progress: bool = True, log=print,
                            prog: str = "ultragen generate", timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """``ultragen generate`` on this torchrun process: the hires pass over all processes in ``mode``, files written
    by rank 0 (:func:`ultragen.pipeline.job.generate_files`). Returns 0; a failure exits (:func:`fail_together`)."""
    from ultragen.pipeline.job import generate_files

    mode = parse_parallel_mode(mode)
    comm = join_group(timeout_s)
    check_job(job, mode, comm.world)
    with fail_together(comm, prog):
        if comm.rank == 0:
            log(f"hires pass over {comm.world} processes ({mode.value})")
        generate_files(replace(job, device=rank_device(job.device)), progress=progress and comm.rank == 0,
                       log=log if comm.rank == 0 else (lambda _line: None), parallel=SequenceParallel(comm, mode))
        comm.all_ok(True)  # nobody leaves while rank 0 still writes
        dist.destroy_process_group()
    return 0
