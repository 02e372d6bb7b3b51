"""Procedural scenes: coloured shapes on a 3x3 grid over a textured background, with captions from a small grammar.

A :class:`Scene` is a frozen value: the caption is derived from it, the image is rendered from it, and it is the
ground truth the detector (:mod:`ultragen.testbed.metrics`) is scored against. Geometry is in *scene units*: the
image is the unit square, x to the right and y downward, so one scene renders at any resolution and the 4x render
box-downsampled matches the base render (both are anti-aliased by supersampling the exact shapes).

Grammar (every caption parses back with :func:`parse_caption`)::

    caption    := group (", " group)* ", on a " background
    group      := count " " colour " " shape["s"] " at " cell (" and " cell)*
    count      := "a" | "two" | "three" | "four"
    background := [texture " "] tone " background"      e.g. "striped dark background", "grey background"

Objects of one (colour, shape) form one group; every object sits in its own grid cell. The background texture has a
fixed frequency in scene units (cycles across the image) and a random phase, chosen so its edges do not line up
with window borders.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

import numpy as np

MAX_OBJECTS = 4
CELLS = 3  # the grid is CELLS x CELLS


class Shape(str, Enum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"


class Colour(str, Enum):
    """Object colours: saturated and far apart, and far from every background tone (the detector relies on it)."""

    RED = "red"
    GREEN = "green"
    BLUE = "blue"
    YELLOW = "yellow"
    MAGENTA = "magenta"

    @property
    def rgb(self) -> tuple[float, float, float]:
        return _RGB[self]


_RGB = {
    Colour.RED: (0.90, 0.12, 0.10),
    Colour.GREEN: (0.10, 0.75, 0.20),
    Colour.BLUE: (0.15, 0.30, 0.95),
    Colour.YELLOW: (0.95, 0.85, 0.10),
    Colour.MAGENTA: (0.85, 0.15, 0.85),
}


class Tone(str, Enum):
    """Background base tones (greys): no object colour is near them."""

    DARK = "dark"
    GREY = "grey"
    LIGHT = "light"

    @property
    def level(self) -> float:
        return {Tone.DARK: 0.22, Tone.GREY: 0.45, Tone.LIGHT: 0.68}[self]


class Texture(str, Enum):
    PLAIN = "plain"
    STRIPED = "striped"  # vertical stripes
    CHECKERED = "checkered"


TEXTURE_CONTRAST = 0.10  # the texture swings the tone by +-this much
TEXTURE_CYCLES = (11, 13, 15)  # cycles across the image: odd, so edges rarely meet power-of-two window borders
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = ("a", "two", "three", "four")
SIZE_RANGE = (0.08, 0.12)  # object half-extent, fraction of the image side (a cell is 1/3)
JITTER = 0.03  # max offset of an object's centre from its cell centre, fraction of the image side


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``cell``: 0..8 in raster order; ``size``: half-extent (circle radius, square half side, triangle
    circumradius scaled to the same height) in image sides; ``offset``: (dx, dy) of the centre from the cell centre."""

    shape: Shape
    colour: Colour
    cell: int
    size: float = 0.11
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", Shape(self.shape))
        object.__setattr__(self, "colour", Colour(self.colour))
        if not 0 <= self.cell < CELLS * CELLS:
            raise ValueError(f"cell={self.cell} must be in 0..{CELLS * CELLS - 1} (raster order on the 3x3 grid)")
        if not 0.02 <= self.size <= 0.12:
            raise ValueError(f"size={self.size} must be in [0.02, 0.12] image sides, to stay inside its cell")
        if max(abs(v) for v in self.offset) + self.extent > 0.5 / CELLS + 1e-9:
            raise ValueError(f"offset={self.offset} with size={self.size} leaves cell {self.cell}; shrink either")

    @property
    def extent(self) -> float:
        """Largest distance of the shape from its centre along x or y, in image sides."""
        return self.size * (2 / np.sqrt(3) if self.shape is Shape.TRIANGLE else 1.0)

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) in image sides."""
        row, col = divmod(self.cell, CELLS)
        return (col + 0.5) / CELLS + self.offset[0], (row + 0.5) / CELLS + self.offset[1]


@dataclass(frozen=True)
class Background:
    tone: Tone = Tone.GREY
    texture: Texture = Texture.PLAIN
    cycles: int = TEXTURE_CYCLES[0]  # texture periods across the image side
    phase: float = 0.0  # fraction of one period

    def __post_init__(self) -> None:
        object.__setattr__(self, "tone", Tone(self.tone))
        object.__setattr__(self, "texture", Texture(self.texture))
        if self.cycles < 1:
            raise ValueError(f"cycles={self.cycles} must be >= 1 texture period across the image")


@dataclass(frozen=True)
class Scene:
    """Objects (1..MAX_OBJECTS, each in its own cell, listed in cell order) on a background."""

    objects: tuple[SceneObject, ...]
    background: Background = Background()

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects, key=lambda o: o.cell))
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(objects)}")
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects share a grid cell ({cells}); every object needs its own cell")

    @property
    def caption(self) -> str:
        return caption(self)


def sample_scene(seed: int) -> Scene:
    """The scene of ``seed`` (the same on every machine and Python version: ``random.Random`` is specified)."""
    rng = random.Random(seed)
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(CELLS * CELLS), n)
    kinds = [(rng.choice(list(Colour)), rng.choice(list(Shape)))]
    objects = []
    for cell in cells:
        if rng.random() < 0.4:  # repeat an earlier kind, so counts above one are common
            colour, shape = rng.choice(kinds)
        else:
            colour, shape = rng.choice(list(Colour)), rng.choice(list(Shape))
            kinds.append((colour, shape))
        size = rng.uniform(*SIZE_RANGE)
        room = min(JITTER, 0.5 / CELLS - SceneObject(shape, colour, cell, size).extent)
        offset = (rng.uniform(-room, room), rng.uniform(-room, room))
        objects.append(SceneObject(shape, colour, cell, size, offset))
    background = Background(rng.choice(list(Tone)), rng.choice(list(Texture)), rng.choice(TEXTURE_CYCLES),
                            rng.random())
    return Scene(tuple(objects), background)


# --- captions -------------------------------------------------------------------------------------------------
def caption(scene: Scene) -> str:
    """The scene in words (groups in order of first appearance by cell); :func:`parse_caption` inverts it."""
    groups: dict[tuple[Colour, Shape], list[int]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj.cell)
    parts = []
    for (colour, shape), cells in groups.items():
        noun = shape.value + ("s" if len(cells) > 1 else "")
        parts.append(f"{COUNT_WORDS[len(cells) - 1]} {colour.value} {noun} at "
                     + " and ".join(CELL_NAMES[c] for c in cells))
    bg = scene.background
    texture = "" if bg.texture is Texture.PLAIN else bg.texture.value + " "
    return ", ".join(parts) + f", on a {texture}{bg.tone.value} background"


def parse_caption(text: str) -> Scene:
    """Caption -> Scene with default sizes, offsets, texture cycles and phase (the caption does not say them).

    Raises ValueError naming the part that does not follow the grammar."""
    text = text.strip()
    head, sep, background = text.rpartition(", on a ")
    if not sep or not background.endswith(" background"):
        raise ValueError(f"caption {text!r} must end with ', on a [texture] <tone> background'")
    objects = [obj for part in head.split(", ") for obj in _parse_group(part)]
    return Scene(tuple(objects), _parse_background(background[: -len(" background")]))


def _parse_group(part: str) -> list[SceneObject]:
    words, sep, where = part.partition(" at ")
    tokens = words.split()
    if not sep or len(tokens) != 3 or tokens[0] not in COUNT_WORDS:
        raise ValueError(f"group {part!r} must read '<count> <colour> <shape> at <cell>[ and <cell>...]', "
                         f"count one of {COUNT_WORDS}")
    count = COUNT_WORDS.index(tokens[0]) + 1
    colour = _enum(Colour, tokens[1], part)
    shape = _enum(Shape, tokens[2][:-1] if count > 1 and tokens[2].endswith("s") else tokens[2], part)
    cells = where.split(" and ")
    if len(cells) != count or any(c not in CELL_NAMES for c in cells):
        raise ValueError(f"group {part!r} names {len(cells)} cells for count {count}; cells are {CELL_NAMES}")
    return [SceneObject(shape, colour, CELL_NAMES.index(c)) for c in cells]


def _parse_background(words: str) -> Background:
    tokens = words.split()
    if len(tokens) == 1:
        return Background(_enum(Tone, tokens[0], words))
    if len(tokens) == 2 and tokens[0] != Texture.PLAIN.value:
        return Background(_enum(Tone, tokens[1], words), _enum(Texture, tokens[0], words))
    raise ValueError(f"background {words!r} must be '[striped|checkered] <tone>'")


def _enum(kind: type[Enum], word: str, context: str):
    try:
        return kind(word)
    except ValueError:
        raise ValueError(f"{word!r} in {context!r} is not a {kind.__name__.lower()}; "
                         f"use one of {[k.value for k in kind]}") from None


# --- rendering ------------------------------------------------------------------------------------------------
def render(scene: Scene, size_px: int, supersample: int = 4) -> np.ndarray:
    """The scene as a (size_px, size_px, 3) float32 RGB image in [0, 1].

    Each pixel averages ``supersample**2`` point samples of the exact shapes and texture (box-filter anti-aliasing),
    so a render at 4x the size, box-downsampled by 4, equals a render with 4x the supersampling."""
    if size_px < 1 or supersample < 1:
        raise ValueError(f"size_px={size_px} and supersample={supersample} must be >= 1")
    n = size_px * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    x, y = coords[None, :], coords[:, None]
    image = np.broadcast_to(_background(scene.background, x, y), (n, n, 3)).copy()
    for obj in scene.objects:
        image[_inside(obj, x, y)] = obj.colour.rgb
    image = image.reshape(size_px, supersample, size_px, supersample, 3).mean(axis=(1, 3))
    return image.astype(np.float32)


def _background(bg: Background, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if bg.texture is Texture.PLAIN:
        level = np.full((1, 1), bg.tone.level)
    else:
        u = np.floor(x * bg.cycles + bg.phase).astype(np.int64)
        if bg.texture is Texture.CHECKERED:
            u = u + np.floor(y * bg.cycles + bg.phase).astype(np.int64)
        level = bg.tone.level + TEXTURE_CONTRAST * np.where(u % 2 == 0, 1.0, -1.0)
    return np.repeat(level[..., None], 3, axis=-1)


def _inside(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bool (n, n): which sample points the object covers."""
    cx, cy = obj.centre
    dx, dy = x - cx, y - cy
    s = obj.size
    if obj.shape is Shape.CIRCLE:
        return dx * dx + dy * dy <= s * s
    if obj.shape is Shape.SQUARE:
        s = s * 0.9  # a square of half side 0.9 s has about the circle's area
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    # upward triangle, apex at (0, -s), base at y = +s with half width s * 2/sqrt(3) (equilateral)
    half = s * 2 / np.sqrt(3)
    return (dy <= s) & (np.abs(dx) <= half * (dy + s) / (2 * s))
