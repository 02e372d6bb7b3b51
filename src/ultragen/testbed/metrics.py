"""Rule-based evaluation of testbed images: a GenEval-like object detector, seam strength and guide agreement.

Detector: the image is box-downsampled to ``analysis_px`` (so every resolution is judged alike), each pixel gets
the nearest palette colour if it is within ``colour_tol`` (RGB distance) of it, else background; connected
components of each colour (8-connectivity) above ``min_area`` become objects. Shape from the fill ratio of the
bounding box (square ~1, circle pi/4, triangle 1/2), cell from the centroid on the 3x3 grid.

Scores against the ground-truth :class:`~ultragen.testbed.scenes.Scene` (micro-averaged over a set of images):

- ``count_acc``: fraction of images with exactly as many detected objects as the scene has;
- ``color_acc``: fraction of scene objects matched by a detection of the same colour and shape (attribute binding);
- ``position_acc``: fraction of scene objects matched by a detection of the same colour, shape and grid cell.

``seam_ratio``: mean squared pixel difference across window borders over that across the other token borders
(1: no seams). ``guide_psnr``: PSNR of the output box-downsampled to the guide's size against the guide.
``detail_ratio``: energy of what the output adds above the guide's resolution, over the same for clean renders of
the same scenes at the output size (1: as much fine detail as the true image; a blurred upsample of the guide is
far below 1). The accuracies and the guide PSNR reward fidelity to the guide; this is what rewards the detail a
high-resolution image exists for.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ultragen.testbed.scenes import CELLS, Colour, Scene, Shape

PALETTE = torch.tensor([c.rgb for c in Colour], dtype=torch.float32)  # (n_colours, 3)


@dataclass(frozen=True)
class DetectorConfig:
    analysis_px: int = 128  # images are judged at this size (box-downsampled when larger)
    colour_tol: float = 0.3  # RGB distance within which a pixel takes a palette colour
    min_area: float = 0.004  # smallest object, fraction of the image (the smallest rendered one is ~0.015)
    square_fill: float = 0.88  # fill ratio of the bounding box above which a component is a square
    triangle_fill: float = 0.66  # ... below which it is a triangle (circles in between)

    def __post_init__(self) -> None:
        if self.analysis_px < 3 * CELLS or not 0 < self.colour_tol or not 0 < self.min_area < 1:
            raise ValueError(f"bad detector settings {self}: analysis_px >= {3 * CELLS}, colour_tol > 0, "
                             f"0 < min_area < 1")
        if not 0 < self.triangle_fill < self.square_fill < 1:
            raise ValueError(f"need 0 < triangle_fill={self.triangle_fill} < square_fill={self.square_fill} < 1")


@dataclass(frozen=True)
class Detection:
    shape: Shape
    colour: Colour
    cell: int
    area: float  # fraction of the image
    fill: float  # area / bounding-box area


@dataclass(frozen=True)
class SceneScores:
    count_acc: float
    color_acc: float
    position_acc: float
    images: int
    objects: int


def box_downsample(images: torch.Tensor, size_px: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size_px, size_px) by area averaging (exact box filter when H is a multiple)."""
    if images.shape[-1] == size_px and images.shape[-2] == size_px:
        return images
    return F.adaptive_avg_pool2d(images, size_px)


def detect(image: torch.Tensor, config: DetectorConfig = DetectorConfig()) -> list[Detection]:
    """Objects in one (3, H, W) image in [0, 1] (square; any resolution)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    size = min(config.analysis_px, image.shape[-1])
    small = box_downsample(image[None].float(), size)[0]
    dist = ((small.flatten(1).T[:, None, :] - PALETTE) ** 2).sum(-1).sqrt()  # (pixels, n_colours)
    nearest = dist.argmin(dim=1)
    label = torch.where(dist.min(dim=1).values <= config.colour_tol, nearest, -1).view(size, size)
    detections = []
    for c, colour in enumerate(Colour):
        components = _components(label == c)
        for comp in range(1, int(components.max()) + 1):
            mask = components == comp
            if mask.sum() >= config.min_area * size * size:
                detections.append(_describe(mask, colour, config))
    return detections


def _components(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) bool -> (H, W) int64 component ids 1..n (0 outside), 8-connectivity, by max-label propagation."""
    h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * mask  # exact below 2**24
    m = mask.view(1, 1, h, w)
    while True:
        grown = F.max_pool2d(ids, 3, stride=1, padding=1) * m
        if torch.equal(grown, ids):
            break
        ids = grown
    _, dense = torch.unique(ids.view(h, w), return_inverse=True)  # 0 stays 0: it is the smallest value
    return dense if bool((~mask).any()) else dense + 1


def _describe(mask: torch.Tensor, colour: Colour, config: DetectorConfig) -> Detection:
    size = mask.shape[-1]
    rows, cols = torch.nonzero(mask, as_tuple=True)
    area = rows.numel()
    box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
    fill = area / box
    if fill >= config.square_fill:
        shape = Shape.SQUARE
    elif fill <= config.triangle_fill:
        shape = Shape.TRIANGLE
    else:
        shape = Shape.CIRCLE
    cy, cx = (float(rows.float().mean()) + 0.5) / size, (float(cols.float().mean()) + 0.5) / size
    cell = min(int(cy * CELLS), CELLS - 1) * CELLS + min(int(cx * CELLS), CELLS - 1)
    return Detection(shape, colour, cell, area / size**2, fill)


def score(scenes: list[Scene], detections: list[list[Detection]]) -> SceneScores:
    """Count, colour and position accuracy of detections against their scenes (see the module docstring)."""
    if len(scenes) != len(detections) or not scenes:
        raise ValueError(f"need one detection list per scene, got {len(scenes)} scenes, {len(detections)} lists")
    counts = colours = positions = objects = 0
    for scene, found in zip(scenes, detections):
        counts += len(found) == len(scene.objects)
        objects += len(scene.objects)
        colours += _matched(Counter((o.colour, o.shape) for o in scene.objects), Counter((d.colour, d.shape)
                                                                                       for d in found))
        positions += _matched(Counter((o.colour, o.shape, o.cell) for o in scene.objects),
                              Counter((d.colour, d.shape, d.cell) for d in found))
    return SceneScores(counts / len(scenes), colours / objects, positions / objects, len(scenes), objects)


def _matched(truth: Counter, found: Counter) -> int:
    return sum(min(n, found[key]) for key, n in truth.items())


def seam_ratio(images: torch.Tensor, window_px: int, token_px: int = 1) -> float:
    """Seam strength of (B, C, H, W) images generated with ``window_px``-pixel windows (pooled over the batch).

    Squared differences of horizontally and vertically adjacent pixels (summed over channels): mean over the pairs
    that straddle a window border divided by the mean over the pairs that straddle a token border but no window
    border (every other pair when ``token_px`` is 1). Comparing with token borders keeps the blockiness of a
    model's patches (present at every token border) from counting as a window seam. ~1 without seams."""
    if window_px < 2 or window_px % token_px or (images.shape[-1] <= window_px and images.shape[-2] <= window_px):
        raise ValueError(f"window_px={window_px} must be >= 2, a multiple of token_px={token_px} and smaller than "
                         f"the image {tuple(images.shape[-2:])}")
    x = images.double()
    border_sum, border_n, inner_sum, inner_n = 0.0, 0, 0.0, 0
    for diff, dim in ((x[..., :, 1:] - x[..., :, :-1], -1), (x[..., 1:, :] - x[..., :-1, :], -2)):
        energy = (diff**2).sum(dim=1).movedim(dim, -1)  # (B, other axis, pairs along this axis)
        after = torch.arange(1, energy.shape[-1] + 1)  # index of the pixel after each pair
        on_border = after % window_px == 0
        reference = (after % token_px == 0) & ~on_border
        border_sum += float(energy[..., on_border].sum())
        border_n += energy[..., on_border].numel()
        inner_sum += float(energy[..., reference].sum())
        inner_n += energy[..., reference].numel()
    inner = inner_sum / inner_n
    return math.inf if inner == 0 else (border_sum / border_n) / inner


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image tensors in [0, 1] of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def guide_psnr(images: torch.Tensor, guides: torch.Tensor) -> float:
    """PSNR of (B, 3, H, W) outputs box-downsampled to the (B, 3, h, w) guide images' size."""
    return psnr_db(box_downsample(images.clamp(0, 1), guides.shape[-1]), guides.clamp(0, 1))


def high_frequency_energy(images: torch.Tensor, factor: int) -> float:
    """Mean squared residual of (B, C, H, W) images after removing what a ``factor``-times smaller image carries:
    ``x - bilinear_up(box_down(x))`` (the bilinear reconstruction keeps a smooth image's residual near 0)."""
    if factor < 2 or images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"factor={factor} must be >= 2 and divide the image size {tuple(images.shape[-2:])}")
    x = images.double()
    low = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)
    return float(((x - low) ** 2).mean())


def detail_ratio(images: torch.Tensor, clean: torch.Tensor | float, factor: int) -> float:
    """High-frequency energy (above 1/``factor`` of the resolution) of (B, 3, H, W) outputs over that of clean
    renders of the same scenes, both pooled over the batch. ~1: true-to-life detail; << 1: blurred; > 1: noise.
    ``clean`` may be given as its ``high_frequency_energy`` (to score several outputs against one reference)."""
    if isinstance(clean, torch.Tensor):
        if images.shape != clean.shape:
            raise ValueError(f"outputs {tuple(images.shape)} and clean renders {tuple(clean.shape)} must match")
        clean = high_frequency_energy(clean.clamp(0, 1), factor)
    return math.inf if clean == 0 else high_frequency_energy(images.clamp(0, 1), factor) / clean


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float array (a render) -> (3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
