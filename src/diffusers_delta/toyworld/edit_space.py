"""Toy world 3: a rich, continuous space of edits, so that an adapter trains on edits no two pairs share and an
unseen edit lies *inside* what it has learned to read, as the paper's adapter reads a million pairs of thousands.

A point of the space (`EditSpec`) is an optional geometric change of the shapes, then one to three pixel operations
applied in order: a colour transform (a 3x3 matrix and a bias), per-channel tone curves, a blur, a sharpen, a frame.
Every operation but the frame acts through a smooth spatial weight: everywhere, a linear ramp at any angle (a half
plane when it is sharp), a radial one (inside or outside a disc), the shapes only or the background only. Every edit is
an exact function of the scene (`EditSpec.edit(...)(scene)`), and its parameter vector (`EditSpec.vector`) is the told
base editor's instruction, the stand-in for a text prompt.

`sample_edit` draws the training distribution; `HELD_OUT_EDITS` are named photo edits (sepia, a vignette, a tinted
half...) and world 2's held-out values that fit the space, which the sampler never produces exactly: how far each is
from the training edits is measured (`edit_distance`) and reported, not assumed.

    spec = sample_edit(np.random.default_rng(0))
    scene = generate_family_scene(np.random.default_rng(1))
    source, target = render(scene), render(spec.edit()(scene))
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .edits import Edit
from .families import generate_family_scene
from .scenes import IMAGE_SIZE, Scene, draw_border, register_finish, render, shape_coverage


OPERATIONS = ("matrix", "curve", "blur", "sharpen", "frame")
REGIONS = ("global", "ramp", "radial", "shapes", "background")
GEOMETRY = ("flip", "translate", "scale")
MAX_OPERATIONS = 3
#: Width of one operation's block of the instruction: kind (one-hot), parameters, region (one-hot), region parameters.
PARAMETER_WIDTH, REGION_PARAMETER_WIDTH = 12, 5
OPERATION_WIDTH = len(OPERATIONS) + PARAMETER_WIDTH + len(REGIONS) + REGION_PARAMETER_WIDTH
GEOMETRY_WIDTH = len(GEOMETRY) + 2
INSTRUCTION_WIDTH = MAX_OPERATIONS * OPERATION_WIDTH + GEOMETRY_WIDTH
#: ITU-R 601 luma as a colour matrix: every row maps a pixel to its grey.
LUMA_MATRIX = np.tile(np.array([0.299, 0.587, 0.114]), (3, 1))
#: An edit must change its pair's pixels by at least this much (mean absolute, 0-1) to be a training or test pair:
#: about twice the VAE's reconstruction floor on world 2's pictures, so that what it does can be measured.
MIN_VISIBLE_CHANGE = 0.02


@dataclass(frozen=True)
class Operation:
    """One pixel operation of an edit.

    Args:
        kind: one of `OPERATIONS`. Its `params`: `matrix` the 3x3 matrix row by row, then the bias (12 numbers, on
            colours in 0-1); `curve` a, b of each channel (R, G, B), the curve y = x + a sin(pi x) + b sin(2 pi x);
            `blur` the Gaussian's sigma in pixels; `sharpen` the unsharp mask's amount and sigma; `frame` its width in
            pixels and its colour (0-255).
        params: its parameters, as above.
        region: one of `REGIONS`, where it acts (a frame acts on its border: `"global"`).
        region_params: `ramp` the direction's angle (radians), the edge's offset from the centre along it and its
            softness (both in image sides), the weight rising along the direction; `radial` the centre x, y, the
            radius, the softness (in image sides) and 1 for inside the disc or 0 for outside; none for the others.
    """

    kind: str
    params: tuple[float, ...]
    region: str = "global"
    region_params: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in OPERATIONS:
            raise ValueError(f"Unknown operation {self.kind!r}; expected one of {OPERATIONS}.")
        if self.region not in REGIONS:
            raise ValueError(f"Unknown region {self.region!r}; expected one of {REGIONS}.")
        if self.kind == "frame" and self.region != "global":
            raise ValueError("A frame acts on the picture's border; its region is 'global'.")

    def features(self) -> np.ndarray:
        """Its block of the instruction (OPERATION_WIDTH,): numbers of order one that say it."""
        block = np.zeros(OPERATION_WIDTH, dtype=np.float32)
        block[OPERATIONS.index(self.kind)] = 1.0
        p = np.asarray(self.params, dtype=np.float64)
        if self.kind == "matrix":
            scaled = np.concatenate([(p[:9] - np.eye(3).ravel()) * 2.0, p[9:] * 4.0])
        elif self.kind == "curve":
            scaled = p * np.tile([3.0, 6.0], 3)
        elif self.kind == "blur":
            scaled = p / 2.0
        elif self.kind == "sharpen":
            scaled = p / np.array([2.0, 1.5])
        else:  # frame
            scaled = np.concatenate([p[:1] / 8.0, p[1:] / 255.0])
        start = len(OPERATIONS)
        block[start : start + len(scaled)] = scaled
        start += PARAMETER_WIDTH
        block[start + REGIONS.index(self.region)] = 1.0
        start += len(REGIONS)
        r = self.region_params
        if self.region == "ramp":
            angle, offset, softness = r
            block[start : start + 4] = (math.cos(angle), math.sin(angle), offset * 2.0, softness * 3.0)
        elif self.region == "radial":
            x, y, radius, softness, inside = r
            block[start : start + 5] = (x, y, radius * 2.0, softness * 3.0, inside * 2.0 - 1.0)
        return block

    def weight(self, scene: Scene) -> np.ndarray:
        """(H, W, 1) float64 in 0-1: how much of the operation each pixel of `scene` takes."""
        size = scene.size
        ys, xs = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size - 0.5  # pixel centres, image sides
        if self.region == "global":
            weight = np.ones((size, size))
        elif self.region == "ramp":
            angle, offset, softness = self.region_params
            weight = _sigmoid((xs * math.cos(angle) + ys * math.sin(angle) - offset) / softness)
        elif self.region == "radial":
            x, y, radius, softness, inside = self.region_params
            disc = _sigmoid((radius - np.hypot(xs - (x - 0.5), ys - (y - 0.5))) / softness)
            weight = disc if inside else 1.0 - disc
        else:
            covered = shape_coverage(scene).astype(np.float64)
            weight = covered if self.region == "shapes" else 1.0 - covered
        return weight[..., None]

    def apply(self, image: np.ndarray, scene: Scene) -> np.ndarray:
        """(H, W, 3) float64 in 0-1 -> the same, with the operation applied through its weight."""
        if self.kind == "frame":
            width, *color = self.params
            return draw_border(image, tuple(c / 255.0 for c in color), int(width))
        p = np.asarray(self.params, dtype=np.float64)
        if self.kind == "matrix":
            changed = image @ p[:9].reshape(3, 3).T + p[9:]
        elif self.kind == "curve":
            a, b = p[0::2], p[1::2]  # (3,) each
            changed = image + a * np.sin(np.pi * image) + b * np.sin(2 * np.pi * image)
        elif self.kind == "blur":
            changed = gaussian_blur(image, p[0])
        else:  # sharpen
            changed = image + p[0] * (image - gaussian_blur(image, p[1]))
        weight = self.weight(scene)
        return np.clip(weight * changed + (1.0 - weight) * image, 0.0, 1.0)

    def describe(self) -> str:
        """The operation in a few words (kind, values and where it acts), as tables and grids label it."""
        p = self.params
        if self.kind == "blur":
            what = f"blur {p[0]:.1f}px"
        elif self.kind == "sharpen":
            what = f"sharpen ×{p[0]:.2f} at {p[1]:.1f}px"
        elif self.kind == "frame":
            what = f"frame {int(p[0])}px ({', '.join(str(int(c)) for c in p[1:])})"
        else:
            what = "colour matrix" if self.kind == "matrix" else "tone curves"
        if self.region == "global":
            return what
        if self.region == "ramp":
            return f"{what} on a ramp at {math.degrees(self.region_params[0]):.0f}°"
        if self.region == "radial":
            return f"{what} {'inside' if self.region_params[4] else 'outside'} a disc"
        return f"{what} on the {self.region}"


@dataclass(frozen=True)
class Geometry:
    """A change of the shapes' geometry, made before the pixel operations.

    Args:
        kind: one of `GEOMETRY`: `flip` mirrors the picture left-right (no params); `translate` moves every shape by
            (dx, dy) image sides; `scale` grows every shape by a factor about its centre.
        params: as above.
    """

    kind: str
    params: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in GEOMETRY:
            raise ValueError(f"Unknown geometry {self.kind!r}; expected one of {GEOMETRY}.")

    def features(self) -> np.ndarray:
        """Its block of the instruction (GEOMETRY_WIDTH,): the kind one-hot and its values, of order one."""
        block = np.zeros(GEOMETRY_WIDTH, dtype=np.float32)
        block[GEOMETRY.index(self.kind)] = 1.0
        if self.kind == "translate":
            block[len(GEOMETRY) :] = np.asarray(self.params) * 4.0
        elif self.kind == "scale":
            block[len(GEOMETRY)] = math.log(self.params[0]) * 2.0
        return block

    def __call__(self, scene: Scene) -> Scene:
        size = scene.size
        if self.kind == "flip":  # shapes mirrored (every kind is left-right symmetric), and the background with them
            background = scene.background[::-1] if scene.split == "vertical" else scene.background
            shapes = (replace(s, center=(size - s.center[0], s.center[1])) for s in scene.shapes)
            return replace(scene.with_shapes(shapes), background=background)
        if self.kind == "translate":
            dx, dy = self.params[0] * size, self.params[1] * size
            return scene.with_shapes(replace(s, center=(s.center[0] + dx, s.center[1] + dy)) for s in scene.shapes)
        return scene.with_shapes(replace(s, size=s.size * self.params[0]) for s in scene.shapes)

    def describe(self) -> str:
        """The geometric step in a few words (flip, translate by a fraction of the side, scale by a factor)."""
        if self.kind == "translate":
            return f"translate {self.params[0]:+.2f},{self.params[1]:+.2f}"
        return "flip" if self.kind == "flip" else f"scale ×{self.params[0]:.2f}"


@dataclass(frozen=True)
class EditSpec:
    """A point of the edit space: a geometric change (or none), then pixel operations in order.

    Args:
        operations: up to `MAX_OPERATIONS`, applied in order after the geometry.
        geometry: the change of the shapes, or None.
        name: what it is called (a held-out edit's name); default: what it does, in words.
    """

    operations: tuple[Operation, ...] = ()
    geometry: Geometry | None = None
    name: str | None = None

    def __post_init__(self):
        if not self.operations and self.geometry is None:
            raise ValueError("An edit has at least one operation or a geometry.")
        if len(self.operations) > MAX_OPERATIONS:
            raise ValueError(f"An edit has at most {MAX_OPERATIONS} operations, got {len(self.operations)}.")

    @property
    def label(self) -> str:
        """Its name when it has one (a held-out edit), else its steps described, joined by " + "."""
        parts = ([self.geometry.describe()] if self.geometry else []) + [op.describe() for op in self.operations]
        return self.name or " + ".join(parts)

    def vector(self) -> np.ndarray:
        """The instruction the told base editor reads: (INSTRUCTION_WIDTH,) float32, one block per operation slot
        (zeros where the edit has fewer), then the geometry's block (zeros for none)."""
        vector = np.zeros(INSTRUCTION_WIDTH, dtype=np.float32)
        for index, operation in enumerate(self.operations):
            vector[index * OPERATION_WIDTH : (index + 1) * OPERATION_WIDTH] = operation.features()
        if self.geometry is not None:
            vector[MAX_OPERATIONS * OPERATION_WIDTH :] = self.geometry.features()
        return vector

    def edit(self) -> Edit:
        """This edit as a toy-world `Edit` of scenes (an exact function of them)."""
        geometry, operations = self.geometry, self.operations

        def scene_fn(scene: Scene) -> Scene:
            edited = geometry(scene) if geometry is not None else scene
            if not operations:
                return edited
            return replace(edited, finishes=edited.finishes + (("edit_space", (operations,)),))

        return Edit(self.label, f"edit space: {self.label}", scene_fn)

    def to_json(self) -> str:
        """The edit as one line of JSON (`from_json` reads it back), for a pair's metadata."""
        return json.dumps({
            "name": self.name,
            "geometry": None if self.geometry is None else [self.geometry.kind, list(self.geometry.params)],
            "operations": [[op.kind, list(op.params), op.region, list(op.region_params)] for op in self.operations],
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> "EditSpec":
        """The edit `to_json` wrote."""
        data = json.loads(text)
        geometry = None if data["geometry"] is None else Geometry(data["geometry"][0], tuple(data["geometry"][1]))
        operations = tuple(Operation(k, tuple(p), r, tuple(rp)) for k, p, r, rp in data["operations"])
        return cls(operations, geometry, data.get("name"))


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * values))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) float64 -> the same blurred by a Gaussian of `sigma` pixels (separable, edges mirrored)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    size_y, size_x = image.shape[:2]
    rows = sum(t * padded[i : i + size_y] for i, t in enumerate(taps))  # (H, W + 2r, C)
    return sum(t * rows[:, i : i + size_x] for i, t in enumerate(taps))


def apply_operations(image: np.ndarray, operations: tuple[Operation, ...], scene: Scene) -> np.ndarray:
    """The `edit_space` finish: (H, W, 3) uint8 -> (H, W, 3) uint8, the operations applied in order on colours in
    0-1, rounded once at the end; spatial weights read `scene`'s shapes."""
    values = image.astype(np.float64) / 255.0
    for operation in operations:
        values = operation.apply(values, scene)
    return np.rint(values * 255.0).astype(np.uint8)


register_finish("edit_space", apply_operations, reads_scene=True)


# ----------------------------------------------------------------------------------------------- the sampler


def _sample_region(rng: np.random.Generator) -> tuple[str, tuple[float, ...]]:
    region = REGIONS[int(rng.choice(len(REGIONS), p=[0.4, 0.2, 0.2, 0.1, 0.1]))]
    if region == "ramp":
        angle, offset, softness = rng.uniform(0, 2 * math.pi), rng.uniform(-0.3, 0.3), rng.uniform(0.01, 0.25)
        return region, (float(angle), float(offset), float(softness))
    if region == "radial":
        return region, (
            float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.15, 0.45)),
            float(rng.uniform(0.02, 0.15)), float(rng.integers(2)),
        )  # fmt: skip
    return region, ()


def _sample_operation(rng: np.random.Generator, kind: str) -> Operation:
    strength = float(rng.uniform(0.25, 1.0))  # how far from the identity, shared by every parameter of the draw
    if kind == "matrix":  # a change of saturation (or none), then a tint and channel mix near the identity
        saturation = float(rng.uniform(-0.5, 1.0)) if rng.random() < 0.5 else 0.0  # 1: grey, < 0: more saturated
        mix = np.eye(3) + strength * rng.uniform(-0.35, 0.35, (3, 3))
        matrix = mix @ ((1 - saturation) * np.eye(3) + saturation * LUMA_MATRIX)
        bias = strength * rng.uniform(-0.25, 0.25, 3)
        params = tuple(float(v) for v in np.concatenate([matrix.ravel(), bias]))
    elif kind == "curve":  # one curve for all channels, or one each
        shared = rng.random() < 0.5
        a = rng.uniform(-0.3, 0.3, 1 if shared else 3) * strength * np.ones(3)
        b = rng.uniform(-0.15, 0.15, 1 if shared else 3) * strength * np.ones(3)
        params = tuple(float(v) for pair in zip(a, b) for v in pair)
    elif kind == "blur":
        params = (float(rng.uniform(0.5, 2.0)),)
    elif kind == "sharpen":
        params = (float(rng.uniform(0.5, 2.5)), float(rng.uniform(0.6, 1.5)))
    else:  # frame
        params = (float(rng.integers(2, 9)), *(float(c) for c in rng.integers(0, 256, 3)))
    region, region_params = ("global", ()) if kind == "frame" else _sample_region(rng)
    return Operation(kind, params, region, region_params)


def _sample_geometry(rng: np.random.Generator) -> Geometry:
    kind = GEOMETRY[int(rng.integers(len(GEOMETRY)))]
    if kind == "translate":
        length, angle = float(rng.uniform(0.08, 0.22)), float(rng.uniform(0, 2 * math.pi))
        return Geometry(kind, (length * math.cos(angle), length * math.sin(angle)))
    if kind == "scale":
        factor = math.exp(float(rng.uniform(0.2, 0.45)) * (1 if rng.random() < 0.5 else -1))  # ×0.64-0.82, 1.22-1.57
        return Geometry(kind, (factor,))
    return Geometry(kind)


def sample_edit(rng: np.random.Generator, geometry_share: float = 0.15) -> EditSpec:
    """One edit of the training distribution: a fresh point of the space.

    Args:
        rng: the random source.
        geometry_share: the share of edits that change the shapes' geometry (then with at most one operation, and
            a flip with exactly one).
    """
    geometry = _sample_geometry(rng) if rng.random() < geometry_share else None
    if geometry is None:
        counts, chances = (1, 2, 3), (0.5, 0.35, 0.15)
    else:  # a flip, the one geometry without a parameter, always comes with an operation: no two edits are the same
        counts, chances = ((1,), (1.0,)) if geometry.kind == "flip" else ((0, 1), (0.6, 0.4))
    count = int(rng.choice(counts, p=chances))
    kinds: list[str] = []
    for _ in range(count):
        allowed = [k for k in OPERATIONS if k != "frame" or "frame" not in kinds]  # one frame at most
        weights = np.array([{"matrix": 3, "curve": 3, "blur": 1.2, "sharpen": 1.0, "frame": 1.5}[k] for k in allowed])
        kinds.append(allowed[int(rng.choice(len(allowed), p=weights / weights.sum()))])
    return EditSpec(tuple(_sample_operation(rng, kind) for kind in kinds), geometry)


def visible_change(spec: EditSpec, scene: Scene) -> float:
    """The mean absolute change (0-1) the edit makes to the scene's picture."""
    return float(np.abs(render(spec.edit()(scene)).astype(np.float64) - render(scene)).mean() / 255.0)


def sample_pair(rng: np.random.Generator, size: int = IMAGE_SIZE, attempts: int = 100) -> tuple[EditSpec, Scene]:
    """A training example: a fresh edit and a scene it changes visibly (`MIN_VISIBLE_CHANGE`), both drawn anew until
    one does."""
    for _ in range(attempts):
        spec, scene = sample_edit(rng), generate_family_scene(rng, size)
        if visible_change(spec, scene) >= MIN_VISIBLE_CHANGE:
            return spec, scene
    raise RuntimeError(f"No visible edit in {attempts} draws.")  # does not happen: about 1 draw in 5 is too faint


# ----------------------------------------------------------------------------------------------- held-out edits


def _matrix(matrix, bias=(0.0, 0.0, 0.0)) -> tuple[float, ...]:
    return tuple(float(v) for v in np.concatenate([np.asarray(matrix, dtype=np.float64).ravel(), bias]))


_SEPIA = [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]]
_DIM = 0.45 * np.eye(3)
#: Named edits the sampler never produces exactly, each with what it tests: common photo edits, and world 2's
#: held-out values (S2) that are points of the space. `spatial` marks those acting through a spatial weight (the
#: dense-against-pooled comparison is measured on them).
HELD_OUT_EDITS: dict[str, EditSpec] = {
    spec.name: spec
    for spec in (
        EditSpec((Operation("matrix", _matrix(_SEPIA)),), name="sepia"),
        EditSpec((Operation("matrix", _matrix(np.diag([1.12, 1.0, 0.82]), (0.04, 0.01, -0.02))),), name="warm"),
        EditSpec((Operation("matrix", _matrix(np.diag([0.85, 0.97, 1.12]), (-0.02, 0.0, 0.05))),), name="cool"),
        EditSpec((Operation("matrix", _matrix(_DIM @ (0.6 * np.eye(3) + 0.4 * LUMA_MATRIX), (0.0, 0.03, 0.12))),),
                 name="night"),
        EditSpec((Operation("matrix", _matrix(0.7 * np.eye(3), (0.18, 0.17, 0.16))),), name="fade"),
        EditSpec((Operation("curve", (0.0, -0.1, 0.0, 0.0, 0.0, 0.1)),), name="split tone"),
        EditSpec((Operation("matrix", _matrix(0.35 * np.eye(3)), "radial", (0.5, 0.5, 0.38, 0.1, 0.0)),),
                 name="vignette"),
        EditSpec((Operation("matrix", _matrix(0.4 * np.eye(3)), "radial", (0.38, 0.42, 0.22, 0.04, 0.0)),),
                 name="spotlight"),
        EditSpec((Operation("matrix", _matrix(np.diag([1.0, 0.65, 0.65]), (0.15, 0.0, 0.0)), "ramp",
                            (math.pi, 0.0, 0.01)),), name="tinted half"),
        EditSpec((Operation("blur", (2.2,), "background"),
                  Operation("matrix", _matrix(0.75 * np.eye(3)), "background")), name="portrait"),
        EditSpec((Operation("curve", (0.25, 0.0, 0.25, 0.0, 0.25, 0.0)),
                  Operation("frame", (5.0, 245.0, 245.0, 240.0))), name="bright print"),
        # world 2's held-out values (S2) that are points of the space
        EditSpec((Operation("matrix", _matrix(0.25 * np.eye(3) + 0.75 * LUMA_MATRIX)),), name="grey(0.75)"),
        EditSpec((Operation("matrix", _matrix(np.eye(3), (-45 / 255,) * 3)),), name="brightness(-45)"),
        EditSpec((Operation("matrix", _matrix(0.7 * np.eye(3), (0.3 * 128 / 255,) * 3)),), name="contrast(×0.7)"),
        EditSpec((Operation("matrix", _matrix(np.diag([1.0, 1.0, -1.0]), (0.0, 0.0, 1.0))),), name="invert(B)"),
        EditSpec((Operation("frame", (4.0, 200.0, 30.0, 30.0)),), name="frame(4px (200, 30, 30))"),
    )
}  # fmt: skip
SPATIAL_HELD_OUT = ("vignette", "spotlight", "tinted half", "portrait")
WORLD2_HELD_OUT = ("grey(0.75)", "brightness(-45)", "contrast(×0.7)", "invert(B)", "frame(4px (200, 30, 30))")


def edit_distance(first: EditSpec, second: EditSpec, scenes: Sequence[Scene]) -> float:
    """How far apart two edits are: the mean absolute difference (0-1) of their results on `scenes`."""
    total = 0.0
    for scene in scenes:
        a, b = render(first.edit()(scene)), render(second.edit()(scene))
        total += np.abs(a.astype(np.float64) - b).mean() / 255.0
    return total / len(scenes)


def probe_scenes(count: int = 4, seed: int = 123_456_789) -> list[Scene]:
    """Scenes edits are compared on (`edit_distance`), drawn apart from training and evaluation."""
    rng = np.random.default_rng(seed)
    return [generate_family_scene(rng) for _ in range(count)]


def evaluation_pair(spec: EditSpec, index: int, size: int = IMAGE_SIZE, attempts: int = 100) -> tuple[Scene, Scene]:
    """The `index`-th evaluation scene of an edit that it changes visibly, and its edit: drawn from a seed range no
    training pair uses (training draws from the build's seed; these from `EVALUATION_SEED` onward)."""
    for attempt in range(attempts):
        rng = np.random.default_rng([EVALUATION_SEED, index, attempt])
        scene = generate_family_scene(rng, size)
        if visible_change(spec, scene) >= MIN_VISIBLE_CHANGE:
            return scene, spec.edit()(scene)
    raise ValueError(f"{spec.label} changed none of {attempts} scenes visibly.")


#: Seeds evaluation scenes (a sequence seed of its own, which no integer training seed draws).
EVALUATION_SEED = 31_337
