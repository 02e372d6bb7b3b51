"""Sequence parallelism for the hierarchical pass over several processes (``torch.distributed``: NCCL on GPUs, gloo
on the CPU).

Each rank holds a contiguous run of whole windows of the hires sequence (:class:`HiresShards`); text and guide are
replicated. Around attention, either

- ``ulysses``: an all-to-all turns the sequence shard into a head shard, every rank runs the block-sparse ``attend``
  on the whole plan for H/N heads, and a second all-to-all turns it back (:mod:`ultragen.parallel.ulysses`); or
- ``halo``: each rank keeps all heads of its windows and receives only the key/value blocks of other ranks that its
  query blocks read, as the plan's block table says (:mod:`ultragen.parallel.halo`).

Both are exact: the same function as one process. :class:`SequenceParallel` is what ``HierFluxTransformer(...,
parallel=...)`` takes; :mod:`ultragen.parallel.traffic` counts the bytes each moves per step.
"""

from ultragen.parallel.context import ParallelMode, ProcessGroupContext, parse_parallel_mode
from ultragen.parallel.sequence import SequenceParallel
from ultragen.parallel.shards import HiresShards
from ultragen.parallel.traffic import Traffic, step_traffic

__all__ = ["HiresShards", "ParallelMode", "ProcessGroupContext", "SequenceParallel", "Traffic", "parse_parallel_mode",
           "step_traffic"]
