"""The forward of diffusers' FLUX.2 blocks over three streams: text, hires and guide.

These functions call the blocks' own modules (norms, projections, feed-forwards; weights untouched) in the order
the stock ``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock`` and their attention processors do, with three
differences that the method needs:

- FLUX.2 computes the modulation once per model (``double_stream_modulation_img/_txt``,
  ``single_stream_modulation``) and shares it across blocks; the guide stream gets its own set, from the timestep
  embedding at t = 0, through the same modulation layers (:class:`Mods`);
- projections run the original weights for text and hires tokens and the LoRA-adapted module for guide tokens
  (``adapted=True``), so a guide LoRA can never leak into the hires path. In the single block the fused
  ``attn.to_qkv_mlp_proj`` and ``attn.to_out`` are called twice, once per group;
- attention is one call over ``[text | hires | guide]`` through ``ultragen.attention`` with the plan.

Tensors are (B, tokens, dim) unless said otherwise. Cached guide keys and values are kept per layer in a
diffusers ``Flux2KVLayerCache``, in its documented format: (B, guide_tokens, heads, head_dim), keys rotated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import Flux2KVLayerCache, Flux2Modulation
from torch import nn

from ultragen.flux.blocks import Streams, linear  # the same three streams as FLUX.1
from ultragen.flux2.ids import Rope

# attention(q, k, v) -> out, (B, H, S, D); q covers the leading query rows of the sequence, k and v all of it
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Mods:
    """The shared modulation of one timestep embedding (raw outputs of the model's modulation layers)."""

    double_img: torch.Tensor  # (B, 6 * dim)
    double_txt: torch.Tensor  # (B, 6 * dim)
    single: torch.Tensor  # (B, 3 * dim)

    @classmethod
    def of(cls, transformer: nn.Module, temb: torch.Tensor) -> Mods:
        return cls(transformer.double_stream_modulation_img(temb), transformer.double_stream_modulation_txt(temb),
                   transformer.single_stream_modulation(temb))


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, S, H, D)


def _qkv(attn: nn.Module, x: torch.Tensor, adapted: bool):
    """Projected, QK-normed q, k, v (B, S, H, D) of an image stream (hires or guide)."""
    q, k, v = (_heads(linear(getattr(attn, n), x, adapted), attn.head_dim) for n in ("to_q", "to_k", "to_v"))
    return attn.norm_q(q), attn.norm_k(k), v


def _qkv_context(attn: nn.Module, x: torch.Tensor):
    q, k, v = (_heads(linear(getattr(attn, n), x, False), attn.head_dim)
               for n in ("add_q_proj", "add_k_proj", "add_v_proj"))
    return attn.norm_added_q(q), attn.norm_added_k(k), v


def _attention(parts: list, rope: Rope, attention: AttentionFn, guide_kv: Flux2KVLayerCache | None) -> torch.Tensor:
    """One attention over the concatenated streams. ``parts``: (q, k, v) per computed stream, in sequence order;
    ``rope`` covers their rows. With ``guide_kv`` the guide is not computed: its cached keys and values are appended
    and its query rows skipped. Returns (B, Sq, H*D)."""
    q, k, v = (parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts], dim=1) for i in range(3))
    parts.clear()
    n = q.shape[1]
    cos_sin = (rope[0][:n], rope[1][:n])
    q = apply_rotary_emb(q, cos_sin, sequence_dim=1)
    k = apply_rotary_emb(k, cos_sin, sequence_dim=1)
    if guide_kv is not None:
        k_guide, v_guide = guide_kv.get()
        k, v = torch.cat([k, k_guide], dim=1), torch.cat([v, v_guide], dim=1)
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


def _feed_forward(ff: nn.Module, x: torch.Tensor, adapted: bool) -> torch.Tensor:
    """diffusers ``Flux2FeedForward`` (linear_in, SwiGLU, linear_out) with a per-stream adapter choice."""
    return linear(ff.linear_out, ff.act_fn(linear(ff.linear_in, x, adapted)), adapted)


def double_block(block: nn.Module, s: Streams, main: Mods, guide: Mods | None, rope: Rope, attention: AttentionFn,
                 guide_kv: Flux2KVLayerCache | None = None) -> Streams:
    """diffusers ``Flux2TransformerBlock.forward`` over text, hires and (optionally) guide."""
    attn = block.attn
    (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(main.double_img, 2)
    (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = Flux2Modulation.split(
        main.double_txt, 2)
    n_h = (1 + scale_msa) * block.norm1(s.hires) + shift_msa
    n_c = (1 + c_scale_msa) * block.norm1_context(s.text) + c_shift_msa
    parts = [_qkv_context(attn, n_c), _qkv(attn, n_h, adapted=False)]
    if s.guide is not None:
        (g_shift_msa, g_scale_msa, g_gate_msa), g_mlp = Flux2Modulation.split(guide.double_img, 2)
        n_g = (1 + g_scale_msa) * block.norm1(s.guide) + g_shift_msa
        parts.append(_qkv(attn, n_g, adapted=True))
    out = _attention(parts, rope, attention, guide_kv)
    t, n = s.text.shape[1], s.hires.shape[1]

    def image_stream(x, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp, adapted):
        x = x + gate_msa * attn.to_out[1](linear(attn.to_out[0], attn_out, adapted))
        h = block.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * _feed_forward(block.ff, h, adapted)

    hires = image_stream(s.hires, out[:, t : t + n], gate_msa, shift_mlp, scale_mlp, gate_mlp, adapted=False)
    guide_out = None
    if s.guide is not None:
        guide_out = image_stream(s.guide, out[:, t + n :], g_gate_msa, *g_mlp, adapted=True)
    text = s.text + c_gate_msa * attn.to_add_out(out[:, :t])
    h = block.norm2_context(text) * (1 + c_scale_mlp) + c_shift_mlp
    text = text + c_gate_mlp * _feed_forward(block.ff_context, h, adapted=False)
    if text.dtype == torch.float16:
        text = text.clip(-65504, 65504)
    return Streams(text, hires, guide_out)


def single_block(block: nn.Module, s: Streams, main: Mods, guide: Mods | None, rope: Rope, attention: AttentionFn,
                 guide_kv: Flux2KVLayerCache | None = None) -> Streams:
    """diffusers ``Flux2SingleTransformerBlock.forward`` (parallel attention + SwiGLU MLP through the fused
    projections) over text + hires (one modulation) and the guide."""
    attn = block.attn
    t = s.text.shape[1]
    qkv_width = 3 * attn.inner_dim
    joint = torch.cat([s.text, s.hires], dim=1)

    def project(x, mod, adapted):
        shift, scale, gate = Flux2Modulation.split(mod, 1)[0]
        h = linear(attn.to_qkv_mlp_proj, (1 + scale) * block.norm(x) + shift, adapted)
        qkv, mlp = h[..., :qkv_width], h[..., qkv_width:]
        q, k, v = (_heads(p, attn.head_dim) for p in qkv.chunk(3, dim=-1))
        return (attn.norm_q(q), attn.norm_k(k), v), mlp, gate

    qkv_m, mlp_m, gate_m = project(joint, main.single, adapted=False)
    parts = [qkv_m]
    if s.guide is not None:
        qkv_g, mlp_g, gate_g = project(s.guide, guide.single, adapted=True)
        parts.append(qkv_g)
    out = _attention(parts, rope, attention, guide_kv)

    def finish(x, attn_out, mlp, gate, adapted):
        y = x + gate * linear(attn.to_out, torch.cat([attn_out, attn.mlp_act_fn(mlp)], dim=-1), adapted)
        return y.clip(-65504, 65504) if y.dtype == torch.float16 else y

    joint = finish(joint, out[:, : joint.shape[1]], mlp_m, gate_m, adapted=False)
    guide_out = None
    if s.guide is not None:
        guide_out = finish(s.guide, out[:, joint.shape[1] :], mlp_g, gate_g, adapted=True)
    return Streams(joint[:, :t], joint[:, t:], guide_out)
