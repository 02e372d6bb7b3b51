"""The testbed's text encoder: a caption of the scene grammar -> (prompt tokens, pooled vector), fixed, no weights.

The caption is parsed (:func:`ultragen.testbed.scenes.parse_caption`) and every part of its structure becomes
one-hot features, so the model reads exactly what the caption says and nothing else:

- token i < MAX_OBJECTS: object i (in cell order): [is object | shape | colour | cell];
- token MAX_OBJECTS: the background: [is background | tone | texture];
- the rest: padding (a single "is padding" feature), up to ``text_tokens`` (a multiple of the attention block);
- pooled: [object count | colour histogram / MAX | shape histogram / MAX | occupied cells | tone | texture].

The empty caption (classifier-free-guidance dropout) is all padding with a zero pooled vector. Features fill the
first dimensions of ``joint_dim`` / ``pooled_dim``; the rest are zero (the model's input projections are learned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ultragen.testbed.scenes import CELLS, MAX_OBJECTS, Colour, Scene, Shape, Texture, Tone, parse_caption

_KIND, _SHAPE, _COLOUR, _CELL = 3, len(Shape), len(Colour), CELLS * CELLS
_TONE, _TEXTURE = len(Tone), len(Texture)
TOKEN_FEATURES = _KIND + _SHAPE + _COLOUR + _CELL + _TONE + _TEXTURE
POOLED_FEATURES = MAX_OBJECTS + _COLOUR + _SHAPE + _CELL + _TONE + _TEXTURE


@dataclass(frozen=True)
class PromptEmbeds:
    """``embeds``: (B, text_tokens, joint_dim) float32; ``pooled``: (B, pooled_dim) float32."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PromptEmbeds:
        return PromptEmbeds(self.embeds.to(device, dtype), self.pooled.to(device, dtype))


@dataclass(frozen=True)
class SceneTextEncoder:
    """Captions -> :class:`PromptEmbeds` matching a FluxTransformer2DModel's joint_attention_dim and
    pooled_projection_dim."""

    text_tokens: int = 32
    joint_dim: int = 32
    pooled_dim: int = 32

    def __post_init__(self) -> None:
        if self.text_tokens < MAX_OBJECTS + 1:
            raise ValueError(f"text_tokens={self.text_tokens} must be >= {MAX_OBJECTS + 1} (objects + background)")
        if self.joint_dim < TOKEN_FEATURES or self.pooled_dim < POOLED_FEATURES:
            raise ValueError(f"joint_dim={self.joint_dim} and pooled_dim={self.pooled_dim} must be at least "
                             f"{TOKEN_FEATURES} and {POOLED_FEATURES} (the caption's one-hot features)")

    def __call__(self, captions: list[str]) -> PromptEmbeds:
        """Encode captions; "" is the empty (unconditional) prompt. Raises ValueError for text off the grammar."""
        return self.encode_scenes([parse_caption(c) if c.strip() else None for c in captions])

    def encode_scenes(self, scenes: list[Scene | None]) -> PromptEmbeds:
        """Encode scenes directly (None: the empty prompt); sizes, offsets and phases are not encoded."""
        embeds = torch.zeros(len(scenes), self.text_tokens, self.joint_dim)
        pooled = torch.zeros(len(scenes), self.pooled_dim)
        embeds[:, :, 2] = 1.0  # padding everywhere, overwritten below
        for b, scene in enumerate(scenes):
            if scene is not None:
                self._fill(scene, embeds[b], pooled[b])
        return PromptEmbeds(embeds, pooled)

    @staticmethod
    def _fill(scene: Scene, tokens: torch.Tensor, pooled: torch.Tensor) -> None:
        shape0, colour0 = _KIND, _KIND + _SHAPE
        cell0, tone0 = colour0 + _COLOUR, colour0 + _COLOUR + _CELL
        for i, obj in enumerate(scene.objects):
            tokens[i].zero_()
            tokens[i, 0] = 1.0
            tokens[i, shape0 + list(Shape).index(obj.shape)] = 1.0
            tokens[i, colour0 + list(Colour).index(obj.colour)] = 1.0
            tokens[i, cell0 + obj.cell] = 1.0
        bg = tokens[MAX_OBJECTS]
        bg.zero_()
        bg[1] = 1.0
        bg[tone0 + list(Tone).index(scene.background.tone)] = 1.0
        bg[tone0 + _TONE + list(Texture).index(scene.background.texture)] = 1.0

        pooled[len(scene.objects) - 1] = 1.0
        for obj in scene.objects:
            pooled[MAX_OBJECTS + list(Colour).index(obj.colour)] += 1.0 / MAX_OBJECTS
            pooled[MAX_OBJECTS + _COLOUR + list(Shape).index(obj.shape)] += 1.0 / MAX_OBJECTS
            pooled[MAX_OBJECTS + _COLOUR + _SHAPE + obj.cell] = 1.0
        rest = MAX_OBJECTS + _COLOUR + _SHAPE + _CELL
        pooled[rest + list(Tone).index(scene.background.tone)] = 1.0
        pooled[rest + _TONE + list(Texture).index(scene.background.texture)] = 1.0
