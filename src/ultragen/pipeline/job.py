"""What ``ultragen generate`` and ``ultragen decode`` do, as library functions: prompts in, checked files out.

:func:`prepare_generation` checks everything that can be checked without a model (sizes, settings, prompts, output
paths, LoRA file) and raises ValueError before anything is loaded or written. :func:`generate_files` then loads the
model and, for each prompt, saves the latent, decodes it, and writes the PNG and its JSON sidecar.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ultragen import __version__
from ultragen.family import ModelInfo
from ultragen.pipeline.config import GenerationConfig
from ultragen.pipeline.loading import inspect_model
from ultragen.pipeline.outputs import (
    OutputPaths,
    check_writable,
    plan_outputs,
    png_text,
    write_json,
    write_png,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GenerationJob:
    """Everything one ``ultragen generate`` run does, checked. ``config.seed`` is the first prompt's seed; prompt i
    uses ``seed + i``."""

    config: GenerationConfig
    prompts: tuple[str, ...]
    outputs: tuple[OutputPaths, ...]
    device: str
    dtype: str
    lora_allow_mismatch: bool = False
    style_loras: tuple = ()  # ultragen.style_lora.StyleLoraSpec, in loading order
    fuse_style_loras: bool = False  # merge them into the base weights (before FP8) instead of adapters

    def seeds(self) -> list[int]:
        return [self.config.seed + i for i in range(len(self.prompts))]


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """One prompt, or the non-blank, non-# lines of a text file. Raises ValueError if there is none."""
    if (prompt is None) == (prompts_file is None):
        raise ValueError("pass exactly one of --prompt TEXT and --prompts-file FILE")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty; describe the image, e.g. --prompt \"a red fox in the snow\"")
        return [prompt.strip()]
    path = Path(prompts_file)
    if not path.is_file():
        raise ValueError(f"prompts file {prompts_file!r} does not exist; pass a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompts file {prompts_file!r} ({error}); pass a UTF-8 text file") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {prompts_file!r} has no prompts; write one prompt per line ('#' = comment)")
    return prompts


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """("auto" -> cuda if available else cpu; dtype "auto" -> bfloat16 on GPU, float32 on CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use --device cpu")
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use auto or one of {sorted(DTYPES)}")
    return device, dtype


def prepare_generation(config: GenerationConfig, prompt: str | None, prompts_file: str | None, out: str | None,
                       force: bool = False, device: str = "auto", dtype: str = "auto",
                       lora_allow_mismatch: bool = False, log=print, style_loras=(),
                       fuse_style_loras: bool = False) -> GenerationJob:
    """Check the whole run before any weights are loaded, as far as the real run would check it (the model's files,
    the LoRA, the attention backend on this device); raises ValueError with the value, the rule and the fix.

    The returned job's config is resolved: the model's defaults (read from its config files) are filled in."""
    if not config.model:
        raise ValueError("no model given; pass --model with a Hugging Face id, a local folder, or tiny-random")
    prompts = read_prompts(prompt, prompts_file)
    seeds = [config.seed + i for i in range(len(prompts))]
    if seeds[-1] > 2**63 - 1:
        raise ValueError(f"seed={config.seed} + {len(prompts) - 1} prompts passes the largest seed 2**63-1")
    outputs = plan_outputs(out, prompts, seeds, force)
    device, dtype = resolve_device(device, dtype)
    if fuse_style_loras and not style_loras:
        raise ValueError("--fuse-style-loras merges style LoRAs into the weights but no --style-lora was given; add "
                         "--style-lora FILE[:SCALE] or leave out --fuse-style-loras")
    if config.fp8 and device == "cpu":
        raise ValueError("--fp8 needs a CUDA GPU (compute capability 8.9+); leave it out on the CPU")
    info = inspect_model(config.model)
    config = config.resolved(info.defaults)
    from ultragen.family import check_lora_family, family_named

    family = family_named(info.family)
    if config.lora_path is not None:
        check_lora_family(config.lora_path, family, config.model)
        _check_lora(config, lora_allow_mismatch, log, family)
    _check_backend(config, device, dtype, info)
    for spec in style_loras:  # style LoRA files (ultragen.style_lora.StyleLoraSpec): readable, the model's family
        check_lora_family(spec.path, family, config.model, kind="style LoRA")
        family.check_style_lora_file(spec)
    return GenerationJob(config, tuple(prompts), tuple(outputs), device, dtype, lora_allow_mismatch,
                         tuple(style_loras), fuse_style_loras)


def _lora_reader(path: str, family=None):
    """The family that reads the LoRA file at ``path``: ``family``, else the one its modules belong to (FLUX.1
    when none claims it: its reader says what is wrong)."""
    from ultragen.family import family_named, family_of_lora

    return family or family_of_lora(path) or family_named("flux1")


def lora_settings(path: str) -> dict:
    """The GenerationConfig fields a guide LoRA was trained under (rho, window, block, policy, guide offset, NTK),
    read from its metadata (the authors' klein file: the settings their code used); the policy by its preset name
    when it is one (else left out: pass it as a file)."""
    from ultragen.policy import get_policy

    meta = _lora_reader(path).read_lora_metadata(path)
    settings = {"rho": meta.rho, "window_tokens": meta.window_tokens, "ntk_factor": meta.ntk_factor}
    if isinstance(meta.extra.get("block_tokens"), int):
        settings["block_tokens"] = meta.extra["block_tokens"]
    if meta.guide_offset_tokens != (meta.rho - 1) / 2:  # the centre is the default (None)
        settings["guide_offset_tokens"] = meta.guide_offset_tokens
    name = meta.policy.get("name")
    try:
        if name and get_policy(name).to_dict() == meta.policy:
            settings["policy"] = name
    except ValueError:  # a policy from a file: not a preset
        pass
    return settings


def _lora_mismatches(config: GenerationConfig, family=None) -> list[str]:
    meta = _lora_reader(config.lora_path, family).read_lora_metadata(config.lora_path)
    expected = config.lora_expectation()
    if meta.extra.get("source") == "authors":  # the authors' klein file names no model of ours
        expected = replace(expected, base_model=meta.base_model)
    diff = meta.mismatches(expected)
    block = meta.extra.get("block_tokens")
    if isinstance(block, int) and block != config.block_tokens:
        diff.append(f"block_tokens: LoRA {block}, run {config.block_tokens}")
    return diff


def _check_lora(config: GenerationConfig, allow_mismatch: bool, log, family=None) -> None:
    """Refuse a LoRA trained under other settings before the model is loaded (the load checks again); with
    ``allow_mismatch`` (--lora-force), say what is overridden."""
    diff = _lora_mismatches(config, family)
    if diff and not allow_mismatch:
        raise ValueError(
            f"LoRA {config.lora_path!r} was trained under other settings ({'; '.join(diff)}); leave those options "
            f"out (generate then takes them from the LoRA) or pass the LoRA's values, or --lora-force if you know "
            f"it is safe"
        )
    if allow_mismatch:
        log(f"--lora-force: using {config.lora_path} although it was trained under other settings: {'; '.join(diff)}"
            if diff else f"--lora-force: {config.lora_path} matches this run's settings; nothing overridden")


def _check_backend(config: GenerationConfig, device: str, dtype: str, info: ModelInfo) -> None:
    """Refuse an explicitly named attention backend that cannot run the hierarchical pass on this device, with the
    reason (``ultragen.attention.why_not`` on stand-in tensors of the pass's shape; nothing is computed)."""
    from ultragen.attention import Backend, parse_backend, why_not
    from ultragen.layout import make_layout
    from ultragen.policy import build_plan

    backend = parse_backend(config.backend)
    if backend is Backend.AUTO:  # picks, per call, the fastest backend that can run (the reference always can)
        return

    def reason(dtype_name: str, layouts, heads: int, head_dim: int) -> str | None:
        for layout in layouts:
            q = torch.empty(1, 1, 1, head_dim, device=device, dtype=DTYPES[dtype_name])
            q = q.expand(1, heads, layout.seq_tokens, head_dim)  # a view: no memory of that size
            if why := why_not(backend, q, q, q, build_plan(layout, config.policy)):
                return why
        return None

    # first the device: can the backend run a plain FLUX.1 problem here (1024 px, 128-dim heads) in any dtype?
    plain = [make_layout(1024, 1024)]
    on_device = [reason(name, plain, 1, 128) for name in DTYPES]
    if all(on_device):  # say why in the words most dtypes gave (e.g. no CUDA device, rather than a dtype)
        why = max(on_device, key=on_device.count)
        gpu = ", or run on a CUDA GPU (--device cuda)" if device == "cpu" else ""
        raise ValueError(f"--backend {backend.value} cannot run on {device}: {why}; use --backend auto (it picks a "
                         f"backend that runs here){gpu}")
    # then this run's problem: the model's heads, this layout, this dtype
    if (why := reason(dtype, config.layouts(), info.heads, info.head_dim)) is None:
        return
    runs = [name for name in DTYPES if name != dtype
            and reason(name, config.layouts(), info.heads, info.head_dim) is None]
    fix = f"pass --dtype {runs[0]}, or --backend auto" if runs else "use --backend auto"
    raise ValueError(f"--backend {backend.value} cannot run this model at this size on {device} in {dtype}: "
                     f"{why}; {fix}")


def describe(job: GenerationJob) -> dict:
    """What ``job`` would do, without loading any weights (``ultragen generate --dry-run``): the resolved settings
    (None only where the model has no such setting, e.g. schnell's guidance), sizes, files, device."""
    layouts = job.config.layouts()
    return {
        "config": job.config.to_record(),
        "guide_size_px": [job.config.guide_size_px[1], job.config.guide_size_px[0]],
        "canvas_px": [[lay.padded_width_px, lay.padded_height_px] for lay in layouts],
        "prompts": [{"prompt": p, "seed": s, "files": [str(f) for f in paths.all()]}
                    for p, s, paths in zip(job.prompts, job.seeds(), job.outputs)],
        "style_loras": [{"path": spec.path, "scale": spec.scale} for spec in job.style_loras],
        "fuse_style_loras": job.fuse_style_loras,
        "device": job.device,
        "dtype": job.dtype,
    }


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"ultragen": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def image_record(prompt: str, config: GenerationConfig, paths: OutputPaths, job: GenerationJob, pipe,
                 timings: dict[str, float]) -> dict:
    layouts = config.layouts()
    return {
        "prompt": prompt,
        "config": config.to_record(),
        "model_family": pipe.defaults.family.value,
        "image_size_px": [config.width_px, config.height_px],
        "guide_size_px": [config.guide_size_px[1], config.guide_size_px[0]],
        "canvas_px": [[lay.padded_width_px, lay.padded_height_px] for lay in layouts],
        # read from the scheduler stage B ran (the last cascade level's); 1.0: started from noise
        "warm_start_sigma": pipe.last_warm_start_sigmas[-1] if pipe.last_warm_start_sigmas else None,
        # per cascade level: the step cache setting, steps computed and steps skipped (reusing the cached residual)
        "step_cache": list(pipe.last_step_cache),
        "lora": None if pipe.lora_metadata is None else json.loads(pipe.lora_metadata.to_json()),
        "lora_files": pipe.lora_records(),  # every LoRA file: kind, path, SHA-256, scale
        "device": job.device if job.device == "cpu" else torch.cuda.get_device_name(torch.device(job.device)),
        "dtype": job.dtype,
        "files": {"image": paths.image.name, "latent": paths.latent.name, "sidecar": paths.sidecar.name},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
    }


def generate_files(job: GenerationJob, progress: bool = True, log=print, parallel=None) -> list[dict]:
    """Run ``job``: load the model, then per prompt save the latent, decode, write PNG + sidecar. Returns records.

    ``parallel``: an ``ultragen.parallel.SequenceParallel`` (one per torchrun process): every process runs the hires
    pass on its windows; once all finished an image, rank 0 alone decodes and writes it (the others return [])."""
    from ultragen.pipeline.decode import save_latent, to_pil
    from ultragen.pipeline.two_stage import UltraGenPipeline

    pipe = UltraGenPipeline.from_pretrained(job.config.model, dtype=DTYPES[job.dtype]).to(job.device)
    pipe.parallel = parallel
    if job.fuse_style_loras:  # merged into the bf16 weights, then quantized with them
        for spec in job.style_loras:
            pipe.load_style_lora(spec.path, scale=spec.scale, fuse=True)
    pipe.prepare_weights(job.config)  # FP8, before any LoRA adapter
    if job.config.lora_path is not None:
        pipe.load_lora(job.config.lora_path, pipe.resolve(job.config), allow_mismatch=job.lora_allow_mismatch)
    for spec in job.style_loras if not job.fuse_style_loras else ():  # before any image: a misfit stops the run here
        pipe.load_style_lora(spec.path, scale=spec.scale)
    records = []
    for prompt, seed, paths in zip(job.prompts, job.seeds(), job.outputs):
        config = pipe.resolve(replace(job.config, seed=seed))
        latents, _, timings = pipe.generate_latents(prompt, config, progress=progress)
        if parallel is not None and not parallel.writes_files():  # waits until every rank has finished the image
            continue
        save_latent(paths.latent, latents, config.to_record(), prompt)  # before decoding: an OOM loses nothing
        start = time.perf_counter()
        image = to_pil(pipe.decode(latents, config.vae_tile_px, progress=progress))[0]
        timings["decode"] = time.perf_counter() - start
        record = image_record(prompt, config, paths, job, pipe, timings)
        write_png(paths.image, image, png_text(record))
        write_json(paths.sidecar, record)
        log(f"wrote {paths.image} ({image.width}x{image.height}), {paths.sidecar.name}, {paths.latent.name}")
        records.append(record)
    return records


def decode_file(latent_path: str, out: str | None = None, tile_px: int | None = None, device: str = "auto",
                dtype: str = "auto", model: str | None = None, force: bool = False, progress: bool = True) -> Path:
    """Decode a latent saved by ``generate`` into a PNG (default: next to it, ``NAME.png``). Returns the PNG path."""
    from ultragen.family import family_of_model
    from ultragen.pipeline.decode import load_latent, to_pil

    if tile_px is not None and (tile_px < 128 or tile_px % 64):
        raise ValueError(f"--tile-size {tile_px} must be a multiple of 64 px, at least 128 (e.g. 512)")
    source = Path(latent_path)
    latents, config, prompt = load_latent(source)
    default_name = source.name.removesuffix(".safetensors").removesuffix(".latent") + ".png"
    image_path = Path(out) if out is not None else source.with_name(default_name)
    if image_path.suffix.lower() != ".png":
        raise ValueError(f"--out {str(image_path)!r} must be a .png file name")
    check_writable(image_path.parent)
    if image_path.exists() and not force:
        raise ValueError(f"{str(image_path)!r} already exists; pass --force to overwrite it or choose another --out")
    device, dtype = resolve_device(device, dtype)
    family = family_of_model(model or config["model"])
    vae = family.load_vae(model or config["model"], DTYPES[dtype]).to(device)
    image = to_pil(family.decode(vae, latents, tile_px, progress))[0]
    record = {"prompt": prompt, "config": config, "versions": versions()}
    write_png(image_path, image, png_text(record))
    return image_path
