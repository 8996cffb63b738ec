"""What a toy-world model shows a newcomer: the demo's rows and the app's examples, from the world it was built in.

World 1: the eight edits of `edits.py`, seen or unseen by its adapter; world 2: the parameterised families of
`families.py`, in splits S1 to S4; world 3: the named held-out edits of `edit_space.py` (sepia, a vignette...), which
its adapter never trained on (`toyworld.model_world` tells which world a model folder holds).

    world = toyworld.model_world()
    for example in showcase.demo_examples(world):
        (source, target), (query, truth) = example.pairs(seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image

from .edit_space import HELD_OUT_EDITS, EditSpec, evaluation_pair
from .edits import EDITS, SEEN_EDITS, Edit
from .families import SPLITS, changed_pair, family_of, split_edits
from .scenes import IMAGE_SIZE, generate_scene, render


WORLD_1, WORLD_2, WORLD_3 = "edits", "families", "space"  # as the training scripts' --world names them
WORLD_NUMBERS = {WORLD_1: 1, WORLD_2: 2, WORLD_3: 3}
SPLIT_LABELS = {
    "seen": "seen edit",
    "unseen": "unseen edit",
    "S1": "S1: seen",
    "S2": "S2: held-out value",
    "S3": "S3: unseen family",
    "S4": "S4: unseen composition",
    "held-out": "held out: never trained",
}
#: The demo's rows when none are asked for: (edit, adaptation steps); a row with steps shows the inputs of its edit's
#: zero-shot row (same exemplar, same query) after test-time adaptation to the exemplar.
DEMO_ROWS = {
    WORLD_1: tuple((name, steps) for name in EDITS for steps in ((0, 20) if name == "invert" else (0,))),
    WORLD_2: (  # edits it makes from S1, S2 and S3, then one it makes only once adapted (a colour S1 never framed in)
        ("frame(5px (30, 30, 200))", 0),
        ("background(pale blue)", 0),
        ("contrast(×1.3)", 0),
        ("grey(0.75)", 0),
        ("posterize(3 levels)", 0),
        ("frame(4px (200, 30, 30))", 0),
        ("frame(4px (200, 30, 30))", 20),
    ),
    WORLD_3: (  # held-out edits only: photo edits it never trained on, then one beside its zero-shot row once adapted
        ("vignette", 0),
        ("night", 0),
        ("spotlight", 0),
        ("cool", 0),
        ("portrait", 0),
        ("sepia", 0),
        ("sepia", 20),
    ),
}
#: The app's ready-made examples, edits the model makes (world 1's `invert`, world 2's red frame, a colour S1 never
#: framed in, and world 3's sepia only once adapted): (edit, exemplar seed, query seeds, adaptation steps).
APP_EXAMPLES = {
    WORLD_1: (("grayscale", 3, (11, 12), 0), ("border", 5, (13, 14), 0), ("invert", 7, (15,), 20)),
    WORLD_2: (
        ("brightness(+60)", 3, (11, 12), 0),
        ("posterize(3 levels)", 5, (13, 14), 0),
        ("frame(4px (200, 30, 30))", 7, (15,), 20),
    ),
    WORLD_3: (("vignette", 3, (11, 12), 0), ("night", 5, (13, 14), 0), ("sepia", 7, (15,), 20)),
}


@dataclass(frozen=True)
class Example:
    """One edit of a world, as the demo and the app show it.

    Args:
        world: `WORLD_1`, `WORLD_2` or `WORLD_3`.
        edit: the edit (world 3: a point of its edit space).
        split: where it stands for the adapter: "seen"/"unseen" (world 1), "S1".."S4" (world 2) or "held-out"
            (world 3).
        adapt_steps: test-time adaptation steps on the exemplar before editing (0: zero-shot).
    """

    world: str
    edit: Edit | EditSpec
    split: str
    adapt_steps: int = 0

    def pair(self, seed: int, size: int = IMAGE_SIZE) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """A scene and its edit (`draw_pair`)."""
        return draw_pair(self.world, self.edit, seed, size)

    def label(self) -> str:
        """Lines naming the edit (world 2: its family, then its parameters; world 3: its name, then what it does), its
        split, and its adaptation if any."""
        name = self.edit.name
        if self.world == WORLD_2:
            name = f"{family_of(self.edit)}\n{edit_parameters(name)}"
        elif self.world == WORLD_3:
            name = "\n".join([name, *(operation.describe() for operation in self.edit.operations)])
        adapted = f"\nadapted, {self.adapt_steps} steps" if self.adapt_steps else ""
        return f"{name}\n{SPLIT_LABELS[self.split]}{adapted}"


def draw_pair(
    world: str, edit: Edit | EditSpec, seed: int, size: int = IMAGE_SIZE
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A scene and its edit as PIL images, a function of (edit, seed, size); in world 2, a scene the edit visibly
    changes (`changed_pair`); in world 3, the `seed`-th evaluation scene it changes visibly (`evaluation_pair`)."""
    if world == WORLD_1:
        scene = generate_scene(np.random.default_rng(seed), size)
        edited = edit(scene)
    elif world == WORLD_3:
        scene, edited = evaluation_pair(edit, seed, size)
    else:
        scene, edited = changed_pair(edit, seed, size)
    return PIL.Image.fromarray(render(scene)), PIL.Image.fromarray(render(edited))


def edit_parameters(name: str) -> str:
    """A world-2 edit's parameters: `"horizontal + circle"` for `"flip(horizontal) + remove(circle)"`."""
    return " + ".join(part.split("(", 1)[-1].removesuffix(")") for part in name.split(" + "))


def world_examples(world: str) -> dict[str, Example]:
    """Every edit of a world by name, zero-shot."""
    if world == WORLD_1:
        return {name: Example(world, edit, "seen" if name in SEEN_EDITS else "unseen") for name, edit in EDITS.items()}
    if world == WORLD_3:
        return {name: Example(world, spec, "held-out") for name, spec in HELD_OUT_EDITS.items()}
    return {edit.name: Example(world, edit, split) for split in SPLITS for edit in split_edits(split)}


def find_example(world: str, name: str, adapt_steps: int = 0) -> Example:
    """The example of an edit named exactly, or (world 2) of a family: its first edit, from the first split that has
    it. Raises ValueError naming what the world has."""
    examples = world_examples(world)
    first_of_family = _first_edit_of_each_family() if world == WORLD_2 else {}
    name = first_of_family.get(name, name)
    if name not in examples:
        known = list(first_of_family) if world == WORLD_2 else list(examples)
        raise ValueError(
            f"Toy world {WORLD_NUMBERS[world]} has no edit {name!r}: pass one of {', '.join(known)}"
            + (" (a family), or an edit's full name, such as 'flip(vertical)'." if world == WORLD_2 else ".")
        )
    example = examples[name]
    return Example(example.world, example.edit, example.split, adapt_steps)


def demo_examples(world: str, names: list[str] | None = None) -> list[Example]:
    """The demo's rows: `names` zero-shot, or the world's `DEMO_ROWS`."""
    rows = [(name, 0) for name in names] if names else DEMO_ROWS[world]
    return [find_example(world, name, steps) for name, steps in rows]


def _first_edit_of_each_family() -> dict[str, str]:
    """World 2's families (of S1 to S3; S4 composes them), each with the name of its first edit."""
    first = {}
    for split in SPLITS[:3]:
        for edit in split_edits(split):
            first.setdefault(family_of(edit), edit.name)
    return first
