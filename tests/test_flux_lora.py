"""The guide-only LoRA: it must change the guide path and nothing else; files round-trip with their metadata."""

import pytest
import torch

from flux_tiny import tiny_flux, tiny_inputs, tiny_layout
from test_flux_transformer import hier_forward
from ultragen.flux import HierFluxTransformer
from ultragen.flux.lora import (
    LoraMetadata, LoraTargets, add_guide_lora, guide_lora_state, load_guide_lora, save_guide_lora,
)
from ultragen.policy import PRESETS, build_plan


def randomise_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def metadata(**overrides):
    base = dict(base_model="tiny", policy=PRESETS["default"].to_dict(), rho=2, guide_offset_tokens=0.5,
                ntk_factor=1.0, window_tokens=4)
    return LoraMetadata(**{**base, **overrides})


@pytest.mark.parametrize("targets", list(LoraTargets))
def test_c_lora_touches_only_the_guide_path(targets):
    plain = tiny_flux(layers=2, single_layers=2)
    adapted = tiny_flux(layers=2, single_layers=2)
    add_guide_lora(adapted, rank=4, alpha=4, targets=targets)
    randomise_lora(adapted)
    assert any("lora_" in n for n, _ in adapted.named_parameters())
    # without a guide the LoRA'd model is exactly the plain one
    layout = tiny_layout(8, 8, rho=None)
    plan = build_plan(layout, "default")
    inputs = tiny_inputs(layout)
    without = hier_forward(HierFluxTransformer(plain, backend="reference"), plan, inputs)
    with_lora = hier_forward(HierFluxTransformer(adapted, backend="reference"), plan, inputs)
    assert torch.equal(without, with_lora)
    # with a guide it changes the hires output (through the guide's keys and values only)
    layout = tiny_layout(8, 16)
    plan = build_plan(layout, "default")
    inputs = tiny_inputs(layout)
    without = hier_forward(HierFluxTransformer(plain, backend="reference"), plan, inputs)
    with_lora = hier_forward(HierFluxTransformer(adapted, backend="reference"), plan, inputs)
    assert (without - with_lora).abs().max() > 1e-4


def test_lora_modules_are_the_requested_ones():
    model = tiny_flux()
    add_guide_lora(model, targets="qkv")
    names = {k.split(".lora_")[0].removeprefix("transformer.") for k in guide_lora_state(model)}
    assert names == {f"{b}.attn.to_{x}" for b in ("transformer_blocks.0", "single_transformer_blocks.0") for x in "qkv"}
    wide = tiny_flux()
    add_guide_lora(wide, targets="wide")
    names = {k.split(".lora_")[0].removeprefix("transformer.") for k in guide_lora_state(wide)}
    assert "x_embedder" in names and "proj_out" not in names and "single_transformer_blocks.0.proj_out" in names


def test_save_and_load_round_trip_with_metadata(tmp_path):
    source = tiny_flux()
    add_guide_lora(source, rank=4, alpha=8)
    randomise_lora(source)
    path = save_guide_lora(source, tmp_path / "guide.safetensors", metadata(rank=4, alpha=8.0))
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"
    target = tiny_flux()
    meta = load_guide_lora(target, path, expected=metadata())
    assert meta.rank == 4 and meta.alpha == 8.0
    a, b = guide_lora_state(source), guide_lora_state(target)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("transformer.") for k in a)
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout), tiny_inputs(layout)
    torch.testing.assert_close(hier_forward(HierFluxTransformer(source, backend="reference"), plan, inputs),
                               hier_forward(HierFluxTransformer(target, backend="reference"), plan, inputs))


def test_mismatched_lora_is_refused_unless_overridden(tmp_path):
    source = tiny_flux()
    add_guide_lora(source)
    path = save_guide_lora(source, tmp_path / "guide.safetensors", metadata())
    with pytest.raises(ValueError, match="rho: LoRA 2, run 4"):
        load_guide_lora(tiny_flux(), path, expected=metadata(rho=4))
    with pytest.raises(ValueError, match="policy"):
        load_guide_lora(tiny_flux(), path, expected=metadata(policy=PRESETS["authors-code"].to_dict()))
    assert load_guide_lora(tiny_flux(), path, expected=metadata(rho=4), allow_mismatch=True).rho == 2


def test_missing_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_guide_lora(tiny_flux(), tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_guide_lora(tiny_flux(), junk)


def test_guide_cache_follows_lora_weight_changes():
    model = tiny_flux()
    add_guide_lora(model, rank=4)
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout), tiny_inputs(layout)
    cached = HierFluxTransformer(model, backend="reference")
    hier_forward(cached, plan, inputs)
    randomise_lora(model)
    fresh = HierFluxTransformer(model, backend="reference", cache_guide=False)
    torch.testing.assert_close(hier_forward(cached, plan, inputs), hier_forward(fresh, plan, inputs),
                               rtol=1e-5, atol=1e-6)


def test_lora_leaks_nothing_into_text_or_hires_even_with_a_guide_present():
    """With a guide present but a policy in which nothing reads it, a random LoRA changes the output by exactly 0."""
    from ultragen.policy import get_policy

    for targets in LoraTargets:
        plain, adapted = tiny_flux(layers=2, single_layers=2), tiny_flux(layers=2, single_layers=2)
        add_guide_lora(adapted, rank=4, alpha=4, targets=targets)
        randomise_lora(adapted)
        layout = tiny_layout(8, 16)
        plan = build_plan(layout, get_policy("default", hires_to_guide="none", text_to_guide="none"))
        inputs = tiny_inputs(layout)
        a = hier_forward(HierFluxTransformer(plain, backend="reference", cache_guide=False), plan, inputs)
        b = hier_forward(HierFluxTransformer(adapted, backend="reference", cache_guide=False), plan, inputs)
        assert torch.equal(a, b), targets


def test_guide_cache_follows_adapter_scale_and_ntk_changes():
    model = tiny_flux()
    add_guide_lora(model, rank=4)
    randomise_lora(model)
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout), tiny_inputs(layout)
    cached = HierFluxTransformer(model, backend="reference")
    hier_forward(cached, plan, inputs)
    model.set_adapters(["guide"], weights=[0.0])
    fresh = HierFluxTransformer(model, backend="reference", cache_guide=False)
    torch.testing.assert_close(hier_forward(cached, plan, inputs), hier_forward(fresh, plan, inputs),
                               rtol=1e-5, atol=1e-6)
    cached.ntk_factor = fresh.ntk_factor = 10.0
    torch.testing.assert_close(hier_forward(cached, plan, inputs), hier_forward(fresh, plan, inputs),
                               rtol=1e-5, atol=1e-6)


def test_guide_lora_beside_a_style_adapter_warns_nothing():
    """A style LoRA before the guide LoRA is the intended set-up: PEFT's "Already found a peft_config" notice
    must not reach the user (every other warning would still be an error here)."""
    import warnings

    from peft import LoraConfig

    model = tiny_flux(layers=1, single_layers=1)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="style1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_guide_lora(model, rank=2, alpha=2)
    assert {"style1", "guide"} <= set(model.peft_config)
