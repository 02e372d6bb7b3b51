"""``ultragen serve`` without a browser: page settings -> job, the CLI's messages, the runner's events, cancel, the
one-job lock, the progress bars and the serve options. The browser test is tests/test_web_browser.py."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ultragen.cli import main
from ultragen.pipeline.config import GenerationConfig
from ultragen.web import runner as runner_module
from ultragen.web.commands import exposure_warning, parse_auth
from ultragen.web.progress import StageProgress
from ultragen.web.runner import Failed, Finished, GuideReady, JobRunner, Progress, Ticket
from ultragen.web.settings import SIZE_PRESETS, PageSettings, make_job


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pipe():
    from ultragen.pipeline.two_stage import UltraGenPipeline

    return UltraGenPipeline.from_pretrained("tiny-random")


def settings(**changes) -> PageSettings:
    base = dict(prompt="a red fox", width_px=256, height_px=256, seed=3, steps=4, guide_steps=3, warm_start_skip=1)
    return PageSettings(**(base | changes))


# --- settings -> GenerationConfig, with the CLI's checks and words ----------------------------------------------------
def test_page_settings_become_the_generation_config_the_cli_would_build(tmp_path, capsys):
    page = PageSettings(prompt="  a red fox ", width_px=512.0, height_px=768, seed=7, steps=20, guide_steps=12,
                        warm_start_skip=5, policy="paper-v1", rho=2, backend="reference", cache_guide=False)
    job = make_job(page, "tiny-random", tmp_path, None, device="cpu")
    assert main(["generate", "--model", "tiny-random", "--prompt", "a red fox", "--width", "512", "--height", "768",
                 "--seed", "7", "--steps", "20", "--guide-steps", "12", "--warm-start-skip", "5", "--policy",
                 "paper-v1", "--rho", "2", "--backend", "reference", "--no-guide-cache", "--out", str(tmp_path),
                 "--dry-run"]) == 0
    assert job.config.to_record() == json.loads(capsys.readouterr().out)["config"]
    assert (job.config.width_px, job.config.height_px, job.config.cache_guide) == (512, 768, False)
    assert job.prompts == ("a red fox",)
    image = job.outputs[0].image
    assert image.parent == tmp_path and image.suffix == ".png" and "a-red-fox-s7" in image.name and not image.exists()


def test_every_size_preset_is_a_valid_size_with_its_aspect():
    ratios = {"square": 1.0, "16:9": 16 / 9, "9:16": 9 / 16, "3:2": 1.5}
    assert len(SIZE_PRESETS) == 12
    for name, (width, height) in SIZE_PRESETS.items():
        tier, aspect = name.split()
        assert max(width, height) == {"2K": 2048, "4K": 4096, "8K": 8192}[tier]
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width / height - ratios[aspect]) < 0.01
        GenerationConfig(height_px=height, width_px=width)


BAD = {  # page field changes -> the same values on the command line
    "width not a multiple of 16": ({"width_px": 1000}, ["--width", "1000"]),
    "width not whole": ({"width_px": 12.5}, ["--width", "12.5"]),
    "skip not below steps": ({"steps": 4, "warm_start_skip": 4}, ["--steps", "4", "--warm-start-skip", "4"]),
    "empty prompt": ({"prompt": "   "}, ["--prompt", "   "]),
    "unknown policy": ({"policy": "nope"}, ["--policy", "nope"]),
    "unknown backend": ({"backend": "nope"}, ["--backend", "nope"]),
    "rho below 2": ({"rho": 1}, ["--rho", "1"]),
    "seed negative": ({"seed": -1}, ["--seed", "-1"]),
    "missing LoRA": ({"guide_lora": "gone.safetensors"}, ["--lora", "{loras}/gone.safetensors"]),
    "missing style LoRA": ({"style_loras": "gone.safetensors"}, ["--style-lora", "{loras}/gone.safetensors"]),
    "style LoRA scale not a number": ({"style_loras": "{loras}/x.safetensors:lots"},
                                      ["--style-lora", "{loras}/x.safetensors:lots"]),
    "unknown step cache": ({"step_cache": "fbcash"}, ["--cache", "fbcash"]),
    "step cache threshold not a number": ({"step_cache": "fbcache:high"}, ["--cache", "fbcache:high"]),
    "CFG on a model without it": ({"cfg": 5}, ["--cfg", "5"]),
    "negative prompt on a model without CFG": ({"negative_prompt": "blurry"}, ["--negative-prompt", "blurry"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_settings_get_the_cli_message_word_for_word(case, tmp_path, capsys):
    page_changes, cli_args = BAD[case]
    loras = tmp_path / "loras"
    loras.mkdir()
    page_changes = {k: v.format(loras=loras) if isinstance(v, str) else v for k, v in page_changes.items()}
    with pytest.raises(ValueError) as raised:
        make_job(settings(**page_changes), "tiny-random", tmp_path, loras, device="cpu")
    base = {"--prompt": "a red fox", "--width": "256", "--height": "256", "--seed": "3", "--steps": "4",
            "--guide-steps": "3", "--warm-start-skip": "1"}
    for flag, value in zip(cli_args[::2], cli_args[1::2]):
        base[flag] = value.format(loras=loras)
    argv = ["generate", "--model", "tiny-random", "--dry-run", "--out", str(tmp_path / "cli")]
    for flag, value in base.items():
        argv.append(f"{flag}={value}")  # "--seed=-1": a value, not an option
    assert main(argv) == 2
    cli_error = capsys.readouterr().err.strip()
    assert len(cli_error.splitlines()) == 1
    assert str(raised.value) in cli_error, (str(raised.value), cli_error)


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory):
    """A LoRA folder with a random FLUX.1 style LoRA for the tiny pipeline's transformer, as PEFT writes it."""
    from test_style_lora import random_lora_state, write
    from ultragen.pipeline.tiny import tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("loras")
    write(folder / "style.safetensors", random_lora_state(tiny_flux_pipeline().transformer, "transformer", seed=5))
    return folder


def dry_run(capsys, *args: str) -> dict:
    assert main(["generate", "--prompt", "a red fox", "--width", "256", "--height", "256", "--seed", "3", "--steps",
                 "4", "--guide-steps", "3", "--warm-start-skip", "1", "--device", "cpu", "--dry-run", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_style_loras_and_step_cache_become_what_generate_gets(style_dir, tmp_path, capsys):
    page = settings(style_loras=f"style.safetensors:0.75\n\n  {style_dir}/style.safetensors  \n",
                    step_cache="fbcache:0.1")
    job = make_job(page, "tiny-random", tmp_path, style_dir, device="cpu")
    plan = dry_run(capsys, "--model", "tiny-random", "--out", str(tmp_path), "--cache", "fbcache:0.1",
                   "--style-lora", f"{style_dir}/style.safetensors:0.75", "--style-lora", f"{style_dir}/style.safetensors")
    assert job.config.to_record() == plan["config"] and plan["config"]["step_cache"] == "fbcache:0.1"
    assert [{"path": s.path, "scale": s.scale} for s in job.style_loras] == plan["style_loras"] == [
        {"path": f"{style_dir}/style.safetensors", "scale": 0.75}, {"path": f"{style_dir}/style.safetensors",
                                                                      "scale": 1.0}]
    assert make_job(settings(), "tiny-random", tmp_path, style_dir, device="cpu").config.step_cache == "off"


def test_negative_prompt_and_cfg_become_what_generate_gets_on_klein_base(tmp_path, capsys):
    page = settings(negative_prompt="blurry, dark", cfg=5)
    job = make_job(page, "tiny-random-klein-base", tmp_path, None, device="cpu")
    plan = dry_run(capsys, "--model", "tiny-random-klein-base", "--out", str(tmp_path), "--negative-prompt",
                   "blurry, dark", "--cfg", "5")
    assert job.config.to_record() == plan["config"]
    assert (plan["config"]["negative_prompt"], plan["config"]["true_cfg_scale"]) == ("blurry, dark", 5.0)


@pytest.mark.parametrize("model, shown", [("tiny-random", False), ("tiny-random-klein-base", True)])
def test_negative_prompt_and_cfg_are_shown_only_for_a_model_with_cfg(model, shown, pipe, tmp_path):
    pytest.importorskip("gradio")
    from ultragen.pipeline.two_stage import UltraGenPipeline
    from ultragen.web.page import PageContext, build_page

    loaded = pipe if model == "tiny-random" else UltraGenPipeline.from_pretrained(model)
    page = build_page(PageContext(JobRunner(loaded), model, tmp_path))
    by_id = {getattr(c, "elem_id", None): c for c in page.blocks.values()}
    assert by_id["ug-negative-prompt"].visible is shown and by_id["ug-cfg"].visible is shown
    assert by_id["ug-style-loras"].visible is not False and by_id["ug-step-cache"].value == "off"


def test_the_style_lora_picker_adds_name_and_scale_lines():
    from ultragen.web.page import add_style_loras

    text, picker = add_style_loras(["a.safetensors", "b.safetensors"], "b.safetensors:0.5\n", 0.8)
    assert text.splitlines() == ["b.safetensors:0.5", "a.safetensors:0.8"] and picker == []


def test_runner_loads_the_jobs_style_loras_and_unloads_them_for_the_next(pipe, style_dir, tmp_path):
    runner = JobRunner(pipe)
    job = make_job(settings(style_loras="style.safetensors:0.75"), "tiny-random", tmp_path, style_dir, device="cpu")
    done = run_collect(runner, Ticket(job))[-1]
    assert isinstance(done, Finished), done
    styles = [f for f in done.record["lora_files"] if f["kind"] == "style"]
    assert [(s["path"], s["scale"]) for s in styles] == [(f"{style_dir}/style.safetensors", 0.75)]
    done = run_collect(runner, Ticket(make_job(settings(), "tiny-random", tmp_path, style_dir, device="cpu")))[-1]
    assert isinstance(done, Finished) and done.record["lora_files"] == [] and pipe.style_loras == ()


def test_generate_button_shows_the_message_and_issues_no_ticket(pipe, tmp_path):
    pytest.importorskip("gradio")
    from ultragen.web.page import PageContext, check

    ctx = PageContext(JobRunner(pipe), "tiny-random", tmp_path)
    fields = list(vars(settings(width_px=1000)).values())
    status, ticket, generate, cancel = check(ctx, *fields)
    assert ticket is None and "use 992 or 1008" in status and "ug-error" in status
    assert generate["interactive"] is True
    status, ticket, generate, cancel = check(ctx, *list(vars(settings()).values()))
    assert isinstance(ticket, Ticket) and "ug-error" not in status
    assert generate["interactive"] is False and cancel["interactive"] is True


# --- the runner: files, events, cancel, one job at a time --------------------------------------------------------------
def run_collect(runner: JobRunner, ticket: Ticket, on_event=None) -> list:
    events = []

    def emit(event):
        events.append(event)
        if on_event is not None:
            on_event(event, ticket)

    runner.run(ticket, emit)
    return events


def test_runner_writes_the_cli_files_and_reports_each_stage_in_order(pipe, tmp_path):
    job = make_job(settings(width_px=256, height_px=384), "tiny-random", tmp_path, None, device="cpu")
    events = run_collect(JobRunner(pipe), Ticket(job))
    assert isinstance(events[-1], Finished), events[-1]
    kinds = [(e.stage, e.done, e.total) if isinstance(e, Progress) else type(e).__name__ for e in events]
    guide_at = kinds.index("GuideReady")
    assert ("guide", 3, 3) in kinds[:guide_at] and not any(k[0] == "hires" for k in kinds[:guide_at] if type(k) is tuple)
    assert [k for k in kinds if type(k) is tuple and k[0] == "hires"] == [("hires", i, 3) for i in (1, 2, 3)]
    assert kinds[-2] == ("decode", kinds[-2][2], kinds[-2][2])
    guide = next(e for e in events if isinstance(e, GuideReady)).image
    guide_height, guide_width = job.config.guide_size_px  # stage A's canvas, a quarter per side (rho 4), padded
    assert guide.size == (guide_width, guide_height) and guide_width == 64
    done = events[-1]
    with Image.open(done.image_path) as png:
        assert png.size == (256, 384) == done.size_px
        text = png.text
    sidecar = json.loads(done.sidecar_path.read_text())
    assert text["prompt"] == sidecar["prompt"] == "a red fox" and text["seed"] == "3"
    assert json.loads(text["ultragen_config"])["steps"] == sidecar["config"]["steps"] == 4
    assert sidecar["config"]["warm_start_skip"] == 1 and sidecar["image_size_px"] == [256, 384]
    assert job.outputs[0].latent.is_file()


def test_cancel_stops_between_steps_frees_memory_and_the_next_job_runs(pipe, tmp_path, monkeypatch):
    freed = []
    monkeypatch.setattr(runner_module, "free_memory", lambda device: freed.append(device))
    runner = JobRunner(pipe)
    job = make_job(settings(guide_steps=6), "tiny-random", tmp_path, None, device="cpu")

    def cancel_at_guide_step_2(event, ticket):
        if isinstance(event, Progress) and event.stage == "guide" and event.done == 2:
            ticket.cancel.set()

    events = run_collect(runner, Ticket(job), cancel_at_guide_step_2)
    assert isinstance(events[-1], Failed) and events[-1].cancelled
    steps = [(e.stage, e.done) for e in events if isinstance(e, Progress)]
    assert steps[-1] == ("guide", 2)  # not one step more
    assert not any(isinstance(e, GuideReady) for e in events)
    assert not any(p.exists() for p in job.outputs[0].all())
    assert freed == [pipe.device]
    # a ticket cancelled while it waited never starts
    waiting = Ticket(make_job(settings(), "tiny-random", tmp_path, None, device="cpu"))
    waiting.cancel.set()
    assert [type(e) for e in run_collect(runner, waiting)] == [Failed]
    # the pipeline is left whole: the next job finishes with the image a fresh run makes
    again = make_job(settings(guide_steps=6), "tiny-random", tmp_path / "again", None, device="cpu")
    assert isinstance(run_collect(runner, Ticket(again))[-1], Finished)
    from ultragen.pipeline.two_stage import UltraGenPipeline

    fresh = UltraGenPipeline.from_pretrained("tiny-random")
    reference = fresh(prompt="a red fox", height=256, width=256, steps=4, guide_steps=6, warm_start_skip=1, seed=3,
                      progress=False).images[0]
    with Image.open(again.outputs[0].image) as png:
        assert np.array_equal(np.asarray(png), np.asarray(reference))


def test_cancel_while_decoding_keeps_the_latent_and_says_how_to_decode_it(pipe, tmp_path):
    job = make_job(settings(), "tiny-random", tmp_path, None, device="cpu")

    def cancel_at_decode(event, ticket):
        if isinstance(event, Progress) and event.stage == "decode":
            ticket.cancel.set()

    events = run_collect(JobRunner(pipe), Ticket(job), cancel_at_decode)
    assert events[-1].cancelled and f"ultragen decode {job.outputs[0].latent}" in events[-1].message
    assert job.outputs[0].latent.is_file() and not job.outputs[0].image.exists()


def test_two_jobs_never_run_at_the_same_time(pipe, tmp_path):
    runner = JobRunner(pipe)
    log: list[tuple[str, object]] = []
    tickets = {name: Ticket(make_job(settings(prompt=name), "tiny-random", tmp_path, None, device="cpu"))
               for name in ("first", "second")}
    threads = [threading.Thread(target=runner.run, args=(t, lambda e, n=name: log.append((n, e))))
               for name, t in tickets.items()]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=120)
    owners = [name for name, _ in log]
    first = owners[0]
    assert owners == [first] * owners.count(first) + [o for o in owners if o != first]  # no interleaving
    assert sum(isinstance(e, Finished) for _, e in log) == 2


def test_free_memory_empties_the_cuda_cache_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    runner_module.free_memory(torch.device("cpu"))
    assert calls == []
    runner_module.free_memory(torch.device("cuda", 0))
    assert calls == [1]


def test_step_callback_sees_every_step_and_its_exception_stops_the_pipeline(pipe):
    config = pipe.make_config(height=256, width=256, steps=5, guide_steps=4, warm_start_skip=2)
    seen = []
    latents, guide, _ = pipe.generate_latents("a fox", config, progress=False, callback=seen.append)
    assert [(e.stage, e.done, e.total) for e in seen] == (
        [("encode", 1, 1)] + [("guide", i, 4) for i in range(1, 5)] + [("hires", i, 3) for i in range(1, 4)])
    assert [e.guide is not None for e in seen] == [False] * 4 + [True] + [False] * 3
    assert torch.equal(seen[4].guide, guide)

    class Stop(Exception):
        pass

    def stop_at_hires_1(event):
        if event.stage == "hires" and event.done == 1:
            raise Stop

    with pytest.raises(Stop):
        pipe.generate_latents("a fox", config, progress=False, callback=stop_at_hires_1)
    again, _, _ = pipe.generate_latents("a fox", config, progress=False)
    assert torch.equal(again, latents)


# --- progress bars ----------------------------------------------------------------------------------------------------
def test_time_left_is_elapsed_per_step_times_steps_to_go():
    now = [100.0]
    bars = StageProgress(clock=lambda: now[0])
    now[0] = 101.0
    bars.update("encode", 1, 1)  # the guide starts here
    assert bars.seconds_left("guide") is None
    now[0] = 108.0
    bars.update("guide", 7, 28)  # 1 s a step, 21 to go
    assert bars.seconds_left("guide") == pytest.approx(21.0)
    assert bars.fraction("guide") == pytest.approx(0.25)
    bars.update("guide", 28, 28)
    assert bars.seconds_left("guide") == 0.0
    now[0] = 110.0
    bars.update("hires1", 1, 4)  # a cascade level feeds the hires bar
    assert bars.seconds_left("hires") == pytest.approx(6.0)
    page = bars.html()
    assert 'data-stage="hires" data-done="1" data-total="4"' in page and "6 s left" in page


# --- serve options ----------------------------------------------------------------------------------------------------
def test_auth_and_exposure_warning():
    assert parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(ValueError, match="USER:PASS"):
            parse_auth(bad)
    for host in ("127.0.0.1", "localhost", "::1"):
        assert exposure_warning(host, 7860, None) is None
    assert "NO authentication" in exposure_warning("0.0.0.0", 7860, None)
    assert "NO authentication" not in exposure_warning("0.0.0.0", 7860, ("a", "b"))


def test_serve_refuses_bad_options_in_one_line_before_loading(capsys, tmp_path):
    assert main(["serve", "--model", "tiny-random", "--auth", "nopassword"]) == 2
    assert main(["serve", "--model", "tiny-random", "--lora", str(tmp_path / "gone.safetensors")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "USER:PASS" in errors[0] and "does not exist" in errors[1]


def test_launch_binds_where_asked_with_auth_no_share_no_analytics(pipe, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from ultragen.web.page import PageContext, build_page, launch

    ctx = PageContext(JobRunner(pipe), "tiny-random", tmp_path)
    page = build_page(ctx)
    seen = {}
    monkeypatch.setattr(type(page), "launch", lambda self, **kw: seen.update(kw))
    monkeypatch.setattr(type(page), "server_port", 7999, raising=False)
    launch(page, ctx, "127.0.0.1", 7999, ("alice", "pw"), block=False)
    assert page.analytics_enabled is False
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7999 and seen["share"] is False
    assert seen["auth"] == ("alice", "pw") and seen["allowed_paths"] == [str(tmp_path)]
    assert page.config["dependencies"]  # built, with its events
