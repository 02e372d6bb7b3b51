"""Every setting of ``ultragen train prepare`` and ``ultragen train`` in two frozen values, validated here.

Sizes are pixels (``size_px``: the square training image); ``rho`` is the guide downscale per side; token counts end
in ``_tokens``. Fields left ``None`` are taken from the model or the cache when the run starts (and then recorded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from ultragen.checks import check_float, check_int

if TYPE_CHECKING:  # imported where used: building the command line must not import torch or peft
    from ultragen.flux.lora import LoraTargets

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_TEXT_TOKENS = 512  # FLUX.1's T5 context and klein's prompt length


class Optimizer(str, Enum):
    ADAMW = "adamw"
    PRODIGY = "prodigy"  # the authors' choice (lr 1: Prodigy estimates the step size); needs `pip install prodigyopt`


class LrSchedule(str, Enum):
    CONSTANT = "constant"  # after the linear warmup
    COSINE = "cosine"  # cosine decay to 0 at ``steps``


def check_geometry(size_px: int, rho: int, window_tokens: int, block_tokens: int, text_tokens: int) -> None:
    """The training image must be exactly the canvas: whole windows and whole guide tiles, no padding. Refuses
    with the nearest training sizes that are."""
    from ultragen.layout import PATCH_PX, make_layout

    def exact(size: int) -> bool:
        try:
            make_layout(size, size, window_tokens=window_tokens, rho=rho, text_tokens=text_tokens,
                        block_tokens=block_tokens, pad=False)
        except ValueError:
            return False
        return True

    # every rule but padding (multiple of 16 px, rho divides the window, window and block fit), with its own message
    make_layout(size_px, size_px, window_tokens=window_tokens, rho=rho, text_tokens=text_tokens,
                block_tokens=block_tokens)
    if exact(size_px):
        return
    below = next((s for s in range(size_px - PATCH_PX, 0, -PATCH_PX) if exact(s)), None)
    above = next((s for s in range(size_px + PATCH_PX, 8 * size_px + 2**16, PATCH_PX) if exact(s)), None)
    fixes = " or ".join(f"--size {s}" for s in (above, below) if s is not None)
    raise ValueError(
        f"size_px={size_px} does not divide into whole {window_tokens}x{window_tokens}-token windows with a guide "
        f"(1/{rho} per side) of whole {block_tokens}-token guide tiles, and training images are never padded; "
        f"use {fixes or 'another --size, --rho, --window or --block-tokens'}"
    )


@dataclass(frozen=True)
class PrepareConfig:
    """``ultragen train prepare``: images (or ``generate_count`` base-model images) -> a latent/text cache.

    ``images_dir``: a folder of images (searched recursively) with captions in ``NAME.txt`` sidecars or in
    ``captions_file`` (JSONL: ``{"file": "relative/path.png", "caption": "..."}``). Each image is resized so its
    shortest side is ``size_px`` and centre-cropped to a square; the guide is its antialiased downsample by ``rho``.
    ``text_tokens`` None: the model's default (FLUX.1-dev and klein 512, schnell 256), at most the tokenizer's.
    """

    model: str
    out_dir: str
    images_dir: str | None = None
    captions_file: str | None = None
    size_px: int = 1024
    rho: int = 4
    window_tokens: int = 16
    block_tokens: int = 128
    text_tokens: int | None = None
    shard_items: int = 64
    batch_size: int = 4
    generate_count: int = 0  # > 0: first draw this many images with the base model from ``prompts_file``
    prompts_file: str | None = None
    generate_steps: int | None = None  # None: 28 for guidance-distilled models, else 4
    generate_guidance: float = 3.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: a Hugging Face id, a local diffusers folder, or tiny-random")
        if not self.out_dir:
            raise ValueError("--out is required: the new folder that will hold the cache")
        check_int("size_px", self.size_px, 16)
        check_int("rho", self.rho, 2)
        check_int("window_tokens", self.window_tokens, 1)
        check_int("block_tokens", self.block_tokens, 1)
        check_int("shard_items", self.shard_items, 1, 100_000)
        check_int("batch_size", self.batch_size, 1, 1024)
        check_int("generate_count", self.generate_count, 0, 10_000_000)
        check_int("seed", self.seed, 0, 2**62)
        check_float("generate_guidance", self.generate_guidance, 0.0, 100.0)
        if self.generate_steps is not None:
            check_int("generate_steps", self.generate_steps, 1, 1000)
        if self.text_tokens is not None:
            check_int("text_tokens", self.text_tokens, 1, MAX_TEXT_TOKENS)
        if self.generate_count:
            if not self.prompts_file:
                raise ValueError(f"--generate {self.generate_count} needs --prompts FILE (one prompt per line)")
            if self.images_dir or self.captions_file:
                raise ValueError("--generate makes its own images and captions; drop --images / --captions")
        elif not self.images_dir:
            raise ValueError("pass --images DIR (a folder of images with captions) or --generate N --prompts FILE")
        check_geometry(self.size_px, self.rho, self.window_tokens, self.block_tokens,
                       self.text_tokens or self.block_tokens)

    def to_record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """``ultragen train``: the guide LoRA's flow-matching run over a prepared cache.

    ``batch_size`` is per process; one optimizer step sees ``batch_size * grad_accum * processes`` images.
    ``window_tokens`` / ``block_tokens`` None: the cache's. ``size_px`` / ``rho``, when given, must equal the
    cache's (a check, not an override: the cached latents fix them). ``val_items`` None: ``clamp(n // 10, 1, 8)``
    cached items are held out for the deterministic validation loss (0: no validation loss).
    """

    model: str
    cache_dir: str
    out_dir: str
    steps: int = 1000
    lr: float | None = None  # None: 1e-4 for AdamW, 1.0 for Prodigy
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    warmup_steps: int = 0
    weight_decay: float = 0.01
    rank: int = 16
    alpha: float = 16.0
    targets: LoraTargets = "wide"  # LoraTargets.WIDE after __post_init__; measured better than qkv on the testbed
    optimizer: Optimizer = Optimizer.ADAMW
    batch_size: int = 1
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0  # 0: no clipping (the authors clip at 0.1 with Prodigy)
    caption_dropout: float = 0.1
    logit_mean: float = 0.0  # t = sigmoid(n), n ~ N(logit_mean, logit_std**2)
    logit_std: float = 1.0
    guidance: float = 1.0  # guidance embedding for guidance-distilled models (the authors train at 1.0)
    policy: str | dict = "default"  # a preset name; a policy file is stored as its fields (see __post_init__)
    ntk_factor: float = 1.0
    guide_offset_tokens: float | None = None  # None: (rho - 1) / 2, the centre of each guide token's footprint
    window_tokens: int | None = None
    block_tokens: int | None = None
    size_px: int | None = None
    rho: int | None = None
    val_items: int | None = None
    save_every: int = 500
    validate_every: int = 250
    validate_prompts: str | None = None
    seed: int = 0
    resume: bool = False

    # settings a resumed run may change (the run folder may have moved); every other one must match the checkpoint's
    RESUMABLE = ("out_dir", "steps", "save_every", "validate_every", "validate_prompts", "resume")

    def __post_init__(self) -> None:
        from ultragen.flux.lora import LoraTargets
        from ultragen.policy import get_policy

        for name, kind in (("lr_schedule", LrSchedule), ("targets", LoraTargets), ("optimizer", Optimizer)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                raise ValueError(f"{name}={value!r} is not one of {[k.value for k in kind]}") from None
        if isinstance(self.policy, str) and self.policy.endswith(".json"):
            # read the file once: the run records (and a resume compares) the policy itself, not a path that may
            # move or change
            object.__setattr__(self, "policy", get_policy(self.policy).to_dict())
        _validate(self)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1.0 if self.optimizer is Optimizer.PRODIGY else 1e-4

    def to_record(self) -> dict:
        """JSON-ready dict of every field (run dir ``config.json``, checkpoints, LoRA metadata)."""
        record = asdict(self)
        for name in ("lr_schedule", "targets", "optimizer"):
            record[name] = getattr(self, name).value
        return record

    @classmethod
    def from_record(cls, record: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**record)

    def differences(self, other: TrainConfig) -> list[str]:
        """'name: this X, other Y' for every setting that differs and may not change on resume."""
        a, b = self.to_record(), other.to_record()
        return [f"{k}: checkpoint {b[k]!r}, now {a[k]!r}" for k in a if k not in self.RESUMABLE and a[k] != b[k]]


def _validate(c: TrainConfig) -> None:
    from ultragen.policy import get_policy

    for name in ("model", "cache_dir", "out_dir"):
        if not getattr(c, name):
            flag = {"model": "--model", "cache_dir": "--cache", "out_dir": "--out"}[name]
            raise ValueError(f"{flag} is required (ultragen train --model ID --cache CACHE --out RUN_DIR)")
    check_int("steps", c.steps, 1, 10_000_000)
    if c.lr is not None:
        check_float("lr", c.lr, 0.0, 100.0, low_open=True)
    check_int("warmup_steps", c.warmup_steps, 0, 10_000_000)
    check_float("weight_decay", c.weight_decay, 0.0, 10.0)
    check_int("rank", c.rank, 1, 1024)
    check_float("alpha", c.alpha, 0.0, 1e6, low_open=True)
    check_int("batch_size", c.batch_size, 1, 1024)
    check_int("grad_accum", c.grad_accum, 1, 4096)
    check_float("max_grad_norm", c.max_grad_norm, 0.0, 1e6)
    check_float("caption_dropout", c.caption_dropout, 0.0, 1.0)
    check_float("logit_mean", c.logit_mean, -10.0, 10.0)
    check_float("logit_std", c.logit_std, 0.0, 10.0, low_open=True)
    check_float("guidance", c.guidance, 0.0, 100.0)
    check_float("ntk_factor", c.ntk_factor, 0.0, 1000.0, low_open=True)
    if c.guide_offset_tokens is not None:  # the upper bound, rho - 1, is checked against the cache's rho
        check_float("guide_offset_tokens", c.guide_offset_tokens, 0.0, 1000.0)
    get_policy(c.policy)  # a preset or a readable policy file; raises with the fix
    for name in ("window_tokens", "block_tokens", "size_px"):
        if getattr(c, name) is not None:
            check_int(name, getattr(c, name), 1)
    if c.rho is not None:
        check_int("rho", c.rho, 2)
    if c.val_items is not None:
        check_int("val_items", c.val_items, 0, 10_000)
    check_int("save_every", c.save_every, 1)
    check_int("validate_every", c.validate_every, 1)
    check_int("seed", c.seed, 0, 2**40)
    if c.validate_prompts is not None and not Path(c.validate_prompts).is_file():
        raise ValueError(f"--validate-prompts {c.validate_prompts!r} is not a file; pass a text file, one prompt "
                         f"a line")
