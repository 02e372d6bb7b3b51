"""The FLUX.2 guide-only LoRA: adapters on the guide stream's projections, files in diffusers' key format.

Adapters are injected with PEFT (``transformer.add_adapter``) under the adapter name ``guide``; the hierarchical
forward calls the adapted module for guide tokens only and the original weights for text and hires tokens
(``ultragen.flux2.blocks``). Two kinds of file load:

- ultragen's own (``save_guide_lora``): ``transformer.<module>.lora_A.weight`` keys with the settings it was trained
  under in the safetensors metadata; a run that disagrees is refused unless overridden (as for FLUX.1);
- the method's authors' klein files: a PEFT adapter (r = 16, alpha = 16) on ``Flux2Transformer2DModel`` with their
  target set, saved with ``Flux2KleinPipeline.save_lora_weights`` and no ultragen metadata. Recognised by that
  target set; read through diffusers' ``Flux2KleinPipeline.lora_state_dict`` and ``load_lora_adapter``, and run
  under the settings their code used (:data:`AUTHORS_SETTINGS`), stated in one log line.
"""

from __future__ import annotations

import logging
import re
from enum import Enum
from pathlib import Path

import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open

from ultragen.flux.lora import (
    ADAPTER_NAME, KEY_PREFIX, METADATA_KEY, LoraMetadata, beside_other_adapters, guide_lora_state,
    save_guide_lora,
)
from ultragen.policy import PRESETS

log = logging.getLogger(__name__)

_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."


class LoraTargets(str, Enum):
    """Which guide-path modules of a FLUX.2 transformer carry adapters."""

    QKV = "qkv"  # double blocks' q, k, v and the single blocks' fused q, k, v (+ MLP-in) projection
    WIDE = "wide"  # the authors' klein set: + x_embedder, attention out, feed-forward, single-block fused out

    def pattern(self) -> str:
        """PEFT ``target_modules`` regex (full match on module names)."""
        double = ["attn\\.to_q", "attn\\.to_k", "attn\\.to_v"]
        single = ["attn\\.to_qkv_mlp_proj"]
        if self is LoraTargets.WIDE:
            double += ["attn\\.to_out\\.0", "ff\\.linear_in", "ff\\.linear_out"]
            single += ["attn\\.to_out"]
        alternatives = [f"{_DOUBLE}({'|'.join(double)})", f"{_SINGLE}({'|'.join(single)})"]
        if self is LoraTargets.WIDE:
            alternatives.append("x_embedder")
        return f"({'|'.join(alternatives)})"


# What the authors' klein code ran their LoRA under (research notes, authors_repo.md sections 2-4): their attention
# pattern, a 4x smaller guide, a 16-token (256 px) window, their RoPE (NTK 1, as in train_flux2.yaml and the klein-9B
# config) and their guide ids: guide token (m, n) at (0, 4m, 4n, 0), the top-left token of its footprint.
AUTHORS_SETTINGS = dict(policy=PRESETS["authors-code"].to_dict(), rho=4, guide_offset_tokens=0.0, ntk_factor=1.0,
                        window_tokens=16)
AUTHORS_BASE_MODEL = "black-forest-labs/FLUX.2-klein (authors' guide LoRA)"


def add_guide_lora(transformer: torch.nn.Module, rank: int = 16, alpha: float = 16.0,
                   targets: LoraTargets | str = LoraTargets.WIDE) -> None:
    """Inject a fresh guide LoRA (B initialised to zero, so the model is unchanged until trained). Default: the
    authors' klein target set."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LoraTargets(targets).pattern(),
                        init_lora_weights=True)
    with beside_other_adapters():
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)


def _module_names(keys) -> set[str]:
    return {k.removeprefix(KEY_PREFIX).split(".lora_")[0] for k in keys if ".lora_" in k}


def _is_authors_set(modules: set[str]) -> bool:
    """The authors' klein target set: x_embedder and only (not necessarily every block of) their block modules."""
    wide = re.compile(LoraTargets.WIDE.pattern())
    return "x_embedder" in modules and all(wide.fullmatch(m) for m in modules)


def _open(path: Path) -> tuple[dict, set[str]]:
    """(safetensors metadata, module names) of a LoRA file, or ValueError with what is wrong."""
    if not path.is_file():
        raise ValueError(f"LoRA file {str(path)!r} does not exist; pass the .safetensors file `ultragen train` wrote "
                         f"or the authors' pytorch_lora_weights.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, _module_names(f.keys())
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"LoRA file {str(path)!r} is not a readable safetensors file: {error}") from None


def read_lora_metadata(path: str | Path) -> LoraMetadata:
    """The settings a FLUX.2 guide LoRA file runs under: from its ultragen metadata, or, for the authors' klein
    file (no metadata, their target set), the settings their code used (``extra['source'] == 'authors'``)."""
    path = Path(path)
    meta, modules = _open(path)
    if METADATA_KEY in meta:
        return LoraMetadata.from_json(meta[METADATA_KEY])
    if not _is_authors_set(modules):
        raise ValueError(
            f"LoRA file {str(path)!r} has no ultragen metadata and is not the authors' klein guide LoRA (modules "
            f"{sorted(modules)[:4]}...); only guide LoRAs load: ultragen's, or the authors' (x_embedder, "
            f"attn.to_q/k/v, attn.to_out.0, ff.linear_in/out, attn.to_qkv_mlp_proj, attn.to_out). Fuse a style LoRA "
            f"into the base model instead"
        )
    with safe_open(str(path), framework="pt") as f:
        rank = f.get_slice(next(k for k in f.keys() if ".lora_A." in k)).get_shape()[0]
    # no alphas in the file: diffusers loads it with alpha = rank (scale 1), as the authors trained (r = alpha = 16)
    return LoraMetadata(base_model=AUTHORS_BASE_MODEL, rank=rank, alpha=float(rank), targets="wide",
                        extra={"source": "authors"}, **AUTHORS_SETTINGS)


def authors_settings_line(meta: LoraMetadata) -> str:
    """The one line that states what an authors' file implies."""
    return (f"guide LoRA without ultragen metadata: the authors' klein file (rank {meta.rank}); running it as their "
            f"code did: policy 'authors-code', rho {meta.rho}, window {meta.window_tokens} tokens, NTK "
            f"{meta.ntk_factor:g}, their guide position ids (0, 4m, 4n, 0): guide_offset_tokens 0, the top-left token "
            f"of each guide token's 4x4 footprint, where ultragen's default centres it at (rho-1)/2 = 1.5")


def load_guide_lora(transformer: torch.nn.Module, path: str | Path, expected: LoraMetadata | None = None,
                    allow_mismatch: bool = False) -> LoraMetadata:
    """Inject the guide LoRA stored at ``path`` (ultragen's or the authors') as adapter ``guide``; refuse it when
    its settings differ from ``expected`` (unless ``allow_mismatch``). Returns the settings it runs under."""
    path = Path(path)
    meta = read_lora_metadata(path)
    if expected is not None and (diff := meta.mismatches(expected)) and not allow_mismatch:
        raise ValueError(
            f"LoRA {str(path)!r} was trained under other settings ({'; '.join(diff)}); run with the LoRA's "
            f"settings, or override the check (allow_mismatch=True, --lora-force) if you know it is safe"
        )
    if meta.extra.get("source") == "authors":
        log.warning(authors_settings_line(meta))
        state = Flux2KleinPipeline.lora_state_dict(str(path))
        with beside_other_adapters():
            transformer.load_lora_adapter(state, adapter_name=ADAPTER_NAME, prefix=KEY_PREFIX.rstrip("."))
        return meta
    with safe_open(str(path), framework="pt") as f:
        state = {k.removeprefix(KEY_PREFIX): f.get_tensor(k) for k in f.keys()}
    add_guide_lora(transformer, meta.rank, meta.alpha, meta.targets.value)
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        transformer.delete_adapters(ADAPTER_NAME)
        raise ValueError(f"LoRA {str(path)!r} holds {len(unexpected)} keys this model lacks, e.g. {unexpected[0]!r}")
    return meta


__all__ = ["ADAPTER_NAME", "AUTHORS_SETTINGS", "LoraMetadata", "LoraTargets", "add_guide_lora",
           "authors_settings_line", "guide_lora_state", "load_guide_lora", "read_lora_metadata", "save_guide_lora"]
