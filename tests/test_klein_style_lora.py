"""Style LoRAs on FLUX.2 [klein]: checked against the transformer before diffusers loads them, then loaded by
diffusers' ``Flux2KleinPipeline.load_lora_weights`` as a stock user would.

References: stock ``Flux2KleinPipeline`` with the same file loaded by diffusers, called with the very arguments the
ultragen run handed its guide stage."""

import copy

import pytest
import torch
from diffusers import Flux2KleinPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ultragen.flux2.tiny import tiny_klein_pipeline
from ultragen.pipeline import UltraGenPipeline

SIZE = 512
KWARGS = dict(num_inference_steps=2, guide_steps=2, output_type="latent", progress=False)


def klein_style_lora(folder, seed: int = 0):
    """A random rank-4 LoRA (lora_B non-zero) on every block linear of the tiny klein transformer, made with PEFT
    and written with ``Flux2KleinPipeline.save_lora_weights``."""
    transformer = copy.deepcopy(tiny_klein_pipeline().transformer)
    targets = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    Flux2KleinPipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder / "pytorch_lora_weights.safetensors"


def test_klein_style_lora_changes_the_output_and_the_guide_stage_equals_stock_diffusers(tmp_path, monkeypatch):
    path = klein_style_lora(tmp_path)
    base = UltraGenPipeline(tiny_klein_pipeline(), model="tiny-random-klein")
    plain = base("a red fox", SIZE, SIZE, **KWARGS)
    pipe = UltraGenPipeline(tiny_klein_pipeline(), model="tiny-random-klein")
    pipe.load_style_lora(path, scale=0.7)
    seen = []
    call = Flux2KleinPipeline.__call__

    def record(self, *args, **kwargs):  # the guide stage's own call of the stock pipeline: its arguments, its result
        out = call(self, *args, **kwargs)
        seen.append((copy.deepcopy({k: v for k, v in kwargs.items() if k != "callback_on_step_end"}), out.images))
        return out

    monkeypatch.setattr(Flux2KleinPipeline, "__call__", record)
    styled = pipe("a red fox", SIZE, SIZE, **KWARGS)
    assert (styled.latents - plain.latents).abs().max() > 1e-3, "the style LoRA has no effect: the test proves nothing"
    (kwargs, guide_z), = seen
    stock = tiny_klein_pipeline()
    stock.load_lora_weights(str(path), adapter_name="mine")
    stock.set_adapters(["mine"], [0.7])
    kwargs["generator"] = torch.Generator().manual_seed(styled.config.seed)
    expected = call(stock, **kwargs).images
    stock.set_adapters(["mine"], [0.0])
    unstyled = call(stock, **{**kwargs, "generator": torch.Generator().manual_seed(styled.config.seed)}).images
    assert (expected - unstyled).abs().max() > 1e-3, "the LoRA has no effect on the guide stage"
    torch.testing.assert_close(guide_z, expected, rtol=1e-5, atol=1e-6)
    assert pipe.lora_records() == [{"kind": "style", "path": str(path.resolve()), "sha256": pipe.style_loras[0].file.sha256,
                                    "scale": 0.7, "fused": False}]


def test_klein_style_lora_fused_equals_unfused(tmp_path):
    path = klein_style_lora(tmp_path)
    unfused = UltraGenPipeline(tiny_klein_pipeline(), model="tiny-random-klein")
    unfused.load_style_lora(path, scale=0.7)
    fused = UltraGenPipeline(tiny_klein_pipeline(), model="tiny-random-klein")
    fused.load_style_lora(path, scale=0.7, fuse=True)
    assert not getattr(fused.flux.transformer, "peft_config", {})
    torch.testing.assert_close(fused("a red fox", SIZE, SIZE, **KWARGS).latents,
                               unfused("a red fox", SIZE, SIZE, **KWARGS).latents, rtol=1e-5, atol=1e-5)


def test_a_flux1_style_lora_is_refused_on_klein_in_one_line(tmp_path):
    from test_style_lora import random_lora_state, write

    from ultragen.pipeline.tiny import tiny_flux_pipeline

    path = write(tmp_path / "flux1.safetensors", random_lora_state(tiny_flux_pipeline().transformer, "transformer", 1))
    pipe = UltraGenPipeline(tiny_klein_pipeline(), model="tiny-random-klein")
    with pytest.raises(ValueError) as error:
        pipe.load_style_lora(path)
    assert "FLUX.1" in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
    assert not getattr(pipe.flux.transformer, "peft_config", {}) and pipe.style_loras == ()


def test_a_klein_lora_of_other_widths_is_refused_before_anything_is_loaded(tmp_path):
    """Every layer of this architecture, one of them at another input width: refused by the shape check, naming
    the layer and both widths; no adapter is left on the model."""
    tensors = load_file(str(klein_style_lora(tmp_path)))
    key = next(k for k in tensors if k.endswith("transformer_blocks.0.attn.to_q.lora_A.weight"))
    tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 8)
    path = tmp_path / "wide.safetensors"
    save_file(tensors, str(path))
    pipe = UltraGenPipeline(tiny_klein_pipeline(), model="tiny-random-klein")
    with pytest.raises(ValueError) as error:
        pipe.load_style_lora(path)
    message = str(error.value)
    assert "does not fit this model" in message and "attn.to_q" in message and str(path) in message, message
    assert "\n" not in message
    assert not getattr(pipe.flux.transformer, "peft_config", {}) and pipe.style_loras == ()
