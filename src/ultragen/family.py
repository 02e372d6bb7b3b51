"""The model-family seam: what the pipeline, training and benchmarks need from a model family, and the registry.

A family (FLUX.1: :mod:`ultragen.flux.family`; FLUX.2 [klein]: :mod:`ultragen.flux2.family`) is one object that
implements :class:`ModelFamily`. Code above this layer (``ultragen.pipeline``, ``ultragen.train``,
``ultragen.bench``) asks :func:`family_of_model` / :func:`family_of_pipeline` / :func:`family_named` for it and
calls its methods; it never branches on a family's name. Layout, policy and attention know no family at all.

Latents. Every family has one *latent grid*: an unpacked latent (B, C, H / latent_px, W / latent_px) in the
transformer's space (FLUX.1: the VAE latent scaled and shifted, 8 px per latent pixel, C = 16; FLUX.2: the
patchified, BatchNorm-normalised latent, 16 px per latent pixel, C = 128) and packed tokens (B, tokens, token
channels) in raster order. The pipeline upsamples, sharpens, re-noises and crops on that grid, and saves it;
the family packs, unpacks and decodes it.

Adding a family (e.g. Qwen-Image): a module ``ultragen.<name>.family`` with a subclass instance ``FAMILY``, and
one line in :data:`_MODULES`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # only for annotations: importing this module stays cheap
    from ultragen.layout import HierLayout
    from ultragen.pipeline.config import GenerationConfig, ModelDefaults
    from ultragen.policy import AttentionPlan

# family name -> module holding its FAMILY object (imported on first use: FLUX.2's imports diffusers' klein code)
_MODULES = {"flux1": "ultragen.flux.family", "flux2": "ultragen.flux2.family"}
# the built-in random-weight models (built in code, offline) -> their family
TINY_MODELS = {"tiny-random": "flux1", "tiny-random-klein": "flux2", "tiny-random-klein-base": "flux2"}


@dataclass(frozen=True)
class Prompt:
    """Encoded prompts of one batch. ``embeds``: (B, text_tokens, joint_dim); ``pooled``: (B, pooled_dim) or None
    (families without a pooled embedding); ``negative``: the unconditional branch's embeds for CFG, else None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    negative: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know of a model before loading it, read from its config files (no weights)."""

    family: str  # a key of the registry
    heads: int  # the transformer's attention heads
    head_dim: int
    defaults: ModelDefaults  # the model's default steps, guidance / CFG, text tokens, shift


class ModelFamily(ABC):
    """One model family. Tensors are described in the method docstrings; ``pipe`` is the family's diffusers
    pipeline (the object :meth:`load_pipeline` returns)."""

    name: str  # registry key, e.g. "flux1"
    title: str  # for messages, e.g. "FLUX.1"
    pipeline_classes: tuple[str, ...]  # model_index.json ``_class_name`` values this family loads
    tiny_models: tuple[str, ...]  # built-in random-weight model names (offline)
    latent_px: int  # image pixels per latent-grid pixel (a token is always 16 px)

    # --- models --------------------------------------------------------------------------------------------------
    @abstractmethod
    def load_pipeline(self, model: str, dtype: torch.dtype):
        """The stock diffusers pipeline of ``model`` (id, folder or tiny name); MissingWeightsError if absent."""

    @abstractmethod
    def load_vae(self, model: str, dtype: torch.dtype):
        """Only the VAE of ``model`` (to re-decode a saved latent)."""

    @abstractmethod
    def inspect(self, model: str, root: Path | None) -> ModelInfo:
        """:class:`ModelInfo` from the config files in ``root`` (None for a tiny model)."""

    @abstractmethod
    def defaults(self, pipe) -> ModelDefaults:
        """The defaults of a loaded pipeline (same as :meth:`inspect` gives for its files)."""

    # --- stages --------------------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, pipe, prompts: list[str], config: GenerationConfig, device: torch.device) -> Prompt:
        """Prompt embeddings in the transformer's dtype (and the negative prompt's when the config runs CFG)."""

    @abstractmethod
    def stage_a(self, pipe, prompt: Prompt, config: GenerationConfig, generator, progress: bool,
                on_step=None) -> torch.Tensor:
        """The guide with the stock pipeline at ``config.guide_size_px``: clean latent grid (B, C, h/lp, w/lp).
        ``on_step(done, total, latent_or_None)`` after each step (the last one gets the latent)."""

    @abstractmethod
    def hierarchical(self, transformer, *, backend: str = "auto", ntk_factor: float = 1.0, cache_guide: bool = True,
                     ff_chunk_tokens: int | None = None, parallel=None):
        """The family's hierarchical wrapper of ``transformer`` (``ff_chunk_tokens``: where the family chunks its
        feed-forward; ``parallel``: a SequenceParallel where the family supports it)."""

    @abstractmethod
    def hires_scheduler(self, pipe, config: GenerationConfig, layout: HierLayout, device: torch.device):
        """A fresh scheduler set to ``config.steps`` steps for this layout, positioned at ``warm_start_skip``."""

    @abstractmethod
    def velocity(self, hier, x: torch.Tensor, prompt: Prompt, sigma: torch.Tensor, plan: AttentionPlan,
                 guide: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        """Velocity (B, hires_tokens, C) of window-first hires tokens ``x`` at sigma (B,), guidance or CFG applied
        (CFG: both branches read the same cached guide keys and values)."""

    # --- latents -------------------------------------------------------------------------------------------------
    @abstractmethod
    def pack(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, rows', cols') latent grid -> (B, tokens, token channels), raster order."""

    @abstractmethod
    def unpack(self, tokens: torch.Tensor, height_px: int, width_px: int) -> torch.Tensor:
        """Raster tokens of a height_px x width_px image -> its latent grid."""

    @abstractmethod
    def decode(self, vae, latent: torch.Tensor, tile_px: int | None, progress: bool) -> torch.Tensor:
        """Latent grid -> (B, 3, H, W) float32 images in [0, 1], tiled VAE decode."""

    # --- LoRAs ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def claims_lora(self, modules: set[str]) -> bool:
        """Whether a LoRA file adapting these transformer modules was made for this family."""

    @abstractmethod
    def read_lora_metadata(self, path: str | Path):
        """The ``LoraMetadata`` a guide LoRA file of this family runs under."""

    @abstractmethod
    def load_guide_lora(self, transformer, path: str | Path, expected, allow_mismatch: bool = False):
        """Add the guide LoRA at ``path`` as adapter ``guide``; returns its ``LoraMetadata``."""

    @abstractmethod
    def add_guide_lora(self, transformer, rank: int, alpha: float, targets: str | None = None) -> None:
        """A fresh (identity) guide LoRA for training; ``targets`` None: the family's default set."""

    @abstractmethod
    def save_guide_lora(self, transformer, path: str | Path, metadata) -> Path:
        """Write the guide LoRA with ``metadata`` (atomically)."""

    @abstractmethod
    def check_style_lora_file(self, spec):
        """Everything checkable about a style LoRA file without the model; ValueError naming the file."""

    @abstractmethod
    def load_style_lora(self, pipe, lora, adapter_name: str):
        """Load a style LoRA with diffusers' loader of this family; returns ``LoadedStyleLora``."""

    # --- training --------------------------------------------------------------------------------------------------
    @abstractmethod
    def load_transformer(self, model: str, dtype: torch.dtype):
        """Only the transformer of ``model`` (training needs no text encoder or VAE); MissingWeightsError if absent."""

    @abstractmethod
    def with_transformer(self, model: str, transformer):
        """The family's pipeline of ``model`` around ``transformer`` (shared, not copied; validation samples)."""

    @abstractmethod
    def text_token_limit(self, pipe) -> int:
        """The most prompt tokens the model's tokenizer takes (the default is ``defaults(pipe).text_tokens``)."""

    @abstractmethod
    def encode_text(self, pipe, captions: list[str], text_tokens: int) -> Prompt:
        """Prompt embeddings of ``captions`` for the training cache (``negative`` None; ``pooled`` None for families
        without a pooled embedding)."""

    @abstractmethod
    def encode_images(self, pipe, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> their latent grid (B, C, H / latent_px, W / latent_px): the VAE posterior's
        mode in the transformer's space (the same grid :meth:`decode` takes)."""

    @abstractmethod
    def sample_images(self, pipe, prompt: str, size_px: int, steps: int | None, guidance: float, generator,
                      text_tokens: int) -> list:
        """One square image of ``prompt`` drawn by the stock pipeline (``train prepare --generate``), as PIL.
        ``steps`` None: the model's default; ``guidance``: the guidance embedding's scale where the model has one
        (otherwise the model's own CFG default applies)."""

    @abstractmethod
    def train_velocity(self, hier, x: torch.Tensor, prompt: Prompt, t: torch.Tensor, plan: AttentionPlan,
                       guide: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """The hierarchical transformer's velocity (B, hires_tokens, C) for the flow-matching loss: window-first
        hires ``x`` at sigma ``t`` (B,), tile-first clean ``guide``, ``guidance`` (B,) or None, no CFG."""

    # --- benchmarks ----------------------------------------------------------------------------------------------
    @abstractmethod
    def random_transformer(self, config: dict, device: str, dtype: torch.dtype, seed: int = 0):
        """The family's diffusers transformer of architecture ``config`` with random weights."""

    @abstractmethod
    def random_pipeline(self, parts: dict[str, Any], device: str, dtype: torch.dtype):
        """The family's stock diffusers pipeline with every component built from ``parts`` (family-specific keys:
        ``transformer`` and the text encoders' and VAE's constructor arguments) with random weights, directly on
        ``device`` in ``dtype``; tokenizers are byte-level stand-ins (``ultragen bench image``)."""

    @abstractmethod
    def random_step_inputs(self, model, layout: HierLayout, seed: int = 0) -> dict[str, Any]:
        """Random inputs of one transformer step at this layout (hires window-first, guide tile-first)."""

    @abstractmethod
    def hier_step(self, hier, inputs: dict[str, Any], plan: AttentionPlan) -> torch.Tensor:
        """One hierarchical step on :meth:`random_step_inputs`."""

    @abstractmethod
    def dense_step(self, model, inputs: dict[str, Any], layout: HierLayout) -> torch.Tensor:
        """The stock diffusers forward over the same text and hires tokens (raster order), no guide."""


def family_named(name: str) -> ModelFamily:
    """The registered family ``name`` (``flux1``, ``flux2``)."""
    if name not in _MODULES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_MODULES)}")
    return import_module(_MODULES[name]).FAMILY


def families() -> list[ModelFamily]:
    return [family_named(name) for name in _MODULES]


def tiny_family(model: str) -> ModelFamily | None:
    """The family of a built-in tiny model name, else None (no import of heavy modules for other names)."""
    return family_named(TINY_MODELS[model]) if model in TINY_MODELS else None


def family_of_index(index: dict, where: str) -> ModelFamily:
    """The family whose pipeline class a model_index.json names; ValueError saying which ones load otherwise."""
    name = index.get("_class_name")
    for family in families():
        if name in family.pipeline_classes:
            return family
    known = ", ".join(c for f in families() for c in f.pipeline_classes)
    raise ValueError(f"{where} is a {name!r} model; ultragen runs {known}; pass a FLUX.1 or FLUX.2 [klein] model")


def family_of_model(model: str) -> ModelFamily:
    """The family of ``model`` (tiny name, folder, or hub id resolved through the local cache; online, its config
    files are fetched) from its model_index.json. MissingWeightsError when the model is not available."""
    if (family := tiny_family(model)) is not None:
        return family
    from ultragen.pipeline.loading import MissingWeightsError, missing_weights_message, model_folder

    root = model_folder(model)
    index = root / "model_index.json"
    if not index.is_file():
        raise MissingWeightsError(missing_weights_message(model, f"folder {root} has no model_index.json"))
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MissingWeightsError(missing_weights_message(model, f"cannot read {index} ({error})")) from None
    return family_of_index(data, f"model {model!r}")


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a loaded diffusers pipeline, by its class."""
    return family_of_index({"_class_name": type(pipe).__name__}, f"pipeline {type(pipe).__name__}")


def lora_modules(path: str | Path) -> set[str]:
    """The transformer module names a LoRA file adapts (``transformer.<module>.lora_A.weight`` keys); an unreadable
    file gives the empty set (the family's own reader says what is wrong)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - safetensors' own error types; reported by the reader
        return set()
    return {k.removeprefix("transformer.").split(".lora_")[0] for k in keys if ".lora_" in k}


def family_of_lora(path: str | Path) -> ModelFamily | None:
    """The family a LoRA file was made for, judged by the modules it adapts; None when none claims it alone."""
    modules = lora_modules(path)
    claims = [f for f in families() if f.claims_lora(modules)] if modules else []
    return claims[0] if len(claims) == 1 else None


def check_lora_family(path: str | Path, family: ModelFamily, model: str, kind: str = "LoRA") -> None:
    """Refuse (ValueError, one line) a LoRA file made for another family than the model's."""
    other = family_of_lora(path)
    if other is not None and other is not family:
        raise ValueError(f"{kind} {str(path)!r} is a {other.title} LoRA but model {model!r} is {family.title}: "
                         f"the layers differ; pass a LoRA made for {family.title} (train one with "
                         f"`ultragen train --model {model}`)")
