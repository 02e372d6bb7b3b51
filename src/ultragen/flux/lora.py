"""The guide-only LoRA: adapters on the guide stream's projections, saved and loaded with their run settings.

Adapters are injected with PEFT (``transformer.add_adapter``); the hierarchical forward calls the adapted module
for guide tokens only and the original weights for text and hires tokens (``ultragen.flux.blocks.linear``). Files
are safetensors in the diffusers/PEFT key format (``transformer.<module>.lora_A.weight``) with the settings the
LoRA was trained under in the metadata; loading one that disagrees with the run is refused unless overridden.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from ultragen.atomic import atomic_path

ADAPTER_NAME = "guide"
KEY_PREFIX = "transformer."
METADATA_KEY = "ultragen_lora"
_BLOCKS = r"(single_)?transformer_blocks\.\d+\."


class LoraTargets(str, Enum):
    """Which guide-path modules carry adapters."""

    QKV = "qkv"  # attention q, k, v projections (the paper's choice)
    WIDE = "wide"  # + attention output, feed-forward, single-block MLP and output, patch embedder

    def pattern(self) -> str:
        """PEFT ``target_modules`` regex (full match on module names)."""
        names = ["attn\\.to_q", "attn\\.to_k", "attn\\.to_v"]
        if self is LoraTargets.QKV:
            return f"{_BLOCKS}({'|'.join(names)})"
        names += ["attn\\.to_out\\.0", "ff\\.net\\.0\\.proj", "ff\\.net\\.2", "proj_mlp", "proj_out"]
        return f"({_BLOCKS}({'|'.join(names)})|x_embedder)"


@dataclass(frozen=True)
class LoraMetadata:
    """The settings a guide LoRA was trained under; a run must match them to use it."""

    base_model: str
    policy: dict
    rho: int
    guide_offset_tokens: float
    ntk_factor: float
    window_tokens: int
    rank: int = 16
    alpha: float = 16.0
    targets: LoraTargets = LoraTargets.QKV
    extra: dict = field(default_factory=dict)  # free-form (training steps, data), not compared

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", LoraTargets(self.targets))
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA rank={self.rank} and alpha={self.alpha} must be positive")

    _COMPARED = ("base_model", "policy", "rho", "guide_offset_tokens", "ntk_factor", "window_tokens")

    def mismatches(self, run: LoraMetadata) -> list[str]:
        """'field: lora X, run Y' for every setting that differs (a policy by its fields, not its name)."""
        out = []
        for name in self._COMPARED:
            mine, theirs = getattr(self, name), getattr(run, name)
            if name == "policy":
                out += policy_mismatches(mine, theirs)
            elif mine != theirs:
                out.append(f"{name}: LoRA {mine!r}, run {theirs!r}")
        return out

    def to_json(self) -> str:
        data = asdict(self)
        data["targets"] = self.targets.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraMetadata:
        return cls(**json.loads(text))


def policy_mismatches(lora: dict, run: dict) -> list[str]:
    """'policy.field: LoRA X, run Y' for each attention-policy field that differs; the policies' names do not count."""
    return [f"policy.{key}: LoRA {lora.get(key)!r}, run {run.get(key)!r}"
            for key in sorted(set(lora) | set(run)) if key != "name" and lora.get(key) != run.get(key)]


@contextmanager
def beside_other_adapters():
    """Silence PEFT's notice that an adapter joins others already on the model (style LoRAs beside the guide
    LoRA are the point, not an accident); every other warning stays."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def add_guide_lora(transformer: torch.nn.Module, rank: int = 16, alpha: float = 16.0,
                   targets: LoraTargets | str = LoraTargets.QKV) -> None:
    """Inject a fresh guide LoRA (B initialised to zero, so the model is unchanged until trained)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LoraTargets(targets).pattern(),
                        init_lora_weights=True)
    with beside_other_adapters():
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)


def guide_lora_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under diffusers' keys (``transformer.<module>.lora_A.weight``)."""
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {KEY_PREFIX + k: v.detach().contiguous() for k, v in state.items()}


def save_guide_lora(transformer: torch.nn.Module, path: str | Path, metadata: LoraMetadata) -> Path:
    """Write the guide LoRA atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    tensors = {k: v.cpu() for k, v in guide_lora_state(transformer).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: metadata.to_json()})
    return path


def read_lora_metadata(path: str | Path) -> LoraMetadata:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA file {str(path)!r} does not exist; pass the .safetensors file `ultragen train` wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"LoRA file {str(path)!r} is not a readable safetensors file: {error}") from None
    if METADATA_KEY not in meta:
        raise ValueError(f"LoRA file {str(path)!r} has no ultragen metadata; it was not written by ultragen")
    return LoraMetadata.from_json(meta[METADATA_KEY])


def load_guide_lora(transformer: torch.nn.Module, path: str | Path, expected: LoraMetadata | None = None,
                    allow_mismatch: bool = False) -> LoraMetadata:
    """Inject the guide LoRA stored at ``path``; refuse it when its settings differ from ``expected``."""
    meta = read_lora_metadata(path)
    if expected is not None and (diff := meta.mismatches(expected)) and not allow_mismatch:
        raise ValueError(
            f"LoRA {str(path)!r} was trained under other settings ({'; '.join(diff)}); run with the LoRA's "
            f"settings, or override the check (allow_mismatch=True, --lora-force) if you know it is safe"
        )
    with safe_open(str(path), framework="pt") as f:
        state = {k.removeprefix(KEY_PREFIX): f.get_tensor(k) for k in f.keys()}
    add_guide_lora(transformer, meta.rank, meta.alpha, meta.targets)
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        transformer.delete_adapters(ADAPTER_NAME)
        raise ValueError(f"LoRA {str(path)!r} holds {len(unexpected)} keys this model lacks, e.g. {unexpected[0]!r}")
    return meta
