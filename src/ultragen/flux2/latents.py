"""FLUX.2 latents: between the ``AutoencoderKLFlux2`` latent and the packed tokens the transformer reads.

One token covers 16x16 px: the VAE downsamples by 8, then each 2x2 patch of latent pixels becomes one token of
4 * latent_channels channels (``_patchify_latents``), normalised by the VAE's BatchNorm running statistics, and the
(B, C, rows, cols) grid is flattened in raster order (``_pack_latents``). Every step reuses diffusers'
``Flux2KleinPipeline`` static helpers, so the convention is exactly the stock pipeline's.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

from ultragen.flux2.ids import raster_image_ids


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, 4 * latent_channels, 1, 1), of the VAE's patchified latents."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, rows, cols) patchified, normalised latents -> (B, rows*cols, C) tokens in raster order."""
    return Flux2KleinPipeline._pack_latents(latents)


def unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows*cols, C) raster-order tokens -> (B, C, rows, cols)."""
    if tokens.shape[1] != rows * cols:
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a {rows}x{cols} token grid")
    ids = raster_image_ids(rows, cols).to(tokens.device).expand(tokens.shape[0], -1, -1)
    return Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids, rows, cols)


def encode_to_tokens(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] (H, W multiples of 16) -> (B, (H/16)*(W/16), C) normalised tokens, raster
    order (the posterior's mode, as diffusers' ``Flux2KleinPipeline._encode_vae_image``)."""
    latents = vae.encode(images).latent_dist.mode()
    patches = Flux2KleinPipeline._patchify_latents(latents)
    mean, std = _bn_stats(vae, patches)
    return pack((patches - mean) / std)


def tokens_to_vae_latents(vae, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows*cols, C) raster-order tokens -> (B, latent_channels, 2*rows, 2*cols), what ``vae.decode`` takes
    (un-normalised and un-patchified as the stock pipeline does before decoding)."""
    patches = unpack(tokens, rows, cols)
    mean, std = _bn_stats(vae, patches)
    return Flux2KleinPipeline._unpatchify_latents(patches * std + mean)


def noise_tokens(batch: int, rows: int, cols: int, channels: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, rows*cols, channels) Gaussian noise tokens in raster order, drawn as the stock pipeline draws them
    (a (B, channels, rows, cols) tensor, then packed), so a seed gives the stock pipeline's starting noise."""
    from diffusers.utils.torch_utils import randn_tensor

    return pack(randn_tensor((batch, channels, rows, cols), generator=generator, device=torch.device(device),
                             dtype=dtype))
