"""Validation images during training: the prompts of ``--validate-prompts`` through the generation pipeline
(``UltraGenPipeline``), with the LoRA being trained, at the training size. Main process only.

The text encoders and the VAE are loaded the first time (training itself never needs them); the transformer is the
one being trained, shared, not copied. A setting the generation pipeline cannot run (for instance a window that
does not tile into 128-token blocks) is reported once and the samples are skipped; the validation loss still runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ultragen.atomic import atomic_path
from ultragen.layout import HierLayout
from ultragen.train.config import TrainConfig
from ultragen.train.prepare import read_prompts

_PIPELINES: dict[int, object] = {}  # id(transformer) -> UltraGenPipeline, so the encoders load once per run
_SKIPPED: set[int] = set()


def _pipeline(transformer, model: str):
    key = id(transformer)
    if key not in _PIPELINES:
        from ultragen.family import family_of_model
        from ultragen.pipeline.two_stage import UltraGenPipeline

        flux = family_of_model(model).with_transformer(model, transformer)
        _PIPELINES[key] = UltraGenPipeline(flux.to(transformer.device), model=model)
    return _PIPELINES[key]


def write_samples(transformer, config: TrainConfig, layout: HierLayout, run_dir: Path, step: int, log_line) -> None:
    """``RUN_DIR/samples/step-NNNNNN-PP.png`` for every prompt (seed = prompt index)."""
    key = id(transformer)
    if key in _SKIPPED:
        return
    prompts = read_prompts(config.validate_prompts)
    settings = dict(height=layout.height_px, width=layout.width_px, rho=layout.rho,
                    window_tokens=layout.window_tokens, policy=config.policy, ntk_factor=config.ntk_factor,
                    guide_offset_tokens=layout.guide_offset_tokens)
    try:
        pipe = _pipeline(transformer, config.model)
        pipe.make_config(**settings)
    except (ValueError, ImportError) as error:
        _SKIPPED.add(key)
        log_line(f"validation samples skipped for this run: {error}")
        return
    out = run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    was_training = transformer.training
    transformer.eval()
    try:
        for i, prompt in enumerate(prompts):
            result = pipe(prompt, generator=torch.Generator("cpu").manual_seed(i), progress=False, **settings)
            with atomic_path(out / f"step-{step:06d}-{i:02d}.png") as tmp:  # never a partial PNG
                result.images[0].save(tmp, format="PNG")
    finally:
        transformer.train(was_training)
    log_line(f"step {step}: wrote {len(prompts)} validation samples to {out}")
