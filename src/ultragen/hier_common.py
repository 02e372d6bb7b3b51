"""What the hierarchical transformers of every family (``ultragen.flux``, ``ultragen.flux2``) share and that knows
nothing of a family: the stream shape checks against a layout, the guide cache's key comparison and adapter
fingerprint, and the block-compile set-up. Family-specific checks and messages (guidance) stay in each family."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ultragen.compile_cache import use_persistent_compile_cache
from ultragen.layout import HierLayout

# one graph per (resolution, backend, input strides): more than dynamo's default limit of 8 in one process, and
# hitting the limit silently falls back to eager
RECOMPILE_LIMIT = 64


def check_streams(layout: HierLayout, hires: torch.Tensor, text: torch.Tensor, guide: torch.Tensor | None) -> None:
    """Raise ValueError unless hires (B, hires_tokens, C), text (B, text_tokens, D) and guide (B, guide_tokens, C)
    (None exactly when ``layout.rho`` is None) match ``layout``."""
    if hires.dim() != 3 or hires.shape[1] != layout.hires_tokens:
        raise ValueError(f"hires must be (B, {layout.hires_tokens}, C) for this layout, got {tuple(hires.shape)}")
    if text.shape[1] != layout.text_tokens:
        raise ValueError(
            f"encoder_hidden_states has {text.shape[1]} tokens but the layout expects {layout.text_tokens}; "
            f"build the layout with text_tokens={text.shape[1]}"
        )
    if (guide is None) != (layout.rho is None):
        need = "no guide (rho=None)" if layout.rho is None else f"a guide of {layout.guide_tokens} tokens"
        raise ValueError(f"the layout needs {need}, got guide={None if guide is None else tuple(guide.shape)}")
    if guide is not None and (guide.shape[0] != hires.shape[0] or guide.shape[1] != layout.guide_tokens):
        raise ValueError(f"guide must be ({hires.shape[0]}, {layout.guide_tokens}, C), got {tuple(guide.shape)}")


def same_inputs(a: tuple, b: tuple) -> bool:
    """Whether two cache keys (tuples of tensors and plain values) are equal, tensors by shape, dtype, device and
    content."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def adapter_fingerprint(model: nn.Module) -> tuple:
    """What a cached guide's keys/values depend on besides the inputs: adapter state (the adapters present, which
    are active and merged, on/off, scales, weights: the guide LoRA and any style LoRA) and the base weights under
    the adapters, by tensor identity and in-place version."""
    marks = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            scaling = tuple(sorted(getattr(module, "scaling", {}).items()))
            present = tuple(getattr(module, "lora_A", {}).keys())
            marks.append((id(module), present, tuple(module.active_adapters), tuple(module.merged_adapters),
                          module.disable_adapters, scaling))
            marks.extend((p.data_ptr(), p._version) for p in module.parameters())
    return tuple(marks)


def compile_fns(fns: Iterable[Callable], **compile_kwargs) -> dict[Callable, Callable]:
    """``{fn: torch.compile(fn)}`` with ``dynamic=False`` (one compile per resolution; ``compile_kwargs`` override),
    the persistent compile cache on (``ultragen.compile_cache``) and dynamo's recompile limit raised to
    :data:`RECOMPILE_LIMIT`."""
    use_persistent_compile_cache()  # a new process reuses earlier compiles
    options = {"dynamic": False, **compile_kwargs}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return {fn: torch.compile(fn, **options) for fn in fns}
