"""Training for FLUX.2 [klein] through the model-family seam: `train prepare` -> `train` -> `generate --lora` with
tiny-random-klein (the README's klein smoke run, run as written), the cache against diffusers' own klein encoders."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
# the authors' klein target set (research/authors_repo.md section 6), on tiny-random-klein's 1 double + 2 single blocks
AUTHORS_MODULES = {"x_embedder", *(f"transformer_blocks.0.{m}" for m in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out")),
    *(f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn.to_qkv_mlp_proj", "attn.to_out"))}


def _klein_smoke_run() -> list[list[str]]:
    """The README's klein training smoke run, one argv per command (continuations joined)."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
                 if "train prepare --model tiny-random-klein" in b)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _images(folder: Path, count: int = 3, size: int = 128) -> list[np.ndarray]:
    folder.mkdir()
    pixels = []
    for i in range(count):
        p = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(p).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
        pixels.append(p)
    return pixels


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """prepare -> train (3 steps) -> generate with that LoRA, exactly as the README's klein block says."""
    from ultragen.cli import main

    root = tmp_path_factory.mktemp("klein-train")
    pixels = _images(root / "data")
    commands = _klein_smoke_run()
    assert [c[:2] for c in commands] == [["ultragen", "train"], ["ultragen", "train"], ["ultragen", "generate"]]
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("HF_HUB_OFFLINE", "1")
    # the tiny VAE's BatchNorm statistics are 0 and 1, which would hide a missing normalisation: give it real ones
    from ultragen.flux2 import tiny

    plain_vae = tiny.tiny_klein_vae

    def vae_with_statistics():
        vae = plain_vae()
        g = torch.Generator().manual_seed(7)
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 3 + 0.5)
        return vae

    mp.setattr(tiny, "tiny_klein_vae", vae_with_statistics)
    try:
        codes = []
        for argv in commands:
            argv = [a.replace("/tmp/", f"{root}/") for a in argv[1:]]
            if argv[1] != "prepare":
                argv.append("--quiet")
            codes.append(main(argv))
        yield root, pixels, codes
    finally:
        mp.undo()


def test_klein_smoke_run_prepares_trains_and_generates_with_the_lora(smoke_run):
    root, _, codes = smoke_run
    assert codes == [0, 0, 0]
    manifest = json.loads((root / "ck" / "manifest.json").read_text())
    # klein's tokens: 4 x 4 latent channels after the 2x2 patchify, stacked 3 x 16 Qwen3 states, no pooled embedding
    assert (manifest["model"], manifest["channels"], manifest["joint_dim"], manifest["pooled_dim"]) == (
        "tiny-random-klein", 16, 48, 0)
    lora = root / "rk" / "guide_lora.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in f.keys()}
        meta = json.loads(f.metadata()["ultragen_lora"])
    assert modules == AUTHORS_MODULES
    assert meta["base_model"] == "tiny-random-klein" and (meta["rho"], meta["window_tokens"]) == (2, 4)
    # trained: the B matrices (zero at step 0) moved
    tensors = load_file(str(lora))
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if ".lora_B." in k)
    record = json.loads((root / "fox-klein.json").read_text())
    assert record["lora"]["base_model"] == "tiny-random-klein" and record["lora"]["extra"]["steps"] == 3
    assert (record["config"]["rho"], record["config"]["window_tokens"]) == (2, 4)
    assert Image.open(root / "fox-klein.png").size == (256, 256)


def test_klein_cache_matches_diffusers_klein_encoders(smoke_run):
    """Latents: Flux2KleinPipeline._encode_vae_image (patchify + BatchNorm normalisation) and _pack_latents; text:
    Flux2KleinPipeline.encode_prompt with the tiny encoder's stacked layers; no pooled embedding."""
    from ultragen.flux2.tiny import TINY_HIDDEN_LAYERS, TINY_TEXT_TOKENS, tiny_klein_pipeline
    from ultragen.train.cache import TrainingCache

    root, pixels, _ = smoke_run
    cache = TrainingCache(root / "ck")
    items = [json.loads(line) for line in (root / "ck" / "items.jsonl").read_text().splitlines()]
    pipe = tiny_klein_pipeline()
    for item in items:
        batch = cache.load([item["index"]])
        i = int(Path(item["file"]).stem)
        image = torch.from_numpy(pixels[i]).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            want = pipe._pack_latents(pipe._encode_vae_image(image, generator=None))
            text, _ = pipe.encode_prompt(item["caption"], max_sequence_length=TINY_TEXT_TOKENS,
                                         text_encoder_out_layers=TINY_HIDDEN_LAYERS)
        torch.testing.assert_close(batch.hires, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch.text, text, rtol=1e-5, atol=1e-5)
        assert batch.guide.shape == (1, (128 // 16 // 2) ** 2, 16) and batch.pooled.shape == (1, 0)


def test_klein_prepare_generate_draws_with_the_stock_klein_pipeline(tmp_path, monkeypatch):
    """`train prepare --generate` on klein: the images are the stock Flux2KleinPipeline's for the prompt and seed
    (the distilled 4 steps by default), then cached like any image."""
    from ultragen.cli import main
    from ultragen.flux2.tiny import TINY_HIDDEN_LAYERS, TINY_TEXT_TOKENS, tiny_klein_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "p.txt").write_text("a lighthouse\n")
    assert main(["train", "prepare", "--model", "tiny-random-klein", "--generate", "1", "--prompts",
                 str(tmp_path / "p.txt"), "--out", str(tmp_path / "c"), "--size", "128", "--rho", "2", "--window",
                 "4", "--block-tokens", "16", "--seed", "5"]) == 0
    want = tiny_klein_pipeline()(prompt="a lighthouse", height=128, width=128, num_inference_steps=4,
                                 generator=torch.Generator("cpu").manual_seed(5), max_sequence_length=TINY_TEXT_TOKENS,
                                 text_encoder_out_layers=TINY_HIDDEN_LAYERS).images[0]
    got = Image.open(tmp_path / "c" / "images" / "000000.png")
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["count"] == 1
