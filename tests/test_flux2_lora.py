"""The FLUX.2 guide-only LoRA: it changes the guide path and nothing else; ultragen's files round-trip with their
metadata; a file saved the authors' way loads, runs under the settings it implies and says so."""

import copy
import logging

import pytest
import torch
from diffusers import Flux2KleinPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from flux2_tiny import tiny_flux2, tiny_inputs, tiny_layout
from test_flux2_transformer import EXTRACT_LIKE, hand_raster_ids, hand_text_ids, hier_forward, \
    stock_with_reference_guide, use_kv_processors
from ultragen.flux2 import HierFlux2Transformer
from ultragen.flux2.lora import (
    LoraMetadata, LoraTargets, add_guide_lora, guide_lora_state, load_guide_lora, read_lora_metadata, save_guide_lora,
)
from ultragen.policy import PRESETS, build_plan, get_policy

# the authors' klein target_modules, as written in their train_flux2.yaml (a PEFT regex)
AUTHORS_TARGETS = (
    r"(.*x_embedder|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_k|.*(?<!single_)transformer_blocks\.[0-9]+"
    r"\.attn\.to_q|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_v|.*(?<!single_)transformer_blocks\.[0-9]+"
    r"\.attn\.to_out\.0|.*(?<!single_)transformer_blocks\.[0-9]+\.ff\.linear_in|.*(?<!single_)transformer_blocks"
    r"\.[0-9]+\.ff\.linear_out|.*single_transformer_blocks\.[0-9]+\.attn\.to_qkv_mlp_proj|.*single_transformer_blocks"
    r"\.[0-9]+\.attn\.to_out)"
)


def randomise_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def metadata(**overrides):
    base = dict(base_model="tiny", policy=PRESETS["default"].to_dict(), rho=2, guide_offset_tokens=0.5,
                ntk_factor=1.0, window_tokens=4, targets="wide")
    return LoraMetadata(**{**base, **overrides})


def fused_copy(plain, adapted_state, scale):
    """The plain model with W + scale * B @ A written into every adapted weight, by hand."""
    fused = copy.deepcopy(plain)
    params = dict(fused.named_parameters())
    for key, a in adapted_state.items():
        if ".lora_A." in key:
            module = key.removeprefix("transformer.").split(".lora_A.")[0]
            b = adapted_state[key.replace(".lora_A.", ".lora_B.")]
            with torch.no_grad():
                params[f"{module}.weight"] += scale * b @ a
    return fused


def stock_guide_reference(plain, guide_model, layout, inputs):
    """diffusers' reference-token KV cache: guide keys/values from ``guide_model`` ("extract"), then the plain model
    reads them ("cached"), text and hires through plain weights only. Hires in and out in raster order."""
    _, kv = stock_with_reference_guide(guide_model, layout, inputs)
    use_kv_processors(plain)
    with torch.no_grad():
        return plain(hidden_states=inputs["hires"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     timestep=inputs["timestep"], img_ids=hand_raster_ids(*layout.padded_grid),
                     txt_ids=hand_text_ids(layout.text_tokens), kv_cache=kv, kv_cache_mode="cached").sample


def test_wide_targets_are_the_authors_set():
    model = tiny_flux2(layers=2, single_layers=1)
    add_guide_lora(model, rank=4, targets="wide")
    names = {k.split(".lora_")[0].removeprefix("transformer.") for k in guide_lora_state(model)}
    double = [f"transformer_blocks.{i}.{m}" for i in range(2)
              for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out")]
    single = ["single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"]
    assert names == {"x_embedder", *double, *single}
    qkv = tiny_flux2(layers=2, single_layers=1)
    add_guide_lora(qkv, rank=4, targets="qkv")
    names = {k.split(".lora_")[0].removeprefix("transformer.") for k in guide_lora_state(qkv)}
    assert names == {f"transformer_blocks.{i}.attn.to_{x}" for i in range(2) for x in "qkv"} | {single[0]}


@pytest.mark.parametrize("targets", list(LoraTargets))
def test_lora_touches_only_the_guide_path(targets):
    plain, adapted = tiny_flux2(), tiny_flux2()
    add_guide_lora(adapted, rank=4, alpha=4, targets=targets)
    randomise_lora(adapted)
    # without a guide the LoRA'd model is bitwise the plain one
    layout = tiny_layout(8, 8, rho=None)
    inputs = tiny_inputs(layout)
    plan = build_plan(layout)
    assert torch.equal(hier_forward(HierFlux2Transformer(plain, backend="reference"), plan, inputs),
                       hier_forward(HierFlux2Transformer(adapted, backend="reference"), plan, inputs))
    # with a guide that nothing reads, still bitwise
    layout = tiny_layout(8, 16)
    inputs = tiny_inputs(layout)
    unread = build_plan(layout, get_policy("default", hires_to_guide="none", text_to_guide="none"))
    assert torch.equal(hier_forward(HierFlux2Transformer(plain, backend="reference", cache_guide=False), unread, inputs),
                       hier_forward(HierFlux2Transformer(adapted, backend="reference", cache_guide=False), unread,
                                    inputs))
    # read, it changes the hires output
    plan = build_plan(layout)
    without = hier_forward(HierFlux2Transformer(plain, backend="reference"), plan, inputs)
    with_lora = hier_forward(HierFlux2Transformer(adapted, backend="reference"), plan, inputs)
    assert (without - with_lora).abs().max() > 1e-4


@pytest.mark.parametrize("cache_guide", [False, True])
def test_lora_acts_on_the_guide_exactly_as_fused_weights_would(cache_guide):
    """Guide keys/values from a model with the LoRA fused in by hand, hires and text through the plain model
    (diffusers' reference-token KV cache) equal our forward with the adapter routed to the guide."""
    plain, adapted = tiny_flux2(), tiny_flux2()
    add_guide_lora(adapted, rank=4, alpha=8, targets="wide")
    randomise_lora(adapted)
    layout = tiny_layout(8, 16)
    inputs = tiny_inputs(layout, batch=2)
    expected = stock_guide_reference(plain, fused_copy(plain, guide_lora_state(adapted), scale=2.0), layout, inputs)
    hier = HierFlux2Transformer(adapted, backend="reference", cache_guide=cache_guide)
    torch.testing.assert_close(hier_forward(hier, build_plan(layout, EXTRACT_LIKE), inputs), expected,
                               rtol=1e-5, atol=1e-5)


def save_the_authors_way(model, directory):
    """Exactly what the authors' klein code does (model2.init_lora and its checkpoint callback)."""
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=AUTHORS_TARGETS))
    randomise_lora(model)  # stands in for training (gaussian init leaves B = 0)
    Flux2KleinPipeline.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(model))
    return directory / "pytorch_lora_weights.safetensors"


def test_authors_file_loads_states_its_settings_and_changes_only_the_guide(tmp_path, caplog):
    trained = tiny_flux2()
    path = save_the_authors_way(trained, tmp_path)
    meta = read_lora_metadata(path)
    assert (meta.rho, meta.guide_offset_tokens, meta.window_tokens, meta.ntk_factor) == (4, 0.0, 16, 1.0)
    assert meta.policy == PRESETS["authors-code"].to_dict() and (meta.rank, meta.alpha) == (16, 16.0)
    loaded = tiny_flux2()
    with caplog.at_level(logging.INFO, logger="ultragen.flux2.lora"):
        assert load_guide_lora(loaded, path) == meta
    lines = [r.getMessage() for r in caplog.records if r.name == "ultragen.flux2.lora"]
    assert len(lines) == 1
    for fact in ("authors", "'authors-code'", "rho 4", "(0, 4m, 4n, 0)", "guide_offset_tokens 0", "top-left",
                 "centres", "(rho-1)/2"):
        assert fact in lines[0], fact
    # the loaded adapter holds the trained values
    source = get_peft_model_state_dict(trained)
    state = {k.removeprefix("transformer."): v for k, v in guide_lora_state(loaded).items()}
    assert state.keys() == source.keys() and all(torch.equal(state[k], source[k]) for k in source)
    # guide-only: no guide, bitwise the plain model
    plain = tiny_flux2()
    layout = tiny_layout(8, 8, rho=None)
    inputs = tiny_inputs(layout)
    assert torch.equal(hier_forward(HierFlux2Transformer(plain, backend="reference"), build_plan(layout), inputs),
                       hier_forward(HierFlux2Transformer(loaded, backend="reference"), build_plan(layout), inputs))
    # with the guide (their ids: rho 4, offset 0): equals the guide run through the authors' own adapted model
    layout = tiny_layout(8, 16, rho=4, guide_offset_tokens=0)
    inputs = tiny_inputs(layout)
    expected = stock_guide_reference(plain, trained, layout, inputs)
    actual = hier_forward(HierFlux2Transformer(loaded, backend="reference"), build_plan(layout, EXTRACT_LIKE), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    base = hier_forward(HierFlux2Transformer(plain, backend="reference"), build_plan(layout, EXTRACT_LIKE), inputs)
    assert (base - actual).abs().max() > 1e-4


def test_authors_file_is_checked_against_the_run_like_any_other(tmp_path):
    path = save_the_authors_way(tiny_flux2(), tmp_path)
    with pytest.raises(ValueError, match="guide_offset_tokens: LoRA 0.0, run 1.5"):
        load_guide_lora(tiny_flux2(), path, expected=read_lora_metadata(path).__class__(
            **{**read_lora_metadata(path).__dict__, "guide_offset_tokens": 1.5}))


def test_save_and_load_round_trip_with_metadata(tmp_path):
    source = tiny_flux2()
    add_guide_lora(source, rank=4, alpha=8)
    randomise_lora(source)
    path = save_guide_lora(source, tmp_path / "guide.safetensors", metadata(rank=4, alpha=8.0))
    target = tiny_flux2()
    meta = load_guide_lora(target, path, expected=metadata())
    assert (meta.rank, meta.alpha, meta.targets.value) == (4, 8.0, "wide")
    a, b = guide_lora_state(source), guide_lora_state(target)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout), tiny_inputs(layout)
    assert torch.equal(hier_forward(HierFlux2Transformer(source, backend="reference"), plan, inputs),
                       hier_forward(HierFlux2Transformer(target, backend="reference"), plan, inputs))
    with pytest.raises(ValueError, match="rho: LoRA 2, run 4"):
        load_guide_lora(tiny_flux2(), path, expected=metadata(rho=4))


def test_foreign_missing_and_broken_files_are_refused(tmp_path):
    style = tiny_flux2()
    style.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["add_q_proj", "add_k_proj"]))
    Flux2KleinPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(style))
    with pytest.raises(ValueError, match="not the authors' klein guide LoRA"):
        load_guide_lora(tiny_flux2(), tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_guide_lora(tiny_flux2(), tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_guide_lora(tiny_flux2(), junk)


def test_guide_cache_follows_lora_weight_and_scale_changes():
    model = tiny_flux2()
    add_guide_lora(model, rank=4)
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout), tiny_inputs(layout)
    cached = HierFlux2Transformer(model, backend="reference")
    fresh = HierFlux2Transformer(model, backend="reference", cache_guide=False)
    hier_forward(cached, plan, inputs)
    randomise_lora(model)
    torch.testing.assert_close(hier_forward(cached, plan, inputs), hier_forward(fresh, plan, inputs),
                               rtol=1e-5, atol=1e-6)
    model.set_adapters(["guide"], weights=[0.0])
    torch.testing.assert_close(hier_forward(cached, plan, inputs), hier_forward(fresh, plan, inputs),
                               rtol=1e-5, atol=1e-6)


def test_a_style_adapter_acts_as_in_stock_diffusers_and_the_guide_lora_stays_on_guide_tokens():
    """Another PEFT adapter (a user's style LoRA) acts on every stream: with a dense single-window plan and no guide,
    the hierarchical forward of a model carrying it and a random guide LoRA equals the stock model carrying only it;
    the guide LoRA still changes nothing bitwise when nothing reads the guide."""
    from test_flux2_transformer import stock_forward

    def styled(with_guide: bool):
        model = tiny_flux2()
        if with_guide:
            add_guide_lora(model, rank=4, targets="wide")
            randomise_lora(model)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "linear_in", "to_out.0"]),
                          adapter_name="style")
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name and ".style." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.set_adapters([n for n in ("style", "guide") if n in model.peft_config])
        return model

    layout = tiny_layout(8, 8, window=8, rho=None)
    inputs = tiny_inputs(layout)
    stock = styled(with_guide=False)
    expected = stock_forward(stock, layout, inputs)
    stock.disable_adapters()
    assert (expected - stock_forward(stock, layout, inputs)).abs().max() > 1e-3, "the style adapter does nothing"
    actual = hier_forward(HierFlux2Transformer(styled(with_guide=True), backend="reference"),
                          build_plan(layout, "dense"), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    layout = tiny_layout(8, 16)
    plan = build_plan(layout, get_policy("default", hires_to_guide="none", text_to_guide="none"))
    inputs = tiny_inputs(layout)
    a, b = (hier_forward(HierFlux2Transformer(styled(with_guide=w), backend="reference", cache_guide=False), plan,
                         inputs) for w in (False, True))
    assert torch.equal(a, b)
