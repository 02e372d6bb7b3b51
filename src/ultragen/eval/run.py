"""One evaluation: read and check both folders, load the networks, extract every feature in one pass over each set,
compute the metrics. Nothing is written here (``ultragen.eval.report`` writes the result)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ultragen.eval.config import EvalConfig, Metric
from ultragen.eval.images import ImageRecord, load_uint8, scan_folder, size_counts
from ultragen.eval import inception
from ultragen.eval.inception import FeatureNet
from ultragen.eval.patches import Box, crop, patch_boxes
from ultragen.eval.prompts import resolve_prompts

THUMB_PX = 160  # side of a crop in the report's grid


@dataclass
class SetFeatures:
    """Everything extracted from one folder. features/logits: [N, D]/[N, K] whole images; patch_*: [M, D]/[M, K]
    over all patches; clip: [N, P] unit image embeddings; thumbs: a few uint8 [3, THUMB_PX, THUMB_PX] crops."""

    records: list[ImageRecord]
    features: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    patch_features: list[torch.Tensor] = field(default_factory=list)
    patch_logits: list[torch.Tensor] = field(default_factory=list)
    clip: list[torch.Tensor] = field(default_factory=list)
    thumbs: list[torch.Tensor] = field(default_factory=list)

    @staticmethod
    def cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.cat(parts) if parts else None


@dataclass(frozen=True)
class EvalResult:
    """metrics: the JSON record (metrics.json); per_image: {metric: [N] values} of the generated set;
    thumbs: {set: crops}; features: {set: [N, D]} whole-image features (for the report's plot), if computed."""

    metrics: dict
    per_image: dict[str, list[float]]
    thumbs: dict[str, list[torch.Tensor]]
    features: dict[str, torch.Tensor]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible; pass --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:1 or auto") from None


def evaluate(config: EvalConfig, inception_loader: Callable[..., FeatureNet] | None = None,
             clip_loader: Callable | None = None) -> EvalResult:
    """Run the evaluation of ``config``. Raises ValueError (one line, nothing written) for any bad input.
    The loaders default to ``inception.load_inception`` and ``clip.ClipEmbedder`` (looked up at call time)."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    needs_inception = any(m.needs_inception for m in config.metrics)
    needs_clip = any(m.needs_clip for m in config.metrics)
    use_reference = any(m.needs_reference for m in config.metrics)
    whole_metrics = [m.value for m in config.metrics if m in (Metric.FID, Metric.IS)]
    patch_metrics = [m.value for m in config.metrics if m.on_patches]

    generated = scan_folder(config.images, "--images")
    reference = scan_folder(config.reference, "--reference") if use_reference else []
    prompts = resolve_prompts(generated, config.prompts) if config.has(Metric.CLIP) else None
    if whole_metrics and len(size_counts(generated)) > 1:
        sizes = size_counts(generated)
        raise ValueError(f"{','.join(whole_metrics)} compare whole images, but --images mixes sizes "
                         f"({', '.join(f'{n} at {s}' for s, n in list(sizes.items())[:3])}); evaluate one size per "
                         f"folder (one method, one resolution)")
    boxes = {name: _boxes(records, config, strict=bool(patch_metrics))
             for name, records in (("generated", generated), ("reference", reference))}
    n_patches = {name: sum(len(b) for b in per_image) for name, per_image in boxes.items()}

    load = inception_loader or inception.load_inception
    net = load(config.inception_weights, config.fid_features, device) if needs_inception else None
    if net is not None:
        _check_counts(config, net.feature_dim, len(generated), len(reference), n_patches)
    from ultragen.eval.clip import ClipEmbedder

    clip = (clip_loader or ClipEmbedder)(config.clip_model, device) if needs_clip else None

    gen = _extract(generated, boxes["generated"], net, clip, config, whole=bool(whole_metrics),
                   patches=bool(patch_metrics))
    ref = _extract(reference, boxes["reference"], net, None, config, whole=config.has(Metric.FID),
                   patches=config.has(Metric.FID_PATCH))
    metrics, per_image = _compute(config, gen, ref, clip, prompts)
    record = {
        "settings": config.settings(),
        "sets": {"generated": _set_info(config.images, generated, n_patches["generated"], bool(patch_metrics))},
        "networks": {},
        "metrics": metrics,
        "per_image": [{"file": r.path.name, **{k: v[i] for k, v in per_image.items()}}
                      for i, r in enumerate(generated)] if per_image else [],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if reference:
        record["sets"]["reference"] = _set_info(config.reference, reference, n_patches["reference"],
                                                config.has(Metric.FID_PATCH))
    if net is not None:
        record["networks"]["inception"] = {"weights": str(config.inception_weights), "feature_dim": net.feature_dim}
    if clip is not None:
        record["networks"]["clip"] = {"model": str(config.clip_model)}
    features = {k: v for k, v in (("generated", SetFeatures.cat(gen.features)),
                                  ("reference", SetFeatures.cat(ref.features))) if v is not None}
    return EvalResult(record, per_image, {"generated": gen.thumbs, "reference": ref.thumbs}, features)


def _boxes(records: list[ImageRecord], config: EvalConfig, strict: bool = False) -> list[list[Box]]:
    """Crop boxes per image. strict: an image smaller than a patch is an error; else (crops for the report only)
    it gets a patch as large as it allows."""
    out = []
    for i, r in enumerate(records):
        side = config.patch_px if strict else min(config.patch_px, r.width_px, r.height_px)
        try:
            out.append(patch_boxes(r.width_px, r.height_px, i, patch_px=side, layout=config.patch_layout,
                                   patches_per_image=config.patches_per_image, seed=config.seed))
        except ValueError as error:
            raise ValueError(f"{str(r.path)!r}: {error}") from None
    return out


def _check_counts(config: EvalConfig, feature_dim: int, n_gen: int, n_ref: int, n_patches: dict[str, int]) -> None:
    from ultragen.eval.fidelity import check_fid_samples, check_is_samples

    if config.has(Metric.FID):
        check_fid_samples(n_gen, n_ref, feature_dim, "images")
    if config.has(Metric.FID_PATCH):
        check_fid_samples(n_patches["generated"], n_patches["reference"], feature_dim, "patches")
    if config.has(Metric.IS):
        check_is_samples(n_gen, config.is_splits, "images")
    if config.has(Metric.IS_PATCH):
        check_is_samples(n_patches["generated"], config.is_splits, "patches")


def _extract(records: list[ImageRecord], boxes: list[list[Box]], net: FeatureNet | None, clip, config: EvalConfig,
             *, whole: bool, patches: bool) -> SetFeatures:
    """One pass over a folder: each image is decoded once. Whole images go to the net in batches of one size."""
    out = SetFeatures(records)
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            features, logits = net(torch.stack(batch))
            out.features.append(features)
            out.logits.append(logits)
            batch.clear()

    for i, record in enumerate(records):
        image = load_uint8(record)
        if whole and net is not None:
            if batch and batch[0].shape != image.shape or len(batch) == config.batch_size:
                flush()
            batch.append(image)
        if patches and net is not None:
            crops = crop(image, boxes[i])
            for start in range(0, len(crops), config.batch_size):
                features, logits = net(crops[start:start + config.batch_size])
                out.patch_features.append(features)
                out.patch_logits.append(logits)
        if clip is not None:
            out.clip.append(clip.images(image[None]))
        if len(out.thumbs) < config.sample_crops and boxes[i]:
            out.thumbs.append(_thumb(crop(image, boxes[i][:1])[0]))
    flush()
    return out


def _thumb(patch: torch.Tensor) -> torch.Tensor:
    """uint8 [3, s, s] -> uint8 [3, THUMB_PX, THUMB_PX] (area average down, nearest up)."""
    x = patch[None].float()
    mode = "area" if patch.shape[-1] >= THUMB_PX else "nearest"
    return torch.nn.functional.interpolate(x, size=(THUMB_PX, THUMB_PX), mode=mode)[0].round().clamp(0, 255).byte()


def _compute(config: EvalConfig, gen: SetFeatures, ref: SetFeatures, clip,
             prompts: list[str] | None) -> tuple[dict, dict[str, list[float]]]:
    from ultragen.eval.clip_metrics import CLIPIQA_PROMPTS, clip_iqa_scores, clip_scores
    from ultragen.eval.fidelity import frechet_distance, inception_score

    metrics: dict = {}
    per_image: dict[str, list[float]] = {}
    patch_settings = {"patch_px": config.patch_px, "layout": config.patch_layout.value,
                      "patches_per_image": config.patches_per_image, "seed": config.seed}
    if config.has(Metric.FID):
        g, r = SetFeatures.cat(gen.features), SetFeatures.cat(ref.features)
        metrics["fid"] = {"value": frechet_distance(g, r), "generated_samples": len(g), "reference_samples": len(r),
                          "feature_dim": g.shape[1], "unit": "images"}
    if config.has(Metric.IS):
        logits = SetFeatures.cat(gen.logits)
        mean, std = inception_score(logits, config.is_splits, config.seed)
        metrics["is"] = {"value": mean, "std_over_splits": std, "samples": len(logits), "splits": config.is_splits,
                         "unit": "images"}
    if config.has(Metric.FID_PATCH):
        g, r = SetFeatures.cat(gen.patch_features), SetFeatures.cat(ref.patch_features)
        metrics["fid_patch"] = {"value": frechet_distance(g, r), "generated_samples": len(g),
                                "reference_samples": len(r), "feature_dim": g.shape[1], "unit": "patches",
                                **patch_settings}
    if config.has(Metric.IS_PATCH):
        logits = SetFeatures.cat(gen.patch_logits)
        mean, std = inception_score(logits, config.is_splits, config.seed)
        metrics["is_patch"] = {"value": mean, "std_over_splits": std, "samples": len(logits),
                               "splits": config.is_splits, "unit": "patches", **patch_settings}
    if clip is not None:
        image_embeds = SetFeatures.cat(gen.clip)
        if config.has(Metric.CLIP):
            scores = clip_scores(image_embeds, clip.texts(prompts))
            per_image["clip"] = scores.tolist()
            metrics["clip"] = {"value": float(scores.mean()), "std": float(scores.std()) if len(scores) > 1 else 0.0,
                               "samples": len(scores), "unit": "images",
                               "scale": "100 * max(cosine, 0) per image (the paper's table: cosine, i.e. / 100)"}
        if config.has(Metric.CLIPIQA):
            scores = clip_iqa_scores(image_embeds, clip.texts(list(CLIPIQA_PROMPTS)))
            per_image["clipiqa"] = scores.tolist()
            metrics["clipiqa"] = {"value": float(scores.mean()),
                                  "std": float(scores.std()) if len(scores) > 1 else 0.0,
                                  "samples": len(scores), "unit": "images", "prompts": list(CLIPIQA_PROMPTS)}
    order = [m.value for m in Metric]
    return dict(sorted(metrics.items(), key=lambda kv: order.index(kv[0]))), per_image


def _set_info(folder: Path, records: list[ImageRecord], n_patches: int, patched: bool) -> dict:
    info = {"folder": str(folder), "images": len(records), "sizes": size_counts(records)}
    if patched:
        info["patches"] = n_patches
    return info
