"""Persistent ``torch.compile`` caches, so the first compiled image of a new process reuses earlier compiles.

PyTorch keeps compiled code on disk in three caches that share one directory, ``TORCHINDUCTOR_CACHE_DIR``: the
inductor FX graph cache (generated kernels and wrappers, ``torch._inductor.config.fx_graph_cache``), the AOTAutograd
cache (``torch._functorch.config.enable_autograd_cache``) and, below it, Triton's compiled kernels (``triton/``,
unless ``TRITON_CACHE_DIR`` is set). Both flags are on by default in recent PyTorch, but the default directory is
``/tmp/torchinductor_<user>``, which many machines and containers empty between sessions: every ``ultragen
generate`` then compiles from scratch. We point it at a user cache directory instead (docs/design.md, "Compile
caches"):

- ``$ULTRAGEN_CACHE_DIR/compile`` when ``ULTRAGEN_CACHE_DIR`` is set, else ``$XDG_CACHE_HOME/ultragen/compile``
  (``~/.cache/ultragen/compile``), one folder below it per CPU instruction set ATen runs with (``cpu-avx512``,
  ``cpu-avx2``: ``ATEN_CPU_CAPABILITY``). Sharing one folder, a suite run under ``ATEN_CPU_CAPABILITY=avx2`` after
  an AVX-512 run gave NaN in compiled CPU blocks that a fresh folder did not (seen once here; not root-caused);
- a ``TORCHINDUCTOR_CACHE_DIR`` the user set wins (it is left alone).

Dynamo itself still traces the Python code in each new process (seconds); what the cache saves is inductor's code
generation and Triton's kernel compiles (most of a cold compile). Entries are keyed by PyTorch version, graph,
shapes and device, so one directory serves every resolution and precision; it grows by one set of kernels per
(resolution, precision, backend) compiled and is never pruned: clear it with ``rm -rf ~/.cache/ultragen/compile``.
``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts`` (moving caches between machines) are not used:
the on-disk caches already serve a second process on the same machine.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_ROOT = "ULTRAGEN_CACHE_DIR"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path:
    """Where ultragen keeps the compile caches (created by :func:`use_persistent_compile_cache`)."""
    import torch

    root = os.environ.get(ENV_ROOT)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ultragen"
    return Path(root).expanduser() / "compile" / f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"


def use_persistent_compile_cache() -> Path:
    """Turn on the FX graph and AOTAutograd caches and put them (and Triton's kernels) in a persistent directory,
    unless the user chose one with ``TORCHINDUCTOR_CACHE_DIR``. Call before compiling; returns the directory used."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    current = os.environ.get(INDUCTOR_ENV)
    # inductor writes its /tmp default into the variable the first time it looks: that is not the user's choice
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return Path(current)
    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_ENV] = str(path)
    if current:  # an earlier compile in this process resolved the default: drop what it memoised
        from torch._inductor.utils import clear_caches

        clear_caches()
    return path


def cache_size_bytes(path: Path | None = None) -> int:
    """Bytes in the compile cache directory (0 when it does not exist), for records and ``du``-free reporting."""
    root = Path(path) if path is not None else compile_cache_dir()
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
