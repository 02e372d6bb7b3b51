"""The hierarchical FLUX.2 [klein] transformer on CUDA in bf16: the CPU tests' properties with bf16 tolerances
(mirrors tests/test_flux_gpu.py), and the real klein-4B architecture (random weights) through the same checks.

Tolerance rule: the hierarchical model in bf16 may differ from the float32 stock model by at most twice what the
stock model itself loses in bf16 (plus a small floor)."""

import pytest
import torch

from flux2_tiny import tiny_flux2, tiny_inputs, tiny_layout
from test_flux2_lora import randomise_lora
from test_flux2_transformer import hand_raster_ids, hand_text_ids, hier_forward
from ultragen.flux2 import HierFlux2Transformer
from ultragen.flux2.lora import add_guide_lora
from ultragen.layout import make_layout
from ultragen.policy import build_plan, get_policy

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


def to(inputs, dtype=BF16):
    return {k: (v.to("cuda", dtype) if v is not None else None) for k, v in inputs.items()}


def stock(model, layout, inputs, mask=None):
    """The unmodified diffusers model in raster order on CUDA (ids written out by hand)."""
    kwargs = {"attention_mask": mask.cuda()} if mask is not None else None
    with torch.no_grad():
        return model(hidden_states=inputs["hires"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     timestep=inputs["timestep"], img_ids=hand_raster_ids(*layout.padded_grid).cuda(),
                     txt_ids=hand_text_ids(layout.text_tokens).cuda(), joint_attention_kwargs=kwargs).sample


def bf16_budget(model, layout, inputs, mask=None):
    exact = stock(model.float().cuda(), layout, to(inputs, torch.float32), mask)
    lowp = stock(model.to(BF16), layout, to(inputs), mask)
    return exact, (lowp.float() - exact).abs().max().item()


def test_full_window_dense_equals_stock_in_bf16():
    model = tiny_flux2(layers=2, single_layers=2)
    layout = tiny_layout(8, 8, window=8, rho=None)
    inputs = tiny_inputs(layout, batch=2)
    exact, noise = bf16_budget(model, layout, inputs)
    out = hier_forward(HierFlux2Transformer(model.to(BF16), backend="reference"), build_plan(layout, "dense"),
                       to(inputs))
    assert (out.float() - exact).abs().max().item() <= 2 * noise + 1e-3


def test_window_first_is_invisible_in_bf16():
    model = tiny_flux2(layers=2, single_layers=1)
    layout = tiny_layout(12, 8, window=4, rho=None)
    plan = build_plan(layout, get_policy("default", hires_halo_tokens=1))
    inputs = tiny_inputs(layout)
    seq_pos = torch.cat([torch.arange(layout.text_tokens), layout.text_tokens + layout.hires_inverse])
    mask = plan.block_table().repeat_interleave(8, 0).repeat_interleave(8, 1)[seq_pos][:, seq_pos]
    exact, noise = bf16_budget(model, layout, inputs, mask)
    out = hier_forward(HierFlux2Transformer(model.to(BF16), backend="reference"), plan, to(inputs))
    assert (out.float() - exact).abs().max().item() <= 2 * noise + 1e-3


def test_lora_only_on_guide_and_cache_matches_in_bf16():
    plain, adapted = tiny_flux2(layers=2, single_layers=2), tiny_flux2(layers=2, single_layers=2)
    add_guide_lora(adapted, rank=4, alpha=4)
    randomise_lora(adapted)
    plain, adapted = plain.to("cuda", BF16), adapted.to("cuda", BF16)
    layout = tiny_layout(8, 8, rho=None)  # no guide: the LoRA must not touch the hires path, bit for bit
    plan, inputs = build_plan(layout), to(tiny_inputs(layout))
    assert torch.equal(hier_forward(HierFlux2Transformer(plain, backend="reference"), plan, inputs),
                       hier_forward(HierFlux2Transformer(adapted, backend="reference"), plan, inputs))
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout), to(tiny_inputs(layout, batch=2))
    cached = hier_forward(HierFlux2Transformer(adapted, backend="reference"), plan, inputs)
    uncached = hier_forward(HierFlux2Transformer(adapted, backend="reference", cache_guide=False), plan, inputs)
    without = hier_forward(HierFlux2Transformer(plain, backend="reference"), plan, inputs)
    torch.testing.assert_close(cached, uncached, rtol=2e-2, atol=2e-2)
    assert (cached.float() - without.float()).abs().max() > 1e-2
    for i in range(2):  # a batch of two prompts equals single runs
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        torch.testing.assert_close(cached[i : i + 1], hier_forward(HierFlux2Transformer(adapted, backend="reference"),
                                                                   plan, single), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_klein_4b_architecture_hierarchical_matches_stock_at_1k_in_bf16(backend):
    """The real klein-4B architecture (random weights): one 1024 px window over the whole grid, no guide, dense
    policy, equals the stock Flux2Transformer2DModel within the bf16 rule, with each GPU backend."""
    from ultragen.bench.models import KLEIN_4B
    from ultragen.family import family_named

    family = family_named("flux2")
    model = family.random_transformer(KLEIN_4B, device="cuda", dtype=torch.float32)
    layout = make_layout(1024, 1024, window_tokens=64, rho=None, text_tokens=512)
    inputs = {k: v for k, v in family.random_step_inputs(model, layout).items() if k != "guide"}
    with torch.no_grad():
        exact = family.dense_step(model, inputs, layout).float()
        model.to(BF16)
        low = {k: v.to(BF16) for k, v in inputs.items()}
        noise = (family.dense_step(model, low, layout).float() - exact).abs().max().item()
        hier = family.hierarchical(model, backend=backend)
        seq = dict(low, hires=layout.hires_to_sequence(low["hires"]))
        out = layout.hires_to_raster(hier(plan=build_plan(layout, "dense"), guide=None, **{
            k: v for k, v in seq.items() if k != "guide"}))
    assert (out.float() - exact).abs().max().item() <= 2 * noise + 1e-2
