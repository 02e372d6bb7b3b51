"""Persistent compile caches: the directory inductor (and Triton under it) will use, read back through inductor's
own lookup; the user's TORCHINDUCTOR_CACHE_DIR wins; compile_blocks turns it on (no compile runs here)."""

import os

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir, triton_cache_dir

import flux2_tiny
import flux_tiny
from ultragen.compile_cache import cache_size_bytes, compile_cache_dir, use_persistent_compile_cache
from ultragen.flux import HierFluxTransformer
from ultragen.flux2 import HierFlux2Transformer

ISA = f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"  # one folder per CPU instruction set


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No cache variables set, HOME in tmp, and the two cache flags off (restored afterwards)."""
    for name in ("ULTRAGEN_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield tmp_path
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # set by the code under test; monkeypatch restores the rest


def test_default_is_the_users_cache_folder_and_inductor_uses_it(clean_env):
    path = use_persistent_compile_cache()
    expected = clean_env / "home" / ".cache" / "ultragen" / "compile" / ISA
    assert path == expected and expected.is_dir()
    assert cache_dir() == str(expected)  # inductor's own lookup
    assert triton_cache_dir(0) == str(expected / "triton" / "0")
    assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache


def test_ultragen_cache_dir_and_xdg(clean_env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    assert compile_cache_dir() == clean_env / "xdg" / "ultragen" / "compile" / ISA
    monkeypatch.setenv("ULTRAGEN_CACHE_DIR", str(clean_env / "mine"))
    assert use_persistent_compile_cache() == clean_env / "mine" / "compile" / ISA
    assert cache_dir() == str(clean_env / "mine" / "compile" / ISA)


def test_the_users_inductor_dir_wins_but_inductors_tmp_default_does_not(clean_env, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(clean_env / "chosen"))
    assert use_persistent_compile_cache() == clean_env / "chosen"
    assert cache_dir() == str(clean_env / "chosen")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes there by itself
    assert use_persistent_compile_cache() == clean_env / "home" / ".cache" / "ultragen" / "compile" / ISA


def test_cache_size_counts_the_files(clean_env):
    path = use_persistent_compile_cache()
    assert cache_size_bytes(path) == 0
    (path / "a").mkdir()
    (path / "a" / "kernel.so").write_bytes(b"x" * 1000)
    (path / "b.py").write_text("y" * 24)
    assert cache_size_bytes() == 1024
    assert cache_size_bytes(clean_env / "absent") == 0


@pytest.mark.parametrize("hier_class, model", [(HierFluxTransformer, flux_tiny.tiny_flux),
                                               (HierFlux2Transformer, flux2_tiny.tiny_flux2)])
def test_compile_blocks_uses_the_persistent_cache(clean_env, monkeypatch, hier_class, model):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)  # nothing compiles here
    hier_class(model(), backend="reference").compile_blocks()
    assert len(compiled) == 2
    assert cache_dir() == str(clean_env / "home" / ".cache" / "ultragen" / "compile" / ISA)
