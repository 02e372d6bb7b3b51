"""What the page sends -> a checked generation job, through exactly the checks ``ultragen generate`` runs.

The page's fields map one to one onto :class:`~ultragen.pipeline.config.GenerationConfig` fields; the job is made by
:func:`~ultragen.pipeline.job.prepare_generation`, so a bad value gets the same message on the page as on the command
line. Only what the CLI's argument parser does itself (whole numbers) is done here, with the parser's own wording.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from ultragen.pipeline.config import GenerationConfig
from ultragen.pipeline.job import GenerationJob, prepare_generation
from ultragen.pipeline.outputs import slug

NO_LORA = "none"
LONG_SIDES_PX = {"2K": 2048, "4K": 4096, "8K": 8192}
ASPECTS = {"square": (1, 1), "16:9": (16, 9), "9:16": (9, 16), "3:2": (3, 2)}


def _preset_size(long_side_px: int, aspect: tuple[int, int]) -> tuple[int, int]:
    """(width, height) with the long side ``long_side_px`` and the short side rounded to a multiple of 16 px."""
    w, h = aspect
    short = round(long_side_px * min(w, h) / max(w, h) / 16) * 16
    return (long_side_px, short) if w >= h else (short, long_side_px)


# "4K 16:9" -> (4096, 2304); every side a multiple of 16 px
SIZE_PRESETS: dict[str, tuple[int, int]] = {
    f"{tier} {name}": _preset_size(side, aspect) for tier, side in LONG_SIDES_PX.items()
    for name, aspect in ASPECTS.items()
}


@dataclass(frozen=True)
class PageSettings:
    """One press of Generate: the page's fields as they arrive (numbers may be floats or None from the browser)."""

    prompt: str
    width_px: float | int | None
    height_px: float | int | None
    seed: float | int | None
    steps: float | int | None
    guide_steps: float | int | None
    warm_start_skip: float | int | None
    policy: str = "default"
    rho: float | int | None = 4
    backend: str = "auto"
    cache_guide: bool = True
    guide_lora: str = NO_LORA  # a file name in the LoRA folder, or NO_LORA
    style_loras: str = ""  # one ``FILE[:SCALE]`` per line, as ``generate --style-lora``; a bare name: in the LoRA folder
    step_cache: str = "off"  # as ``generate --cache``: off, fbcache or fbcache:THRESHOLD
    negative_prompt: str = ""  # as ``generate --negative-prompt`` (models with CFG only)
    cfg: float | int | None = None  # as ``generate --cfg``; None: the model's default


def whole(flag: str, value) -> int:
    """A page number as the CLI's ``whole_number`` would take it; ValueError with argparse's wording otherwise."""
    from ultragen.cli import whole_number

    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"argument {flag}: expected a whole number, got nothing; enter one")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return whole_number(str(value))
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"argument {flag}: {error}") from None


def style_lora_specs(text: str, lora_dir: Path | None) -> tuple:
    """The page's style-LoRA lines -> ``StyleLoraSpec``s, each line read by the CLI's ``--style-lora`` parser; a
    relative FILE is taken from ``lora_dir`` (the folder the picker lists). ValueError with the CLI's message."""
    from dataclasses import replace

    from ultragen.style_lora import parse_style_lora

    specs = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        spec = parse_style_lora(line.strip())
        if lora_dir is not None and not Path(spec.path).expanduser().is_absolute():
            spec = replace(spec, path=str(lora_dir / spec.path))
        specs.append(spec)
    return tuple(specs)


def style_lora_line(name: str, scale: float = 1.0) -> str:
    """The text line the picker adds for a file of the LoRA folder: ``NAME:SCALE``."""
    return f"{name}:{scale:g}"


def step_cache(value) -> str:
    """The page's step cache as the CLI's ``--cache`` parses it; ValueError with argparse's wording otherwise."""
    from ultragen.cli import step_cache_setting

    try:
        return step_cache_setting(str(value if value is not None else "off"))
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"argument --cache: {error}") from None


def to_config(settings: PageSettings, model: str, lora_dir: Path | None) -> GenerationConfig:
    """The GenerationConfig these settings ask for (validated by its constructor; raises ValueError)."""
    lora_path = None
    if settings.guide_lora and settings.guide_lora != NO_LORA:
        lora_path = str((lora_dir or Path(".")) / settings.guide_lora)
    return GenerationConfig(
        height_px=whole("--height", settings.height_px), width_px=whole("--width", settings.width_px), model=model,
        seed=whole("--seed", settings.seed), steps=whole("--steps", settings.steps),
        guide_steps=whole("--guide-steps", settings.guide_steps),
        warm_start_skip=whole("--warm-start-skip", settings.warm_start_skip), rho=whole("--rho", settings.rho),
        policy=settings.policy, backend=settings.backend, cache_guide=bool(settings.cache_guide), lora_path=lora_path,
        step_cache=step_cache(settings.step_cache), negative_prompt=settings.negative_prompt or "",
        true_cfg_scale=None if settings.cfg is None else float(settings.cfg),
    )


def image_path(out_dir: Path, prompt: str, seed: int, clock=time.time) -> Path:
    """A new PNG path in ``out_dir``: ``<yyyymmdd-hhmmss>-<prompt slug>-s<seed>[-n].png``, not yet taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(clock()))
    base = f"{stamp}-{slug(prompt)}-s{seed}"
    path, n = out_dir / f"{base}.png", 1
    while any(p.exists() for p in (path, path.with_suffix(".json"), path.with_name(path.stem + ".latent.safetensors"))):
        n += 1
        path = out_dir / f"{base}-{n}.png"
    return path


def make_job(settings: PageSettings, model: str, out_dir: Path, lora_dir: Path | None, device: str = "auto",
             dtype: str = "auto", pipe=None, lora_allow_mismatch: bool = False) -> GenerationJob:
    """Check ``settings`` as ``ultragen generate`` would and plan the files; ValueError with the CLI's message.

    ``pipe`` (the loaded pipeline), when given, also checks what needs the model (e.g. settings its family lacks)."""
    config = to_config(settings, model, lora_dir)
    style_loras = style_lora_specs(settings.style_loras, lora_dir)
    prompt = settings.prompt or ""
    job = prepare_generation(config, prompt, None, str(image_path(out_dir, prompt, config.seed)), device=device,
                             dtype=dtype, lora_allow_mismatch=lora_allow_mismatch, style_loras=style_loras)
    if pipe is not None:
        pipe.resolve(job.config)
    return job
