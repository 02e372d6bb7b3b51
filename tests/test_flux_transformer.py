"""The hierarchical FLUX transformer against the stock diffusers model (tiny config, CPU, float32)."""

import pytest
import torch

from flux_tiny import tiny_flux, tiny_inputs, tiny_layout
from ultragen.flux import HierFluxTransformer
from ultragen.layout import Segment
from ultragen.policy import AttentionPolicy, Reach, build_plan, get_policy


def stock_forward(model, layout, inputs, attention_mask=None):
    """The unmodified diffusers model in raster order; returns (B, hires_tokens, C) in raster order."""
    raster_ids = layout.hires_to_raster(layout.hires_ids()[None])[0]
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else None
    with torch.no_grad():
        return model(
            hidden_states=inputs["hires"], encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"], img_ids=raster_ids,
            txt_ids=layout.text_ids(), guidance=inputs["guidance"], joint_attention_kwargs=kwargs,
        ).sample


def hier_forward(hier, plan, inputs, raster_hires=True):
    layout = plan.layout
    args = dict(inputs)
    if raster_hires:
        args["hires"] = layout.hires_to_sequence(inputs["hires"])
    with torch.no_grad():
        out = hier(plan=plan, **args)
    return layout.hires_to_raster(out) if raster_hires else out


def test_a_full_window_no_guide_dense_policy_equals_stock_model():
    model = tiny_flux(layers=2, single_layers=2)
    layout = tiny_layout(8, 8, window=8, rho=None)
    inputs = tiny_inputs(layout, batch=2)
    expected = stock_forward(model, layout, inputs)
    actual = hier_forward(HierFluxTransformer(model, backend="reference"), build_plan(layout, "dense"), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_b_window_first_order_is_invisible():
    """Windowed attention in window-first order equals the stock model with the same mask in raster order."""
    model = tiny_flux(layers=2, single_layers=1)
    layout = tiny_layout(12, 8, window=4, rho=None)
    plan = build_plan(layout, get_policy("default", hires_halo_tokens=1))
    inputs = tiny_inputs(layout)
    t = layout.text_tokens
    seq_pos = torch.cat([torch.arange(t), t + layout.hires_inverse])  # raster token -> sequence position
    mask_seq = plan.block_table().repeat_interleave(8, 0).repeat_interleave(8, 1)
    mask_raster = mask_seq[seq_pos][:, seq_pos]
    assert not mask_raster.all(), "the test needs a mask that actually masks"
    expected = stock_forward(model, layout, inputs, attention_mask=mask_raster)
    actual = hier_forward(HierFluxTransformer(model, backend="reference"), plan, inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    unmasked = stock_forward(model, layout, inputs)
    assert (unmasked - expected).abs().max() > 1e-3, "the mask had no effect, so the test proves nothing"


def test_e_cached_and_uncached_guide_give_the_same_output():
    model = tiny_flux(layers=2, single_layers=2)
    layout = tiny_layout(8, 16)
    plan = build_plan(layout, "default")
    assert plan.policy.guide_isolated
    inputs = tiny_inputs(layout, batch=2)
    cached = HierFluxTransformer(model, backend="reference", cache_guide=True)
    uncached = HierFluxTransformer(model, backend="reference", cache_guide=False)
    first = hier_forward(cached, plan, inputs)
    assert cached._guide_cache is not None
    again = hier_forward(cached, plan, {**inputs, "timestep": torch.full((2,), 0.3)})
    torch.testing.assert_close(first, hier_forward(uncached, plan, inputs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, hier_forward(uncached, plan, {**inputs, "timestep": torch.full((2,), 0.3)}),
                               rtol=1e-5, atol=1e-6)


def test_e_guide_cache_is_invalidated_when_its_inputs_change():
    model = tiny_flux()
    layout = tiny_layout(8, 16)
    plan = build_plan(layout)
    inputs = tiny_inputs(layout)
    hier = HierFluxTransformer(model, backend="reference")
    reference = HierFluxTransformer(model, backend="reference", cache_guide=False)
    hier_forward(hier, plan, inputs)
    for change in ("guide", "pooled_projections", "guidance"):
        changed = {**inputs, change: inputs[change] + 0.5}
        torch.testing.assert_close(hier_forward(hier, plan, changed), hier_forward(reference, plan, changed),
                                   rtol=1e-5, atol=1e-6)
    hier.clear_guide_cache()
    assert hier._guide_cache is None


def _receptive_blocks(plan, start_block: int, layers: int) -> torch.Tensor:
    table = plan.block_table()
    reached = torch.zeros(plan.n_blocks, dtype=torch.bool)
    reached[start_block] = True
    for _ in range(layers):
        reached = reached | table[:, reached].any(dim=1)
    return reached


@pytest.mark.parametrize("segment", [Segment.HIRES, Segment.GUIDE])
def test_d_perturbation_stays_inside_the_policys_receptive_field(segment):
    layers, single_layers = 1, 2
    model = tiny_flux(layers=layers, single_layers=single_layers)
    layout = tiny_layout(16, 16)
    policy = AttentionPolicy(text_to_guide=Reach.NONE, text_to_hires=Reach.NONE, hires_halo_tokens=0,
                             guide_margin_tokens=(0, 0), guide_to_guide=Reach.LOCAL, guide_radius_tokens=0)
    plan = build_plan(layout, policy)
    inputs = tiny_inputs(layout)
    hier = HierFluxTransformer(model, backend="reference", cache_guide=False)
    base = hier_forward(hier, plan, inputs, raster_hires=False)
    key = "hires" if segment is Segment.HIRES else "guide"
    token = 37
    perturbed = {**inputs, key: inputs[key].clone()}
    perturbed[key][:, token] += 1.0
    out = hier_forward(hier, plan, perturbed, raster_hires=False)
    start = (layout.segment_offsets[segment] + token) // layout.block_tokens
    reached = _receptive_blocks(plan, start, layers + single_layers)
    hires_blocks = plan.query_blocks_of(Segment.HIRES)
    inside = reached[hires_blocks.start:hires_blocks.stop].repeat_interleave(layout.block_tokens)
    assert 0 < inside.sum() < inside.numel() // 2, "the receptive field should be a small part of the image"
    changed = (out != base).any(dim=-1)[0]
    assert torch.equal(out[:, ~inside], base[:, ~inside]), "a token outside the receptive field changed"
    assert changed[inside].any()


def test_f_batches_of_two_prompts_and_cfg_doubling_match_single_runs():
    model = tiny_flux()
    layout = tiny_layout(8, 16)
    plan = build_plan(layout)
    hier = HierFluxTransformer(model, backend="reference")
    pair = tiny_inputs(layout, batch=2)
    together = hier_forward(hier, plan, pair)
    for i in range(2):
        single = {k: v[i : i + 1] for k, v in pair.items()}
        torch.testing.assert_close(together[i : i + 1], hier_forward(hier, plan, single), rtol=1e-5, atol=1e-6)
    one = tiny_inputs(layout, batch=1, seed=5)
    cfg = {k: torch.cat([v, v]) for k, v in one.items()}
    cfg["encoder_hidden_states"][1] = 0.0  # the unconditional branch
    doubled = hier_forward(hier, plan, cfg)
    torch.testing.assert_close(doubled[:1], hier_forward(hier, plan, one), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(doubled[0], doubled[1])


def test_ntk_factor_changes_the_output_and_one_is_stock():
    model = tiny_flux()
    layout = tiny_layout(8, 8, window=8, rho=None)
    plan = build_plan(layout, "dense")
    inputs = tiny_inputs(layout)
    one = hier_forward(HierFluxTransformer(model, backend="reference", ntk_factor=1.0), plan, inputs)
    torch.testing.assert_close(one, stock_forward(model, layout, inputs), rtol=1e-5, atol=1e-5)  # stock diffusers
    ntk = hier_forward(HierFluxTransformer(model, backend="reference", ntk_factor=10), plan, inputs)
    assert (one - ntk).abs().max() > 1e-4


def test_e_switching_plans_with_the_cache_on_equals_uncached_for_each():
    """Two guide-isolated plans whose guide attends differently (all of it, or its own tile only), used in turn by
    one cached transformer: each result equals the uncached one (a cache keyed without the plan reuses stale keys
    and values)."""
    model = tiny_flux(layers=2, single_layers=2)
    layout = tiny_layout(8, 16)
    plans = [build_plan(layout, "default"),
             build_plan(layout, get_policy("default", guide_to_guide="local", guide_radius_tokens=0))]
    assert all(p.policy.guide_isolated for p in plans)
    inputs = tiny_inputs(layout, batch=1)
    cached = HierFluxTransformer(model, backend="reference", cache_guide=True)
    uncached = HierFluxTransformer(model, backend="reference", cache_guide=False)
    expected = [hier_forward(uncached, plan, inputs) for plan in plans]
    assert (expected[0] - expected[1]).abs().max() > 1e-4, "the plans must differ in what the guide computes"
    for i in (0, 1, 0, 1):
        torch.testing.assert_close(hier_forward(cached, plans[i], inputs), expected[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, l: {**i, "hires": i["hires"][:, :-1]}, "hires must be"),
        (lambda i, l: {**i, "guide": None}, "the layout needs a guide"),
        (lambda i, l: {**i, "guidance": None}, "guidance-distilled"),
        (lambda i, l: {**i, "encoder_hidden_states": i["encoder_hidden_states"][:, :4]}, "text_tokens=4"),
    ],
)
def test_bad_inputs_raise_with_the_fix(change, message):
    model = tiny_flux()
    layout = tiny_layout(8, 16)
    hier = HierFluxTransformer(model, backend="reference")
    with pytest.raises(ValueError, match=message):
        hier(plan=build_plan(layout), **change(tiny_inputs(layout), layout))


def test_compiled_blocks_match_eager_and_do_not_recompile():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_flux(layers=2, single_layers=3)
    layout = tiny_layout(8, 16)
    plan = build_plan(layout)
    inputs = tiny_inputs(layout)
    eager = hier_forward(HierFluxTransformer(model, backend="reference"), plan, inputs)
    compiled = HierFluxTransformer(model, backend="reference")
    compiled.compile_blocks()
    torch._dynamo.reset()
    counters.clear()
    torch.testing.assert_close(hier_forward(compiled, plan, inputs), eager, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # one per block kind: the first single block too
    later = {**inputs, "timestep": torch.full((1,), 0.2), "hires": torch.randn_like(inputs["hires"])}
    with torch._dynamo.config.patch(error_on_recompile=True):  # (monkeypatch's undo deletes dynamo config keys)
        again = hier_forward(compiled, plan, later)
    torch.testing.assert_close(again, hier_forward(HierFluxTransformer(model, backend="reference"), plan, later),
                               rtol=1e-5, atol=1e-5)


def test_a_new_plan_for_the_same_layout_reuses_the_compiled_blocks():
    """Each image builds its own plan; the compiled blocks must not recompile for it (dynamo guards on the
    attention op's plan key, and falls back to eager silently after its recompile limit)."""
    import torch._dynamo

    from ultragen.attention.op import plan_key

    model = tiny_flux(layers=1, single_layers=1)
    layout = tiny_layout(8, 16)
    inputs = tiny_inputs(layout)
    compiled = HierFluxTransformer(model, backend="reference")
    compiled.compile_blocks()
    torch._dynamo.reset()
    first = build_plan(layout)
    hier_forward(compiled, first, inputs)
    second = build_plan(layout)  # the next image's plan, while the first is still alive
    assert plan_key(second) == plan_key(first)
    assert plan_key(build_plan(tiny_layout(8, 8))) != plan_key(first)  # another table, another key
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = hier_forward(compiled, second, inputs)
    torch.testing.assert_close(again, hier_forward(HierFluxTransformer(model, backend="reference"), second, inputs),
                               rtol=1e-5, atol=1e-5)


def test_guidance_on_a_model_without_guidance_embedding_is_refused():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    schnell_like = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    layout = tiny_layout(8, 16)
    with pytest.raises(ValueError, match="no guidance embedding"):
        hier_forward(HierFluxTransformer(schnell_like, backend="reference"), build_plan(layout), tiny_inputs(layout))


# --- feed-forward over token chunks (ff_chunk_tokens) --------------------------------------------------------------
def _mlp_token_counts(model) -> list[int]:
    """A list that fills with the token count of every call to a hires/guide feed-forward or single-block MLP input
    projection (the base layer, so adapted calls count too; the double block's small text stream is left out)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    counts: list[int] = []
    linears = [b.ff.net[0].proj for b in model.transformer_blocks]
    linears += [b.proj_mlp for b in model.single_transformer_blocks]
    for layer in linears:
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
        base.register_forward_hook(lambda module, args, out: counts.append(args[0].shape[1]))
    return counts


def _ff_case(case: str):
    """(model, layout, HierFluxTransformer keyword arguments) of one chunking test case."""
    model = tiny_flux(layers=2, single_layers=2)
    if case == "guide LoRA":  # feed-forwards and MLPs adapted too, so the adapted path is chunked
        from test_flux_lora import randomise_lora  # here: test_flux_lora imports this module

        from ultragen.flux.lora import add_guide_lora

        add_guide_lora(model, rank=4, alpha=4, targets="wide")
        randomise_lora(model)
    layout = tiny_layout(8, 16, rho=None if case == "no guide" else 2)  # text 8, hires 128, guide 32 tokens
    return model, layout, {"cache_guide": case == "cached guide"}


# 7 divides no stream; 16 divides hires and guide but not the single block's text + hires (136); 48 leaves the guide
# whole (32 tokens)
@pytest.mark.parametrize("chunk", [7, 16, 48])
@pytest.mark.parametrize("case", ["no guide", "guide", "cached guide", "guide LoRA"])
def test_ff_chunked_equals_unchunked_and_no_mlp_sees_more_than_a_chunk(case, chunk):
    model, layout, kwargs = _ff_case(case)
    plan = build_plan(layout)
    inputs = tiny_inputs(layout, batch=2)
    counts = _mlp_token_counts(model)
    plain = hier_forward(HierFluxTransformer(model, backend="reference", **kwargs), plan, inputs)
    plain_counts = list(counts)
    counts.clear()
    chunked = hier_forward(HierFluxTransformer(model, backend="reference", ff_chunk_tokens=chunk, **kwargs), plan,
                           inputs)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert max(plain_counts) > chunk, "the test needs streams longer than a chunk"
    assert max(counts) <= chunk, f"an MLP saw {max(counts)} tokens at ff_chunk_tokens={chunk}"
    assert sum(counts) == sum(plain_counts), "chunking must cover every token once"


def test_ff_chunking_off_or_above_every_stream_is_the_plain_call():
    """None (the default) runs each MLP once over its whole stream, the code path from before chunking existed;
    a chunk size above every stream's length gives bit-identical output."""
    model = tiny_flux(layers=2, single_layers=2)
    layout = tiny_layout(8, 16)
    plan = build_plan(layout)
    inputs = tiny_inputs(layout, batch=2)
    counts = _mlp_token_counts(model)
    default = hier_forward(HierFluxTransformer(model, backend="reference", cache_guide=False), plan, inputs)
    assert sorted(set(counts)) == [32, 128, 136]  # guide; double-block hires; single-block text + hires
    off = hier_forward(HierFluxTransformer(model, backend="reference", cache_guide=False, ff_chunk_tokens=None),
                       plan, inputs)
    above = hier_forward(HierFluxTransformer(model, backend="reference", cache_guide=False, ff_chunk_tokens=136),
                         plan, inputs)
    assert torch.equal(off, default) and torch.equal(above, default)


def test_ff_chunking_with_gradient_checkpointing_matches_output_and_gradients():
    model = tiny_flux(layers=2, single_layers=2)
    layout = tiny_layout(8, 16)
    plan = build_plan(layout)
    inputs = {**tiny_inputs(layout), "hires": tiny_inputs(layout)["hires"].requires_grad_()}
    counts = _mlp_token_counts(model)
    results = []
    for chunk in (None, 7):
        hier = HierFluxTransformer(model, backend="reference", cache_guide=False, ff_chunk_tokens=chunk)
        hier.enable_gradient_checkpointing()
        counts.clear()
        out = hier(plan=plan, **{**inputs, "hires": layout.hires_to_sequence(inputs["hires"])})
        (grad,) = torch.autograd.grad(out.square().sum(), inputs["hires"])
        results.append((out.detach(), grad))
    assert max(counts) <= 7, "the recomputed forward must chunk too"
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)


def test_compiled_blocks_run_the_feed_forward_whole_and_match_eager_chunked():
    """Chunking unrolls into a compiled graph (an 8K FP8 compile did not finish), so compiled blocks run whole."""
    import torch._dynamo

    model = tiny_flux()
    layout = tiny_layout(8, 16)
    plan = build_plan(layout)
    inputs = tiny_inputs(layout)
    eager = hier_forward(HierFluxTransformer(model, backend="reference"), plan, inputs)
    compiled = HierFluxTransformer(model, backend="reference", ff_chunk_tokens=48)
    compiled.compile_blocks()
    torch._dynamo.reset()
    seen = []
    for fn, compiled_fn in list(compiled._compiled.items()):

        def spy(*args, _compiled_fn=compiled_fn, **kwargs):
            seen.append(kwargs.get("ff_chunk_tokens"))
            return _compiled_fn(*args, **kwargs)

        compiled._compiled[fn] = spy
    torch.testing.assert_close(hier_forward(compiled, plan, inputs), eager, rtol=1e-5, atol=1e-5)
    assert seen == [None, None]  # the double and the single block
    later = {**inputs, "timestep": torch.full((1,), 0.2)}
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = hier_forward(compiled, plan, later)
    torch.testing.assert_close(again, hier_forward(HierFluxTransformer(model, backend="reference"), plan, later),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "16384"])
def test_bad_ff_chunk_tokens_is_refused_with_the_rule(value):
    with pytest.raises(ValueError, match=r"ff_chunk_tokens=.* must be None \(no chunking\) or a whole number >= 1"):
        HierFluxTransformer(tiny_flux(), backend="reference", ff_chunk_tokens=value)


def test_compiled_gelu_form_equals_the_tanh_gelu(monkeypatch):
    """Compiled blocks write GELU-tanh as x * sigmoid(2u) (a faster fused FP8 quantisation on the GPU): the same
    function. Checked in float64, where any mistake in the constants would show."""
    import torch.nn.functional as F

    from ultragen.flux import blocks

    x = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(blocks.gelu(x, "tanh"), F.gelu(x, approximate="tanh"), rtol=1e-13, atol=1e-13)
    assert not torch.equal(blocks.gelu(x, "none"), F.gelu(x, approximate="tanh"))  # the exact form stays exact
    torch.testing.assert_close(blocks.gelu(x, "none"), F.gelu(x), rtol=0, atol=0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert torch.equal(blocks.gelu(x, "tanh"), F.gelu(x, approximate="tanh"))  # eager: the one fused kernel


def test_the_blocks_take_their_gelu_from_the_compiled_form(monkeypatch):
    """Every tanh GELU of the blocks (double-block feed-forwards of both streams, single-block MLP) goes through
    blocks.gelu, the function that switches to the sigmoid form under compile."""
    import sys

    from ultragen.flux import blocks

    calls = []
    gelu = blocks.gelu

    def spy(x, approximate):
        calls.append((sys._getframe(1).f_code.co_name, approximate))  # the caller: feed_forward or the single block's
        return gelu(x, approximate)

    monkeypatch.setattr(blocks, "gelu", spy)
    layout = tiny_layout(8, 8)
    hier_forward(HierFluxTransformer(tiny_flux(layers=2, single_layers=3), backend="reference"), build_plan(layout),
                 tiny_inputs(layout))
    # the step's own: 2 double blocks x (hires + text feed-forward) and 3 single-block MLPs (and the guide pass's)
    assert calls.count(("feed_forward", "tanh")) >= 2 * 2 and calls.count(("stream", "tanh")) >= 3
    assert {approximate for _, approximate in calls} == {"tanh"}
