"""The Gradio page: settings on the left; per-stage bars, the guide, the image, its files and the session's gallery
on the right.

Generate is a chain of three events. ``check`` (not queued, instant) validates the settings with the CLI's checks and
shows the message, or issues a :class:`~ultragen.web.runner.Ticket`; ``gate`` (not queued) stops the chain when there
is no ticket; ``run`` (Gradio's queue, one job at a time) runs the ticket on the :class:`~ultragen.web.runner.JobRunner`
in a thread and streams its events to the page. Cancel (not queued) only sets the ticket's cancel switch: the job stops
after its current step and ``run`` reports it. Another user's Generate waits in the queue; it never touches a running
job, which finishes or is cancelled by its own page.
"""

from __future__ import annotations

import html
import queue
import sys
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ultragen.attention import Backend
from ultragen.pipeline.loading import TINY_RANDOM
from ultragen.policy import PRESETS
from ultragen.web.progress import EMPTY_HTML, StageProgress
from ultragen.web.runner import Failed, Finished, GuideReady, JobRunner, Progress, Ticket
from ultragen.web.settings import NO_LORA, SIZE_PRESETS, PageSettings, make_job, style_lora_line

CUSTOM_SIZE = "custom"
MAX_SEED = 2**32 - 1  # the dice's range; any seed up to 2**63-1 can be typed
REFRESH_S = 0.25  # at most this often a progress update is sent to the browser (the guide and the end: at once)
CSS = """
.ug-stage { display: flex; align-items: center; gap: 0.6em; margin: 0.2em 0; }
.ug-stage .ug-label { width: 7em; }
.ug-stage progress { flex: 1; height: 0.9em; }
.ug-stage .ug-note { width: 11em; font-variant-numeric: tabular-nums; }
.ug-error { color: #b91c1c; white-space: pre-wrap; }
"""


@dataclass(frozen=True)
class PageContext:
    """What every handler needs: the runner, the model name, where files go, where LoRAs are listed from."""

    runner: JobRunner
    model: str
    out_dir: Path
    lora_dir: Path | None = None
    default_lora: str = NO_LORA  # a file name in lora_dir
    device: str = "auto"
    dtype: str = "auto"


def lora_choices(lora_dir: Path | None) -> list[str]:
    """NO_LORA, then the .safetensors files of ``lora_dir`` by name."""
    names = sorted(p.name for p in lora_dir.glob("*.safetensors")) if lora_dir and lora_dir.is_dir() else []
    return [NO_LORA, *names]


def takes_cfg(pipe) -> bool:
    """Whether the loaded model runs classifier-free guidance (klein-base): its defaults carry a CFG scale."""
    return pipe.defaults.true_cfg_scale is not None


def add_style_loras(picked: list[str] | None, text: str, scale: float | None) -> tuple[str, list]:
    """The picker's files added to the style-LoRA lines as ``NAME:SCALE`` (a file already listed is left as it is);
    returns (the new lines, the emptied picker)."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    listed = {line.strip().rpartition(":")[0] or line.strip() for line in lines}
    lines += [style_lora_line(name, 1.0 if scale is None else scale) for name in picked or [] if name not in listed]
    return "\n".join(lines), []


def status_html(message: str, error: bool = False) -> str:
    return f'<div class="{"ug-error" if error else "ug-info"}">{html.escape(message)}</div>'


def check(ctx: PageContext, *fields):
    """Generate pressed: (status, ticket or None, Generate button, Cancel button)."""
    try:
        job = make_job(PageSettings(*fields), ctx.model, ctx.out_dir, ctx.lora_dir, ctx.device, ctx.dtype,
                       pipe=ctx.runner.pipe, lora_allow_mismatch=ctx.runner.lora_allow_mismatch)
    except ValueError as error:
        return status_html(f"Error: {error}", error=True), None, gr.update(interactive=True), gr.update()
    waiting = "Waiting for the GPU: another image is being made." if ctx.runner.busy else "Starting."
    return status_html(waiting), Ticket(job), gr.update(interactive=False), gr.update(interactive=True)


def gate(ticket: Ticket | None) -> None:
    if ticket is None:  # check has shown the message; stop the chain without a second one
        raise gr.Error("invalid settings", visible=False, print_exception=False)


def cancel(ticket: Ticket | None):
    if ticket is None:
        return gr.update()
    ticket.cancel.set()
    return status_html("Cancelling: the job stops after its current step.")


def run(ctx: PageContext, ticket: Ticket | None, history: list):
    """Stream one job: yields (bars, guide, image, files, gallery, history, status, Generate, Cancel)."""
    skip = gr.skip()
    if ticket is None:
        return
    events: queue.Queue = queue.Queue()
    threading.Thread(target=ctx.runner.run, args=(ticket, events.put), daemon=True, name="ultragen-job").start()
    bars, last_sent = StageProgress(), 0.0
    yield EMPTY_HTML, None, None, None, skip, skip, status_html("Generating."), skip, skip
    while True:
        try:
            event = events.get(timeout=1.0)
        except queue.Empty:  # keep the time left moving while a long step runs
            yield bars.html(), skip, skip, skip, skip, skip, skip, skip, skip
            continue
        if isinstance(event, Progress):
            bars.update(event.stage, event.done, event.total)
            if time.monotonic() - last_sent >= REFRESH_S or event.done >= event.total:
                last_sent = time.monotonic()
                yield bars.html(), skip, skip, skip, skip, skip, skip, skip, skip
        elif isinstance(event, GuideReady):
            yield bars.html(), event.image, skip, skip, skip, skip, status_html("Guide ready; hires steps."), skip, skip
        elif isinstance(event, Finished):
            history = [*history, (str(event.image_path), event.image_path.name)]
            width, height = event.size_px
            done = status_html(f"Done: {event.image_path.name} ({width}x{height}), {event.sidecar_path.name}")
            yield (bars.html(), skip, str(event.image_path), [str(event.image_path), str(event.sidecar_path)],
                   history, history, done, gr.update(interactive=True), gr.update(interactive=False))
            return
        elif isinstance(event, Failed):
            message = event.message if event.cancelled else f"Error: {event.message}"
            yield (bars.html(), skip, skip, skip, skip, skip, status_html(message, error=not event.cancelled),
                   gr.update(interactive=True), gr.update(interactive=False))
            return


def build_page(ctx: PageContext) -> gr.Blocks:
    defaults = ctx.runner.pipe.defaults
    tiny = ctx.model == TINY_RANDOM
    preset, (width, height) = (CUSTOM_SIZE, (512, 512)) if tiny else ("4K square", SIZE_PRESETS["4K square"])
    loras = lora_choices(ctx.lora_dir)
    cfg = takes_cfg(ctx.runner.pipe)
    with gr.Blocks(analytics_enabled=False, title="ultragen") as page:
        gr.Markdown(f"## ultragen: 2K-8K images with {ctx.model}\nFiles are written to `{ctx.out_dir}`.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red fox in the snow", elem_id="ug-prompt")
                size = gr.Dropdown([CUSTOM_SIZE, *SIZE_PRESETS], value=preset, label="Size", elem_id="ug-size")
                with gr.Row():
                    width_px = gr.Number(width, label="Width (px, multiple of 16)", precision=0, elem_id="ug-width")
                    height_px = gr.Number(height, label="Height (px, multiple of 16)", precision=0,
                                          elem_id="ug-height")
                with gr.Row(equal_height=True):
                    seed = gr.Number(0, label="Seed", precision=0, scale=4, elem_id="ug-seed")
                    dice = gr.Button("Random seed", scale=1, min_width=60, elem_id="ug-dice")
                steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Steps (hires schedule N)",
                                  elem_id="ug-steps")
                lora = gr.Dropdown(loras, value=ctx.default_lora if ctx.default_lora in loras else NO_LORA,
                                   label=f"Guide LoRA ({ctx.lora_dir or 'no --lora-dir'})", elem_id="ug-lora")
                negative_prompt = gr.Textbox(label="Negative prompt (what CFG steers away from)", lines=2,
                                             visible=cfg, elem_id="ug-negative-prompt")
                cfg_scale = gr.Number(defaults.true_cfg_scale, label="CFG scale (hires pass)", visible=cfg,
                                      elem_id="ug-cfg")
                with gr.Accordion("Style LoRAs", open=False, elem_id="ug-style"):
                    with gr.Row(equal_height=True):
                        style_pick = gr.Dropdown(loras[1:], value=[], multiselect=True, scale=3,
                                                 label=f"Files in {ctx.lora_dir or 'no --lora-dir'}",
                                                 elem_id="ug-style-pick")
                        style_scale = gr.Number(1.0, label="Scale", scale=1, min_width=60, elem_id="ug-style-scale")
                        style_add = gr.Button("Add", scale=1, min_width=60, elem_id="ug-style-add")
                    style_loras = gr.Textbox(label="Style LoRAs, one FILE[:SCALE] per line (as generate --style-lora;"
                                                   " a bare name is in the LoRA folder)", lines=3,
                                             placeholder="style.safetensors:0.8", elem_id="ug-style-loras")
                with gr.Accordion("Advanced", open=False, elem_id="ug-advanced"):
                    guide_steps = gr.Slider(1, 100, value=defaults.guide_steps, step=1, label="Guide steps (stage A)",
                                            elem_id="ug-guide-steps")
                    skip = gr.Slider(0, 99, value=defaults.warm_start_skip, step=1,
                                     label="Warm-start skip k (hires steps skipped)", elem_id="ug-skip")
                    policy = gr.Dropdown(sorted(PRESETS), value="default", allow_custom_value=True,
                                         label="Attention policy (a preset or a .json file)", elem_id="ug-policy")
                    rho = gr.Number(4, label="rho (guide downscale per side)", precision=0, elem_id="ug-rho")
                    backend = gr.Dropdown([b.value for b in Backend], value="auto", label="Attention backend",
                                          elem_id="ug-backend")
                    cache_guide = gr.Checkbox(True, label="Cache the guide's keys/values (faster, more memory)",
                                              elem_id="ug-cache-guide")
                    step_cache = gr.Textbox("off", label="Step cache: off, fbcache or fbcache:THRESHOLD "
                                                         "(as generate --cache)", elem_id="ug-step-cache")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="ug-generate")
                    stop = gr.Button("Cancel", variant="stop", interactive=False, elem_id="ug-cancel")
                status = gr.HTML("", elem_id="ug-status")
            with gr.Column(scale=3):
                bars = gr.HTML(EMPTY_HTML, elem_id="ug-progress")
                with gr.Row():
                    guide = gr.Image(label="Guide (stage A)", interactive=False, elem_id="ug-guide")
                    image = gr.Image(label="Image", type="filepath", format="png", interactive=False,
                                     elem_id="ug-image")
                files = gr.File(label="PNG (settings in its metadata) and JSON sidecar", file_count="multiple",
                                interactive=False, elem_id="ug-files")
                gallery = gr.Gallery(label="This session", columns=6, height=240, object_fit="contain",
                                     elem_id="ug-gallery")
        ticket, history = gr.State(None), gr.State([])

        size.change(lambda name: (gr.skip(), gr.skip()) if name == CUSTOM_SIZE else SIZE_PRESETS[name],
                    size, [width_px, height_px], queue=False)
        for box in (width_px, height_px):
            box.input(lambda: CUSTOM_SIZE, None, size, queue=False)
        dice.click(lambda: random.randint(0, MAX_SEED), None, seed, queue=False)
        style_add.click(add_style_loras, [style_pick, style_loras, style_scale], [style_loras, style_pick],
                        queue=False)
        fields = [prompt, width_px, height_px, seed, steps, guide_steps, skip, policy, rho, backend, cache_guide, lora,
                  style_loras, step_cache, negative_prompt, cfg_scale]
        (generate.click(lambda *f: check(ctx, *f), fields, [status, ticket, generate, stop], queue=False)
         .then(gate, ticket, None, queue=False)
         .success(lambda t, h: (yield from run(ctx, t, h)), [ticket, history],
                  [bars, guide, image, files, gallery, history, status, generate, stop],
                  concurrency_limit=1, concurrency_id="gpu", show_progress="hidden"))
        stop.click(cancel, ticket, status, queue=False)
    return page


def launch(page: gr.Blocks, ctx: PageContext, host: str, port: int, auth: tuple[str, str] | None,
           block: bool = True) -> str:
    """Serve ``page`` (one GPU job at a time, no share link, files served from ``out_dir`` only); returns its URL
    once it answers, then blocks until Ctrl+C unless ``block`` is False."""
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=host, server_port=port, auth=auth, share=False, allowed_paths=[str(ctx.out_dir)],
                    ssr_mode=False, mcp_server=False, enable_monitoring=False, css=CSS, prevent_thread_lock=True,
                    show_error=True, quiet=True)
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port} ({error}); pass another --port, e.g. --port {port + 1}") from None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{page.server_port}/"
    print(f"ultragen serve: {url} (Ctrl+C to stop)", file=sys.stderr, flush=True)
    if block:
        page.block_thread()
    return url
