"""The hierarchical FLUX transformer on CUDA in bf16: same properties as the CPU tests, bf16 tolerances.

Tolerance rule: the hierarchical model in bf16 may differ from the float32 stock model by at most twice what the
stock model itself loses in bf16 (plus a small floor)."""

import pytest
import torch

from flux_tiny import tiny_flux, tiny_inputs, tiny_layout
from test_flux_lora import randomise_lora
from test_flux_transformer import _receptive_blocks, hier_forward, stock_forward
from ultragen.flux import HierFluxTransformer
from ultragen.flux.lora import add_guide_lora
from ultragen.layout import Segment
from ultragen.policy import AttentionPolicy, Reach, build_plan, get_policy

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


def to(inputs, dtype=BF16):
    return {k: (v.to("cuda", dtype) if v is not None else None) for k, v in inputs.items()}


def bf16_budget(model, layout, inputs, mask=None):
    exact = stock_forward(model.float().cuda(), layout, to(inputs, torch.float32),
                          None if mask is None else mask.cuda())
    lowp = stock_forward(model.to(BF16), layout, to(inputs), None if mask is None else mask.cuda())
    return exact, (lowp.float() - exact).abs().max().item()


def test_full_window_dense_equals_stock_in_bf16():
    model = tiny_flux(layers=2, single_layers=2)
    layout = tiny_layout(8, 8, window=8, rho=None)
    inputs = tiny_inputs(layout, batch=2)
    exact, noise = bf16_budget(model, layout, inputs)
    out = hier_forward(HierFluxTransformer(model.to(BF16), backend="reference"), build_plan(layout, "dense"),
                       to(inputs))
    assert (out.float() - exact).abs().max().item() <= 2 * noise + 1e-3


def test_window_first_is_invisible_in_bf16():
    model = tiny_flux(layers=2, single_layers=1)
    layout = tiny_layout(12, 8, window=4, rho=None)
    plan = build_plan(layout, get_policy("default", hires_halo_tokens=1))
    inputs = tiny_inputs(layout)
    seq_pos = torch.cat([torch.arange(layout.text_tokens), layout.text_tokens + layout.hires_inverse])
    mask = plan.block_table().repeat_interleave(8, 0).repeat_interleave(8, 1)[seq_pos][:, seq_pos]
    exact, noise = bf16_budget(model, layout, inputs, mask)
    out = hier_forward(HierFluxTransformer(model.to(BF16), backend="reference"), plan, to(inputs))
    assert (out.float() - exact).abs().max().item() <= 2 * noise + 1e-3


def test_lora_only_on_guide_and_cache_matches_in_bf16():
    plain, adapted = tiny_flux(layers=2, single_layers=2), tiny_flux(layers=2, single_layers=2)
    add_guide_lora(adapted, rank=4, alpha=4)
    randomise_lora(adapted)
    plain, adapted = plain.to("cuda", BF16), adapted.to("cuda", BF16)
    layout = tiny_layout(8, 8, rho=None)
    plan, inputs = build_plan(layout), to(tiny_inputs(layout))
    assert torch.equal(hier_forward(HierFluxTransformer(plain, backend="reference"), plan, inputs),
                       hier_forward(HierFluxTransformer(adapted, backend="reference"), plan, inputs))
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout), to(tiny_inputs(layout, batch=2))
    cached = hier_forward(HierFluxTransformer(adapted, backend="reference"), plan, inputs)
    uncached = hier_forward(HierFluxTransformer(adapted, backend="reference", cache_guide=False), plan, inputs)
    without = hier_forward(HierFluxTransformer(plain, backend="reference"), plan, inputs)
    torch.testing.assert_close(cached, uncached, rtol=2e-2, atol=2e-2)
    assert (cached.float() - without.float()).abs().max() > 1e-2
    for i in range(2):  # a batch of two prompts equals single runs
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        torch.testing.assert_close(cached[i : i + 1], hier_forward(HierFluxTransformer(adapted, backend="reference"),
                                                                   plan, single), rtol=2e-2, atol=2e-2)


def test_locality_on_gpu():
    model = tiny_flux(layers=1, single_layers=2).to("cuda", BF16)
    layout = tiny_layout(16, 16)
    policy = AttentionPolicy(text_to_guide=Reach.NONE, hires_halo_tokens=0, guide_margin_tokens=(0, 0),
                             guide_to_guide=Reach.LOCAL, guide_radius_tokens=0)
    plan = build_plan(layout, policy)
    inputs = to(tiny_inputs(layout))
    hier = HierFluxTransformer(model, backend="reference", cache_guide=False)
    base = hier_forward(hier, plan, inputs, raster_hires=False)
    perturbed = {**inputs, "hires": inputs["hires"].clone()}
    perturbed["hires"][:, 37] += 1.0
    out = hier_forward(hier, plan, perturbed, raster_hires=False)
    reached = _receptive_blocks(plan, (layout.text_tokens + 37) // 8, 3)
    hires = plan.query_blocks_of(Segment.HIRES)
    inside = reached[hires.start:hires.stop].repeat_interleave(8).cuda()
    assert torch.equal(out[:, ~inside], base[:, ~inside])


def test_compiled_triton_blocks_match_eager_and_reuse_their_graphs_for_a_new_plan():
    """The compiled path as `generate --compile` runs it: the attention custom op with strided q, k, v and a
    heads-last output, then the next image's plan (same layout) without a recompile."""
    import torch._dynamo
    from diffusers import FluxTransformer2DModel

    from flux_tiny import CHANNELS, JOINT_DIM, POOLED_DIM
    from ultragen.layout import make_layout

    torch.manual_seed(0)
    model = FluxTransformer2DModel(  # head dim 64: the smallest the Triton kernel takes
        patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    ).eval().to("cuda", BF16)
    layout = make_layout(512, 512, window_tokens=8, rho=2, text_tokens=64, block_tokens=64)
    inputs = {**tiny_inputs(layout), "encoder_hidden_states": torch.randn(1, 64, JOINT_DIM)}
    inputs = to(inputs)
    eager = hier_forward(HierFluxTransformer(model, backend="triton"), build_plan(layout), inputs)
    compiled = HierFluxTransformer(model, backend="triton")
    compiled.compile_blocks()
    torch._dynamo.reset()
    out = hier_forward(compiled, build_plan(layout), inputs)
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = hier_forward(compiled, build_plan(layout), inputs)
    torch.testing.assert_close(again, out, rtol=1e-3, atol=1e-3)


def test_fp8_blocks_stay_close_to_bf16_and_leave_the_process_settings_alone():
    """FP8 linears (torchao) in the blocks only; eager and compiled outputs near bf16's. torchao's default would also
    switch on inductor's coordinate-descent tuning and float32 matmul precision "high" for the whole process (it made
    the first compiled FP8 4K image warm up in 516 s instead of 57 s on an H100): they must stay as they were."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from diffusers import FluxTransformer2DModel

    from flux_tiny import CHANNELS, JOINT_DIM, POOLED_DIM
    from ultragen.flux.fp8 import fp8_unavailable, quantize_blocks_fp8
    from ultragen.layout import make_layout

    if reason := fp8_unavailable():
        pytest.skip(reason)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    ).eval().to("cuda", BF16)
    layout = make_layout(512, 512, window_tokens=8, rho=2, text_tokens=64, block_tokens=64)
    plan = build_plan(layout)
    inputs = to({**tiny_inputs(layout), "encoder_hidden_states": torch.randn(1, 64, JOINT_DIM)})
    bf16 = hier_forward(HierFluxTransformer(model, backend="triton"), plan, inputs).float()
    in_blocks = [name for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name]
    settings = (inductor_config.coordinate_descent_tuning, torch.get_float32_matmul_precision())

    assert quantize_blocks_fp8(model) == len(in_blocks) > 0
    assert (inductor_config.coordinate_descent_tuning, torch.get_float32_matmul_precision()) == settings
    assert type(model.x_embedder.weight) is torch.nn.Parameter and model.x_embedder.weight.dtype == BF16
    assert type(model.transformer_blocks[0].attn.to_q.weight.data) is not torch.Tensor  # an FP8 tensor subclass

    def rel(out):
        return float((out.float() - bf16).norm() / bf16.norm())

    eager = hier_forward(HierFluxTransformer(model, backend="triton"), plan, inputs)
    compiled = HierFluxTransformer(model, backend="triton")
    compiled.compile_blocks()
    torch._dynamo.reset()
    fast = hier_forward(compiled, plan, inputs)
    assert 0 < rel(eager) < 0.1 and 0 < rel(fast) < 0.1, (rel(eager), rel(fast))
