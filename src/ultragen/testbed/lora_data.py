"""A guide-LoRA training cache from testbed scenes, in the format ``ultragen train`` reads (ultragen.train.cache).

Each item is one scene at ``scale`` x the base size (the hires latent) with its base-size render as the guide: the
analytic render at the base size *is* the antialiased (box-filtered) downsample of the hires image. Latents come
from the testbed's fixed codec and prompts from its caption encoder, so no VAE or text encoder is involved. The
cache names the testbed model folder ``RUN_DIR/model`` (written by ``ultragen testbed train``), which
``ultragen train --model RUN_DIR/model`` loads like any diffusers FLUX folder. Sizes in the manifest are layout
pixels (16 per token; :func:`ultragen.testbed.latent.layout_px`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ultragen.testbed.latent import layout_px, to_tokens
from ultragen.testbed.scenes import render, sample_scene
from ultragen.testbed.train import TRAIN_SUPERSAMPLE, load_config
from ultragen.train.cache import EMPTY, CacheWriter, normalise_model, write_tensors_atomic, write_text_atomic

LORA_SEED0 = 500_000_000  # LoRA scenes: seeds LORA_SEED0 + i (the base model trained on other seeds)


def write_lora_cache(run_dir: str | Path, out_dir: str | Path, count: int, scale: int | None = None,
                     batch: int = 16, shard_items: int = 64, workers: int = 0) -> Iterator[int]:
    """Write ``count`` items; yields the number written after each batch. ``scale`` defaults to the config's rho.

    ``workers`` > 0 renders the scenes in that many processes (the items and their order do not change).
    """
    if workers < 0:
        raise ValueError(f"workers={workers}: use 0 (render in this process) or a positive number of processes")
    run_dir, out = Path(run_dir), Path(out_dir)
    config = load_config(run_dir)
    scale = config.rho if scale is None else scale
    if not (run_dir / "model" / "transformer" / "config.json").exists():
        raise ValueError(f"{run_dir}/model/transformer is missing; finish a `ultragen testbed train` run first")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} is not empty; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    codec, encoder = config.codec(), config.text_encoder()
    writer = CacheWriter(out, shard_items)
    sizes_px = (config.base_px * scale, config.base_px)
    with ProcessPoolExecutor(min(workers, batch)) if workers else nullcontext() as pool:  # a batch at a time
        mapper = pool.map if pool else map
        for first in range(0, count, batch):
            scenes = [sample_scene(LORA_SEED0 + i) for i in range(first, min(count, first + batch))]
            renders = list(mapper(_render_sizes, scenes, [sizes_px] * len(scenes)))
            hires, guide = (_encode(codec, [r[k] for r in renders]) for k in range(2))
            prompt = encoder.encode_scenes(scenes)
            writer.add(hires=to_tokens(hires), guide=to_tokens(guide), text=prompt.embeds, pooled=prompt.pooled)
            yield first + len(scenes)
    empty = encoder.encode_scenes([None])
    write_tensors_atomic(out / EMPTY, {"text": empty.embeds[0], "pooled": empty.pooled[0]})
    writer.finish({
        "model": normalise_model(str(run_dir / "model")), "size_px": layout_px(config.base_tokens * scale),
        "rho": config.rho, "window_tokens": config.window_tokens, "block_tokens": config.block_tokens,
        "text_tokens": config.text_tokens, "channels": codec.channels, "joint_dim": config.joint_dim,
        "pooled_dim": config.pooled_dim,
        "prepare": {"testbed": config.to_dict(), "scale": scale, "first_seed": LORA_SEED0, "count": count},
    })
    write_text_atomic(out / "testbed.json", json.dumps(config.to_dict(), indent=2))


def _render_sizes(scene, sizes_px: tuple[int, ...]) -> list[np.ndarray]:
    """One scene rendered at each size: [(size, size, 3) float images] (module level so worker processes can run it)."""
    return [render(scene, size, supersample=TRAIN_SUPERSAMPLE) for size in sizes_px]


def _encode(codec, images: list[np.ndarray]) -> torch.Tensor:
    """[(H, W, 3)] images -> (B, C, h, w) latents."""
    return codec.encode(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
