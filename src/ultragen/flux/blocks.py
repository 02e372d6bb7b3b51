"""The forward of diffusers' FLUX blocks over three streams: text, hires and guide.

These functions call the block's own modules (norms, projections, feed-forwards; weights untouched) in the order
the stock blocks do, with three differences that the method needs:

- the guide stream gets its own modulation (from a t = 0 embedding) through the same norm modules;
- projections run without the guide LoRA for text and hires tokens and with it for guide tokens (``adapted=True``),
  so a guide LoRA can never leak into the hires path; any other LoRA (a user's style LoRA) applies to every stream,
  as in the stock model (:func:`linear`);
- attention is one call over ``[text | hires | guide]`` through ``ultragen.attention`` with the plan; the text
  length is carried explicitly (diffusers' single block infers it from a concatenation).

Tensors are (B, tokens, dim) unless said otherwise; q, k, v are (B, heads, tokens, head_dim).

``ff_chunk_tokens`` (default None: off) runs the per-token work after attention (output projection, norm,
feed-forward or MLP, residual) over chunks of at most that many tokens of each stream that has more, and
concatenates the results: the wide hidden activations then exist for one chunk at a time. Every step of that work is
per token, so the result is the same up to the float rounding of matmuls of another size. The double block's text
stream (at most 512 tokens) is never chunked; the single block chunks text and hires together, as it computes them.

Memory at 8192x8192 (an estimate from the shapes, not a measurement): FLUX.1 has N = 262,144 hires tokens of width
3072, so one (B=1, N, 3072) bf16 tensor is U = 1.6 GB. Unchunked, the single block holds its MLP activation (4U), the
concatenation with the attention output (5U) and the output projection (1U) at once: about 10U = 16 GB. The double
block's hires stream holds the feed-forward's hidden before and after the GELU (4U + 4U) with the projected attention
output, the residual and the normed input (3U): about 11U = 18 GB. Chunked at c tokens these shrink to c/N of that
plus about 2U for the chunk outputs and their concatenation; at c = 16,384 (N/16) about 3 GB, so each block's
transient after attention falls by about 13 GB (single) and 14.5 GB (double). The blocks run one at a time, so that is
the most the step peak can fall; how much it does depends on what peaks next (attention's transients). Measured
(H100, eager, 8K): the step peak fell only 1.5 GB (64.7 to 63.2 GB), at no cost in time: attention's transients, not
the feed-forward, set the peak. Compiled blocks do not chunk (``HierFluxTransformer``: the loop would unroll into the
graph); inductor's fused blocks peak at 39.2 GB at 8K with FP8 linears.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ultragen.flux.lora import ADAPTER_NAME as GUIDE_ADAPTER

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (S, head_dim)
# attention(q, k, v) -> out; q covers the leading query rows of the sequence, k and v all of it (B, H, S, D)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Streams:
    text: torch.Tensor  # (B, T, dim)
    hires: torch.Tensor  # (B, N, dim)
    guide: torch.Tensor | None  # (B, G, dim); None when the guide is absent or its keys/values are cached


@dataclass
class Temb:
    main: torch.Tensor  # (B, dim) at the current t, for text and hires
    guide: torch.Tensor | None  # (B, dim) at t = 0


GuideKV = tuple[torch.Tensor, torch.Tensor]  # (k, v) of the guide for one layer, (B, H, G, head_dim), k rotated


def linear(module: nn.Module, x: torch.Tensor, adapted: bool) -> torch.Tensor:
    """``module(x)`` with the guide LoRA applied only when ``adapted``; every other active PEFT adapter (the user's
    style LoRAs) applies either way, as in the stock model.

    On a PEFT-wrapped module this is PEFT's own LoRA forward written out: the base layer, then for each active,
    unmerged adapter in order ``result + lora_B(lora_A(dropout(x))) * scaling`` (the same operations, so a module
    without the guide LoRA gives PEFT's result bit for bit), skipping the guide adapter unless ``adapted``. Nothing in
    PEFT's state is changed (compile-friendly: a compiled block only reads which adapters are active and their
    scales). Adapters merged into the base weights (``fuse_lora``) are already in the base layer's output; unlike
    PEFT's forward, a merged module still adds the guide LoRA when it is unmerged."""
    if not isinstance(module, BaseTunerLayer):
        return module(x)
    if not hasattr(module, "lora_A"):  # another PEFT tuner type: not routed per adapter
        return module(x) if adapted else module.get_base_layer()(x)
    result = module.get_base_layer()(x)
    if module.disable_adapters:
        return result
    result_dtype = result.dtype
    for name in module.active_adapters:
        if name not in module.lora_A or name in module.merged_adapters or (name == GUIDE_ADAPTER and not adapted):
            continue
        lora_A, lora_B = module.lora_A[name], module.lora_B[name]
        x = module._cast_input_dtype(x, lora_A.weight.dtype)
        if name in module.lora_variant:  # DoRA and other variants: PEFT's own step for this adapter
            result = module.lora_variant[name].forward(module, active_adapter=name, x=x, result=result)
        else:
            result = result + lora_B(lora_A(module.lora_dropout[name](x))) * module.scaling[name]
    return result.to(result_dtype)


# GELU's tanh form, 0.5 x (1 + tanh(u)), equals x * sigmoid(2u) exactly (tanh(u) = 2 sigmoid(2u) - 1)
_GELU_2U = 2 * math.sqrt(2 / math.pi)
SIGMOID_GELU = True  # under torch.compile; a switch so the benchmark can measure the libdevice tanh form


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu(x, approximate=approximate)``. Under ``torch.compile`` the tanh form is written as
    ``x * sigmoid(2u)``: inductor fuses it into the FP8 activation quantisation that follows, which reads the row
    twice (amax, then scale) and so evaluates it twice per element, and libdevice's tanh is the slower of the two
    there. Eager runs keep the single fused ``F.gelu`` kernel."""
    if approximate == "tanh" and SIGMOID_GELU and torch.compiler.is_compiling():
        return x * torch.sigmoid(_GELU_2U * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate=approximate)


def feed_forward(ff: nn.Module, x: torch.Tensor, adapted: bool) -> torch.Tensor:
    """diffusers ``FeedForward`` (GELU-tanh projection, dropout, linear) with per-stream adapter choice."""
    act = ff.net[0]
    h = gelu(linear(act.proj, x, adapted), act.approximate)
    for layer in ff.net[1:]:
        h = linear(layer, h, adapted) if isinstance(layer, (nn.Linear, BaseTunerLayer)) else layer(h)
    return h


def check_ff_chunk_tokens(value) -> None:
    """Raise ValueError unless ``value`` is a valid ``ff_chunk_tokens``: None (off) or a whole number >= 1."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"ff_chunk_tokens={value!r} must be None (no chunking) or a whole number >= 1 of tokens per "
                         f"chunk, e.g. 16384")


def _token_chunked(fn: Callable[..., torch.Tensor], chunk_tokens: int | None, tokens: tuple[torch.Tensor, ...],
                   *args, **kwargs) -> torch.Tensor:
    """``fn(*tokens, *args, **kwargs)`` for a per-token ``fn`` whose ``tokens`` tensors are (B, S, ...) over the same
    S. With ``chunk_tokens`` set and S above it, ``fn`` runs on consecutive slices of at most ``chunk_tokens`` tokens
    of each and the results are concatenated along dim 1; otherwise it is the one plain call."""
    n = tokens[0].shape[1]
    if chunk_tokens is None or n <= chunk_tokens:
        return fn(*tokens, *args, **kwargs)
    chunks = [fn(*(x[:, i : i + chunk_tokens] for x in tokens), *args, **kwargs) for i in range(0, n, chunk_tokens)]
    return torch.cat(chunks, dim=1)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, S, H, D)


def _qkv(attn: nn.Module, x: torch.Tensor, adapted: bool, context: bool = False):
    """Projected, QK-normed q, k, v (B, S, H, D) of one stream."""
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if context else ("to_q", "to_k", "to_v")
    q, k, v = (_heads(linear(getattr(attn, n), x, adapted), attn.head_dim) for n in names)
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if context else (attn.norm_q, attn.norm_k)
    return norm_q(q), norm_k(k), v


def _attention(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    rope: Rope,
    attention: AttentionFn,
    guide_kv: GuideKV | None,
) -> torch.Tensor:
    """One attention over the concatenated streams. ``parts``: (q, k, v) per computed stream, in sequence order;
    ``rope`` covers their rows. With ``guide_kv`` the guide is not computed: its cached keys and values are appended
    and its query rows skipped. Returns the output (B, Sq, H*D).

    ``parts`` is emptied once joined, so (eagerly) the per-stream tensors are freed before RoPE's float32 work
    instead of living to the end of the block; a single stream is used as it is, not copied by a concatenation.
    At 8K each of these is a 1.6 GB tensor."""
    q, k, v = (parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts], dim=1) for i in range(3))
    parts.clear()
    cos, sin = rope
    n = q.shape[1]
    q = apply_rotary_emb(q, (cos[:n], sin[:n]), sequence_dim=1).transpose(1, 2)
    k = apply_rotary_emb(k, (cos[:n], sin[:n]), sequence_dim=1).transpose(1, 2)
    v = v.transpose(1, 2)
    if guide_kv is not None:
        k = torch.cat([k, guide_kv[0]], dim=2)
        v = torch.cat([v, guide_kv[1]], dim=2)
    return attention(q, k, v).transpose(1, 2).flatten(2, 3).to(q.dtype)


def double_block(
    block: nn.Module, s: Streams, temb: Temb, rope: Rope, attention: AttentionFn, guide_kv: GuideKV | None = None,
    *, ff_chunk_tokens: int | None = None,
) -> Streams:
    """diffusers ``FluxTransformerBlock.forward`` over text, hires and (optionally) guide; ``ff_chunk_tokens``:
    see the module docstring."""
    attn = block.attn
    n_h, gate_h, shift_mlp_h, scale_mlp_h, gate_mlp_h = block.norm1(s.hires, emb=temb.main)
    n_c, gate_c, shift_mlp_c, scale_mlp_c, gate_mlp_c = block.norm1_context(s.text, emb=temb.main)
    parts = [_qkv(attn, n_c, adapted=False, context=True), _qkv(attn, n_h, adapted=False)]
    if s.guide is not None:
        n_g, gate_g, shift_mlp_g, scale_mlp_g, gate_mlp_g = block.norm1(s.guide, emb=temb.guide)
        parts.append(_qkv(attn, n_g, adapted=True))
    out = _attention(parts, rope, attention, guide_kv)
    t, n = s.text.shape[1], s.hires.shape[1]

    def image_stream(x, attn_out, gate, shift_mlp, scale_mlp, gate_mlp, adapted):
        attn_out = attn.to_out[1](linear(attn.to_out[0], attn_out, adapted))
        x = x + gate.unsqueeze(1) * attn_out
        h = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * feed_forward(block.ff, h, adapted)

    hires = _token_chunked(image_stream, ff_chunk_tokens, (s.hires, out[:, t : t + n]),
                           gate_h, shift_mlp_h, scale_mlp_h, gate_mlp_h, adapted=False)
    guide = None
    if s.guide is not None:
        guide = _token_chunked(image_stream, ff_chunk_tokens, (s.guide, out[:, t + n :]),
                               gate_g, shift_mlp_g, scale_mlp_g, gate_mlp_g, adapted=True)
    text = s.text + gate_c.unsqueeze(1) * attn.to_add_out(out[:, :t])
    h = block.norm2_context(text) * (1 + scale_mlp_c[:, None]) + shift_mlp_c[:, None]
    text = text + gate_mlp_c.unsqueeze(1) * feed_forward(block.ff_context, h, adapted=False)
    if text.dtype == torch.float16:
        text = text.clip(-65504, 65504)
    return Streams(text, hires, guide)


def single_block(
    block: nn.Module, s: Streams, temb: Temb, rope: Rope, attention: AttentionFn, guide_kv: GuideKV | None = None,
    *, ff_chunk_tokens: int | None = None,
) -> Streams:
    """diffusers ``FluxSingleTransformerBlock.forward`` over text + hires (one modulation) and the guide;
    ``ff_chunk_tokens``: see the module docstring."""
    attn = block.attn
    t = s.text.shape[1]
    main = torch.cat([s.text, s.hires], dim=1)
    n_m, gate_m = block.norm(main, emb=temb.main)
    parts = [_qkv(attn, n_m, adapted=False)]
    if s.guide is not None:
        n_g, gate_g = block.norm(s.guide, emb=temb.guide)
        parts.append(_qkv(attn, n_g, adapted=True))
    out = _attention(parts, rope, attention, guide_kv)

    def stream(x, normed, attn_out, gate, adapted):
        h, act = linear(block.proj_mlp, normed, adapted), block.act_mlp
        mlp = gelu(h, act.approximate) if isinstance(act, nn.GELU) else act(h)
        y = x + gate.unsqueeze(1) * linear(block.proj_out, torch.cat([attn_out, mlp], dim=2), adapted)
        return y.clip(-65504, 65504) if y.dtype == torch.float16 else y

    main = _token_chunked(stream, ff_chunk_tokens, (main, n_m, out[:, : main.shape[1]]), gate_m, adapted=False)
    guide = None
    if s.guide is not None:
        guide = _token_chunked(stream, ff_chunk_tokens, (s.guide, n_g, out[:, main.shape[1] :]), gate_g, adapted=True)
    # views of the joint stream (compiled, HierFluxTransformer hands the first single block such views too: one graph)
    return Streams(main[:, :t], main[:, t:], guide)
