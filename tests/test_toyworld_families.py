"""Toy world 2's edit families: enough of them, over every domain, exact, and split into disjoint S1-S4."""

import json

import numpy as np
import pytest

from diffusers_delta import toyworld
from diffusers_delta.data import LocalPairDataset
from diffusers_delta.toyworld import families
from diffusers_delta.toyworld.scenes import generate_scene, render


def scenes(count=20, seed=0):
    rng = np.random.default_rng(seed)
    return [generate_scene(rng) for _ in range(count)]


def test_at_least_twelve_families_over_every_domain():
    assert len(families.FAMILIES) >= 12
    assert {f.domain for f in families.FAMILIES.values()} == set(families.DOMAINS)
    for domain in families.DOMAINS:  # the adapter sees every domain
        assert any(families.FAMILIES[name].domain == domain for name in families.SEEN_FAMILIES)


def test_the_splits_are_disjoint_and_say_what_they_hold():
    names = {split: [edit.name for edit in families.split_edits(split)] for split in families.SPLITS}
    for split, edits in names.items():
        assert edits and len(set(edits)) == len(edits), split
    for a in families.SPLITS:
        for b in families.SPLITS:
            assert a == b or not set(names[a]) & set(names[b]), (a, b)
    family_sets = {split: {families.family_of(e) for e in families.split_edits(split)} for split in families.SPLITS}
    assert family_sets["S1"] == set(families.SEEN_FAMILIES) and family_sets["S2"] <= family_sets["S1"]
    assert family_sets["S3"] == set(families.HELD_OUT_FAMILIES) and not family_sets["S3"] & family_sets["S1"]
    assert all(set(c.split(" + ")) <= set(families.SEEN_FAMILIES) for c in family_sets["S4"])
    for name in families.SEEN_FAMILIES:  # S2 holds values S1 never shows
        family = families.FAMILIES[name]
        assert not set(family.seen_values) & set(family.held_out_values)


def test_s2_holds_out_only_values_of_parameters_s1_varies():
    """A parameter S1 shows with one value only (a flip seen only horizontally) cannot be learned as a parameter, so
    S2 holds out a value of a parameter only where S1 trains at least two other values of it."""
    for name in families.SEEN_FAMILIES:
        family = families.FAMILIES[name]
        for held_out in family.held_out_values:
            for position, value in enumerate(held_out):
                seen = {values[position] for values in family.seen_values}
                assert value in seen or len(seen) >= 2, (name, held_out, position)


@pytest.mark.parametrize("split", ["S1", "S2", "S3"])
def test_image_forms_agree_with_the_scene_edits(split):
    for edit in families.split_edits(split):
        if edit.image_fn is None:
            continue
        for scene in scenes():
            assert np.array_equal(edit.image_fn(render(scene)), render(edit(scene))), edit.name


def test_compositions_are_the_second_edit_after_the_first():
    for edit in families.split_edits("S4"):
        first_name, second_name = edit.name.split(" + ")
        first, second = (
            next(e for e in families.split_edits("S1") if e.name == name) for name in (first_name, second_name)
        )
        for scene in scenes(5):
            assert np.array_equal(render(edit(scene)), render(second(first(scene))))


@pytest.mark.parametrize("split", families.SPLITS)
def test_every_edit_changes_a_picture_and_pairs_are_a_function_of_the_seed(split):
    for index, edit in enumerate(families.split_edits(split)):
        scene, edited = families.changed_pair(edit, seed=index, size=64)
        assert not np.array_equal(render(scene), render(edited)), edit.name
        again, _ = families.changed_pair(edit, seed=index, size=64)
        assert again == scene


def test_sampling_covers_the_families_evenly_and_is_seeded():
    drawn = families.sample_edits("S1", 400, np.random.default_rng(0))
    counts = {}
    for edit in drawn:
        counts[families.family_of(edit)] = counts.get(families.family_of(edit), 0) + 1
    assert set(counts) == set(families.SEEN_FAMILIES) and max(counts.values()) < 3 * min(counts.values())
    again = families.sample_edits("S1", 400, np.random.default_rng(0))
    assert [e.name for e in drawn] == [e.name for e in again]


def test_every_edit_has_its_own_structured_instruction():
    vectors = {}
    for split in families.SPLITS:
        for edit in families.split_edits(split):
            vector = families.instruction_vector(edit)
            assert vector.shape == (families.INSTRUCTION_WIDTH,) and vector.any()
            vectors.setdefault(vector.tobytes(), []).append(edit.name)
    assert all(len(names) == 1 for names in vectors.values())  # no two edits read the same
    assert not families.instruction_vector(None).any()  # the empty instruction: reproduce the reference
    composition = families.split_edits("S4")[0]
    first, second = np.split(families.instruction_vector(composition), families.MAX_STEPS)
    assert first.any() and second.any()
    with pytest.raises(ValueError, match="not an edit of the toy world's families"):
        families.instruction_vector(toyworld.EDITS["flip"])


def test_world_batches_and_family_pairs(tmp_path):
    references, targets, instructions = toyworld.world_batch(np.random.default_rng(0), 16, instruction_fraction=0.5)
    assert references.shape == targets.shape == (16, 3, 64, 64) and instructions.shape == (
        16,
        families.INSTRUCTION_WIDTH,
    )
    unchanged = (references == targets).flatten(1).all(dim=1)
    assert ((instructions == 0).all(dim=1) <= unchanged).all()  # the empty instruction keeps the reference
    toyworld.write_family_pairs(tmp_path, "S2", pairs_per_family=2, seed=3)
    records = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    s2_families = {families.family_of(edit) for edit in families.split_edits("S2")}
    assert len(records) == 2 * len(s2_families) and {r["split"] for r in records} == {"S2"}
    per_family = {}
    for record in records:  # every family equally, its edits in turn
        per_family.setdefault(record["family"], []).append(record["edit"])
    assert set(per_family) == s2_families and all(len(v) == 2 for v in per_family.values())
    assert len(set(per_family["recolor"])) == 2  # a family of several edits takes them in turn
    assert len(LocalPairDataset(tmp_path)) == len(records)


def test_world_batches_of_chosen_families():
    _, _, instructions = toyworld.world_batch(
        np.random.default_rng(0), 32, edited_fraction=1.0, instruction_fraction=1.0, families=("flip",)
    )
    names = list(families.FAMILIES)
    chosen = instructions[:, : len(names)].argmax(dim=1)  # each instruction's family (its first step's one-hot)
    assert (chosen == names.index("flip")).all() and not instructions[:, families.STEP_WIDTH :].any()
    with pytest.raises(ValueError, match=r"No edits of \['rotate'\] in \('S1',\)"):
        toyworld.world_batch(np.random.default_rng(0), 2, splits=("S1",), families=("rotate",))


def test_make_pair_draws_world_2_edits_by_name_or_family():
    from diffusers_delta.toyworld import showcase

    source, target = toyworld.make_pair("flip(vertical)", seed=4)
    assert np.array_equal(np.asarray(target), np.asarray(source)[::-1])  # a scene the flip visibly changes
    assert not np.array_equal(np.asarray(source), np.asarray(target))
    same = toyworld.make_pair("zoom", seed=4)  # a family: its first edit (S3 has zoom's only values)
    assert [np.asarray(image).tobytes() for image in same] == [
        np.asarray(image).tobytes() for image in toyworld.make_pair("zoom(×1.5)", seed=4)
    ]
    with pytest.raises(ValueError, match="no edit 'zooom'.*posterize.*'flip\\(vertical\\)'.*World 1's.*grayscale"):
        toyworld.make_pair("zooom", seed=0)
    for world in (showcase.WORLD_1, showcase.WORLD_2, showcase.WORLD_3):  # every showcase names an edit of its world
        assert [example.adapt_steps for example in showcase.demo_examples(world)] == [
            steps for _, steps in showcase.DEMO_ROWS[world]
        ]
        assert all(showcase.find_example(world, name) for name, *_ in showcase.APP_EXAMPLES[world])
