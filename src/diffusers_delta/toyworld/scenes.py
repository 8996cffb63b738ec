"""Seeded synthetic scenes: 1-3 flat shapes on a plain or two-tone background, rendered with hard edges.

Scenes are data (`Scene`, `Shape`), rendering is a pure function of them, and shapes and backgrounds use disjoint
palettes, so every edit in `edits.py` is an exact function of the scene (and, where it has one, of the image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np


#: Saturated colours shapes are drawn in.
SHAPE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),  # red
    (40, 170, 60),  # green
    (40, 80, 220),  # blue
    (240, 200, 30),  # yellow
    (160, 50, 200),  # purple
    (250, 130, 20),  # orange
)
#: Pale colours backgrounds are painted in (none of them is a shape colour).
BACKGROUND_PALETTE: tuple[tuple[int, int, int], ...] = (
    (245, 245, 240),  # off-white
    (200, 225, 245),  # pale blue
    (215, 240, 210),  # pale green
    (245, 225, 200),  # sand
    (230, 215, 240),  # lavender
)
SHAPE_KINDS = ("circle", "square", "triangle")
IMAGE_SIZE = 64
#: Range of shape sizes of `generate_scene`, as a share of the image side.
SHAPE_SIZES = (0.09, 0.2)


@dataclass(frozen=True)
class Shape:
    """One flat shape.

    Args:
        kind: `"circle"`, `"square"` or `"triangle"` (pointing up).
        center: (x, y) in pixels.
        size: radius of the circle, half-side of the square, circumradius of the triangle, in pixels.
        color: an RGB colour of `SHAPE_PALETTE`.
    """

    kind: str
    center: tuple[float, float]
    size: float
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A picture: background, shapes in drawing order, and whole-image finishes applied after drawing.

    Args:
        background: one colour (plain) or two (two-tone), of `BACKGROUND_PALETTE`.
        split: for two-tone backgrounds, `"horizontal"` (top | bottom) or `"vertical"` (left | right).
        shapes: drawn in order, later ones on top.
        flipped: mirrored left-right.
        border: colour of a frame `border_width` pixels wide, or None.
        border_width: width of that frame.
        inverted: colours inverted (255 - value).
        grayscale: colours replaced by their luma.
        size: side of the square image in pixels.
        finishes: pixel operations `(name, params)` registered in `FINISHES` (by the edit families and the edit
            space), applied in order after the others.
    """

    background: tuple[tuple[int, int, int], ...]
    split: str = "horizontal"
    shapes: tuple[Shape, ...] = field(default_factory=tuple)
    flipped: bool = False
    border: tuple[int, int, int] | None = None
    border_width: int = 4
    inverted: bool = False
    grayscale: bool = False
    size: int = IMAGE_SIZE
    finishes: tuple[tuple[str, tuple], ...] = ()

    def with_shapes(self, shapes) -> "Scene":
        """The same scene (background, finish) with other shapes."""
        return replace(self, shapes=tuple(shapes))


def generate_scene(
    rng: np.random.Generator, size: int = IMAGE_SIZE, shape_sizes: tuple[float, float] = SHAPE_SIZES
) -> Scene:
    """A random scene: 1-3 shapes of distinct colours inside the frame, on a plain or two-tone background.

    Args:
        rng: the random source.
        size: image side in pixels.
        shape_sizes: the range shape sizes (`Shape.size`) are drawn from, as a share of `size`.
    """
    num_shapes = int(rng.integers(1, 4))
    colors = rng.choice(len(SHAPE_PALETTE), size=num_shapes, replace=False)
    shapes = tuple(
        Shape(
            kind=SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))],
            center=(float(rng.uniform(0.2, 0.8) * size), float(rng.uniform(0.2, 0.8) * size)),
            size=float(rng.uniform(*shape_sizes) * size),
            color=SHAPE_PALETTE[int(color)],
        )
        for color in colors
    )
    two_tone = bool(rng.integers(2))
    background = rng.choice(len(BACKGROUND_PALETTE), size=2 if two_tone else 1, replace=False)
    split = "horizontal" if rng.integers(2) else "vertical"
    return Scene(
        background=tuple(BACKGROUND_PALETTE[int(i)] for i in background), split=split, shapes=shapes, size=size
    )


def _shape_mask(shape: Shape, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pixels (centres xs, ys) inside the shape: (H, W) bool."""
    cx, cy = shape.center
    dx, dy = xs - cx, ys - cy
    if shape.kind == "circle":
        return dx * dx + dy * dy < shape.size * shape.size
    if shape.kind == "square":
        return (np.abs(dx) < shape.size) & (np.abs(dy) < shape.size)
    if shape.kind == "triangle":  # apex up; inside all three half-planes of an equilateral triangle
        r = shape.size
        apex, left, right = (0.0, -r), (-r * 0.866, r * 0.5), (r * 0.866, r * 0.5)
        inside = np.ones_like(dx, dtype=bool)
        for (x0, y0), (x1, y1) in ((apex, right), (right, left), (left, apex)):
            inside &= (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0) > 0
        return inside
    raise ValueError(f"Unknown shape kind {shape.kind!r}; expected one of {SHAPE_KINDS}.")


#: Pixel operations a scene's `finishes` name: name -> (function(image, *params[, scene=scene]), reads_scene). The
#: modules that define edits register theirs (`register_finish`), so that scenes know no edit module.
FINISHES: dict[str, tuple[Callable[..., np.ndarray], bool]] = {}


def register_finish(name: str, function: Callable[..., np.ndarray], reads_scene: bool = False) -> None:
    """Makes `function` a finish scenes can name.

    Args:
        name: the name `Scene.finishes` gives it.
        function: (H, W, 3) uint8 image, *params -> (H, W, 3) uint8 image.
        reads_scene: it also takes the scene being rendered as the keyword `scene` (to weight its effect by where
            the shapes are).
    """
    if name in FINISHES and FINISHES[name] != (function, reads_scene):
        raise ValueError(f"A finish named {name!r} is already registered.")
    FINISHES[name] = (function, reads_scene)


def shape_coverage(scene: Scene) -> np.ndarray:
    """(H, W) bool: the pixels any of the scene's shapes covers (before its finishes)."""
    ys, xs = np.mgrid[0 : scene.size, 0 : scene.size].astype(np.float64) + 0.5  # pixel centres
    covered = np.zeros((scene.size, scene.size), dtype=bool)
    for shape in scene.shapes:
        covered |= _shape_mask(shape, xs, ys)
    return covered


def luma(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 grey, ITU-R 601 weights, rounded."""
    grey = np.rint(image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def draw_border(image: np.ndarray, color: tuple[int, int, int], width: int) -> np.ndarray:
    """A copy of (H, W, 3) `image` with a `width`-pixel frame of `color`."""
    framed = image.copy()
    framed[:width], framed[-width:], framed[:, :width], framed[:, -width:] = color, color, color, color
    return framed


def render(scene: Scene) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image. Finishes apply in a fixed order: flip, border, invert, grayscale, then
    the scene's `finishes` in theirs."""
    size = scene.size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = scene.background[0]
    if len(scene.background) == 2:
        second = ys >= size / 2 if scene.split == "horizontal" else xs >= size / 2
        image[second] = scene.background[1]
    for shape in scene.shapes:
        image[_shape_mask(shape, xs, ys)] = shape.color
    if scene.flipped:
        image = image[:, ::-1].copy()
    if scene.border is not None:
        image = draw_border(image, scene.border, scene.border_width)
    if scene.inverted:
        image = 255 - image
    if scene.grayscale:
        image = luma(image)
    for name, params in scene.finishes:
        if name not in FINISHES:
            raise ValueError(f"Unknown finish {name!r}: import the module that defines it (one of toyworld's).")
        function, reads_scene = FINISHES[name]
        image = function(image, *params, scene=scene) if reads_scene else function(image, *params)
    return image
