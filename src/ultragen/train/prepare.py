"""``ultragen train prepare``: images and captions -> a training cache (see :mod:`ultragen.train.cache`).

Order of work: check the output folder and every input (nothing written yet), load the pipeline, optionally draw
the training images with the base model, encode, write shards, write the manifest last. Any model family: text
embeddings and latents come from the family (``ultragen.family``: ``encode_text``, ``encode_images``, ``pack``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ultragen.atomic import atomic_path
from ultragen.family import ModelFamily, family_named, family_of_model, family_of_pipeline
from ultragen.train.cache import (
    EMPTY,
    ITEMS,
    CacheManifest,
    CacheWriter,
    normalise_model,
    write_tensors_atomic,
    write_text_atomic,
)
from ultragen.train.config import MAX_TEXT_TOKENS, PrepareConfig, check_geometry
from ultragen.train.data import Item, check_images, collect_items, guide_image, load_square, to_tensor


def check_out_dir(out_dir: str | Path) -> Path:
    """The output must be a new or empty folder: an existing cache (or anything else) is never overwritten."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; pass a new folder for the cache")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} is not empty; pass a new folder (prepare never overwrites; if it "
                         f"holds an unfinished cache without manifest.json, delete it first)")
    return out


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--prompts {str(path)!r} is not a file; pass a text file with one prompt a line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {str(path)!r} holds no prompts (one a line, '#' starts a comment)")
    return prompts


def resolve_text_tokens(config: PrepareConfig, pipe, family=None) -> int:
    """The model's default prompt length (FLUX.1-dev and klein 512, schnell 256), at most its tokenizer's."""
    family = family or family_of_pipeline(pipe)
    limit = min(family.text_token_limit(pipe), MAX_TEXT_TOKENS)
    text = config.text_tokens or min(family.defaults(pipe).text_tokens, limit)
    if text > limit:
        raise ValueError(f"text_tokens={text} is above what the model's text tokenizer allows ({limit}); use {limit}")
    check_geometry(config.size_px, config.rho, config.window_tokens, config.block_tokens, text)
    return text


def prepare_cache(config: PrepareConfig, device: str | torch.device | None = None, progress: bool = True,
                  log_line=print) -> CacheManifest:
    """Build the cache described by ``config``; returns its manifest. Raises ValueError for bad input."""
    out = check_out_dir(config.out_dir)
    items: list[Item] = []
    if not config.generate_count:
        items = collect_items(config.images_dir, config.captions_file)
        check_images(items, config.size_px)
    prompts = read_prompts(config.prompts_file) if config.generate_count else []
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    family = family_of_model(config.model)
    pipe = family.load_pipeline(config.model, dtype).to(device)
    text_tokens = resolve_text_tokens(config, pipe, family)
    out.mkdir(parents=True, exist_ok=True)
    if config.generate_count:
        images_dir = generate_images(pipe, config, prompts, out / "images", text_tokens, progress, family)
        items = collect_items(images_dir)
    log_line(f"encoding {len(items)} images at {config.size_px} px (guide {config.size_px // config.rho} px)")
    writer = CacheWriter(out, config.shard_items)
    with torch.no_grad():
        for start in tqdm(range(0, len(items), config.batch_size), desc="encode", disable=not progress):
            writer.add(**encode_items(pipe, items[start : start + config.batch_size], config, text_tokens))
        text, pooled = encode_text(pipe, [""], text_tokens)
    write_tensors_atomic(out / EMPTY, {"text": text[0], "pooled": pooled[0]})
    lines = [json.dumps({"index": i, "file": it.name, "caption": it.caption}) for i, it in enumerate(items)]
    write_text_atomic(out / ITEMS, "\n".join(lines) + "\n")
    cfg = pipe.transformer.config
    manifest = writer.finish(dict(
        model=normalise_model(config.model), size_px=config.size_px, rho=config.rho,
        window_tokens=config.window_tokens, block_tokens=config.block_tokens, text_tokens=text_tokens,
        channels=cfg.in_channels, joint_dim=cfg.joint_attention_dim, pooled_dim=pooled.shape[-1],
        prepare=config.to_record(),
    ))
    log_line(f"wrote {manifest.count} items in {len(manifest.shards)} shards to {out}")
    return manifest


def encode_text(pipe, captions: list[str], text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) prompt embeddings and (B, P) pooled embeddings as the family's pipeline computes them (P = 0 for
    families without a pooled embedding: FLUX.2)."""
    prompt = family_of_pipeline(pipe).encode_text(pipe, captions, text_tokens)
    pooled = prompt.pooled if prompt.pooled is not None else prompt.embeds.new_zeros(prompt.embeds.shape[0], 0)
    return prompt.embeds, pooled


def encode_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> packed latents in the transformer's space (B, H/16 * W/16, in_channels)."""
    family = family_of_pipeline(pipe)
    return family.pack(family.encode_images(pipe, images))


def encode_items(pipe, items: list[Item], config: PrepareConfig, text_tokens: int) -> dict[str, torch.Tensor]:
    squares = [load_square(item.path, config.size_px) for item in items]
    guides = [guide_image(square, config.rho) for square in squares]
    text, pooled = encode_text(pipe, [item.caption for item in items], text_tokens)
    return {"hires": encode_latents(pipe, to_tensor(squares)).float(),
            "guide": encode_latents(pipe, to_tensor(guides)).float(), "text": text, "pooled": pooled}


def generate_images(pipe, config: PrepareConfig, prompts: list[str], images_dir: Path, text_tokens: int,
                    progress: bool, family: ModelFamily | None = None) -> Path:
    """The paper's data: ``generate_count`` images drawn by the base model of ``family`` (None: FLUX.1) (prompts
    cycled, seed ``seed + i``), saved as PNG with a ``.txt`` caption each. Steps: ``generate_steps`` or the
    model's (FLUX.1-dev 28, schnell 4, klein 4, klein-base 50)."""
    images_dir.mkdir(parents=True)
    family = family or family_named("flux1")
    pipe.set_progress_bar_config(disable=True)
    for i in tqdm(range(config.generate_count), desc="generate", disable=not progress):
        prompt = prompts[i % len(prompts)]
        generator = torch.Generator("cpu").manual_seed(config.seed + i)
        image = family.sample_images(pipe, prompt, config.size_px, config.generate_steps, config.generate_guidance,
                                     generator, text_tokens)[0]
        name = f"{i:06d}"
        with atomic_path(images_dir / f"{name}.png") as tmp:  # the training step reads it: never a partial PNG
            image.save(tmp, format="PNG")
        write_text_atomic(images_dir / f"{name}.txt", prompt + "\n")
    return images_dir
