"""The toy world: synthetic scenes and exact edits, small enough to train and measure Delta-Adapter on 2 CPU cores.

from diffusers_delta import toyworld
source, target = toyworld.make_pair("recolor", seed=0)      # an exemplar pair of a known edit
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from . import edit_space, showcase
from .edits import EDITS, SEEN_EDITS, UNSEEN_EDITS, Edit
from .families import (
    FAMILIES,
    HELD_OUT_COMPOSITIONS,
    HELD_OUT_FAMILIES,
    SEEN_FAMILIES,
    SPLITS,
    changed_pair,
    draw_edit,
    edits_by_family,
    generate_family_scene,
    instruction_vector,
    split_edits,
)
from .scenes import IMAGE_SIZE, Scene, Shape, generate_scene, render


#: Where the embedded default model lives (written by examples/toyworld/build_default_model.py).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
#: The base editor's learned instruction prompts, one (1, L, D_txt) tensor per edit name, in its pipeline folder.
EDIT_PROMPT_EMBEDS_NAME = "edit_prompt_embeds.safetensors"


def load_pipeline(model_dir: str | Path | None = None):
    """The toy world's default `FluxDeltaEditPipeline`, through the same `from_pretrained` / `load_delta_adapter` code
    as any Hub model: `model_dir/base` is the pipeline folder, `model_dir/adapter` the adapter folder (default: the
    embedded model, `DEFAULT_MODEL_DIR`)."""
    from ..pipelines import FluxDeltaEditPipeline

    model_dir = _model_folder(model_dir)
    pipe = FluxDeltaEditPipeline.from_pretrained(model_dir / "base")
    pipe.load_delta_adapter(model_dir / "adapter")
    return pipe


def model_world(model_dir: str | Path | None = None) -> str:
    """Which world a toy-world model folder (default: the embedded one) was built in, from what its base editor
    reads: `showcase.WORLD_3` an edit space's parameter vector (`base/instruction_encoder/` of
    `edit_space.INSTRUCTION_WIDTH` numbers), `showcase.WORLD_2` world 2's structured instruction, `showcase.WORLD_1`
    a learned prompt per edit (no instruction encoder)."""
    model_dir = _model_folder(model_dir)
    config = model_dir / "base" / "instruction_encoder" / "config.json"
    if not config.is_file():
        return showcase.WORLD_1
    try:
        width = json.loads(config.read_text(encoding="utf-8")).get("instruction_width")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise ValueError(f"{config} is not an instruction encoder's config ({error}).") from None
    return showcase.WORLD_3 if width == edit_space.INSTRUCTION_WIDTH else showcase.WORLD_2


def _model_folder(model_dir: str | Path | None) -> Path:
    """`model_dir` (None: `DEFAULT_MODEL_DIR`) as a Path, checked to hold a toy-world model (`base/`, `adapter/`)."""
    model_dir = Path(DEFAULT_MODEL_DIR if model_dir is None else model_dir)
    if not (model_dir / "base" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No toy-world model in {model_dir}: build one with "
            "`python examples/toyworld/build_default_model.py --work_dir toy-build`."
        )
    return model_dir


def make_pair(
    edit: str | Edit | edit_space.EditSpec, seed: int, size: int = IMAGE_SIZE
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A random scene and its exactly edited version, as PIL images; a function of (edit, seed, size).

    Args:
        edit: a world-1 edit or its name (`EDITS`: "grayscale"); the name of a world-2 edit ("grey(0.50)") or
            family ("grey": its first edit); or a world-3 edit, held out by name ("sepia": `edit_space.HELD_OUT_EDITS`)
            or any point of its space (an `edit_space.EditSpec`, such as `edit_space.sample_edit(rng)`). The scene of
            a world-2 or world-3 edit is one the edit visibly changes.
        seed: draws the scene.
        size: image side.
    """
    if isinstance(edit, edit_space.EditSpec):
        return showcase.draw_pair(showcase.WORLD_3, edit, seed, size)
    if isinstance(edit, str) and edit in edit_space.HELD_OUT_EDITS and not _names_world_2_edit(edit):
        return showcase.find_example(showcase.WORLD_3, edit).pair(seed, size)
    if isinstance(edit, str) and edit not in EDITS:
        try:
            return showcase.find_example(showcase.WORLD_2, edit).pair(seed, size)
        except ValueError as error:
            raise ValueError(
                f"{error} World 1's edits: {', '.join(EDITS)}. World 3's: {', '.join(edit_space.HELD_OUT_EDITS)}."
            ) from None
    return showcase.draw_pair(showcase.WORLD_1, EDITS[edit] if isinstance(edit, str) else edit, seed, size)


def _names_world_2_edit(name: str) -> bool:
    """Whether a name is a world-2 edit's or family's (world 3 holds out some of world 2's values under their names:
    they stay world 2's pairs here)."""
    try:
        showcase.find_example(showcase.WORLD_2, name)
    except ValueError:
        return False
    return True


def _random_scenes(rng: np.random.Generator, batch_size: int, size: int, edited_fraction: float) -> list[Scene]:
    """`batch_size` random scenes, each shown after a random edit (any of `EDITS`) with chance `edited_fraction`."""
    scenes = [generate_scene(rng, size) for _ in range(batch_size)]
    names = list(EDITS)
    # (No draw at all when edited_fraction is 0, so that unedited batches stay what they always were for a seed.)
    edited = [edited_fraction > 0 and rng.random() < edited_fraction for _ in scenes]
    return [EDITS[names[int(rng.integers(len(names)))]](s) if e else s for s, e in zip(scenes, edited)]


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """Scenes rendered as a (B, 3, H, W) float tensor in [-1, 1], the VAE's input range."""
    images = np.stack([render(scene) for scene in scenes])  # (B, H, W, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_batch(
    rng: np.random.Generator, batch_size: int, size: int = IMAGE_SIZE, edited_fraction: float = 0.0
) -> torch.Tensor:
    """Random scenes as a (B, 3, H, W) float tensor in [-1, 1], the VAE's input range.

    Args:
        rng: the random source.
        batch_size: B.
        size: image side.
        edited_fraction: the share of scenes shown after a random edit (any of `EDITS`), so that models that stand in
            for ones pretrained on all images (the VAE, the base editor) also know what edited pictures look like.
    """
    return render_batch(_random_scenes(rng, batch_size, size, edited_fraction))


def instruction_batch(
    rng: np.random.Generator,
    batch_size: int,
    size: int = IMAGE_SIZE,
    edited_fraction: float = 0.0,
    instruction_fraction: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch for an instruction editor, which FLUX.2 [klein] is: each reference scene either stays as it is (the
    empty instruction) or is edited by one of `EDITS`, all of them, as a text-conditioned editor knows them all.

    Args:
        rng: the random source.
        batch_size: B.
        size: image side.
        edited_fraction: the share of reference scenes that are themselves already edited (see `scene_batch`).
        instruction_fraction: the share of references that get an edit instruction rather than the empty one.

    Returns:
        references (B, 3, H, W) and targets (B, 3, H, W) in [-1, 1], and instructions (B,): an index into `EDITS`,
        or -1 for the empty instruction (target = reference).
    """
    references = _random_scenes(rng, batch_size, size, edited_fraction)
    names = list(EDITS)
    instructions = [int(rng.integers(len(names))) if rng.random() < instruction_fraction else -1 for _ in references]
    targets = [EDITS[names[i]](scene) if i >= 0 else scene for scene, i in zip(references, instructions)]
    return render_batch(references), render_batch(targets), torch.tensor(instructions)


def world_batch(
    rng: np.random.Generator,
    batch_size: int,
    size: int = IMAGE_SIZE,
    edited_fraction: float = 0.5,
    instruction_fraction: float = 0.5,
    splits: tuple[str, ...] = SPLITS,
    families: tuple[str, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of toy world 2 for models that stand in for ones pretrained on everything (the VAE, the instruction
    base editor): references, some already edited by an edit of any split, and targets: the reference edited by a
    random edit of `splits` under its structured instruction, or unchanged under the empty one.

    Args:
        rng: the random source.
        batch_size: B.
        size: image side.
        edited_fraction: the share of references that are themselves already edited.
        instruction_fraction: the share of references that get an edit rather than the empty instruction.
        splits: the splits the edits are drawn from (a base editor knows all of them, as klein knows edits by text),
            each family (and each composition) as often as any other (`families.draw_edit`).
        families: only the edits of these families (and compositions, by their `"a + b"` name); default: every one.

    Returns:
        references (B, 3, H, W) and targets (B, 3, H, W) in [-1, 1], and instructions (B, INSTRUCTION_WIDTH) float32
        (`families.instruction_vector`; zeros for the empty instruction).
    """
    groups = edits_by_family([edit for split in splits for edit in split_edits(split)])
    if families is not None:
        unknown = set(families) - set(groups)
        if unknown:
            raise ValueError(f"No edits of {sorted(unknown)} in {splits}; the families are {sorted(groups)}.")
        groups = {name: edits for name, edits in groups.items() if name in families}
    references, targets, instructions = [], [], []
    for _ in range(batch_size):
        scene = generate_family_scene(rng, size)
        if rng.random() < edited_fraction:
            scene = draw_edit(groups, rng)(scene)
        edit = draw_edit(groups, rng) if rng.random() < instruction_fraction else None
        references.append(scene)
        targets.append(edit(scene) if edit is not None else scene)
        instructions.append(instruction_vector(edit))
    return render_batch(references), render_batch(targets), torch.from_numpy(np.stack(instructions))


def space_batch(
    rng: np.random.Generator,
    batch_size: int,
    size: int = IMAGE_SIZE,
    edited_fraction: float = 0.5,
    instruction_fraction: float = 0.7,
    held_out_fraction: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of toy world 3 (`edit_space`) for the models that stand in for ones pretrained on everything (the VAE,
    the told base editor): references, some already edited, and targets: the reference edited by a fresh edit of the
    space under its parameter vector, or unchanged under the empty instruction.

    Args:
        rng: the random source.
        batch_size: B.
        size: image side.
        edited_fraction: the share of references that are themselves already edited (by a sampled edit).
        instruction_fraction: the share of references that get an edit rather than the empty instruction.
        held_out_fraction: the share of those edits that are one of `edit_space.HELD_OUT_EDITS` rather than a draw
            of the sampler: the base editor knows them, as klein knows "sepia" by text; the adapter never sees them.

    Returns:
        references (B, 3, H, W) and targets (B, 3, H, W) in [-1, 1], and instructions
        (B, edit_space.INSTRUCTION_WIDTH) float32 (zeros for the empty instruction).
    """
    held_out = list(edit_space.HELD_OUT_EDITS.values())
    references, targets, instructions = [], [], []
    for _ in range(batch_size):
        scene = generate_family_scene(rng, size)
        if rng.random() < edited_fraction:
            scene = edit_space.sample_edit(rng).edit()(scene)
        spec = None
        if rng.random() < instruction_fraction:
            use_held_out = rng.random() < held_out_fraction
            spec = held_out[int(rng.integers(len(held_out)))] if use_held_out else edit_space.sample_edit(rng)
        references.append(scene)
        targets.append(spec.edit()(scene) if spec is not None else scene)
        instructions.append(spec.vector() if spec is not None else np.zeros(edit_space.INSTRUCTION_WIDTH, np.float32))
    return render_batch(references), render_batch(targets), torch.from_numpy(np.stack(instructions))


def write_space_pairs(folder: str | Path, count: int, seed: int = 0) -> Path:
    """Writes toy world 3's training pairs in the training script's layout (`source/`, `target/`,
    `metadata.jsonl`): every pair its own fresh edit of the space (`edit_space.sample_pair`), recorded in the
    metadata as JSON (`edit_space.EditSpec.from_json` reads it), so that no two pairs share an edit.

    Args:
        folder: where to write.
        count: how many pairs.
        seed: seeds the edits and scenes.

    Returns:
        The folder.
    """
    import json

    from tqdm.auto import tqdm

    folder = Path(folder)
    for sub in ("source", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 3])  # world 3's training stream: no evaluation scene is drawn from it
    records = []
    for index in tqdm(range(count), desc="world-3 pairs", mininterval=2):
        spec, scene = edit_space.sample_pair(rng)
        name = f"space-{index:06d}.png"
        PIL.Image.fromarray(render(scene)).save(folder / "source" / name)
        PIL.Image.fromarray(render(spec.edit()(scene))).save(folder / "target" / name)
        records.append({"source": f"source/{name}", "target": f"target/{name}", "edit": spec.label,
                        "spec": spec.to_json()})  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def write_family_pairs(folder: str | Path, split: str, pairs_per_family: int, seed: int = 0) -> Path:
    """Writes pairs of a split in the training script's layout (`source/`, `target/`), and `metadata.jsonl` with
    each pair's edit, family and split. Every family (or composition) gets as many pairs, its edits taken in turn, so
    that recolouring's 20 colour pairs weigh no more than flip's one; each pair is a scene its edit visibly changes.

    Args:
        folder: where to write.
        split: `"S1"` (the adapter's training data), or another split for evaluation sets.
        pairs_per_family: pairs of each family of the split.
        seed: seeds the scenes, so sets with different seeds do not overlap.

    Returns:
        The folder.
    """
    import json

    folder = Path(folder)
    for sub in ("source", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    records = []
    for number, (family, edits) in enumerate(edits_by_family(split_edits(split)).items()):
        for index in range(pairs_per_family):
            edit = edits[index % len(edits)]
            scene, edited = changed_pair(edit, seed * 1_000_003 + number * 100_003 + index, IMAGE_SIZE)
            name = f"{split}-{number:03d}-{index:05d}.png"
            PIL.Image.fromarray(render(scene)).save(folder / "source" / name)
            PIL.Image.fromarray(render(edited)).save(folder / "target" / name)
            records.append({"source": f"source/{name}", "target": f"target/{name}", "edit": edit.name,
                            "family": family, "split": split})  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def write_pairs(folder: str | Path, edits: tuple[str, ...], pairs_per_edit: int, seed: int = 0) -> Path:
    """Writes pairs in the training script's local layout: `folder/source/NAME.png` + `folder/target/NAME.png`.

    Args:
        folder: where to write.
        edits: edit names (e.g. `SEEN_EDITS`).
        pairs_per_edit: pairs of each edit.
        seed: seeds scene `seed * 1_000_003 + index` for each pair, so sets with different seeds do not overlap.

    Returns:
        The folder.
    """
    folder = Path(folder)
    for sub in ("source", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for edit in edits:
        for index in range(pairs_per_edit):
            source, target = make_pair(edit, seed * 1_000_003 + index)
            name = f"{edit}-{index:05d}.png"
            source.save(folder / "source" / name)
            target.save(folder / "target" / name)
    return folder


__all__ = [
    "DEFAULT_MODEL_DIR",
    "EDIT_PROMPT_EMBEDS_NAME",
    "EDITS",
    "FAMILIES",
    "HELD_OUT_COMPOSITIONS",
    "HELD_OUT_FAMILIES",
    "SEEN_FAMILIES",
    "SPLITS",
    "changed_pair",
    "instruction_vector",
    "IMAGE_SIZE",
    "SEEN_EDITS",
    "UNSEEN_EDITS",
    "Edit",
    "Scene",
    "Shape",
    "generate_family_scene",
    "generate_scene",
    "instruction_batch",
    "load_pipeline",
    "make_pair",
    "render",
    "render_batch",
    "scene_batch",
    "space_batch",
    "split_edits",
    "world_batch",
    "write_family_pairs",
    "write_pairs",
    "write_space_pairs",
]
