"""Style LoRAs: the user's FLUX LoRAs act as in stock diffusers on every stream, with the guide LoRA routed on top.

References are independent of ultragen's code: stock diffusers (``FluxPipeline`` / ``FluxTransformer2DModel`` with
the LoRA loaded by diffusers), LoRA deltas merged into the weights by hand, and a kohya key mapping written here."""

import hashlib
import json
import pickle
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from flux_tiny import tiny_flux, tiny_inputs, tiny_layout
from test_flux_lora import randomise_lora
from test_flux_transformer import hier_forward, stock_forward
from ultragen.flux import HierFluxTransformer
from ultragen.flux.lora import add_guide_lora
from ultragen.pipeline import UltraGenPipeline
from ultragen.pipeline.latents import unpack
from ultragen.pipeline.tiny import tiny_flux_pipeline
from ultragen.policy import build_plan, get_policy
from ultragen.style_lora import StyleLoraSpec, parse_style_lora

RANK = 4
SIZE, GUIDE = 256, 64  # image and stage-A size in pixels (rho 4)
PIPE_KWARGS = dict(num_inference_steps=3, warm_start_skip=1, guide_steps=2, output_type="latent", progress=False)


def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def random_lora_state(model: torch.nn.Module, prefix: str, seed: int, names: list[str] | None = None) -> dict:
    """A random LoRA (lora_B non-zero) on every linear layer of a copy of ``model``, under diffusers' keys
    (``<prefix>.<module>.lora_A.weight``), as PEFT writes them."""
    import copy

    copy_ = copy.deepcopy(model)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names or linear_names(model)), copy_,
                            adapter_name="s")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in copy_.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = get_peft_model_state_dict(copy_, adapter_name="s")
    return {f"{prefix}.{k}": v.contiguous() for k, v in state.items()}


def write(path, tensors: dict, metadata: dict | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_style(model: torch.nn.Module, state: dict, name: str = "style", scale: float = 1.0) -> None:
    """The stock diffusers way onto a bare transformer (what a diffusers user does)."""
    model.load_lora_adapter(state, prefix="transformer", adapter_name=name)
    names = list(model.peft_config)
    model.set_adapters(names, [scale if n == name else 1.0 for n in names])


def merge_by_hand(model: torch.nn.Module, state: dict, scale: float) -> None:
    """W += scale * B @ A for each LoRA pair (diffusers-format files without alphas run at lora_alpha = rank)."""
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                module = model.get_submodule(key.removeprefix("transformer.").removesuffix(".lora_A.weight"))
                module.weight += scale * state[key.replace("lora_A", "lora_B")] @ a


# --- the hierarchical forward with a style LoRA ---------------------------------------------------------------------
def test_hierarchical_with_a_style_lora_equals_stock_diffusers_with_it():
    """Allow-everything single-window plan, no guide: the hierarchical forward of a model carrying a style LoRA and a
    (random) guide LoRA equals stock diffusers with the style LoRA alone."""
    layout = tiny_layout(8, 8, window=8, rho=None)
    inputs = tiny_inputs(layout)
    state = random_lora_state(tiny_flux(layers=2, single_layers=2), "transformer", seed=5)
    stock = tiny_flux(layers=2, single_layers=2)
    plain = stock_forward(stock, layout, inputs)
    load_style(stock, state, scale=0.7)
    expected = stock_forward(stock, layout, inputs)
    assert (expected - plain).abs().max() > 1e-2, "the style LoRA has no effect, so the test proves nothing"
    model = tiny_flux(layers=2, single_layers=2)
    add_guide_lora(model, rank=4, targets="wide")
    randomise_lora(model)
    load_style(model, state, scale=0.7)
    assert set(model.transformer_blocks[0].attn.to_q.active_adapters) == {"style", "guide"}
    actual = hier_forward(HierFluxTransformer(model, backend="reference"), build_plan(layout, "dense"), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_guide", [False, True])
def test_style_lora_acts_on_every_stream_with_the_guide_lora_on_top(cache_guide):
    """With the guide read: style LoRA as an adapter == its delta merged into the weights by hand (so it acts on
    text, hires and guide tokens alike), the guide LoRA adding to the guide tokens on top."""
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout, "default"), tiny_inputs(layout)
    state = random_lora_state(tiny_flux(layers=2, single_layers=2), "transformer", seed=6)
    merged, adapted = tiny_flux(layers=2, single_layers=2), tiny_flux(layers=2, single_layers=2)
    merge_by_hand(merged, state, scale=0.5)
    for model in (merged, adapted):
        add_guide_lora(model, rank=4, targets="wide")
        randomise_lora(model)
    load_style(adapted, state, scale=0.5)
    expected = hier_forward(HierFluxTransformer(merged, backend="reference", cache_guide=False), plan, inputs)
    actual = hier_forward(HierFluxTransformer(adapted, backend="reference", cache_guide=cache_guide), plan, inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_guide_lora_still_changes_nothing_unread_while_a_style_lora_is_active():
    state = random_lora_state(tiny_flux(layers=2, single_layers=2), "transformer", seed=7)
    for layout, policy in [(tiny_layout(8, 8, rho=None), "default"),
                           (tiny_layout(8, 16), get_policy("default", hires_to_guide="none", text_to_guide="none"))]:
        plan, inputs = build_plan(layout, policy), tiny_inputs(layout)
        styled, both = tiny_flux(layers=2, single_layers=2), tiny_flux(layers=2, single_layers=2)
        add_guide_lora(both, rank=4, targets="wide")
        randomise_lora(both)
        load_style(styled, state, scale=0.8)
        load_style(both, state, scale=0.8)
        a = hier_forward(HierFluxTransformer(styled, backend="reference", cache_guide=False), plan, inputs)
        b = hier_forward(HierFluxTransformer(both, backend="reference", cache_guide=False), plan, inputs)
        assert torch.equal(a, b)


def test_guide_cache_follows_style_lora_changes():
    layout = tiny_layout(8, 16)
    plan, inputs = build_plan(layout), tiny_inputs(layout)
    model = tiny_flux()
    add_guide_lora(model, rank=4)
    randomise_lora(model)
    cached = HierFluxTransformer(model, backend="reference")
    fresh = HierFluxTransformer(model, backend="reference", cache_guide=False)
    hier_forward(cached, plan, inputs)
    for change in ("load", "scale", "load another", "delete"):
        if change == "load":
            load_style(model, random_lora_state(tiny_flux(), "transformer", seed=8), name="a", scale=1.0)
        elif change == "scale":
            model.set_adapters(["a", "guide"], [0.3, 1.0])
        elif change == "load another":
            load_style(model, random_lora_state(tiny_flux(), "transformer", seed=9), name="b", scale=1.0)
        else:
            model.delete_adapters(["a", "b"])
        torch.testing.assert_close(hier_forward(cached, plan, inputs), hier_forward(fresh, plan, inputs),
                                   rtol=1e-5, atol=1e-6, msg=change)


# --- the pipeline ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def style_file(tmp_path_factory):
    """A random style LoRA on every linear layer of the tiny pipeline's transformer and its CLIP text encoder."""
    flux = tiny_flux_pipeline()
    te_names = [n for n in linear_names(flux.text_encoder) if "self_attn" in n]
    state = {**random_lora_state(flux.transformer, "transformer", seed=11),
             **random_lora_state(flux.text_encoder, "text_encoder", seed=12, names=te_names)}
    return write(tmp_path_factory.mktemp("loras") / "style.safetensors", state)


def guide_lora(pipe, seed=3):
    """A random guide LoRA on the pipeline's transformer, as load_lora would leave it."""
    add_guide_lora(pipe.flux.transformer, rank=2, alpha=2.0, targets="wide")
    randomise_lora(pipe.flux.transformer, seed)
    pipe._activate_adapters()


def test_stage_a_equals_stock_flux_pipeline_with_the_same_lora(style_file):
    pipe = UltraGenPipeline(tiny_flux_pipeline(), model="tiny-random")
    guide_lora(pipe)
    pipe.load_style_lora(style_file, scale=0.8)
    out = pipe("a red fox", SIZE, SIZE, generator=torch.Generator().manual_seed(4), **PIPE_KWARGS)
    config = out.config
    stock = tiny_flux_pipeline()
    plain = stock("a red fox", height=GUIDE, width=GUIDE, num_inference_steps=2, guidance_scale=config.guide_guidance_scale,
                  generator=torch.Generator().manual_seed(4), output_type="latent",
                  max_sequence_length=config.text_tokens).images
    stock.load_lora_weights(str(style_file), adapter_name="mine")
    stock.set_adapters(["mine"], [0.8])
    expected = stock("a red fox", height=GUIDE, width=GUIDE, num_inference_steps=2,
                     guidance_scale=config.guide_guidance_scale, generator=torch.Generator().manual_seed(4),
                     output_type="latent", max_sequence_length=config.text_tokens).images
    assert config.guide_size_px == (GUIDE, GUIDE)
    assert (expected - plain).abs().max() > 1e-3, "the LoRA has no effect on stage A, so the test proves nothing"
    torch.testing.assert_close(out.guide_latents, unpack(expected, GUIDE, GUIDE), rtol=1e-5, atol=1e-6)


def test_unload_restores_the_base_output_bitwise(style_file):
    pipe = UltraGenPipeline(tiny_flux_pipeline(), model="tiny-random")
    guide_lora(pipe)
    base = pipe("a red fox", SIZE, SIZE, **PIPE_KWARGS).latents
    loaded = pipe.load_style_lora(style_file, scale=1.0)
    assert loaded.components == ("transformer", "text_encoder")
    styled = pipe("a red fox", SIZE, SIZE, **PIPE_KWARGS).latents
    assert (styled - base).abs().max() > 1e-3
    pipe.unload_style_loras()
    assert pipe.style_loras == () and set(pipe.flux.transformer.peft_config) == {"guide"}
    assert pipe.flux.transformer.transformer_blocks[0].attn.to_q.active_adapters == ["guide"]
    assert not getattr(pipe.flux.text_encoder, "peft_config", {})
    assert torch.equal(pipe("a red fox", SIZE, SIZE, **PIPE_KWARGS).latents, base)
    pipe.load_style_lora(style_file, scale=1.0)  # and again: a new adapter name, the same result
    assert torch.equal(pipe("a red fox", SIZE, SIZE, **PIPE_KWARGS).latents, styled)


def kohya_pair(flux, seed: int, alpha: float) -> tuple[dict, dict]:
    """(kohya sd-scripts file, diffusers file) of the same random weights, mapped here by kohya's FLUX naming:
    ``lora_unet_double_blocks_{i}_img_attn_qkv`` is to_q/to_k/to_v stacked (lora_down shared, lora_up split), etc.
    Kohya's ``alpha`` scales by alpha / rank, folded into lora_A here. (Single blocks' fused ``linear1`` is left out:
    diffusers splits it at FLUX.1's own widths, 3072/12288, which a tiny model does not have.)"""
    tr, g = flux.transformer, torch.Generator().manual_seed(seed)
    dim = tr.config.num_attention_heads * tr.config.attention_head_dim
    scale = alpha / RANK
    kohya, diffusers = {}, {}

    def add(kohya_name: str, targets: list[str], in_features: int, out_splits: list[int], prefix="transformer"):
        down = torch.randn(RANK, in_features, generator=g) * 0.3
        up = torch.randn(sum(out_splits), RANK, generator=g) * 0.3
        kohya[f"{kohya_name}.lora_down.weight"], kohya[f"{kohya_name}.lora_up.weight"] = down, up
        kohya[f"{kohya_name}.alpha"] = torch.tensor(alpha)
        for target, part in zip(targets, torch.split(up, out_splits)):
            diffusers[f"{prefix}.{target}.lora_A.weight"] = down * scale
            diffusers[f"{prefix}.{target}.lora_B.weight"] = part.contiguous()

    b = "transformer_blocks.0"
    for side, attn, ff, norm, out in [("img", ["to_q", "to_k", "to_v"], "ff", "norm1", "to_out.0"),
                                      ("txt", ["add_q_proj", "add_k_proj", "add_v_proj"], "ff_context",
                                       "norm1_context", "to_add_out")]:
        add(f"lora_unet_double_blocks_0_{side}_attn_qkv", [f"{b}.attn.{n}" for n in attn], dim, [dim] * 3)
        add(f"lora_unet_double_blocks_0_{side}_attn_proj", [f"{b}.attn.{out}"], dim, [dim])
        add(f"lora_unet_double_blocks_0_{side}_mlp_0", [f"{b}.{ff}.net.0.proj"], dim, [4 * dim])
        add(f"lora_unet_double_blocks_0_{side}_mlp_2", [f"{b}.{ff}.net.2"], 4 * dim, [dim])
        add(f"lora_unet_double_blocks_0_{side}_mod_lin", [f"{b}.{norm}.linear"], dim, [6 * dim])
    add("lora_unet_single_blocks_0_linear2", ["single_transformer_blocks.0.proj_out"], 5 * dim, [dim])
    add("lora_unet_single_blocks_0_modulation_lin", ["single_transformer_blocks.0.norm.linear"], dim, [3 * dim])
    te = flux.text_encoder.config.hidden_size
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):  # diffusers reads kohya text-encoder LoRAs with out_proj
        add(f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}", [f"text_model.encoder.layers.0.self_attn.{proj}"],
            te, [te], prefix="text_encoder")
    return kohya, diffusers


def test_kohya_and_diffusers_files_of_the_same_weights_give_the_same_output(tmp_path):
    kohya, diffusers = kohya_pair(tiny_flux_pipeline(), seed=21, alpha=RANK / 8)
    outputs = {}
    for name, state in [("kohya", kohya), ("diffusers", diffusers), ("none", None)]:
        pipe = UltraGenPipeline(tiny_flux_pipeline(), model="tiny-random")
        guide_lora(pipe)
        if state is not None:
            loaded = pipe.load_style_lora(write(tmp_path / f"{name}.safetensors", state), scale=0.9)
            assert loaded.components == ("transformer", "text_encoder")
        outputs[name] = pipe("a red fox", SIZE, SIZE, generator=torch.Generator().manual_seed(2), **PIPE_KWARGS)
    assert (outputs["kohya"].latents - outputs["none"].latents).abs().max() > 1e-3
    for field in ("guide_latents", "latents"):
        torch.testing.assert_close(getattr(outputs["kohya"], field), getattr(outputs["diffusers"], field),
                                   rtol=1e-5, atol=1e-5)


# --- parsing and bad input ------------------------------------------------------------------------------------------
def test_parse_file_and_scale():
    assert parse_style_lora("a.safetensors") == StyleLoraSpec("a.safetensors", 1.0)
    assert parse_style_lora("dir/a.safetensors:0.8") == StyleLoraSpec("dir/a.safetensors", 0.8)
    assert parse_style_lora("a.safetensors:-1e-1").scale == -0.1
    assert parse_style_lora("C:\\loras\\a.safetensors") == StyleLoraSpec("C:\\loras\\a.safetensors")
    assert parse_style_lora("odd:dir/a.safetensors").path == "odd:dir/a.safetensors"
    for bad, words in [("a.safetensors:strong", "scale 'strong' is not a number"), ("a.safetensors:", "not a number"),
                       ("a.safetensors:nan", "not a finite number"), ("", "needs a value"), (":0.5", "no file")]:
        with pytest.raises(ValueError, match=words):
            parse_style_lora(bad)


def bad_files(tmp_path) -> dict:
    """name -> (spec text, words the one-line error must hold)."""
    flux = tiny_flux_pipeline()
    d = tmp_path / "inputs"
    sdxl_kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320),
                  "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4)}
    sdxl_diffusers = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 320),
                      "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(320, 4)}
    wide = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4)}
    deep = {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.randn(4, 32),
            "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.randn(32, 4)}
    d.mkdir(parents=True)
    (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    torch.save(random_lora_state(flux.transformer, "transformer", seed=1), d / "style.pt")
    good = write(d / "good.safetensors", random_lora_state(flux.transformer, "transformer", seed=1))
    return {
        "SDXL kohya keys": (str(write(d / "sdxl.safetensors", sdxl_kohya)), "not a FLUX.1 LoRA"),
        "SDXL diffusers keys": (str(write(d / "sdxl2.safetensors", sdxl_diffusers)), "not a FLUX.1 LoRA"),
        "FLUX keys, other widths": (str(write(d / "wide.safetensors", wide)), "does not fit this model"),
        "FLUX keys, a block this model lacks": (str(write(d / "deep.safetensors", deep)), "does not fit this model"),
        "unknown format": (str(write(d / "odd.safetensors", {"foo.weight": torch.ones(2)})), "not a FLUX.1 LoRA"),
        "corrupt": (str(d / "corrupt.safetensors"), "not a readable safetensors file"),
        "pickle": (str(d / "style.pt"), "pickle"),
        "missing": (str(d / "nope.safetensors"), "does not exist"),
        "scale not a number": (f"{good}:lots", "is not a number"),
    }


def test_bad_files_are_refused_naming_the_file_and_nothing_is_unpickled(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("a LoRA file was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    pipe = UltraGenPipeline(tiny_flux_pipeline(), model="tiny-random")
    before = {k: v.clone() for k, v in pipe.flux.transformer.state_dict().items()}
    for name, (text, words) in bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=words) as error:
            spec = parse_style_lora(text)
            pipe.load_style_lora(spec.path, scale=spec.scale)
        assert text.split(":lots")[0] in str(error.value) and "\n" not in str(error.value), name
    assert pipe.style_loras == () and not getattr(pipe.flux.transformer, "peft_config", {})
    after = pipe.flux.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_refuses_each_bad_style_lora_with_one_line_and_writes_nothing(tmp_path, capsys):
    from ultragen.cli import main

    out = tmp_path / "out"
    out.mkdir()
    for name, (text, words) in bad_files(tmp_path).items():
        code = main(["generate", "--model", "tiny-random", "--prompt", "a red fox", "--width", str(SIZE), "--height", str(SIZE),
                     "--guide-steps", "2", "--steps", "3", "--warm-start-skip", "1", "--quiet", "--device", "cpu",
                     "--out", str(out / "fox.png"), "--style-lora", text])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and words in err and text.split(":lots")[0] in err, (name, err)
        assert not list(out.iterdir()), name


def test_each_image_record_names_every_lora_file_with_sha256_and_scale(tmp_path, style_file):
    from PIL import Image

    from ultragen.cli import main

    kohya, _ = kohya_pair(tiny_flux_pipeline(), seed=2, alpha=RANK)
    second = write(tmp_path / "kohya.safetensors", kohya)
    out = tmp_path / "fox.png"
    assert main(["generate", "--model", "tiny-random", "--prompt", "a red fox", "--width", str(SIZE), "--height", str(SIZE),
                 "--guide-steps", "2", "--steps", "3", "--warm-start-skip", "1", "--quiet", "--device", "cpu",
                 "--out", str(out), "--style-lora", f"{style_file}:0.75", "--style-lora", str(second)]) == 0
    expected = [{"kind": "style", "path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                 "scale": s, "fused": False} for p, s in [(style_file, 0.75), (second, 1.0)]]
    assert json.loads(out.with_suffix(".json").read_text())["lora_files"] == expected
    assert json.loads(Image.open(out).text["lora_files"]) == expected


def test_a_guide_lora_loaded_after_a_style_lora_leaves_both_active_and_both_recorded(tmp_path, style_file):
    from test_pipeline_cli import _lora_file

    guide_path = _lora_file(tmp_path, rho=4, trained=True)
    pipe = UltraGenPipeline(tiny_flux_pipeline(), model="tiny-random")
    pipe.load_style_lora(style_file, scale=0.5)
    pipe.load_lora(str(guide_path), pipe.make_config(height=SIZE, width=SIZE), allow_mismatch=True)
    to_q = pipe.flux.transformer.transformer_blocks[0].attn.to_q
    assert to_q.active_adapters == ["style1", "guide"] and to_q.scaling["style1"] == 0.5
    kinds = [(r["kind"], r["path"], r["sha256"], r["scale"]) for r in pipe.lora_records()]
    assert kinds == [("guide", str(guide_path.resolve()), hashlib.sha256(guide_path.read_bytes()).hexdigest(), 1.0),
                     ("style", str(style_file.resolve()), hashlib.sha256(style_file.read_bytes()).hexdigest(), 0.5)]


# --- fused on request -----------------------------------------------------------------------------------------------
def lora_adapter_names(module: torch.nn.Module) -> set[str]:
    """Every adapter name any LoRA layer of ``module`` still holds."""
    return {name for m in module.modules() if hasattr(m, "lora_A") for name in m.lora_A}


def test_fused_style_lora_equals_unfused_with_the_guide_lora_routed_and_leaves_only_the_guide_adapter(style_file):
    """Whole pipeline (stage A, then the hierarchical pass reading the guide, guide LoRA on the guide tokens): a
    fused style LoRA gives the unfused output; afterwards only the guide adapter is left, still active."""
    unfused = UltraGenPipeline(tiny_flux_pipeline(), model="tiny-random")
    fused = UltraGenPipeline(tiny_flux_pipeline(), model="tiny-random")
    for pipe in (unfused, fused):
        guide_lora(pipe)
    base = unfused("a red fox", SIZE, SIZE, **PIPE_KWARGS).latents
    unfused.load_style_lora(style_file, scale=0.8)
    expected = unfused("a red fox", SIZE, SIZE, **PIPE_KWARGS).latents
    fused("a red fox", SIZE, SIZE, **PIPE_KWARGS)  # a cached guide of the base weights, to be dropped by fusing
    loaded = fused.load_style_lora(style_file, scale=0.8, fuse=True)
    assert loaded.fused and fused.style_loras == (loaded,)
    assert lora_adapter_names(fused.flux.transformer) == {"guide"}
    assert lora_adapter_names(fused.flux.text_encoder) == set()
    to_q = fused.flux.transformer.transformer_blocks[0].attn.to_q
    assert to_q.active_adapters == ["guide"] and to_q.merged_adapters == [] and not to_q.merged
    actual = fused("a red fox", SIZE, SIZE, **PIPE_KWARGS).latents
    assert (expected - base).abs().max() > 1e-3, "the style LoRA has no effect, so the test proves nothing"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert fused.lora_records()[-1]["fused"] is True and unfused.lora_records()[-1]["fused"] is False


def test_fused_style_loras_refuse_to_unload_in_one_line(style_file):
    pipe = UltraGenPipeline(tiny_flux_pipeline(), model="tiny-random")
    pipe.load_style_lora(style_file, fuse=True)
    with pytest.raises(ValueError, match="fused into the base weights.*load the pipeline again") as error:
        pipe.unload_style_loras()
    assert "\n" not in str(error.value)


def test_generate_fuses_style_loras_before_fp8_quantisation(tmp_path, style_file, monkeypatch):
    """--fuse-style-loras --fp8: merge into the bf16 weights, then quantize, then add the guide LoRA (the
    quantiser is replaced by a recorder: no torchao on the CPU)."""
    import ultragen.flux.fp8 as fp8
    import ultragen.pipeline.job as job_module
    from test_pipeline_cli import _lora_file

    calls = []
    real_fuse, real_load_lora = UltraGenPipeline.fuse_style_loras, UltraGenPipeline.load_lora

    def fuse(self):
        calls.append("fuse")
        real_fuse(self)

    def load_lora(self, *args, **kwargs):
        calls.append("guide")
        return real_load_lora(self, *args, **kwargs)

    def quantize(transformer):
        # the style LoRA is already in the weights and no style adapter is left when quantizing
        calls.append(("quantize", lora_adapter_names(transformer)))

    monkeypatch.setattr(UltraGenPipeline, "fuse_style_loras", fuse)
    monkeypatch.setattr(UltraGenPipeline, "load_lora", load_lora)
    monkeypatch.setattr(fp8, "quantize_blocks_fp8", quantize)
    guide = _lora_file(tmp_path, rho=4, trained=True)
    config = job_module.GenerationConfig(height_px=SIZE, width_px=SIZE, model="tiny-random", steps=3,
                                         guide_steps=2, warm_start_skip=1, lora_path=str(guide))
    job = job_module.prepare_generation(config, "a red fox", None, str(tmp_path / "fox.png"), device="cpu",
                                        lora_allow_mismatch=True, style_loras=(StyleLoraSpec(str(style_file), 0.5),),
                                        fuse_style_loras=True, log=lambda *_: None)
    job = replace(job, config=replace(job.config, fp8=True))  # prepare_generation refuses --fp8 on the CPU
    records = job_module.generate_files(job, progress=False, log=lambda *_: None)
    assert calls == ["fuse", ("quantize", set()), "guide"]
    assert records[0]["lora_files"][-1]["fused"] is True


def test_cli_fuse_style_loras_without_a_style_lora_is_refused_in_one_line(tmp_path, capsys):
    from ultragen.cli import main

    code = main(["generate", "--model", "tiny-random", "--prompt", "a red fox", "--width", str(SIZE), "--height",
                 str(SIZE), "--quiet", "--device", "cpu", "--out", str(tmp_path / "fox.png"), "--fuse-style-loras"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--fuse-style-loras" in err and "--style-lora" in err
    assert not list(tmp_path.iterdir())


def test_bench_image_fuse_style_lora_hands_the_flag_and_needs_a_rank(tmp_path, monkeypatch):
    from ultragen.bench.image import run_image_bench
    from ultragen.cli import main

    calls = []
    monkeypatch.setattr("ultragen.bench.image.run_image_bench",
                        lambda *args, **kwargs: calls.append(kwargs) or {"total_s": 1.0})
    monkeypatch.setattr("ultragen.bench.record.environment", lambda: {"gpu": "none (test)"})
    assert main(["bench", "image", "--style-lora-rank", "64", "--fuse-style-lora", "--fp8",
                 "--out", str(tmp_path / "i.json")]) == 0
    assert (calls[0]["style_lora_rank"], calls[0]["fuse_style_lora"], calls[0]["fp8"]) == (64, True, True)
    with pytest.raises(ValueError, match="--style-lora-rank"):
        run_image_bench(fuse_style_lora=True)
