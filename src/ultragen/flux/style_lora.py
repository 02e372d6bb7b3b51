"""Style LoRAs on a FLUX.1 pipeline: diffusers converts and loads them, this module checks that they fit first.

A style LoRA file may be in any FLUX.1 format diffusers' ``FluxLoraLoaderMixin`` reads (diffusers/PEFT with
``transformer.`` / ``text_encoder.`` keys, kohya sd-scripts, XLabs, ...). :func:`convert_flux_lora` runs diffusers'
own conversion (``lora_state_dict``) to find out what the file would change, and :func:`check_fits` refuses it
unless every converted LoRA matrix fits a linear layer of this model with the right shapes: a LoRA for another
family (SDXL keys) or another architecture (FLUX keys at other widths) is refused before anything is loaded.
:func:`load_style_lora` then hands the file's tensors to ``FluxPipeline.load_lora_weights`` under its own adapter
name, exactly as a diffusers user would, so stage A (the stock model) applies it as diffusers does.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ultragen.flux.lora import METADATA_KEY
from ultragen.style_lora import StyleLoraFile, StyleLoraSpec, read_style_lora

FORMATS = "diffusers/PEFT, kohya (sd-scripts), XLabs, or another FLUX.1 format diffusers reads"
KLEIN_FORMATS = "diffusers/PEFT, BFL (diffusion_model.), or another FLUX.2 format diffusers reads"
_COMPONENTS = ("transformer", "text_encoder")


@dataclass(frozen=True)
class LoadedStyleLora:
    """A style LoRA on the pipeline: the file as read and the PEFT adapter name it was loaded under."""

    file: StyleLoraFile
    adapter_name: str
    components: tuple[str, ...]  # the pipeline components it has LoRA layers in ("transformer", "text_encoder")
    fused: bool = False  # merged into the base weights (:func:`fuse_style_loras`): its adapter is gone

    @property
    def scale(self) -> float:
        return self.file.spec.scale

    def record(self) -> dict:
        """What an image's record says: the file (path, SHA-256, scale) and whether it was fused into the weights."""
        return {"kind": "style", **self.file.record(), "fused": self.fused}


def _copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh tensors: diffusers' kohya converter scales text-encoder matrices in place (``*=``), so a file's tensors
    handed to it twice (check, then load) would be scaled twice."""
    return {k: v.clone() for k, v in tensors.items()}


@contextmanager
def _quiet_diffusers():
    """diffusers' converters log warnings about keys they drop (the checks here say what is wrong instead), and
    transformers draws a "Loading weights" bar for a few LoRA matrices of the text encoder: both off inside."""
    from transformers.utils import logging as transformers_logging

    logger = logging.getLogger("diffusers")
    level, bars = logger.level, transformers_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()


def convert_flux_lora(lora: StyleLoraFile) -> dict[str, torch.Tensor]:
    """The file's LoRA matrices under diffusers' keys (``transformer.<module>.lora_A.weight``, ...), converted by
    diffusers; ValueError (naming the file) when it is not a FLUX.1 LoRA in a format diffusers reads."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    def convert(tensors):
        state, _alphas = FluxLoraLoaderMixin.lora_state_dict(tensors, return_alphas=True)
        return _text_encoder_keys_as_peft(state)

    return _convert(lora, convert, "FLUX.1", FORMATS, _COMPONENTS)


def convert_klein_lora(lora: StyleLoraFile) -> dict[str, torch.Tensor]:
    """:func:`convert_flux_lora` for FLUX.2 [klein]: diffusers' ``Flux2KleinPipeline.lora_state_dict`` converts
    the file (diffusers/PEFT, BFL ``diffusion_model.`` keys, ...) to ``transformer.<module>.lora_A.weight`` keys."""
    from diffusers import Flux2KleinPipeline

    return _convert(lora, Flux2KleinPipeline.lora_state_dict, "FLUX.2 [klein]", KLEIN_FORMATS, ("transformer",))


def _convert(lora: StyleLoraFile, convert, title: str, formats: str, components: tuple[str, ...]):
    name = lora.spec.path
    if METADATA_KEY in lora.metadata:
        raise ValueError(f"style LoRA {name!r} is an ultragen guide LoRA (it acts on the guide tokens only); pass it "
                         f"with --lora (Python: pipe.load_lora), not as a style LoRA")
    try:
        with _quiet_diffusers():
            state = convert(_copy(lora.tensors))
    except Exception as error:  # diffusers' converters raise ValueError, KeyError, AssertionError, ...
        words = " ".join(str(error).split())
        reason = (words[:160] + " ...") if len(words) > 160 else (words or type(error).__name__)
        raise ValueError(f"style LoRA {name!r} is not a {title} LoRA in a format diffusers reads ({formats}): "
                         f"{reason}") from None
    foreign = [k for k in state if not (k.startswith(tuple(f"{c}." for c in components))
                                        and k.endswith((".lora_A.weight", ".lora_B.weight")))]
    if foreign or not state:
        example = f"key {foreign[0]!r} " if foreign else "no LoRA keys "
        raise ValueError(f"style LoRA {name!r} is not a {title} LoRA in a format diffusers reads ({formats}): "
                         f"{example}after conversion (a LoRA for another model family?)")
    return state


def _text_encoder_keys_as_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya's text-encoder keys come out of ``lora_state_dict`` in diffusers' older naming; its text-encoder loader
    converts them to PEFT's with these two diffusers functions (which raise for what it could not load either)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    te = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    if not te:
        return state
    te = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te))
    rest = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
    return rest | {f"text_encoder.{k}": v for k, v in te.items()}


def _linear(root: torch.nn.Module, module_name: str) -> torch.nn.Module | None:
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        return None
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module if hasattr(module, "in_features") and hasattr(module, "out_features") else None


def check_fits(lora: StyleLoraFile, state: dict[str, torch.Tensor], components: dict[str, torch.nn.Module]) -> None:
    """Every converted (lora_A, lora_B) pair must sit on a linear layer of ``components`` ({"transformer": ...,
    "text_encoder": ...}) with lora_A (r, in_features) and lora_B (out_features, r); ValueError otherwise."""
    name = lora.spec.path
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        component, _, module_name = key.removesuffix(".lora_A.weight").partition(".")
        b = state.get(key.replace(".lora_A.", ".lora_B."))
        root = components.get(component)
        if component == "text_encoder" and root is not None and not hasattr(root, "text_model"):
            module_name = module_name.removeprefix("text_model.")  # flattened CLIP (newer transformers), as diffusers
        layer = None if root is None else _linear(root, module_name)
        if layer is None:
            raise ValueError(f"style LoRA {name!r} does not fit this model: it has {key!r}, a layer this {component} "
                             f"lacks (a LoRA for another model or architecture?)")
        if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"style LoRA {name!r} is malformed: {key!r} has no matching lora_B of rank "
                             f"{a.shape[0] if a.ndim else '?'}")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise ValueError(
                f"style LoRA {name!r} does not fit this model: {component}.{module_name} is a {layer.in_features} -> "
                f"{layer.out_features} layer, the LoRA's is {a.shape[1]} -> {b.shape[0]} (a LoRA for another "
                f"architecture?)")
    if not any(k.endswith(".lora_A.weight") for k in state):
        raise ValueError(f"style LoRA {name!r} holds no lora_A matrices; pass a LoRA file")


def load_style_lora(flux, lora: StyleLoraFile, adapter_name: str) -> LoadedStyleLora:
    """Check ``lora`` against the pipeline's transformer and text encoder, then load it with diffusers
    (``flux.load_lora_weights``) as adapter ``adapter_name``. Activation and scale are the caller's
    (``set_adapters``)."""
    state = convert_flux_lora(lora)
    components = {"transformer": flux.transformer, "text_encoder": flux.text_encoder}
    check_fits(lora, state, components)
    with _quiet_diffusers(), warnings.catch_warnings():
        # PEFT warns that a second adapter joins the first: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        flux.load_lora_weights(_copy(lora.tensors), adapter_name=adapter_name)
    present = tuple(c for c in _COMPONENTS if any(k.startswith(f"{c}.") for k in state))
    return LoadedStyleLora(lora, adapter_name, present)


def fuse_style_loras(pipe, loras: tuple[LoadedStyleLora, ...]) -> tuple[LoadedStyleLora, ...]:
    """Merge the unfused ``loras`` into the base weights of ``pipe`` (a diffusers pipeline with
    ``LoraLoaderMixin``) with diffusers' ``fuse_lora`` at the scales ``set_adapters`` gave them (the caller
    activates them first), then delete their adapters: the per-step path has no extra matmuls. Other adapters (the
    guide LoRA) stay as they are. Returns ``loras`` marked fused. Not undoable exactly (W + s B A, rounded in the
    weights' dtype); reload the pipeline for the base weights.

    PEFT's ``delete_adapter`` leaves a deleted name in a layer's ``merged_adapters``, which makes PEFT's forward
    skip every remaining adapter (``layer.merged``) and ``disable_adapters`` try to unmerge it: those names are
    dropped here."""
    names = [s.adapter_name for s in loras if not s.fused]
    if not names:
        return loras
    components = [c for c in _COMPONENTS if any(c in s.components for s in loras if not s.fused)]
    with _quiet_diffusers():
        pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=names)
        pipe.delete_adapters(names)
    for component in components:
        for module in getattr(pipe, component).modules():
            if isinstance(module, BaseTunerLayer):
                module.merged_adapters = [n for n in module.merged_adapters if n not in names]
    return tuple(s if s.fused else replace(s, fused=True) for s in loras)


def load_klein_style_lora(pipe, lora: StyleLoraFile, adapter_name: str) -> LoadedStyleLora:
    """:func:`load_style_lora` for a ``Flux2KleinPipeline``: converted by diffusers, every LoRA pair checked against
    a linear layer of this transformer (shapes included), then loaded with ``pipe.load_lora_weights``."""
    state = convert_klein_lora(lora)
    check_fits(lora, state, {"transformer": pipe.transformer})
    with _quiet_diffusers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(_copy(lora.tensors), adapter_name=adapter_name)
    return LoadedStyleLora(lora, adapter_name, ("transformer",))


def check_style_lora_file(spec: StyleLoraSpec) -> StyleLoraFile:
    """Everything that can be checked without the model (a readable safetensors file of a FLUX.1 LoRA in a format
    diffusers reads); the shapes are checked against the model when it is loaded. ValueError naming the file."""
    lora = read_style_lora(spec)
    convert_flux_lora(lora)
    return lora


def write_random_lora(transformer: torch.nn.Module, rank: int, path, seed: int = 0, std: float = 0.01,
                      dtype: torch.dtype = torch.bfloat16):
    """Write a random diffusers-format LoRA of ``rank`` on every linear layer of the transformer's double and single
    blocks (the layers kohya FLUX LoRAs train) to ``path`` and return it: for benchmarks of a real-size style LoRA.
    lora_A (r, in) and lora_B (out, r) are Gaussian with ``std``, in ``dtype``; made on the CPU."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        blocks = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        if blocks and isinstance(module, torch.nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
            for part, shape in (("lora_A", (rank, module.in_features)), ("lora_B", (module.out_features, rank))):
                tensors[f"transformer.{name}.{part}.weight"] = (torch.randn(shape, generator=g) * std).to(dtype)
    save_file(tensors, str(path))
    return path
