"""The hierarchical FLUX.2 transformer against the stock diffusers Flux2Transformer2DModel (tiny, CPU, float32)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_flux2
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

from flux2_tiny import CHANNELS, TEXT_TOKENS, tiny_flux2, tiny_inputs, tiny_layout
from ultragen.flux2 import HierFlux2Transformer
from ultragen.flux2.ids import guide_ids, hires_ids, sequence_ids, text_ids
from ultragen.policy import AttentionPolicy, Reach, build_plan, get_policy

# the pattern of diffusers' reference tokens ("extract" mode): text and image read everything, the reference
# tokens only themselves
EXTRACT_LIKE = AttentionPolicy(name="extract-like", text_to_hires=Reach.ALL, text_to_guide=Reach.ALL,
                               hires_to_hires=Reach.ALL, hires_to_guide=Reach.ALL, guide_to_guide=Reach.ALL)


def hand_text_ids(n):
    return torch.tensor([[0.0, 0.0, 0.0, float(l)] for l in range(n)])


def hand_raster_ids(rows, cols):
    return torch.tensor([[0.0, float(r), float(c), 0.0] for r in range(rows) for c in range(cols)])


def hand_guide_ids(layout):
    """(0, rho*m + offset, rho*n + offset, 0) of each guide token in sequence order, written out by hand."""
    rows, cols = layout.guide_grid
    out = []
    for raster in layout.guide_perm.tolist():
        m, n = divmod(raster, cols)
        off = layout.guide_offset_tokens
        out.append([0.0, layout.rho * m + off, layout.rho * n + off, 0.0])
    return torch.tensor(out)


def stock_forward(model, layout, inputs, attention_mask=None, guidance=None):
    """The unmodified diffusers model in raster order; returns (B, hires_tokens, C) in raster order."""
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else None
    with torch.no_grad():
        return model(
            hidden_states=inputs["hires"], encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=inputs["timestep"], img_ids=hand_raster_ids(*layout.padded_grid),
            txt_ids=hand_text_ids(layout.text_tokens), guidance=guidance, joint_attention_kwargs=kwargs,
        ).sample


def use_kv_processors(model):
    """What diffusers' Flux2KleinKVPipeline does to run reference tokens."""
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())


def stock_with_reference_guide(model, layout, inputs):
    """diffusers' own reference-token forward ("extract"): the guide as reference tokens with their modulation at
    ref_fixed_timestep=0, reading only themselves; text and hires read everything. Hires in and out in raster order."""
    use_kv_processors(model)
    ids = torch.cat([hand_guide_ids(layout), hand_raster_ids(*layout.padded_grid)])
    with torch.no_grad():
        out = model(
            hidden_states=torch.cat([inputs["guide"], inputs["hires"]], dim=1),
            encoder_hidden_states=inputs["encoder_hidden_states"], timestep=inputs["timestep"], img_ids=ids,
            txt_ids=hand_text_ids(layout.text_tokens), kv_cache_mode="extract",
            num_ref_tokens=layout.guide_tokens, ref_fixed_timestep=0.0,
        )
    return out.sample, out.kv_cache  # diffusers drops the reference rows itself


def hier_forward(hier, plan, inputs, raster_hires=True):
    layout = plan.layout
    args = dict(inputs)
    if raster_hires:
        args["hires"] = layout.hires_to_sequence(inputs["hires"])
    with torch.no_grad():
        out = hier(plan=plan, **args)
    return layout.hires_to_raster(out) if raster_hires else out


def test_a_full_window_no_guide_dense_policy_equals_stock_model():
    model = tiny_flux2(layers=2, single_layers=2)
    layout = tiny_layout(8, 8, window=8, rho=None)
    inputs = tiny_inputs(layout, batch=2)
    expected = stock_forward(model, layout, inputs)
    actual = hier_forward(HierFlux2Transformer(model, backend="reference"), build_plan(layout, "dense"), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_b_window_first_order_is_invisible():
    """Windowed attention in window-first order equals the stock model with the same mask in raster order."""
    model = tiny_flux2(layers=2, single_layers=1)
    layout = tiny_layout(12, 8, window=4, rho=None)
    assert not torch.equal(layout.hires_perm, torch.arange(layout.hires_tokens))
    plan = build_plan(layout, get_policy("default", hires_halo_tokens=1))
    inputs = tiny_inputs(layout)
    t = layout.text_tokens
    seq_pos = torch.cat([torch.arange(t), t + layout.hires_inverse])  # raster token -> sequence position
    mask_seq = plan.block_table().repeat_interleave(8, 0).repeat_interleave(8, 1)
    mask_raster = mask_seq[seq_pos][:, seq_pos]
    assert not mask_raster.all(), "the test needs a mask that actually masks"
    expected = stock_forward(model, layout, inputs, attention_mask=mask_raster)
    actual = hier_forward(HierFlux2Transformer(model, backend="reference"), plan, inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (stock_forward(model, layout, inputs) - expected).abs().max() > 1e-3, "the mask had no effect"


@pytest.mark.parametrize("cache_guide", [False, True])
def test_guide_equals_diffusers_reference_tokens(cache_guide):
    """With the guide read as diffusers reads reference tokens (modulation at t = 0, self-attention only, rho-scaled
    ids), our three-stream forward equals the stock extract-mode forward."""
    model = tiny_flux2(layers=2, single_layers=2)
    layout = tiny_layout(8, 16)
    inputs = tiny_inputs(layout, batch=2)
    expected, _ = stock_with_reference_guide(model, layout, inputs)
    hier = HierFlux2Transformer(model, backend="reference", cache_guide=cache_guide)
    actual = hier_forward(hier, build_plan(layout, EXTRACT_LIKE), inputs)
    assert (hier._guide_cache is not None) == cache_guide
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    without_guide = stock_forward(model, tiny_layout(8, 16, rho=None), inputs)
    assert (without_guide - expected).abs().max() > 1e-3, "the guide had no effect, so the test proves nothing"


def dense_masked_reference(model, layout, plan, inputs, monkeypatch):
    """Brute force: diffusers' extract-mode forward (guide as reference tokens, modulated at t = 0) with its
    attention replaced by dense SDPA under the policy's pairwise token mask (not the block table)."""
    t, n, g = layout.text_tokens, layout.hires_tokens, layout.guide_tokens
    # stock order [text | guide | hires raster] -> our sequence position
    ours = torch.cat([torch.arange(t), t + n + torch.arange(g), t + layout.hires_inverse])
    mask = plan.policy.token_mask(layout)[ours][:, ours]

    def masked(query, key, value, num_txt_tokens, num_ref_tokens, kv_cache=None, backend=None):
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    monkeypatch.setattr(transformer_flux2, "_flux2_kv_causal_attention", masked)
    return stock_with_reference_guide(model, layout, inputs)[0]


@pytest.mark.parametrize("cache_guide", [False, True])
def test_guide_with_default_policy_equals_brute_force_masked_dense(cache_guide, monkeypatch):
    model = tiny_flux2(layers=2, single_layers=2)
    layout = tiny_layout(16, 16)
    plan = build_plan(layout, "default")
    inputs = tiny_inputs(layout)
    expected = dense_masked_reference(model, layout, plan, inputs, monkeypatch)
    actual = hier_forward(HierFlux2Transformer(model, backend="reference", cache_guide=cache_guide), plan, inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_guide_ids_are_scaled_by_rho_on_h_and_w_with_the_images_t_and_l():
    layout = tiny_layout(8, 16, rho=2)
    expected_guide = hand_guide_ids(layout)
    assert torch.equal(guide_ids(layout), expected_guide)
    # a guide token in the middle by hand: guide grid raster index 9 = (m, n) = (1, 1) -> (0, 2.5, 2.5, 0)
    position = layout.guide_inverse[9].item()
    assert guide_ids(layout)[position].tolist() == [0.0, 2.5, 2.5, 0.0]
    assert torch.equal(text_ids(TEXT_TOKENS), hand_text_ids(TEXT_TOKENS))
    raster = hand_raster_ids(*layout.padded_grid)
    assert torch.equal(hires_ids(layout), raster[layout.hires_perm])
    assert torch.equal(sequence_ids(layout), torch.cat([hand_text_ids(TEXT_TOKENS), raster[layout.hires_perm],
                                                        expected_guide]))
    authors = tiny_layout(8, 16, rho=4, guide_offset_tokens=0)
    m, n = divmod(authors.guide_perm[3].item(), authors.guide_grid[1])
    assert guide_ids(authors)[3].tolist() == [0.0, 4.0 * m, 4.0 * n, 0.0]


def test_cached_and_uncached_guide_identical_and_switching_plans_stays_exact():
    model = tiny_flux2(layers=2, single_layers=2)
    layout = tiny_layout(16, 16)
    first, second = build_plan(layout, "default"), build_plan(layout, get_policy("default", guide_radius_tokens=0,
                                                                                   guide_to_guide="local"))
    assert first.policy.guide_isolated and second.policy.guide_isolated
    assert not torch.equal(first.block_table(), second.block_table())
    inputs = tiny_inputs(layout, batch=2)
    cached = HierFlux2Transformer(model, backend="reference", cache_guide=True)
    uncached = HierFlux2Transformer(model, backend="reference", cache_guide=False)
    later = {**inputs, "timestep": torch.full((2,), 0.3)}
    for plan, args in ((first, inputs), (first, later), (second, inputs), (first, later)):
        torch.testing.assert_close(hier_forward(cached, plan, args), hier_forward(uncached, plan, args),
                                   rtol=1e-5, atol=1e-6)
        assert cached._guide_cache[0] is plan
    changed = {**inputs, "guide": inputs["guide"] + 0.5}
    torch.testing.assert_close(hier_forward(cached, first, changed), hier_forward(uncached, first, changed),
                               rtol=1e-5, atol=1e-6)
    cached.clear_guide_cache()
    assert cached._guide_cache is None


def test_guide_pass_runs_once_per_image_across_steps_and_cfg_branches():
    model = tiny_flux2()
    layout = tiny_layout(8, 16)
    plan = build_plan(layout)
    hier = HierFlux2Transformer(model, backend="reference")
    calls = []
    original = hier._guide_pass
    hier._guide_pass = lambda *a: calls.append(1) or original(*a)
    inputs = tiny_inputs(layout, batch=2)
    for step in (0.9, 0.6, 0.3):
        cond = {**inputs, "timestep": torch.full((2,), step)}
        uncond = {**cond, "encoder_hidden_states": torch.zeros_like(inputs["encoder_hidden_states"])}
        hier_forward(hier, plan, cond)
        hier_forward(hier, plan, uncond)
    assert len(calls) == 1


def test_ntk_factor_changes_the_output_and_one_is_stock():
    model = tiny_flux2()
    layout = tiny_layout(8, 8, window=8, rho=None)
    plan = build_plan(layout, "dense")
    inputs = tiny_inputs(layout)
    stock = hier_forward(HierFlux2Transformer(model, backend="reference"), plan, inputs)
    torch.testing.assert_close(stock, stock_forward(model, layout, inputs), rtol=1e-5, atol=1e-5)
    ntk = hier_forward(HierFlux2Transformer(model, backend="reference", ntk_factor=10), plan, inputs)
    assert (stock - ntk).abs().max() > 1e-4


def test_guidance_embedding_models_match_stock_and_guidance_is_checked():
    model = tiny_flux2(guidance_embeds=True)
    layout = tiny_layout(8, 8, window=8, rho=None)
    inputs = tiny_inputs(layout)
    guidance = torch.full((1,), 4.0)
    hier = HierFlux2Transformer(model, backend="reference")
    actual = hier_forward(hier, build_plan(layout, "dense"), {**inputs, "guidance": guidance})
    torch.testing.assert_close(actual, stock_forward(model, layout, inputs, guidance=guidance), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guidance-distilled"):
        hier_forward(hier, build_plan(layout, "dense"), inputs)
    with pytest.raises(ValueError, match="no guidance embedding"):
        hier_forward(HierFlux2Transformer(tiny_flux2(), backend="reference"), build_plan(layout, "dense"),
                     {**inputs, "guidance": guidance})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: {**i, "hires": i["hires"][:, :-1]}, "hires must be"),
        (lambda i: {**i, "guide": None}, "the layout needs a guide"),
        (lambda i: {**i, "encoder_hidden_states": i["encoder_hidden_states"][:, :4]}, "text_tokens=4"),
    ],
)
def test_bad_inputs_raise_with_the_fix(change, message):
    layout = tiny_layout(8, 16)
    with pytest.raises(ValueError, match=message):
        HierFlux2Transformer(tiny_flux2(), backend="reference")(plan=build_plan(layout), **change(tiny_inputs(layout)))


def test_a_flux1_model_is_refused_with_the_right_class():
    from flux_tiny import tiny_flux

    with pytest.raises(ValueError, match="HierFluxTransformer"):
        HierFlux2Transformer(tiny_flux())


def test_gradient_checkpointing_matches_output_and_gradients():
    model = tiny_flux2()
    layout = tiny_layout(8, 16)
    plan = build_plan(layout)
    inputs = tiny_inputs(layout)
    results = []
    for enabled in (False, True):
        hires = layout.hires_to_sequence(inputs["hires"]).requires_grad_()
        hier = HierFlux2Transformer(model, backend="reference")
        hier.enable_gradient_checkpointing(enabled)
        out = hier(plan=plan, **{**inputs, "hires": hires})
        (grad,) = torch.autograd.grad(out.square().sum(), hires)
        results.append((out.detach(), grad))
        assert hier._guide_cache is None, "no cache while gradients are on"
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
