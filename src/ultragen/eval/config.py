"""Settings of one evaluation, checked in one place (``EvalConfig.__post_init__``): every ValueError names the value,
the rule and the option that fixes it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from ultragen.eval.weights import check_clip_model, check_inception_weights

INCEPTION_FEATURE_DIMS = (64, 192, 768, 2048)  # the pooled Inception layers torch-fidelity exposes
DEFAULT_PATCH_PX = 1024  # the base model's native size; the paper does not state its patch size
DEFAULT_PATCHES_PER_IMAGE = 4  # 1,000 images -> 4,000 patches: more than 2,048 features, so FID_patch is full rank
DEFAULT_IS_SPLITS = 10  # the usual Inception Score protocol (Salimans et al., torch-fidelity)


class Metric(enum.Enum):
    FID = "fid"
    IS = "is"
    CLIP = "clip"
    CLIPIQA = "clipiqa"
    FID_PATCH = "fid_patch"
    IS_PATCH = "is_patch"

    @property
    def needs_reference(self) -> bool:
        return self in (Metric.FID, Metric.FID_PATCH)

    @property
    def needs_inception(self) -> bool:
        return self in (Metric.FID, Metric.IS, Metric.FID_PATCH, Metric.IS_PATCH)

    @property
    def needs_clip(self) -> bool:
        return self in (Metric.CLIP, Metric.CLIPIQA)

    @property
    def on_patches(self) -> bool:
        return self in (Metric.FID_PATCH, Metric.IS_PATCH)


class PatchLayout(enum.Enum):
    RANDOM = "random"  # patches_per_image crops at seeded random positions
    GRID = "grid"  # every whole patch-size tile of a centred grid


def parse_metrics(text: str, have_reference: bool) -> tuple[Metric, ...]:
    """``"all"`` -> every metric (the FIDs only with a reference set); else a comma list such as ``fid,clip``."""
    if text.strip() == "all":
        return tuple(m for m in Metric if have_reference or not m.needs_reference)
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {m.value: m for m in Metric}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--metrics {text!r}: unknown metric {unknown[0] if unknown else '(none)'!r}; "
                         f"use 'all' or a comma list of {','.join(known)}")
    return tuple(dict.fromkeys(known[n] for n in names))


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. Paths are checked to exist here; images are checked when the folders are read."""

    images: Path
    out: Path
    metrics: tuple[Metric, ...]
    reference: Path | None = None
    prompts: Path | None = None
    patch_px: int = DEFAULT_PATCH_PX
    patch_layout: PatchLayout = PatchLayout.RANDOM
    patches_per_image: int | None = None  # RANDOM: default DEFAULT_PATCHES_PER_IMAGE; GRID: every tile
    fid_features: int = 2048
    is_splits: int = DEFAULT_IS_SPLITS
    inception_weights: Path | None = None
    clip_model: Path | None = None
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 8
    sample_crops: int = 16  # crops shown in the report's grid, per set

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError("no metric to compute; pass --metrics, e.g. --metrics is,clip")
        for name, folder in (("--images", self.images), ("--reference", self.reference)):
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"{name} {str(folder)!r} is not a folder; pass the folder that holds the images")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ValueError(f"--prompts {str(self.prompts)!r} is not a file; pass a text file with one prompt "
                             f"per line (images in name order)")
        if self.reference is None:
            needing = [m.value for m in self.metrics if m.needs_reference]
            if needing:
                rest = ",".join(m.value for m in self.metrics if not m.needs_reference) or "is,clip"
                raise ValueError(f"{','.join(needing)} compares against real images: pass --reference DIR "
                                 f"(the paper: 10,000 LAION high-resolution photos) or --metrics {rest}")
        if self.patch_px < 1:
            raise ValueError(f"--patch-size {self.patch_px}: must be at least 1 pixel (default {DEFAULT_PATCH_PX})")
        if self.patch_layout is PatchLayout.GRID and self.patches_per_image is not None:
            raise ValueError("--patches-per-image applies to --patch-layout random; the grid layout takes every "
                             "tile. Drop one of the two")
        if self.patches_per_image is not None and self.patches_per_image < 1:
            raise ValueError(f"--patches-per-image {self.patches_per_image}: must be at least 1 "
                             f"(default {DEFAULT_PATCHES_PER_IMAGE})")
        if self.patch_layout is PatchLayout.RANDOM and self.patches_per_image is None:
            object.__setattr__(self, "patches_per_image", DEFAULT_PATCHES_PER_IMAGE)
        if self.fid_features not in INCEPTION_FEATURE_DIMS:
            raise ValueError(f"--fid-features {self.fid_features}: InceptionV3 exposes "
                             f"{', '.join(map(str, INCEPTION_FEATURE_DIMS))}; 2048 is the standard FID")
        if self.is_splits < 1:
            raise ValueError(f"--is-splits {self.is_splits}: must be at least 1 (standard: {DEFAULT_IS_SPLITS})")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be at least 1")
        if any(m.needs_inception for m in self.metrics):
            check_inception_weights(self.inception_weights)
        if any(m.needs_clip for m in self.metrics):
            check_clip_model(self.clip_model)

    def has(self, metric: Metric) -> bool:
        return metric in self.metrics

    def settings(self) -> dict:
        """The settings as JSON-ready values, for metrics.json."""
        return {
            "images": str(self.images), "reference": None if self.reference is None else str(self.reference),
            "prompts": None if self.prompts is None else str(self.prompts),
            "metrics": [m.value for m in self.metrics], "patch_px": self.patch_px,
            "patch_layout": self.patch_layout.value, "patches_per_image": self.patches_per_image,
            "fid_features": self.fid_features, "is_splits": self.is_splits, "seed": self.seed,
            "inception_weights": None if self.inception_weights is None else str(self.inception_weights),
            "clip_model": None if self.clip_model is None else str(self.clip_model), "device": self.device,
        }
