"""The training cache: VAE latents and text embeddings computed once, so training loads only the transformer.

Folder layout (``ultragen train prepare --out CACHE``)::

    CACHE/shard-00000.safetensors   hires (n, N, C) and guide (n, G, C) packed latents in raster order,
                                    text (n, T, D) prompt embeddings (FLUX.1: T5; FLUX.2: stacked Qwen3
                                    hidden states), pooled (n, P) pooled embeddings (FLUX.1: CLIP; P = 0 for
                                    families without one)
    CACHE/empty.safetensors         text (T, D), pooled (P): the empty caption (caption dropout)
    CACHE/items.jsonl               one {"index", "file", "caption"} a line (provenance)
    CACHE/images/                   only with --generate: the base model's images and their .txt captions
    CACHE/manifest.json             written last: the commit point; without it the cache is unfinished

Latents are the family's latent grid of the VAE posterior's mode (``ModelFamily.encode_images``; FLUX.1:
``(z - shift_factor) * scaling_factor``; FLUX.2: patchified and BatchNorm-normalised), packed with the family's
``pack`` (N = (size/16)^2 tokens, G = N / rho^2, C = the transformer's in_channels: FLUX.1 64, klein 128).
Every write is atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ultragen.atomic import atomic_path
from ultragen.pipeline.loading import normalise_model  # noqa: F401  (re-exported: caches record it)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMPTY = "empty.safetensors"
ITEMS = "items.jsonl"
SHARD_KEYS = ("hires", "guide", "text", "pooled")


@dataclass(frozen=True)
class CacheManifest:
    """What a cache holds and what it was built for; training refuses a cache that does not fit its run."""

    format_version: int
    model: str
    size_px: int
    rho: int
    window_tokens: int  # the defaults training uses; latents do not depend on them
    block_tokens: int
    text_tokens: int
    channels: int  # packed latent channels (FLUX.1: 64, klein: 128)
    joint_dim: int  # prompt embedding width
    pooled_dim: int  # pooled embedding width (0: the family has none)
    count: int
    shards: list  # [{"file": NAME, "count": n, "bytes": size}]
    prepare: dict  # the PrepareConfig record

    @property
    def hires_tokens(self) -> int:
        return (self.size_px // 16) ** 2

    @property
    def guide_tokens(self) -> int:
        return (self.size_px // 16 // self.rho) ** 2

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-item shape of every shard tensor."""
        return {"hires": (self.hires_tokens, self.channels), "guide": (self.guide_tokens, self.channels),
                "text": (self.text_tokens, self.joint_dim), "pooled": (self.pooled_dim,)}


def atomic_write(path: Path, write) -> Path:
    """``write(tmp_path)`` then fsync and rename onto ``path``: readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        write(str(tmp))
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


class CacheWriter:
    """Collects encoded items and writes them as shards of ``shard_items``; ``finish`` writes the manifest."""

    def __init__(self, root: Path, shard_items: int):
        self.root, self.shard_items = root, shard_items
        self.pending: dict[str, list[torch.Tensor]] = {k: [] for k in SHARD_KEYS}
        self.shards: list[dict] = []
        self.count = 0

    def add(self, **batch: torch.Tensor) -> None:
        """hires (B, N, C), guide (B, G, C), text (B, T, D), pooled (B, P)."""
        for key in SHARD_KEYS:
            self.pending[key].extend(batch[key].detach().cpu().unbind(0))
        while len(self.pending["hires"]) >= self.shard_items:
            self._flush(self.shard_items)

    def _flush(self, n: int) -> None:
        tensors = {k: torch.stack(v[:n]) for k, v in self.pending.items()}
        self.pending = {k: v[n:] for k, v in self.pending.items()}
        path = self.root / f"shard-{len(self.shards):05d}.safetensors"
        write_tensors_atomic(path, tensors)
        self.shards.append({"file": path.name, "count": n, "bytes": path.stat().st_size})
        self.count += n

    def finish(self, manifest_fields: dict) -> CacheManifest:
        if self.pending["hires"]:
            self._flush(len(self.pending["hires"]))
        manifest = CacheManifest(format_version=FORMAT_VERSION, count=self.count, shards=self.shards,
                                 **manifest_fields)
        write_text_atomic(self.root / MANIFEST, json.dumps(asdict(manifest), indent=2) + "\n")
        return manifest


@dataclass(frozen=True)
class CacheBatch:
    hires: torch.Tensor  # (B, N, C) clean latents x0, raster order
    guide: torch.Tensor  # (B, G, C) clean guide latents, raster order
    text: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor  # (B, P)


class TrainingCache:
    """Read side of a cache: checks the manifest and the shard headers at open, reads items lazily (mmap)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        self._files = []
        self._offsets = []
        start = 0
        for shard in self.manifest.shards:
            self._files.append(self._open_shard(shard))
            self._offsets.append(start)
            start += shard["count"]
        empty = self._open(self.root / EMPTY, {"text": (self.manifest.text_tokens, self.manifest.joint_dim),
                                               "pooled": (self.manifest.pooled_dim,)}, leading=None)
        self.empty_text, self.empty_pooled = empty.get_tensor("text"), empty.get_tensor("pooled")

    def __len__(self) -> int:
        return self.manifest.count

    def _open_shard(self, shard: dict):
        path = self.root / shard["file"]
        if path.is_file() and path.stat().st_size != shard["bytes"]:
            raise ValueError(f"cache shard {str(path)!r} has {path.stat().st_size} bytes but the manifest records "
                             f"{shard['bytes']}: it is truncated or was replaced; rebuild the cache")
        return self._open(path, self.manifest.shapes(), leading=shard["count"])

    def _open(self, path: Path, shapes: dict[str, tuple], leading: int | None):
        if not path.is_file():
            raise ValueError(f"cache file {str(path)!r} is missing; the cache is incomplete, rebuild it with "
                             f"`ultragen train prepare`")
        try:
            handle = safe_open(str(path), framework="pt")
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as error:  # safetensors raises its own types for corrupt headers
            raise ValueError(f"cache file {str(path)!r} is not a readable safetensors file ({error}); "
                             f"rebuild the cache") from None
        for key, shape in shapes.items():
            want = shape if leading is None else (leading, *shape)
            if found.get(key) != want:
                raise ValueError(f"cache file {str(path)!r} holds {key} of shape {found.get(key)}, the manifest "
                                 f"says {want} (size {self.manifest.size_px} px, rho {self.manifest.rho}); "
                                 f"the cache is inconsistent, rebuild it")
        return handle

    def load(self, indices: list[int]) -> CacheBatch:
        rows = {k: [] for k in SHARD_KEYS}
        for index in indices:
            if not 0 <= index < len(self):
                raise IndexError(f"item {index} of a cache of {len(self)}")
            shard = max(i for i, start in enumerate(self._offsets) if start <= index)
            row = index - self._offsets[shard]
            for key in SHARD_KEYS:
                rows[key].append(self._files[shard].get_slice(key)[row : row + 1])
        return CacheBatch(**{k: torch.cat(v) for k, v in rows.items()})

    def check_run(self, model: str, size_px: int | None = None, rho: int | None = None) -> None:
        """Refuse a cache built for another model or another geometry (before any weights are loaded)."""
        m = self.manifest
        where = str(self.root / MANIFEST)
        if normalise_model(model) != m.model:
            raise ValueError(f"cache {where} was built for model {m.model!r} but the run uses {model!r}; train "
                             f"with --model {m.model} or rebuild the cache: ultragen train prepare --model {model}")
        for name, asked in (("size_px", size_px), ("rho", rho)):
            if asked is not None and asked != getattr(m, name):
                raise ValueError(f"cache {where} was built with {name}={getattr(m, name)} but the run asks "
                                 f"{name}={asked}; drop the option or rebuild the cache with it")

    def check_transformer(self, model: str, transformer_config) -> None:
        """Refuse a cache whose latent or text widths do not fit the loaded transformer."""
        m = self.manifest
        widths = (("channels", m.channels, transformer_config.in_channels),
                  ("joint_dim", m.joint_dim, transformer_config.joint_attention_dim),
                  ("pooled_dim", m.pooled_dim, getattr(transformer_config, "pooled_projection_dim", None) or 0))
        for name, cached, needed in widths:
            if cached != needed:
                raise ValueError(f"cache {self.root / MANIFEST} has {name}={cached} but the transformer of "
                                 f"{model!r} needs {needed}; the cache belongs to another model, rebuild it")


def read_manifest(root: Path) -> CacheManifest:
    if not root.is_dir():
        raise ValueError(f"cache folder {str(root)!r} does not exist; build it with "
                         f"`ultragen train prepare --model ID --images DIR --out {root}`")
    path = root / MANIFEST
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing: {str(root)!r} is not a finished cache (prepare was "
                         f"interrupted, or this is another folder); delete it and run `ultragen train prepare` again")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cache manifest {str(path)!r} cannot be read ({error}); rebuild the cache") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise ValueError(f"cache manifest {str(path)!r} has format version {version!r}, this ultragen reads "
                         f"{FORMAT_VERSION}; rebuild the cache with this version")
    names = {f.name for f in fields(CacheManifest)}
    if set(data) != names:
        raise ValueError(f"cache manifest {str(path)!r} has fields {sorted(data)}, expected {sorted(names)}; "
                         f"rebuild the cache")
    return CacheManifest(**data)
