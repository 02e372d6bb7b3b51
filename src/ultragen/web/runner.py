"""Run checked jobs on one loaded pipeline, one at a time, with progress events and a cancel between steps.

:meth:`JobRunner.run` holds the runner's lock for the whole job (so a second job waits, whatever the web queue does),
reports :class:`Progress`, :class:`GuideReady`, then :class:`Finished` or :class:`Failed` through ``emit``, and writes
the same files as ``ultragen generate``: the latent (before decoding), the PNG with our metadata and its JSON sidecar.
A :class:`Ticket`'s cancel event is read after every step (text encoding, each guide and hires step, each VAE tile);
a cancelled or failed job releases its tensors and, on CUDA, the allocator's cached memory.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ultragen.pipeline.job import GenerationJob

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job's ticket was cancelled; raised between two steps."""


@dataclass
class Ticket:
    """One press of Generate: the checked job and its cancel switch."""

    job: GenerationJob
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Progress:
    stage: str  # "encode", "guide", "hires" (or "hires<level>"), "decode"
    done: int
    total: int


@dataclass(frozen=True)
class GuideReady:
    image: object  # PIL image of stage A's guide, decoded as soon as stage A ends


@dataclass(frozen=True)
class Finished:
    image_path: Path
    sidecar_path: Path
    size_px: tuple[int, int]  # (width, height)
    record: dict


@dataclass(frozen=True)
class Failed:
    message: str
    cancelled: bool = False


Event = Progress | GuideReady | Finished | Failed


class JobRunner:
    """Owns the loaded :class:`~ultragen.pipeline.two_stage.UltraGenPipeline`; runs one job at a time."""

    def __init__(self, pipe, lora_allow_mismatch: bool = False):
        self.pipe = pipe
        self.lora_allow_mismatch = lora_allow_mismatch
        self._gpu = threading.Lock()
        self._lora_path: str | None = None
        self._style_loras: tuple = ()  # the StyleLoraSpecs loaded on the pipeline, in loading order

    @property
    def busy(self) -> bool:
        return self._gpu.locked()

    def run(self, ticket: Ticket, emit: Callable[[Event], None]) -> None:
        """Run ``ticket``'s job (waiting for the one before it); every outcome ends with Finished or Failed."""
        with self._gpu:
            try:
                if ticket.cancel.is_set():
                    raise Cancelled
                emit(self._generate(ticket, emit))
            except Cancelled as stop:
                emit(Failed(str(stop) or "Cancelled.", cancelled=True))
            except ValueError as error:
                emit(Failed(str(error)))
            except torch.OutOfMemoryError:
                emit(Failed("out of GPU memory: try a smaller size, or restart `ultragen serve` with fewer other "
                            "programs on the GPU"))
            except Exception as error:  # the page must hear about it; the terminal gets the traceback
                log.exception("generation failed")
                emit(Failed(f"generation failed: {type(error).__name__}: {error}"))
            finally:
                free_memory(self.pipe.device)

    def _generate(self, ticket: Ticket, emit: Callable[[Event], None]) -> Finished:
        from dataclasses import replace

        from ultragen.pipeline.decode import save_latent, to_pil
        from ultragen.pipeline.job import image_record
        from ultragen.pipeline.outputs import png_text, write_json, write_png

        job, pipe = ticket.job, self.pipe
        config = pipe.resolve(replace(job.config, seed=job.seeds()[0]))
        self._use_lora(config)
        self._use_style_loras(job.style_loras)
        prompt, paths = job.prompts[0], job.outputs[0]

        def on_step(event) -> None:
            if ticket.cancel.is_set():
                raise Cancelled
            emit(Progress(event.stage, event.done, event.total))
            if event.guide is not None:
                emit(GuideReady(to_pil(pipe.decode(event.guide, config.vae_tile_px, progress=False))[0]))

        emit(Progress("encode", 0, 1))
        latents, _, timings = pipe.generate_latents(prompt, config, progress=False, callback=on_step)
        save_latent(paths.latent, latents, config.to_record(), prompt)  # before decoding, as generate does
        start = time.perf_counter()
        try:
            with _tile_events(pipe.flux.vae, latents, config.vae_tile_px, ticket, emit):
                image = to_pil(pipe.decode(latents, config.vae_tile_px, progress=False))[0]
        except Cancelled:
            raise Cancelled(f"Cancelled while decoding; the latent is kept: ultragen decode {paths.latent}") from None
        timings["decode"] = time.perf_counter() - start
        record = image_record(prompt, config, paths, job, pipe, timings)
        write_png(paths.image, image, png_text(record))
        write_json(paths.sidecar, record)
        return Finished(paths.image, paths.sidecar, (image.width, image.height), record)

    def _use_lora(self, config) -> None:
        """Make ``config.lora_path`` (None: none) the pipeline's guide LoRA, swapping out the one loaded before."""
        path = config.lora_path
        if path == self._lora_path:
            return
        from ultragen.flux.lora import ADAPTER_NAME

        transformer = self.pipe.flux.transformer
        if ADAPTER_NAME in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters(ADAPTER_NAME)
        self.pipe.lora_metadata, self._lora_path = None, None
        if path is not None:
            self.pipe.load_lora(path, config, allow_mismatch=self.lora_allow_mismatch)
            self._lora_path = path


    def _use_style_loras(self, specs: tuple) -> None:
        """Make ``specs`` (``StyleLoraSpec``s, as ``generate --style-lora`` loads them) the pipeline's style LoRAs,
        unloading the ones loaded before when they differ."""
        if tuple(specs) == self._style_loras:
            return
        self.pipe.unload_style_loras()
        self._style_loras = ()
        for spec in specs:
            self.pipe.load_style_lora(spec.path, scale=spec.scale)
        self._style_loras = tuple(specs)


class _tile_events:
    """While decoding: a Progress("decode", tile, tiles) per VAE decoder call, and the cancel check before each."""

    def __init__(self, vae, latents: torch.Tensor, tile_px: int | None, ticket: Ticket, emit):
        from ultragen.pipeline.decode import tile_count, set_vae_tiling

        set_vae_tiling(vae, tile_px)
        self.total = tile_count(vae, tuple(latents.shape[-2:])) * latents.shape[0]
        self.vae, self.ticket, self.emit, self.done = vae, ticket, emit, 0

    def _before_tile(self, *_) -> None:  # a forward pre-hook: returning None leaves the input alone
        if self.ticket.cancel.is_set():
            raise Cancelled
        if self.done:
            self.emit(Progress("decode", self.done, self.total))
        self.done += 1

    def __enter__(self):
        self.emit(Progress("decode", 0, self.total))
        self._hook = self.vae.decoder.register_forward_pre_hook(self._before_tile)
        return self

    def __exit__(self, kind, *_) -> None:
        self._hook.remove()
        if kind is None:
            self.emit(Progress("decode", self.total, self.total))


def free_memory(device: torch.device) -> None:
    """Return what a finished or stopped job held: Python garbage, then CUDA's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
