"""Latents -> pixels with diffusers' tiled VAE decode (and a progress bar over tiles); the latent file format.

A latent file is safetensors with one tensor ``latent``: the final, cropped, UNPACKED latent (B, C, H/8, W/8) in the
transformer's space (before the VAE's scaling and shift), and string metadata: ``ultragen_config`` (the resolved
GenerationConfig as JSON), ``prompt``, ``format``. It is written before decoding, so a decode that runs out of
memory loses nothing: ``ultragen decode FILE --tile-size 512 --device cpu`` finishes the job.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

from ultragen.pipeline.latents import to_vae_space
from ultragen.pipeline.outputs import atomic_path

LATENT_FORMAT = "ultragen-latent-v1"


def tile_count(vae, latent_hw: tuple[int, int]) -> int:
    """How many decoder calls diffusers' AutoencoderKL.tiled_decode makes for this latent size."""
    if not vae.use_tiling or max(latent_hw) <= vae.tile_latent_min_size:
        return 1
    stride = int(vae.tile_latent_min_size * (1 - vae.tile_overlap_factor))
    return len(range(0, latent_hw[0], stride)) * len(range(0, latent_hw[1], stride))


def set_vae_tiling(vae, tile_px: int | None) -> None:
    """Tiled decoding on, with ``tile_px`` square tiles (None: the VAE's own ``sample_size``)."""
    vae.enable_tiling()
    size = tile_px if tile_px is not None else vae.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    vae.tile_sample_min_size = size
    vae.tile_latent_min_size = size // 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, tile_px: int | None = None, progress: bool = True,
                   to_vae=None) -> torch.Tensor:
    """Unpacked latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1], decoded tile by tile.
    ``to_vae(latents, vae)``: the family's map to what ``vae.decode`` takes (default FLUX.1's ``to_vae_space``)."""
    set_vae_tiling(vae, tile_px)
    param = next(vae.parameters())
    z = (to_vae or to_vae_space)(latents.to(device=param.device, dtype=param.dtype), vae)
    bar = tqdm(total=tile_count(vae, tuple(z.shape[-2:])) * z.shape[0], desc="decode", unit="tile",
               disable=not progress)

    def tick(*_) -> None:  # a pre-hook that returned a value would replace the decoder's input
        bar.update()

    hook = vae.decoder.register_forward_pre_hook(tick)
    try:
        images = torch.cat([vae.decode(z[i : i + 1]).sample for i in range(z.shape[0])])
    finally:
        hook.remove()
        bar.close()
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> B RGB images."""
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def save_latent(path: str | Path, latents: torch.Tensor, config: dict, prompt: str) -> None:
    """Write (atomically) an unpacked latent and its generation record; see the module docstring."""
    metadata = {"format": LATENT_FORMAT, "prompt": prompt, "ultragen_config": json.dumps(config)}
    with atomic_path(path) as tmp:
        save_file({"latent": latents.detach().to("cpu").contiguous()}, str(tmp), metadata=metadata)


def load_latent(path: str | Path) -> tuple[torch.Tensor, dict, str]:
    """(latents (B, C, h, w), config record, prompt) of a file written by :func:`save_latent`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"latent file {str(path)!r} does not exist; pass the .latent.safetensors that generate wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{str(path)!r} is not a safetensors file ({error}); pass a file written by generate") from None
    if metadata.get("format") != LATENT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an ultragen latent (format {metadata.get('format')!r}, "
                         f"expected {LATENT_FORMAT!r}); pass a .latent.safetensors written by ultragen generate")
    return load_file(str(path))["latent"], json.loads(metadata["ultragen_config"]), metadata.get("prompt", "")
