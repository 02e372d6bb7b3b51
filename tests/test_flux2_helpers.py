"""The FLUX.2 [klein] helpers against the stock diffusers Flux2KleinPipeline (tiny-random-klein, CPU)."""

import pytest
import torch

from ultragen.flux2.latents import encode_to_tokens, noise_tokens, pack, tokens_to_vae_latents, unpack
from ultragen.flux2.schedule import KleinVariant, klein_variant, schedule_defaults, set_timesteps
from ultragen.flux2.text import encode_prompts
from ultragen.flux2.tiny import TINY_HIDDEN_LAYERS, TINY_TEXT_TOKENS, tiny_klein_pipeline, tiny_klein_scheduler


@pytest.fixture(scope="module")
def pipe():
    return tiny_klein_pipeline()


def test_tiny_klein_runs_the_stock_pipeline_and_is_the_same_every_time(pipe):
    again = tiny_klein_pipeline()
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.state_dict().values(),
                                                  again.transformer.state_dict().values()))
    out = pipe(prompt="a red cube", height=128, width=192, num_inference_steps=2, output_type="pt",
               max_sequence_length=TINY_TEXT_TOKENS, text_encoder_out_layers=TINY_HIDDEN_LAYERS,
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 128, 192) and torch.isfinite(out.images).all()
    assert pipe.config.is_distilled and not pipe.transformer.config.guidance_embeds


def test_prompt_embeddings_are_the_stacked_qwen3_hidden_states(pipe):
    embeds = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a red cube", ""], text_tokens=TINY_TEXT_TOKENS,
                            hidden_layers=TINY_HIDDEN_LAYERS)
    assert embeds.shape == (2, TINY_TEXT_TOKENS, pipe.transformer.config.joint_attention_dim)
    # by hand: the chat-templated prompt, padded, through the encoder; hidden states of the layers side by side
    text = "<|im_start|>user\na red cube<|im_end|>\n<|im_start|>assistant\n"
    ids = pipe.tokenizer(text, padding="max_length", max_length=TINY_TEXT_TOKENS, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(**ids, output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[i] for i in TINY_HIDDEN_LAYERS], dim=-1)
    torch.testing.assert_close(embeds[:1], expected)
    assert not torch.allclose(embeds[0], embeds[1])
    with pytest.raises(ValueError, match=r"hidden_layers=\(9, 18, 27\) must be hidden-state indices in \[0, 3\]"):
        encode_prompts(pipe.text_encoder, pipe.tokenizer, ["x"], text_tokens=TINY_TEXT_TOKENS)


def test_packing_is_raster_order_and_round_trips():
    latents = torch.randn(2, 16, 3, 5)
    tokens = pack(latents)
    assert tokens.shape == (2, 15, 16)
    assert torch.equal(tokens[:, 2 * 5 + 3], latents[:, :, 2, 3])  # token r * cols + c is latent pixel (r, c)
    assert torch.equal(unpack(tokens, 3, 5), latents)
    with pytest.raises(ValueError, match="do not fill a 4x4"):
        unpack(tokens, 4, 4)


def test_vae_tokens_round_trip_to_the_vae_latent(pipe):
    vae = pipe.vae
    with torch.no_grad():
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        tokens = encode_to_tokens(vae, image)
        direct = vae.encode(image).latent_dist.mode()
    assert tokens.shape == (1, 4 * 6, 4 * pipe.vae.config.latent_channels)
    torch.testing.assert_close(tokens_to_vae_latents(vae, tokens, 4, 6), direct, rtol=1e-5, atol=1e-5)


def test_noise_tokens_are_the_stock_pipelines_starting_noise(pipe):
    channels = pipe.transformer.config.in_channels
    ours = noise_tokens(1, 8, 12, channels, generator=torch.Generator().manual_seed(7))
    stock, ids = pipe.prepare_latents(1, channels // 4, 128, 192, torch.float32, torch.device("cpu"),
                                      torch.Generator().manual_seed(7))
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("steps", [4, 50])
def test_timesteps_are_the_stock_pipelines(pipe, steps):
    pipe(prompt="x", height=128, width=192, num_inference_steps=steps, output_type="latent",
         max_sequence_length=TINY_TEXT_TOKENS, text_encoder_out_layers=TINY_HIDDEN_LAYERS)
    ours = set_timesteps(tiny_klein_scheduler(), steps, image_tokens=8 * 12)
    torch.testing.assert_close(ours, pipe.scheduler.timesteps)


def test_schedule_defaults_of_the_variants():
    assert klein_variant(True) is KleinVariant.DISTILLED
    distilled, base = schedule_defaults(True), schedule_defaults(False)
    assert (distilled.guide_steps, distilled.hires_steps, distilled.cfg_scale) == (4, 4, None)
    assert base.cfg_scale == 4.0 and base.guide_steps == 50
    assert not distilled.warm_start and not base.warm_start  # the authors switch it off for klein
