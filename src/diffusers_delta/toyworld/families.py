"""Toy world 2: edit families with parameters, so that the exemplar, not a label, says which edit is meant.

A family is a kind of edit (recolour one colour into another, shift the brightness, move the shapes, add a shape,
draw a frame...) and its parameter values; `FAMILIES["brightness"].edit(-40)` is one `Edit`, an exact function of
scenes. Edits of the picture's pixels add a finish (`PIXEL_OPS`) that the renderer applies, so every edit and every
composition of two stays an exact function of the scene, and the true edit of any query is known.

The splits are fixed here (and tested disjoint). S2 holds out a value only of a parameter whose other values S1
trains on at least two of: from one value an adapter learns a fixed mode, not how to read the parameter (a flip seen
only horizontally), so flip trains both directions and holds out neither, and frames train two colours. Recolouring
is the one colour edit of shapes: a shift of every shape's hue round the palette, shown on a scene of one colour, is
the same pair as a recolouring, so an exemplar could not tell the two apart.

| split | edits | used for |
| --- | --- | --- |
| S1 | seen families, seen parameter values, new scenes | training the adapter (its only data) |
| S2 | seen families, held-out parameter values | does the adapter read the parameter from the exemplar? |
| S3 | held-out families, every value | does it transfer to kinds of edit it never saw? |
| S4 | held-out compositions of two seen families (seen values) | does it compose? |
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .edits import Edit
from .scenes import (
    BACKGROUND_PALETTE,
    IMAGE_SIZE,
    SHAPE_KINDS,
    SHAPE_PALETTE,
    Scene,
    Shape,
    draw_border,
    generate_scene,
    luma,
    register_finish,
)


COLOR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange")  # SHAPE_PALETTE, in order
BACKGROUND_NAMES = ("off-white", "pale blue", "pale green", "sand", "lavender")  # BACKGROUND_PALETTE, in order
DOMAINS = ("colour", "tone", "geometry", "content", "framing")
#: World 2 draws bigger shapes than the shipped world, so that edits of one shape (recolour, add, remove, change its
#: kind) change enough pixels to be measured above the VAE's reconstruction floor.
FAMILY_SHAPE_SIZES = (0.15, 0.28)
ADDED_SHAPE_SIZE = 0.2


def generate_family_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """A random scene of toy world 2: `generate_scene` with `FAMILY_SHAPE_SIZES`."""
    return generate_scene(rng, size, shape_sizes=FAMILY_SHAPE_SIZES)


# ----------------------------------------------------------------------------------------------- pixel operations


def _blend_grey(image: np.ndarray, amount: float) -> np.ndarray:
    """A `amount` of the way to grey: (H, W, 3) uint8 -> (H, W, 3) uint8."""
    mixed = (1.0 - amount) * image.astype(np.float64) + amount * luma(image).astype(np.float64)
    return np.rint(mixed).astype(np.uint8)


def _brightness(image: np.ndarray, delta: int) -> np.ndarray:
    return np.clip(image.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    stretched = np.rint((image.astype(np.float64) - 128.0) * factor + 128.0)
    return np.clip(stretched, 0, 255).astype(np.uint8)


def _invert_channels(image: np.ndarray, channels: tuple[int, ...]) -> np.ndarray:
    inverted = image.copy()
    inverted[..., list(channels)] = 255 - image[..., list(channels)]
    return inverted


def _posterize(image: np.ndarray, levels: int) -> np.ndarray:
    steps = np.rint(image.astype(np.float64) / 255.0 * (levels - 1))
    return np.rint(steps * 255.0 / (levels - 1)).astype(np.uint8)


def _flip(image: np.ndarray, axis: str) -> np.ndarray:
    return (image[:, ::-1] if axis == "horizontal" else image[::-1]).copy()


def _rotate(image: np.ndarray, quarter_turns: int) -> np.ndarray:
    return np.rot90(image, k=quarter_turns).copy()  # counter-clockwise


def _frame(image: np.ndarray, width: int, color: tuple[int, int, int]) -> np.ndarray:
    return draw_border(image, color, width)


def _zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """The centre 1/`factor` of the picture, enlarged back to its size (nearest neighbour, exact)."""
    size = image.shape[0]
    index = np.floor((np.arange(size) + 0.5) / factor + size * (1 - 1 / factor) / 2).astype(int)
    return image[np.ix_(index, index)].copy()


#: Pixel operations an edit can add to a scene as a finish: name -> function(image, *params).
PIXEL_OPS: dict[str, Callable[..., np.ndarray]] = {
    "grey": _blend_grey,
    "brightness": _brightness,
    "contrast": _contrast,
    "invert": _invert_channels,
    "posterize": _posterize,
    "flip": _flip,
    "rotate": _rotate,
    "frame": _frame,
    "zoom": _zoom,
}
for _name, _function in PIXEL_OPS.items():
    register_finish(_name, _function)


def _finish(name: str, *params) -> Callable[[Scene], Scene]:
    return lambda scene: replace(scene, finishes=scene.finishes + ((name, params),))


# ----------------------------------------------------------------------------------------------- scene edits


def _recolor(source: int, target: int) -> Callable[[Scene], Scene]:
    old, new = SHAPE_PALETTE[source], SHAPE_PALETTE[target]
    return lambda scene: scene.with_shapes(replace(s, color=new) if s.color == old else s for s in scene.shapes)


def _background(target: int) -> Callable[[Scene], Scene]:
    return lambda scene: replace(scene, background=(BACKGROUND_PALETTE[target],))


def _scale(factor: float) -> Callable[[Scene], Scene]:
    return lambda scene: scene.with_shapes(replace(s, size=s.size * factor) for s in scene.shapes)


def _translate(dx: float, dy: float) -> Callable[[Scene], Scene]:
    def move(scene: Scene) -> Scene:
        offset = (dx * scene.size, dy * scene.size)
        return scene.with_shapes(
            replace(s, center=(s.center[0] + offset[0], s.center[1] + offset[1])) for s in scene.shapes
        )

    return move


def _remove(kind: str) -> Callable[[Scene], Scene]:
    return lambda scene: scene.with_shapes(s for s in scene.shapes if s.kind != kind)


def _add(kind: str, color: int, x: float, y: float) -> Callable[[Scene], Scene]:
    def add(scene: Scene) -> Scene:
        shape = Shape(kind, (x * scene.size, y * scene.size), ADDED_SHAPE_SIZE * scene.size, SHAPE_PALETTE[color])
        return scene.with_shapes((*scene.shapes, shape))  # on top

    return add


def _change_kind(source: str, target: str) -> Callable[[Scene], Scene]:
    return lambda scene: scene.with_shapes(replace(s, kind=target) if s.kind == source else s for s in scene.shapes)


# ----------------------------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """A kind of edit and its parameter values.

    Args:
        name: short identifier.
        domain: one of `DOMAINS`.
        build: parameters -> the edit on scenes.
        describe: parameters -> the edit's name, in words (`"recolor(red→blue)"`).
        seen_values: parameter tuples of S1 (for a held-out family: empty).
        held_out_values: parameter tuples of S2 (for a held-out family: all of S3).
        image_form: parameters -> the same edit on images of generated scenes, where it has one.
        features: parameters -> numbers that say them (one-hot choices, scaled amounts), for the structured
            instruction the base editor reads (`instruction_vector`).
    """

    name: str
    domain: str
    build: Callable[..., Callable[[Scene], Scene]]
    describe: Callable[..., str]
    seen_values: tuple[tuple, ...]
    held_out_values: tuple[tuple, ...]
    image_form: Callable[..., Callable[[np.ndarray], np.ndarray]] | None = None
    features: Callable[..., tuple[float, ...]] = lambda *params: tuple(float(p) for p in params)

    def edit(self, *params) -> Edit:
        """The edit of these parameter values."""
        image_fn = self.image_form(*params) if self.image_form is not None else None
        description = f"{self.domain} edit: {self.name} {self.describe(*params)}"
        name = f"{self.name}({self.describe(*params)})"
        return Edit(name, description, self.build(*params), image_fn, instruction=((self.name, params),))


def _pixel_family(name, domain, op, describe, seen, held_out, features=None) -> Family:
    return Family(
        name,
        domain,
        lambda *params: _finish(op, *params),
        describe,
        tuple(seen),
        tuple(held_out),
        lambda *params: lambda image: PIXEL_OPS[op](image, *params),
        **({"features": features} if features else {}),
    )


def _one_hot(index: int, size: int) -> tuple[float, ...]:
    return tuple(float(i == index) for i in range(size))


def _map_pixels(mapping: dict) -> Callable[[np.ndarray], np.ndarray]:
    def apply(image: np.ndarray) -> np.ndarray:
        edited = image.copy()
        for old, new in mapping.items():
            edited[(image == old).all(axis=-1)] = new
        return edited

    return apply


_COLOR_PAIRS = [(a, b) for a in range(6) for b in range(6) if a != b]
# A third of the colour pairs (and so of the recolourings) are held out for S2.
_SEEN_COLOR_PAIRS = tuple(p for p in _COLOR_PAIRS if (p[0] + p[1]) % 3)
_HELD_OUT_COLOR_PAIRS = tuple(p for p in _COLOR_PAIRS if not (p[0] + p[1]) % 3)
_RGB_SUBSETS = [(0, 1, 2), (0,), (1,), (0, 1), (2,), (1, 2), (0, 2)]

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        # colour
        Family("recolor", "colour", _recolor, lambda a, b: f"{COLOR_NAMES[a]}→{COLOR_NAMES[b]}",
               _SEEN_COLOR_PAIRS, _HELD_OUT_COLOR_PAIRS,
               lambda a, b: _map_pixels({SHAPE_PALETTE[a]: SHAPE_PALETTE[b]}),
               lambda a, b: _one_hot(a, 6) + _one_hot(b, 6)),
        Family("background", "colour", _background, lambda i: BACKGROUND_NAMES[i], ((0,), (1,), (3,)), ((2,), (4,)),
               features=lambda i: _one_hot(i, 5)),
        # tone
        _pixel_family("grey", "tone", "grey", lambda a: f"{a:.2f}", ((1.0,), (0.5,)), ((0.75,), (0.3,))),
        _pixel_family("brightness", "tone", "brightness", lambda d: f"{d:+d}",
                      ((-60,), (-30,), (40,)), ((-45,), (60,))),
        _pixel_family("contrast", "tone", "contrast", lambda f: f"×{f:g}", ((0.5,), (1.6,)), ((0.7,), (1.3,))),
        _pixel_family("invert", "tone", "invert", lambda c: "".join("RGB"[i] for i in c),
                      ((s,) for s in _RGB_SUBSETS[:4]), ((s,) for s in _RGB_SUBSETS[4:]),
                      lambda c: tuple(float(i in c) for i in range(3))),
        # geometry
        _pixel_family("flip", "geometry", "flip", lambda axis: axis, (("horizontal",), ("vertical",)), (),
                      lambda axis: (float(axis == "horizontal"), float(axis == "vertical"))),
        Family("scale", "geometry", _scale, lambda f: f"×{f:g}", ((0.6,), (1.5,)), ((0.8,), (1.3,))),
        Family("translate", "geometry", _translate, lambda dx, dy: f"{dx:+.2f},{dy:+.2f}",
               ((0.2, 0.0), (0.0, 0.2), (-0.2, 0.0)), ((0.0, -0.2), (0.15, 0.15))),
        # content
        Family("remove", "content", _remove, lambda kind: kind, (("circle",), ("square",)), (("triangle",),),
               features=lambda kind: _one_hot(SHAPE_KINDS.index(kind), 3)),
        Family("add", "content", _add, lambda k, c, x, y: f"{COLOR_NAMES[c]} {k} at {x:.2f},{y:.2f}",
               tuple((k, c, x, y) for k, c, (x, y) in itertools.product(("circle", "square"), (0, 2, 3),
                                                                       ((0.25, 0.25), (0.75, 0.75)))),
               (("triangle", 1, 0.75, 0.25), ("triangle", 5, 0.75, 0.25), ("circle", 4, 0.25, 0.75)),
               features=lambda k, c, x, y: _one_hot(SHAPE_KINDS.index(k), 3) + _one_hot(c, 6) + (x, y)),
        # framing
        _pixel_family("frame", "framing", "frame", lambda w, c: f"{w}px {c}",
                      ((3, (30, 30, 30)), (6, (30, 30, 30)), (5, (30, 30, 200))),
                      ((4, (200, 30, 30)), (8, (30, 30, 30))),
                      lambda w, c: (w / 8, *(v / 255 for v in c))),
        # held-out families: one of every domain but colour, whose two seen families span it
        _pixel_family("posterize", "tone", "posterize", lambda n: f"{n} levels", (), ((2,), (3,), (4,))),
        _pixel_family("rotate", "geometry", "rotate", lambda k: f"{90 * k}°", (), ((1,), (2,), (3,)),
                      lambda k: _one_hot(k - 1, 3)),
        Family("change_kind", "content", _change_kind, lambda a, b: f"{a}→{b}", (),
               tuple((a, b) for a in SHAPE_KINDS for b in SHAPE_KINDS if a != b),
               features=lambda a, b: _one_hot(SHAPE_KINDS.index(a), 3) + _one_hot(SHAPE_KINDS.index(b), 3)),
        _pixel_family("zoom", "framing", "zoom", lambda f: f"×{f:g}", (), ((1.5,), (2.0,))),
    )
}  # fmt: skip
SEEN_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.seen_values)
HELD_OUT_FAMILIES = tuple(name for name, family in FAMILIES.items() if not family.seen_values)
#: S4: compositions of two seen families (first, then second), across domains, none of them trained on.
HELD_OUT_COMPOSITIONS = (
    ("grey", "translate"),
    ("background", "frame"),
    ("recolor", "scale"),
    ("flip", "remove"),
    ("brightness", "add"),
    ("background", "contrast"),
)
SPLITS = ("S1", "S2", "S3", "S4")


def compose(first: Edit, second: Edit) -> Edit:
    """`second` after `first`, as one edit."""
    return Edit(
        f"{first.name} + {second.name}",
        f"composition: {first.description}, then {second.description}",
        lambda scene: second(first(scene)),
        instruction=first.instruction + second.instruction,
    )


def split_edits(split: str) -> list[Edit]:
    """Every edit of a split, in a fixed order (S4: each composition with every pair of its families' first two
    seen values)."""
    if split == "S1":
        return [FAMILIES[f].edit(*v) for f in SEEN_FAMILIES for v in FAMILIES[f].seen_values]
    if split in ("S2", "S3"):
        families = SEEN_FAMILIES if split == "S2" else HELD_OUT_FAMILIES
        return [FAMILIES[f].edit(*v) for f in families for v in FAMILIES[f].held_out_values]
    if split == "S4":
        return [
            compose(FAMILIES[a].edit(*va), FAMILIES[b].edit(*vb))
            for a, b in HELD_OUT_COMPOSITIONS
            for va, vb in itertools.product(FAMILIES[a].seen_values[:2], FAMILIES[b].seen_values[:2])
        ]
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def family_of(edit: Edit) -> str:
    """The family (or, for a composition, `"a + b"`) an edit belongs to."""
    return " + ".join(part.split("(")[0] for part in edit.name.split(" + "))


def changed_pair(edit: Edit, seed: int, size: int, attempts: int = 100) -> tuple[Scene, Scene]:
    """A scene the edit visibly changes, and its edit: the first of seeds `seed`, `seed + 1_000_003`, ... (so a
    function of the seed) whose picture the edit changes (removing triangles needs a triangle)."""
    from .scenes import render

    for attempt in range(attempts):
        scene = generate_family_scene(np.random.default_rng(seed + attempt * 1_000_003), size)
        edited = edit(scene)
        if not np.array_equal(render(scene), render(edited)):
            return scene, edited
    raise ValueError(f"{edit.name} changed none of {attempts} scenes.")


def edits_by_family(edits: Sequence[Edit]) -> dict[str, list[Edit]]:
    """Edits grouped by family (a composition under `"a + b"`), families in the order they first come."""
    groups: dict[str, list[Edit]] = {}
    for edit in edits:
        groups.setdefault(family_of(edit), []).append(edit)
    return groups


def draw_edit(groups: dict[str, list[Edit]], rng: np.random.Generator) -> Edit:
    """One edit of `edits_by_family`'s groups: a family uniformly, then one of its edits uniformly, so that a family
    with many parameter values (recolouring's 20 seen colour pairs) is drawn no more often than one with few (flip's
    one)."""
    families = sorted(groups)
    edits = groups[families[int(rng.integers(len(families)))]]
    return edits[int(rng.integers(len(edits)))]


def sample_edits(split: str, count: int, rng: np.random.Generator) -> Sequence[Edit]:
    """`count` edits of a split drawn with replacement by `draw_edit`."""
    groups = edits_by_family(split_edits(split))
    return [draw_edit(groups, rng) for _ in range(count)]


#: Width of one step of a structured instruction: the family (one-hot) and its parameters' features (zero-padded).
FEATURE_WIDTH = 16
STEP_WIDTH = len(FAMILIES) + FEATURE_WIDTH
MAX_STEPS = 2
INSTRUCTION_WIDTH = MAX_STEPS * STEP_WIDTH


def instruction_vector(edit: Edit | None) -> np.ndarray:
    """The structured instruction of an edit of these families, as the base editor's text-encoder stand-in reads it:
    (INSTRUCTION_WIDTH,) float32, one block per step (family one-hot, then parameter features); all zeros for the
    empty instruction (`None`: reproduce the reference)."""
    vector = np.zeros(INSTRUCTION_WIDTH, dtype=np.float32)
    steps = () if edit is None else edit.instruction
    if edit is not None and not steps:
        raise ValueError(f"{edit.name} is not an edit of the toy world's families: it has no structured instruction.")
    if len(steps) > MAX_STEPS:
        raise ValueError(f"{edit.name} has {len(steps)} steps; instructions hold at most {MAX_STEPS}.")
    names = list(FAMILIES)
    for index, (family, params) in enumerate(steps):
        features = FAMILIES[family].features(*params)
        start = index * STEP_WIDTH
        vector[start + names.index(family)] = 1.0
        vector[start + len(FAMILIES) : start + len(FAMILIES) + len(features)] = features
    return vector
