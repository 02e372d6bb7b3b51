"""The hierarchical FLUX.1 transformer: a stock diffusers ``FluxTransformer2DModel`` run over
``[text | hires | guide]`` with block-sparse attention, per-stream modulation and a cached guide."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ultragen.attention import Backend, attend, heads_last_output, parse_backend
from ultragen.attention.op import attend_op, plan_key
from ultragen.attention.segment import attend_within
from ultragen.flux.blocks import (
    GuideKV,
    Rope,
    Streams,
    Temb,
    check_ff_chunk_tokens,
    double_block,
    linear,
    single_block,
)
from ultragen.flux.rope import flux_rope
from ultragen.hier_common import adapter_fingerprint, check_streams, compile_fns, same_inputs
from ultragen.layout import Segment
from ultragen.policy import AttentionPlan
from ultragen.step_cache import StepCache, StepCacheConfig

log = logging.getLogger(__name__)


@dataclass
class _GuideCache:
    """Per-layer guide keys/values and what they were computed from."""

    plan: AttentionPlan
    inputs: tuple  # guide, pooled, guidance tensors (copies), the NTK factor and the adapter fingerprint
    kv: list[GuideKV]


class HierFluxTransformer(nn.Module):
    """Hierarchical forward of a FLUX.1 transformer (dev or schnell); the wrapped model's weights are untouched.

    ``backend``: attention backend name (``ultragen.attention.Backend``). ``ntk_factor``: RoPE NTK factor (paper:
    10 for FLUX.1; 1 reproduces the stock model). ``cache_guide``: when the plan's guide attends only to itself,
    compute its per-layer keys and values once and reuse them while the guide latent, pooled prompt, guidance and
    LoRA stay the same (never while gradients are on). ``ff_chunk_tokens``: run each block's per-token work after
    attention (feed-forward / MLP) over chunks of at most this many tokens to cut activation memory at 8K (None: off;
    the pipeline uses 16,384; measured on an H100 at 8K, eager: no cost, 1.5 GB less, and FP8 fits only chunked).
    Compiled blocks (:meth:`compile_blocks`) run it whole: the chunk loop would be unrolled into the graph (an 8K
    FP8 compile with 16 chunks did not finish in 9 minutes), and inductor's fused blocks do not need it (8K,
    compiled, FP8, unchunked: 39.2 GB peak on an H100). The once-per-image guide pass, never compiled, still chunks.

    PEFT adapters: the guide LoRA (``ultragen.flux.lora.ADAPTER_NAME``) acts on guide tokens only; any other active
    adapter (a user's style LoRA, loaded with diffusers) acts on every stream, as in the stock model
    (``ultragen.flux.blocks.linear``).

    ``parallel``: an ``ultragen.parallel.SequenceParallel`` to run the hires pass over several processes: this one
    computes its run of windows (the input and output stay whole on every process), text and guide replicated.

    ``step_cache`` (:meth:`set_step_cache`; off by default): First-Block-Cache over the hires pass
    (``ultragen.step_cache``); not with ``parallel``.
    """

    def __init__(self, transformer: nn.Module, backend: Backend | str = Backend.AUTO, ntk_factor: float = 1.0,
                 cache_guide: bool = True, ff_chunk_tokens: int | None = None, parallel=None):
        super().__init__()
        if getattr(transformer.config, "patch_size", 1) != 1:
            raise ValueError(f"patch_size={transformer.config.patch_size} is not supported; FLUX.1 models use 1")
        self.transformer = transformer
        self.backend = parse_backend(backend)
        if ntk_factor <= 0:
            raise ValueError(f"ntk_factor={ntk_factor} must be > 0 (1: stock RoPE; the paper uses 10 for FLUX.1)")
        self.ntk_factor = float(ntk_factor)
        self.cache_guide = cache_guide
        check_ff_chunk_tokens(ff_chunk_tokens)
        self.ff_chunk_tokens = ff_chunk_tokens
        self.gradient_checkpointing = False
        self._compiled: dict | None = None
        self._rope: tuple[AttentionPlan, torch.device, float, Rope] | None = None
        self._guide_cache: _GuideCache | None = None
        # ultragen.parallel.SequenceParallel: this process computes its windows of the hires pass, the others theirs
        self.parallel = parallel
        self.step_cache = StepCache()  # off; set_step_cache turns it on (one fresh state per image)

    # --- public ------------------------------------------------------------------------------------------------
    def forward(
        self,
        hires: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        plan: AttentionPlan,
        guide: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity of the hires tokens.

        hires: (B, hires_tokens, C) packed latents in window-first order; guide: (B, guide_tokens, C) clean packed
        guide latent in tile-first order (None when the layout has none); encoder_hidden_states: (B, text_tokens,
        joint_dim); pooled_projections: (B, pooled_dim); timestep: (B,) sigma in [0, 1] (diffusers' FluxPipeline
        convention); guidance: (B,) for guidance-distilled models (FLUX.1-dev), else None.
        Returns (B, hires_tokens, C) in window-first order."""
        tr = self.transformer
        self._check_inputs(hires, encoder_hidden_states, plan, guide, guidance)
        if self.parallel is not None:
            hires = self.parallel.scatter_hires(hires, plan)
        x = linear(tr.x_embedder, hires, adapted=False)
        t = timestep.to(x.dtype) * 1000
        g = guidance.to(x.dtype) * 1000 if guidance is not None else None
        temb = Temb(self._embed_time(t, g, pooled_projections), None)
        rope = self._rope_for(plan, x.device)
        block_rope = rope if self.parallel is None else self.parallel.local_rope(rope, plan)
        text = tr.context_embedder(encoder_hidden_states)
        guide_kv: list[GuideKV | None] = [None] * (len(tr.transformer_blocks) + len(tr.single_transformer_blocks))
        streams = Streams(text, x, None)
        if guide is not None:
            temb.guide = self._embed_time(torch.zeros_like(t), g, pooled_projections)
            if self._use_cache(plan):
                guide_kv = self._cached_guide_kv(guide, pooled_projections, g, temb.guide, plan, rope)
            else:
                streams.guide = linear(tr.x_embedder, guide, adapted=True)

        if self.parallel is not None:
            attention = self.parallel.attention(plan, self.backend, compiled=self._compiled is not None)
        elif self._compiled is not None:
            key, backend = plan_key(plan), self.backend.value

            def attention(q, k, v):  # an opaque custom op inside the compiled block
                return attend_op(q, k, v, key, backend)
        else:

            def attention(q, k, v):
                return attend(q, k, v, plan, self.backend, out=heads_last_output(q))

        def blocks(s: Streams, start: int, stop: int | None = None) -> Streams:
            return self._blocks(s, start, stop, temb, block_rope, attention, guide_kv)

        if self.step_cache.active():  # first block, then the rest or the cached residual of the rest
            if self.parallel is not None:
                raise ValueError("a step cache with --parallel is not supported (each rank would decide to skip "
                                 "alone); leave out --cache or --parallel")
            prompt = (encoder_hidden_states, pooled_projections)
            hires_out = self.step_cache.run(plan, prompt, x, lambda: blocks(streams, 0, 1),
                                            lambda s: blocks(s, 1), lambda s: s.hires)
        else:
            hires_out = blocks(streams, 0).hires
        out = tr.norm_out(hires_out, temb.main)
        out = linear(tr.proj_out, out, adapted=False)
        return out if self.parallel is None else self.parallel.gather_hires(out, plan)

    def clear_guide_cache(self) -> None:
        """Forget the cached guide keys/values and the rotary tables (call after each image to free their memory).
        Also needed after editing base weights in place (e.g. fusing another LoRA into them)."""
        self._guide_cache = None
        self._rope = None

    def set_step_cache(self, config: StepCacheConfig | str) -> StepCache:
        """Start a fresh step cache (``ultragen.step_cache``: "off", "fbcache", "fbcache:0.08"; call before each
        image). The guide's keys/values cache is independent of it: the first block, run every step, reads them."""
        cache = StepCache(config)
        if cache.config.enabled and self.parallel is not None:
            raise ValueError("a step cache with --parallel is not supported (each rank would decide to skip "
                             "alone); leave out --cache or --parallel")
        self.step_cache = cache
        return cache

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` the double- and single-block forwards (regional compilation: one graph each, shared by
        all blocks of a kind, with ``dynamic=False``: one compile per resolution). Attention stays one opaque
        custom-op call inside the graph. The guide's once-per-image pass is not compiled."""
        self._compiled = compile_fns((double_block, single_block), **compile_kwargs)
        if self.ff_chunk_tokens is not None:
            log.info("compiled blocks run the feed-forward whole; ff_chunk_tokens=%d applies to the guide pass only",
                     self.ff_chunk_tokens)

    # --- internals ---------------------------------------------------------------------------------------------
    def _check_inputs(self, hires, text, plan: AttentionPlan, guide, guidance) -> None:
        check_streams(plan.layout, hires, text, guide)
        needs_guidance = self.transformer.config.guidance_embeds
        if needs_guidance and guidance is None:
            raise ValueError("this model is guidance-distilled (FLUX.1-dev): pass guidance, e.g. torch.full((B,), 3.5)")
        if not needs_guidance and guidance is not None:
            raise ValueError("this model has no guidance embedding (FLUX.1-schnell): pass guidance=None")

    def _embed_time(self, t, g, pooled) -> torch.Tensor:
        embed = self.transformer.time_text_embed
        return embed(t, pooled) if g is None else embed(t, g, pooled)

    def _rope_for(self, plan: AttentionPlan, device: torch.device) -> Rope:
        key = (plan, device, self.ntk_factor)
        if self._rope is None or self._rope[0] is not plan or self._rope[1:3] != key[1:]:
            layout = plan.layout
            ids = torch.cat([layout.text_ids(), layout.image_ids()]).to(device)
            cfg = self.transformer.config
            rope = flux_rope(ids, tuple(cfg.axes_dims_rope), ntk_factor=self.ntk_factor)
            self._rope = (*key, rope)
        return self._rope[3]

    def _use_cache(self, plan: AttentionPlan) -> bool:
        return self.cache_guide and plan.policy.guide_isolated and not torch.is_grad_enabled()

    def _cached_guide_kv(self, guide, pooled, g, temb_guide, plan: AttentionPlan, rope: Rope) -> list[GuideKV]:
        inputs = (guide, pooled, g, self.ntk_factor, adapter_fingerprint(self.transformer))
        cache = self._guide_cache
        if cache is None or cache.plan is not plan or not same_inputs(cache.inputs, inputs):
            copies = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)
            self._guide_cache = cache = _GuideCache(plan, copies, self._guide_pass(guide, temb_guide, plan, rope))
        return cache.kv

    def _guide_pass(self, guide, temb_guide, plan: AttentionPlan, rope: Rope) -> list[GuideKV]:
        """Run the guide stream alone through every block and keep each layer's (rotated k, v)."""
        tr = self.transformer
        start = plan.layout.segment_offsets[Segment.GUIDE]
        rope_guide = (rope[0][start:], rope[1][start:])
        g = linear(tr.x_embedder, guide, adapted=True)
        empty = g.new_zeros(g.shape[0], 0, g.shape[2])
        kv: list[GuideKV] = []

        def attention(q, k, v):
            kv.append((k, v))
            return attend_within(q, k, v, plan, Segment.GUIDE)

        streams, temb = Streams(empty, empty, g), Temb(temb_guide, temb_guide)
        chunk = self.ff_chunk_tokens
        for block in tr.transformer_blocks:
            streams = double_block(block, streams, temb, rope_guide, attention, ff_chunk_tokens=chunk)
        for block in tr.single_transformer_blocks:
            streams = single_block(block, streams, temb, rope_guide, attention, ff_chunk_tokens=chunk)
        return kv

    def _blocks(self, streams: Streams, start: int, stop: int | None, temb: Temb, rope: Rope, attention,
                guide_kv: list) -> Streams:
        """Run blocks ``start`` .. ``stop`` - 1 (None: to the end) of the double blocks followed by the single
        blocks."""
        tr = self.transformer
        doubles = len(tr.transformer_blocks)
        stop = doubles + len(tr.single_transformer_blocks) if stop is None else stop
        for i in range(start, stop):
            if i < doubles:
                streams = self._run(double_block, tr.transformer_blocks[i], streams, temb, rope, attention,
                                    guide_kv[i])
                continue
            if i == doubles and self._compiled is not None:
                # single blocks return views into their joint text + hires stream; hand the first one such views
                # too, so one compiled graph serves them all (else a second compile for the others, per resolution)
                text_tokens = streams.text.shape[1]
                joint = torch.cat([streams.text, streams.hires], dim=1)
                streams = Streams(joint[:, :text_tokens], joint[:, text_tokens:], streams.guide)
            streams = self._run(single_block, tr.single_transformer_blocks[i - doubles], streams, temb, rope,
                                attention, guide_kv[i])
        return streams

    def _run(self, fn, block, streams: Streams, temb: Temb, rope: Rope, attention, guide_kv) -> Streams:
        chunk = self.ff_chunk_tokens
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, block, streams, temb, rope, attention, guide_kv, use_reentrant=False,
                              ff_chunk_tokens=chunk)
        if self._compiled is not None:  # whole: a chunk loop unrolls into the graph (see the class docstring)
            fn, chunk = self._compiled[fn], None
        return fn(block, streams, temb, rope, attention, guide_kv, ff_chunk_tokens=chunk)
