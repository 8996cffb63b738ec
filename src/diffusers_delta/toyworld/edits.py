"""Edits of toy scenes that are exact functions of the scene, so the true edited image of any query is known.

Each `Edit` transforms a `Scene`; those that also have a pixel form (`image_fn`) give the same image either way,
which the tests check. The edits are split into *seen* ones (for training) and *unseen* ones (for evaluation only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .scenes import BACKGROUND_PALETTE, SHAPE_PALETTE, Scene, draw_border, luma


BORDER_COLOR = (30, 30, 30)
# Shape colours swap in pairs (red <-> blue, green <-> yellow, purple <-> orange); backgrounds rotate by one.
RECOLOR_MAP = {
    SHAPE_PALETTE[0]: SHAPE_PALETTE[2],
    SHAPE_PALETTE[2]: SHAPE_PALETTE[0],
    SHAPE_PALETTE[1]: SHAPE_PALETTE[3],
    SHAPE_PALETTE[3]: SHAPE_PALETTE[1],
    SHAPE_PALETTE[4]: SHAPE_PALETTE[5],
    SHAPE_PALETTE[5]: SHAPE_PALETTE[4],
}
BACKGROUND_MAP = {
    color: BACKGROUND_PALETTE[(index + 1) % len(BACKGROUND_PALETTE)] for index, color in enumerate(BACKGROUND_PALETTE)
}


@dataclass(frozen=True)
class Edit:
    """An edit of toy scenes.

    Args:
        name: short identifier.
        description: what it does, in words.
        scene_fn: the edit on scenes.
        image_fn: the same edit on (H, W, 3) uint8 images of generated scenes, where it has a pixel form.
        instruction: for edits of `families`, the structured instruction: `(family, parameters)` of each step.
    """

    name: str
    description: str
    scene_fn: Callable[[Scene], Scene]
    image_fn: Callable[[np.ndarray], np.ndarray] | None = None
    instruction: tuple[tuple[str, tuple], ...] = ()

    def __call__(self, scene: Scene) -> Scene:
        return self.scene_fn(scene)


def _map_colors(image: np.ndarray, mapping: dict) -> np.ndarray:
    """Replaces each colour of `mapping` by its image, pixel by pixel (all at once, so swaps stay swaps)."""
    edited = image.copy()
    for source, target in mapping.items():
        edited[(image == source).all(axis=-1)] = target
    return edited


def _recolor(scene: Scene) -> Scene:
    return scene.with_shapes(replace(shape, color=RECOLOR_MAP[shape.color]) for shape in scene.shapes)


def _swap_background(scene: Scene) -> Scene:
    return replace(scene, background=tuple(BACKGROUND_MAP[color] for color in scene.background))


def _enlarge(scene: Scene) -> Scene:
    return scene.with_shapes(replace(shape, size=shape.size * 1.5) for shape in scene.shapes)


def _move(scene: Scene) -> Scene:
    shift = 0.2 * scene.size
    return scene.with_shapes(
        replace(shape, center=(shape.center[0] + shift, shape.center[1])) for shape in scene.shapes
    )


EDITS: dict[str, Edit] = {
    edit.name: edit
    for edit in (
        Edit("recolor", "shape colours swap in pairs: red-blue, green-yellow, purple-orange", _recolor,
             lambda image: _map_colors(image, RECOLOR_MAP)),
        Edit("background", "the background changes to the next pale colour", _swap_background,
             lambda image: _map_colors(image, BACKGROUND_MAP)),
        Edit("grayscale", "the picture turns grey", lambda scene: replace(scene, grayscale=True), luma),
        Edit("border", "a dark frame is drawn around the picture", lambda scene: replace(scene, border=BORDER_COLOR),
             lambda image: draw_border(image, BORDER_COLOR, 4)),
        Edit("flip", "the picture is mirrored left-right", lambda scene: replace(scene, flipped=not scene.flipped),
             lambda image: image[:, ::-1].copy()),
        Edit("invert", "the colours are inverted", lambda scene: replace(scene, inverted=not scene.inverted),
             lambda image: 255 - image),
        Edit("enlarge", "every shape grows 1.5 times about its centre", _enlarge),
        Edit("move", "every shape moves right by a fifth of the picture", _move),
    )
}  # fmt: skip
SEEN_EDITS = ("recolor", "background", "grayscale", "border")
UNSEEN_EDITS = ("invert", "flip", "enlarge", "move")
