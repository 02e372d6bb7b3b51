"""Guide-LoRA training on the tiny model (CPU): the loss falls, only the LoRA changes, resume is exact, the LoRA
loads and touches only the guide path. Geometry: 128 px images, window 4, rho 2, 16-token blocks."""

import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from ultragen.flux import HierFluxTransformer
from ultragen.flux.lora import LoraMetadata, guide_lora_state, load_guide_lora
from ultragen.layout import make_layout
from ultragen.policy import build_plan, get_policy
from ultragen.train import PrepareConfig, TrainConfig
from ultragen.train.loop import train
from ultragen.train.model import load_transformer
from ultragen.train.prepare import prepare_cache
from ultragen.train.rundir import read_loss_log

SIZE, RHO, WINDOW, BLOCK = 128, 2, 4, 16
quiet = dict(progress=False, log_line=lambda line: None)


def make_images(folder: Path, count: int, size=(160, 144), seed: int = 0, captions: bool = True) -> Path:
    """Coloured ellipses on a coloured background, each with a NAME.txt caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.randrange(size[0] - 40), rng.randrange(size[1] - 40)
            draw.ellipse((x, y, x + 40, y + 40), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / f"img{i:02d}.png")
        if captions:
            (folder / f"img{i:02d}.txt").write_text(f"{rng.choice(['red', 'blue', 'green'])} shapes number {i}")
    return folder


def prepare_config(images, out, **overrides) -> PrepareConfig:
    base = dict(model="tiny-random", out_dir=str(out), images_dir=str(images), size_px=SIZE, rho=RHO,
                window_tokens=WINDOW, block_tokens=BLOCK, shard_items=5)
    return PrepareConfig(**{**base, **overrides})


def train_config(cache, out, **overrides) -> TrainConfig:
    base = dict(model="tiny-random", cache_dir=str(cache), out_dir=str(out), steps=30, lr=1e-2, rank=4, alpha=4.0,
                save_every=15, validate_every=30, val_items=2, seed=7)
    return TrainConfig(**{**base, **overrides})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads only add overhead (and thrash on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    prepare_cache(prepare_config(make_images(root / "images", 12), root / "cache"), **quiet)
    return root / "cache"


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
    return train(train_config(cache, tmp_path_factory.mktemp("run") / "full"), **quiet)


# --- training -------------------------------------------------------------------------------------------------------
def test_validation_loss_falls(full_run):
    before, after = full_run.val_losses[0], full_run.val_losses[30]
    assert after < 0.97 * before, f"held-out loss {before:.4f} -> {after:.4f} after 30 steps"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in full_run.history)


def test_only_lora_parameters_change(full_run):
    base = load_transformer("tiny-random", torch.float32).state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in full_run.transformer.state_dict().items()}
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    assert set(trained) - set(lora) == set(base)
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert not changed, f"base weights changed: {changed[:3]}"
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k), "the LoRA did not train"
    trainable = [n for n, p in full_run.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_stopped_and_resumed_run_reproduces_the_curve_exactly(cache, full_run, tmp_path):
    run = tmp_path / "stopped"

    def stop_after_15(step, record):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(train_config(cache, run), on_step=stop_after_15, **quiet)
    assert not (run / "guide_lora.safetensors").exists()
    resumed = train(train_config(cache, run, resume=True), **quiet)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full_run.history]
    assert read_loss_log(run) == read_loss_log(full_run.run_dir)
    a, b = guide_lora_state(resumed.transformer), guide_lora_state(full_run.transformer)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_under_a_warm_up_and_cosine_schedule(cache, tmp_path):
    """Stopped inside the cosine decay after a warm-up and resumed: the LR of every step and the losses equal the
    uninterrupted run's (a resume that does not restore the LR scheduler restarts the warm-up)."""
    schedule = dict(steps=12, save_every=6, validate_every=12, warmup_steps=4, lr_schedule="cosine")
    full = train(train_config(cache, tmp_path / "full", **schedule), **quiet)
    lrs = [r["lr"] for r in full.history]
    assert lrs[0] < lrs[3] and lrs[3] > lrs[6] > lrs[-1] and len(set(lrs)) == len(lrs)  # warm-up, then decay

    def stop_after_6(step, record):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(train_config(cache, tmp_path / "stopped", **schedule), on_step=stop_after_6, **quiet)
    resumed = train(train_config(cache, tmp_path / "stopped", resume=True, **schedule), **quiet)
    assert [r["lr"] for r in resumed.history] == lrs
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    a, b = guide_lora_state(resumed.transformer), guide_lora_state(full.transformer)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_lora_loads_and_changes_only_the_guide_path(full_run):
    layout = make_layout(SIZE, SIZE, window_tokens=WINDOW, rho=RHO, text_tokens=128, block_tokens=BLOCK, pad=False)
    expected = LoraMetadata(base_model="tiny-random", policy=get_policy("default").to_dict(), rho=RHO,
                            guide_offset_tokens=layout.guide_offset_tokens, ntk_factor=1.0, window_tokens=WINDOW)
    plain, adapted = load_transformer("tiny-random", torch.float32), load_transformer("tiny-random", torch.float32)
    meta = load_guide_lora(adapted, full_run.lora_path, expected=expected)
    assert meta.rank == 4 and meta.extra["steps"] == 30
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(1, 128, 32, generator=g), torch.randn(1, 32, generator=g)
    common = dict(encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([0.6]),
                  guidance=torch.tensor([1.0]))
    no_guide = make_layout(SIZE, SIZE, window_tokens=WINDOW, rho=None, text_tokens=128, block_tokens=BLOCK)
    x = torch.randn(1, layout.hires_tokens, 16, generator=g)
    guide = torch.randn(1, layout.guide_tokens, 16, generator=g)
    with torch.no_grad():
        outs = [HierFluxTransformer(m, backend="reference")(x, plan=build_plan(no_guide), **common)
                for m in (plain, adapted)]
        assert torch.equal(outs[0], outs[1]), "without a guide the LoRA must change nothing"
        outs = [HierFluxTransformer(m, backend="reference")(x, plan=build_plan(layout), guide=guide, **common)
                for m in (plain, adapted)]
        assert (outs[0] - outs[1]).abs().max() > 1e-5, "with a guide the trained LoRA must change the output"


def test_cli_prepare_and_train(tmp_path, capsys):
    from ultragen.cli import main

    images = make_images(tmp_path / "images", 3, seed=1)
    cache = tmp_path / "cache"
    assert main(["train", "prepare", "--model", "tiny-random", "--images", str(images), "--out", str(cache),
                 "--size", "128", "--rho", "2", "--window", "4", "--block-tokens", "16", "--quiet"]) == 0
    args = ["train", "--model", "tiny-random", "--cache", str(cache), "--out", str(tmp_path / "run"), "--steps", "2",
            "--rank", "2", "--val-items", "1", "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "run" / "guide_lora.safetensors").is_file()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


# --- bad input: a clear error naming the file; nothing already written lost ----------------------------------------
def test_prepare_refuses_missing_and_empty_image_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_cache(prepare_config(tmp_path / "nowhere", tmp_path / "out"), **quiet)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        prepare_cache(prepare_config(tmp_path / "empty", tmp_path / "out"), **quiet)
    assert not (tmp_path / "out").exists()


def test_prepare_names_unreadable_small_and_uncaptioned_images(tmp_path):
    images = make_images(tmp_path / "images", 2)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (images / "broken.txt").write_text("broken")
    with pytest.raises(ValueError, match=r"unreadable images: .*broken\.png"):
        prepare_cache(prepare_config(images, tmp_path / "out"), **quiet)
    (images / "broken.png").unlink()
    Image.new("RGB", (200, 100)).save(images / "small.png")
    (images / "small.txt").write_text("small")
    with pytest.raises(ValueError, match=r"smaller than the training size 128 px.*small\.png is 200x100"):
        prepare_cache(prepare_config(images, tmp_path / "out"), **quiet)
    (images / "small.png").unlink()
    (images / "img01.txt").unlink()
    with pytest.raises(ValueError, match=r"without a caption: .*img01\.txt is missing"):
        prepare_cache(prepare_config(images, tmp_path / "out"), **quiet)
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"file": "img00.png", "caption": "a"}\n')
    with pytest.raises(ValueError, match=r"no entry for 'img01.png' in .*captions\.jsonl"):
        prepare_cache(prepare_config(images, tmp_path / "out", captions_file=str(captions)), **quiet)
    captions.write_text('{"file": "img00.png", "caption": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl:2 is not valid JSON"):
        prepare_cache(prepare_config(images, tmp_path / "out", captions_file=str(captions)), **quiet)
    assert not (tmp_path / "out").exists()


def test_prepare_never_writes_into_a_non_empty_folder(cache, tmp_path):
    images = make_images(tmp_path / "images", 2)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="is not empty"):
        prepare_cache(prepare_config(images, cache), **quiet)
    assert snapshot(cache) == before


def test_train_refuses_a_cache_for_another_model_or_layout(cache, tmp_path):
    with pytest.raises(ValueError, match=r"manifest\.json was built for model 'tiny-random'"):
        train(train_config(cache, tmp_path / "run", model="someone/other-flux"), **quiet)
    with pytest.raises(ValueError, match=r"built with rho=2 but the run asks rho=4"):
        train(train_config(cache, tmp_path / "run", rho=4), **quiet)
    with pytest.raises(ValueError, match=r"does not fit this layout"):
        train(train_config(cache, tmp_path / "run", window_tokens=16), **quiet)
    edited = tmp_path / "edited"
    shutil.copytree(cache, edited)
    manifest = (edited / "manifest.json").read_text()
    (edited / "manifest.json").write_text(manifest.replace('"rho": 2', '"rho": 4'))
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors' holds guide of shape"):
        train(train_config(edited, tmp_path / "run"), **quiet)
    (edited / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"manifest\.json' is missing"):
        train(train_config(edited, tmp_path / "run"), **quiet)
    assert not (tmp_path / "run").exists()


def test_train_refuses_to_overwrite_a_run_and_a_changed_resume(cache, full_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(full_run.run_dir, run)
    before = snapshot(run)
    with pytest.raises(ValueError, match="already holds a run .*pass --resume"):
        train(train_config(cache, run), **quiet)
    with pytest.raises(ValueError, match=r"--resume with other settings .*rank: checkpoint 4, now 8"):
        train(train_config(cache, run, rank=8, steps=40, resume=True), **quiet)
    with pytest.raises(ValueError, match=r"step-000030' is at step 30 and --steps is 30"):
        train(train_config(cache, run, resume=True), **quiet)
    assert snapshot(run) == before


def test_corrupt_checkpoint_is_named_and_kept(cache, full_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(full_run.run_dir, run)
    optimizer = run / "checkpoints" / "step-000030" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"step-000030/optimizer\.pt' is corrupt .*resume from .*step-000015"):
        train(train_config(cache, run, steps=40, resume=True), **quiet)
    assert snapshot(run) == before


def test_generated_training_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red circle\na blue square\n")
    config = prepare_config(None, tmp_path / "cache", images_dir=None, generate_count=3, prompts_file=str(prompts),
                            generate_steps=2)
    manifest = prepare_cache(config, **quiet)
    assert manifest.count == 3
    assert (tmp_path / "cache" / "images" / "000002.txt").read_text().strip() == "a red circle"


def test_validation_samples_through_the_generation_pipeline(tmp_path, caplog):
    images = make_images(tmp_path / "images", 2, size=(520, 512))
    prepare_cache(prepare_config(images, tmp_path / "cache", size_px=512, window_tokens=16, block_tokens=128), **quiet)
    prompts = tmp_path / "val.txt"
    prompts.write_text("a red circle\n")
    with caplog.at_level("WARNING", logger="ultragen.pipeline.two_stage"):
        result = train(train_config(tmp_path / "cache", tmp_path / "run", steps=1, validate_every=1, val_items=1,
                                    validate_prompts=str(prompts)), **quiet)
    assert "no guide LoRA loaded" not in caplog.text  # the samples run with the LoRA being trained
    assert sorted(p.name for p in (result.run_dir / "samples").iterdir()) == ["step-000000-00.png",
                                                                              "step-000001-00.png"]


def test_train_config_records_a_policy_file_by_its_fields(tmp_path):
    path = tmp_path / "halo0.json"
    path.write_text('{"base": "default", "hires_halo_tokens": 0}')
    config = train_config(tmp_path, tmp_path / "run", policy=str(path))
    assert config.policy == get_policy(str(path)).to_dict() and config.policy["hires_halo_tokens"] == 0
    path.unlink()  # the record needs no file: a run resumes anywhere
    assert TrainConfig.from_record(config.to_record()) == config
    path.write_text('{"base": "default", "hires_halo_tokens": 2}')  # an edited file is another policy
    assert train_config(tmp_path, tmp_path / "run", policy=str(path)).differences(config) == [
        f"policy: checkpoint {config.policy!r}, now {get_policy(str(path)).to_dict()!r}"]
    with pytest.raises(ValueError, match="policy file .*nope.json' does not exist"):
        train_config(tmp_path, tmp_path / "run", policy=str(tmp_path / "nope.json"))


def test_resume_keeps_the_runs_own_lora_targets(tmp_path):
    from ultragen.cli import build_parser
    from ultragen.flux.lora import LoraTargets
    from ultragen.train.commands import train_config_from_args
    from ultragen.train.rundir import write_run_config

    def parsed(*extra):
        return train_config_from_args(build_parser().parse_args(
            ["train", "--model", "tiny-random", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r"), *extra]))

    assert parsed().targets is LoraTargets.WIDE  # the default for a new run
    write_run_config(tmp_path / "r", train_config(tmp_path / "c", tmp_path / "r", targets="qkv"))
    assert parsed("--resume").targets is LoraTargets.QKV  # a run started with q/k/v (the old default) resumes as one
    assert parsed("--resume", "--targets", "wide").targets is LoraTargets.WIDE  # (and check_run_dir refuses it)


def test_bad_guide_offset_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"guide_offset_tokens=-1.0 must be a number in \[0.0, 1000.0\]"):
        train_config(tmp_path / "c", tmp_path / "r", guide_offset_tokens=-1.0)
