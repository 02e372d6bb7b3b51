"""The hierarchical FLUX.2 transformer: a stock diffusers ``Flux2Transformer2DModel`` run over
``[text | hires | guide]`` with block-sparse attention, a guide modulated at t = 0 and a cached guide."""

from __future__ import annotations

import logging

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache
from torch import nn
from torch.utils.checkpoint import checkpoint

from ultragen.attention import Backend, attend, heads_last_output, parse_backend
from ultragen.attention.op import attend_op, plan_key
from ultragen.attention.segment import attend_within
from ultragen.flux.blocks import linear
from ultragen.flux2.blocks import Mods, Streams, double_block, single_block
from ultragen.flux2.ids import Rope, flux2_rope, sequence_ids
from ultragen.hier_common import adapter_fingerprint, check_streams, compile_fns, same_inputs
from ultragen.layout import Segment
from ultragen.policy import AttentionPlan
from ultragen.step_cache import StepCache, StepCacheConfig

log = logging.getLogger(__name__)

GUIDE_TIMESTEP = 0.0  # the guide is clean: its modulation comes from t = 0 (diffusers' ref_fixed_timestep)


class HierFlux2Transformer(nn.Module):
    """Hierarchical forward of a FLUX.2 transformer (klein 4B / 9B, distilled or base); the wrapped model's weights
    are untouched and its modules are called as they are.

    ``backend``: attention backend name (``ultragen.attention.Backend``). ``ntk_factor``: RoPE NTK factor (1
    reproduces the stock model; the authors use 1 for klein-9B and 10 at inference for klein-base-9B).
    ``cache_guide``: when the plan's guide attends only to itself, compute its per-layer keys and values once
    (in a diffusers ``Flux2KVCache``) and reuse them in every step and CFG branch while the plan, the guide latent,
    the guidance value and the LoRA stay the same (never while gradients are on). ``step_cache``
    (:meth:`set_step_cache`; off by default): First-Block-Cache over the hires pass (``ultragen.step_cache``).
    """

    def __init__(self, transformer: nn.Module, backend: Backend | str = Backend.AUTO, ntk_factor: float = 1.0,
                 cache_guide: bool = True):
        super().__init__()
        if getattr(transformer.config, "patch_size", 1) != 1:
            raise ValueError(f"patch_size={transformer.config.patch_size} is not supported; FLUX.2 models use 1")
        if len(transformer.config.axes_dims_rope) != 4:
            raise ValueError(f"axes_dims_rope={tuple(transformer.config.axes_dims_rope)}: a FLUX.2 model has four "
                             f"RoPE axes (T, H, W, L); for a FLUX.1 model use ultragen.flux.HierFluxTransformer")
        self.transformer = transformer
        self.backend = parse_backend(backend)
        if ntk_factor <= 0:
            raise ValueError(f"ntk_factor={ntk_factor} must be > 0 (1: stock RoPE)")
        self.ntk_factor = float(ntk_factor)
        self.cache_guide = cache_guide
        self.gradient_checkpointing = False
        self._compiled: dict | None = None
        self._rope: tuple | None = None  # (plan, device, ntk, Rope)
        self._guide_cache: tuple | None = None  # (plan, key inputs, Flux2KVCache)
        self.step_cache = StepCache()  # off; set_step_cache turns it on (one fresh state per image)

    # --- public ------------------------------------------------------------------------------------------------
    def forward(
        self,
        hires: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        plan: AttentionPlan,
        guide: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity of the hires tokens.

        hires: (B, hires_tokens, C) packed latents in window-first order; guide: (B, guide_tokens, C) clean packed
        guide latent in tile-first order (None when the layout has none); encoder_hidden_states: (B, text_tokens,
        joint_dim) Qwen3 prompt embeddings; timestep: (B,) sigma in [0, 1] (diffusers' Flux2KleinPipeline passes
        t / 1000); guidance: (B,) for guidance-distilled models (config ``guidance_embeds``), else None (klein).
        Returns (B, hires_tokens, C) in window-first order."""
        tr = self.transformer
        self._check_inputs(hires, encoder_hidden_states, plan, guide, guidance)
        t = timestep.to(hires.dtype) * 1000
        g = guidance.to(hires.dtype) * 1000 if guidance is not None else None
        temb = tr.time_guidance_embed(t, g)
        main = Mods.of(tr, temb)
        x = linear(tr.x_embedder, hires, adapted=False)
        text = tr.context_embedder(encoder_hidden_states)
        rope = self._rope_for(plan, x.device)
        streams = Streams(text, x, None)
        guide_mods = None
        cache: Flux2KVCache | None = None
        if guide is not None:
            guide_mods = self._guide_mods(t, g)
            if self._use_cache(plan):
                cache = self._cached_guide_kv(guide, g, guide_mods, plan, rope)
            else:
                streams.guide = tr.x_embedder(guide)  # adapted: a LoRA on x_embedder acts on the guide

        if self._compiled is not None:
            key, backend = plan_key(plan), self.backend.value

            def attention(q, k, v):  # an opaque custom op inside the compiled block
                return attend_op(q, k, v, key, backend)
        else:

            def attention(q, k, v):
                return attend(q, k, v, plan, self.backend, out=heads_last_output(q))

        def blocks(s: Streams, start: int, stop: int | None = None) -> Streams:
            return self._blocks(s, start, stop, main, guide_mods, rope, attention, cache)

        if self.step_cache.active():  # first block, then the rest or the cached residual of the rest
            hires_out = self.step_cache.run(plan, (encoder_hidden_states,), x, lambda: blocks(streams, 0, 1),
                                            lambda s: blocks(s, 1), lambda s: s.hires)
        else:
            hires_out = blocks(streams, 0).hires
        return tr.proj_out(tr.norm_out(hires_out, temb))

    def clear_guide_cache(self) -> None:
        """Forget the cached guide keys/values and the rotary tables (call after each image to free their memory).
        Also needed after editing base weights in place (e.g. fusing another LoRA into them)."""
        self._guide_cache = None
        self._rope = None

    def set_step_cache(self, config: StepCacheConfig | str) -> StepCache:
        """Start a fresh step cache (``ultragen.step_cache``: "off", "fbcache", "fbcache:0.08"; call before each
        image). CFG's two calls per step keep two states (told apart by their prompt embeddings); the guide's
        keys/values cache is independent of it: the first block, run every step, reads them."""
        self.step_cache = StepCache(config)
        return self.step_cache

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` the double- and single-block forwards (one graph each, shared by all blocks of a kind,
        ``dynamic=False``: one compile per resolution). Attention stays one opaque custom-op call inside the graph;
        the guide's once-per-image pass is not compiled."""
        self._compiled = compile_fns((double_block, single_block), **compile_kwargs)

    # --- internals ---------------------------------------------------------------------------------------------
    def _check_inputs(self, hires, text, plan: AttentionPlan, guide, guidance) -> None:
        check_streams(plan.layout, hires, text, guide)
        needs_guidance = self.transformer.config.guidance_embeds
        if needs_guidance and guidance is None:
            raise ValueError("this FLUX.2 model is guidance-distilled (config guidance_embeds): pass guidance, e.g. "
                             "torch.full((B,), 4.0)")
        if not needs_guidance and guidance is not None:
            raise ValueError("this FLUX.2 model has no guidance embedding (klein; config guidance_embeds=false): "
                             "pass guidance=None and use CFG for the base models")

    def _guide_mods(self, t: torch.Tensor, g: torch.Tensor | None) -> Mods:
        """The guide's modulation: the model's shared modulation layers at t = 0 (same guidance)."""
        t_guide = torch.full_like(t, GUIDE_TIMESTEP * 1000)
        return Mods.of(self.transformer, self.transformer.time_guidance_embed(t_guide, g))

    def _rope_for(self, plan: AttentionPlan, device: torch.device) -> Rope:
        if self._rope is None or self._rope[0] is not plan or self._rope[1:3] != (device, self.ntk_factor):
            cfg = self.transformer.config
            rope = flux2_rope(sequence_ids(plan.layout).to(device), tuple(cfg.axes_dims_rope), cfg.rope_theta,
                              self.ntk_factor)
            self._rope = (plan, device, self.ntk_factor, rope)
        return self._rope[3]

    def _use_cache(self, plan: AttentionPlan) -> bool:
        return self.cache_guide and plan.policy.guide_isolated and not torch.is_grad_enabled()

    def _cached_guide_kv(self, guide, g, mods: Mods, plan: AttentionPlan, rope: Rope) -> Flux2KVCache:
        key = (guide, g, self.ntk_factor, adapter_fingerprint(self.transformer))
        cached = self._guide_cache
        if cached is None or cached[0] is not plan or not same_inputs(cached[1], key):
            copies = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in key)
            self._guide_cache = cached = (plan, copies, self._guide_pass(guide, mods, plan, rope))
        return cached[2]

    def _guide_pass(self, guide, mods: Mods, plan: AttentionPlan, rope: Rope) -> Flux2KVCache:
        """Run the guide stream alone through every block; keep each layer's rotated keys and values."""
        tr = self.transformer
        start = plan.layout.segment_offsets[Segment.GUIDE]
        rope_guide = (rope[0][start:], rope[1][start:])
        cache = Flux2KVCache(len(tr.transformer_blocks), len(tr.single_transformer_blocks))
        cache.num_ref_tokens = guide.shape[1]
        x = tr.x_embedder(guide)
        empty = x.new_zeros(x.shape[0], 0, x.shape[2])
        layers = [*cache.double_block_caches, *cache.single_block_caches]

        def attention(q, k, v):  # (B, H, G, D); stored as diffusers' (B, G, H, D)
            layers[len(seen)].store(k.transpose(1, 2), v.transpose(1, 2))
            seen.append(None)
            return attend_within(q, k, v, plan, Segment.GUIDE)

        seen: list = []
        streams = Streams(empty, empty, x)
        for block in tr.transformer_blocks:
            streams = double_block(block, streams, mods, mods, rope_guide, attention)
        for block in tr.single_transformer_blocks:
            streams = single_block(block, streams, mods, mods, rope_guide, attention)
        return cache

    def _blocks(self, streams: Streams, start: int, stop: int | None, main: Mods, guide: Mods | None, rope: Rope,
                attention, cache: Flux2KVCache | None) -> Streams:
        """Run blocks ``start`` .. ``stop`` - 1 (None: to the end) of the double blocks followed by the single
        blocks."""
        tr = self.transformer
        doubles = len(tr.transformer_blocks)
        stop = doubles + len(tr.single_transformer_blocks) if stop is None else stop
        for i in range(start, stop):
            if i < doubles:
                kv = cache.get_double(i) if cache is not None else None
                streams = self._run(double_block, tr.transformer_blocks[i], streams, main, guide, rope, attention, kv)
                continue
            if i == doubles and self._compiled is not None:
                # single blocks return views of their joint text + hires stream; give the first one such views too,
                # so one compiled graph serves them all
                text_tokens = streams.text.shape[1]
                joint = torch.cat([streams.text, streams.hires], dim=1)
                streams = Streams(joint[:, :text_tokens], joint[:, text_tokens:], streams.guide)
            kv = cache.get_single(i - doubles) if cache is not None else None
            streams = self._run(single_block, tr.single_transformer_blocks[i - doubles], streams, main, guide, rope,
                                attention, kv)
        return streams

    def _run(self, fn, block, streams: Streams, main: Mods, guide: Mods | None, rope: Rope, attention, kv) -> Streams:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, block, streams, main, guide, rope, attention, kv, use_reentrant=False)
        if self._compiled is not None:
            fn = self._compiled[fn]
        return fn(block, streams, main, guide, rope, attention, kv)
