"""Toy world 3's edit space: every edit an exact, reproducible function of the scene, its parameter vector what the
told base reads, its held-out edits apart from what the sampler draws."""

import json
import math
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest

from diffusers_delta import toyworld
from diffusers_delta.toyworld import edit_space
from diffusers_delta.toyworld.edit_space import EditSpec, Geometry, Operation
from diffusers_delta.toyworld.scenes import render, shape_coverage


def _scene(seed: int = 0):
    return toyworld.generate_family_scene(np.random.default_rng(seed))


def _identity_matrix(region="global", region_params=()):
    return Operation("matrix", tuple(np.eye(3).ravel()) + (0.0, 0.0, 0.0), region, region_params)


def test_sampler_is_a_function_of_its_seed_and_round_trips_through_json():
    first = [edit_space.sample_edit(np.random.default_rng(7)) for _ in range(2)]
    assert first[0] == first[1]
    rng = np.random.default_rng(0)
    specs = [edit_space.sample_edit(rng) for _ in range(200)]
    assert all(EditSpec.from_json(spec.to_json()) == spec for spec in specs)
    assert len({spec.to_json() for spec in specs}) == 200  # no two draws share an edit
    kinds = {op.kind for spec in specs for op in spec.operations}
    regions = {op.region for spec in specs for op in spec.operations}
    assert kinds == set(edit_space.OPERATIONS) and regions == set(edit_space.REGIONS)
    assert {spec.geometry.kind for spec in specs if spec.geometry} == set(edit_space.GEOMETRY)
    assert max(len(spec.operations) for spec in specs) == edit_space.MAX_OPERATIONS


def test_identity_operations_leave_the_picture_alone():
    scene = _scene(1)
    identity = EditSpec((_identity_matrix(), Operation("curve", (0.0,) * 6), Operation("sharpen", (0.0, 1.0))))
    assert np.array_equal(render(identity.edit()(scene)), render(scene))


@pytest.mark.parametrize("region", ["shapes", "background"])
def test_a_region_of_shapes_or_background_changes_those_pixels_only(region):
    scene = _scene(2)
    darken = Operation("matrix", tuple((0.5 * np.eye(3)).ravel()) + (0.0, 0.0, 0.0), region)
    changed = (render(EditSpec((darken,)).edit()(scene)) != render(scene)).any(axis=-1)
    covered = shape_coverage(scene)
    inside = covered if region == "shapes" else ~covered
    assert changed[inside].mean() > 0.9 and not changed[~inside].any()


def test_a_sharp_ramp_is_a_half_plane_and_a_radial_weight_a_disc():
    scene = _scene(3)
    half = edit_space.HELD_OUT_EDITS["tinted half"]  # angle pi: the weight rises towards the left
    changed = (render(half.edit()(scene)) != render(scene)).any(axis=-1)
    assert not changed[:, 38:].any() and changed[:, :28].mean() > 0.5
    darken = tuple((0.3 * np.eye(3)).ravel()) + (0.0, 0.0, 0.0)
    inside = Operation("matrix", darken, "radial", (0.5, 0.5, 0.25, 0.01, 1.0))
    weight = inside.weight(scene)[..., 0]
    assert weight[32, 32] > 0.99 and weight[2, 2] < 0.01 and weight[32, 20] > 0.99 and weight[32, 10] < 0.01
    outside = replace(inside, region_params=(0.5, 0.5, 0.25, 0.01, 0.0))
    assert np.allclose(outside.weight(scene), 1.0 - weight[..., None])


def test_blur_keeps_the_mean_colour_and_a_frame_its_width():
    image = render(_scene(4)).astype(np.float64) / 255.0
    blurred = edit_space.gaussian_blur(image, 1.5)
    assert np.allclose(blurred.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=2e-3)
    assert np.abs(np.diff(blurred, axis=1)).max() < np.abs(np.diff(image, axis=1)).max()
    framed = render(EditSpec((Operation("frame", (5.0, 10.0, 20.0, 30.0)),)).edit()(_scene(4)))
    assert (framed[:5] == (10, 20, 30)).all() and (framed[:, -5:] == (10, 20, 30)).all()


def test_geometry_moves_the_shapes_and_flip_mirrors_the_picture():
    for seed in range(5):
        scene = _scene(seed)
        assert np.array_equal(render(Geometry("flip")(scene)), render(scene)[:, ::-1])
    scene = _scene(5)
    moved = Geometry("translate", (0.1, 0.0))(scene)
    assert all(math.isclose(b.center[0] - a.center[0], 6.4) for a, b in zip(scene.shapes, moved.shapes))
    grown = Geometry("scale", (1.3,))(scene)
    assert shape_coverage(grown).sum() > shape_coverage(scene).sum()


def test_the_instruction_vector_says_the_edit():
    rng = np.random.default_rng(1)
    specs = [edit_space.sample_edit(rng) for _ in range(50)] + list(edit_space.HELD_OUT_EDITS.values())
    vectors = np.stack([spec.vector() for spec in specs])
    assert vectors.shape == (len(specs), edit_space.INSTRUCTION_WIDTH) and np.isfinite(vectors).all()
    assert len({vector.tobytes() for vector in vectors}) == len(specs)
    assert np.abs(vectors).max() < 10  # of order one, for the encoder to read
    one = EditSpec((Operation("blur", (1.0,)),))
    assert not one.vector()[edit_space.OPERATION_WIDTH :].any()  # empty slots and no geometry: zeros


def test_held_out_edits_are_visible_and_apart_from_sampled_ones():
    probes = edit_space.probe_scenes(2)
    rng = np.random.default_rng(2)
    sampled = [edit_space.sample_edit(rng) for _ in range(40)]
    for name, spec in edit_space.HELD_OUT_EDITS.items():
        scene, edited = edit_space.evaluation_pair(spec, 0)
        assert edit_space.visible_change(spec, scene) >= edit_space.MIN_VISIBLE_CHANGE, name
        assert np.array_equal(render(edited), render(spec.edit()(scene)))
        assert edit_space.edit_distance(spec, spec, probes) == 0.0
        assert min(edit_space.edit_distance(spec, other, probes) for other in sampled) > 0.0, name
    assert set(edit_space.SPATIAL_HELD_OUT) <= set(edit_space.HELD_OUT_EDITS)
    assert set(edit_space.WORLD2_HELD_OUT) <= set(edit_space.HELD_OUT_EDITS)


def test_space_batch_edits_under_instructions_and_reproduces_under_the_empty_one():
    references, targets, instructions = toyworld.space_batch(np.random.default_rng(0), 12, instruction_fraction=0.5)
    assert references.shape == targets.shape == (12, 3, 64, 64)
    assert instructions.shape == (12, edit_space.INSTRUCTION_WIDTH)
    empty = ~instructions.abs().sum(dim=1).bool()
    assert 0 < int(empty.sum()) < 12
    assert (references[empty] == targets[empty]).all()


def test_written_pairs_each_have_their_own_edit_and_reproduce_exactly(tmp_path):
    folder = toyworld.write_space_pairs(tmp_path / "pairs", 6, seed=1)
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 6 and len({record["spec"] for record in records}) == 6
    for record in records:
        source = np.asarray(PIL.Image.open(folder / record["source"]))
        target = np.asarray(PIL.Image.open(folder / record["target"]))
        assert np.abs(source.astype(float) - target).mean() / 255 >= edit_space.MIN_VISIBLE_CHANGE
        assert EditSpec.from_json(record["spec"]).label == record["edit"]


def test_invalid_edits_are_refused_and_unknown_finishes_named():
    with pytest.raises(ValueError, match="at least one operation"):
        EditSpec(())
    with pytest.raises(ValueError, match="Unknown operation"):
        Operation("emboss", ())
    with pytest.raises(ValueError, match="border"):
        Operation("frame", (4.0, 0.0, 0.0, 0.0), "shapes")
    with pytest.raises(ValueError, match="Unknown finish"):
        render(replace(_scene(), finishes=(("emboss", ()),)))


def test_make_pair_draws_world_3s_held_out_edits_by_name_and_any_point_of_the_space():
    source, target = toyworld.make_pair("vignette", seed=2)
    scene, edited = edit_space.evaluation_pair(edit_space.HELD_OUT_EDITS["vignette"], 2)
    assert np.array_equal(np.asarray(source), render(scene)) and np.array_equal(np.asarray(target), render(edited))
    spec = edit_space.sample_edit(np.random.default_rng(5))
    source, target = toyworld.make_pair(spec, seed=3)
    assert np.abs(np.asarray(target, dtype=float) - np.asarray(source)).mean() / 255 >= edit_space.MIN_VISIBLE_CHANGE
    # a world-2 value that world 3 holds out under the same name stays world 2's pair
    assert [np.asarray(i).tobytes() for i in toyworld.make_pair("grey(0.75)", 1)] == [
        np.asarray(i).tobytes() for i in toyworld.showcase.find_example("families", "grey(0.75)").pair(1)
    ]
    with pytest.raises(ValueError, match="World 3's: sepia, warm"):
        toyworld.make_pair("sepiaa", seed=0)


def test_model_world_reads_what_the_base_editor_reads(tmp_path):
    from diffusers_delta.toyworld import showcase
    from diffusers_delta.toyworld.instruction_encoder import InstructionEncoder

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    assert toyworld.model_world(tmp_path) == showcase.WORLD_1  # a learned prompt per edit
    InstructionEncoder(instruction_width=edit_space.INSTRUCTION_WIDTH).save_pretrained(
        tmp_path / "base" / "instruction_encoder"
    )
    assert toyworld.model_world(tmp_path) == showcase.WORLD_3
    InstructionEncoder().save_pretrained(tmp_path / "base" / "instruction_encoder")  # world 2's width
    assert toyworld.model_world(tmp_path) == showcase.WORLD_2
    (tmp_path / "base" / "instruction_encoder" / "config.json").write_text("[not json")
    with pytest.raises(ValueError, match="is not an instruction encoder's config"):
        toyworld.model_world(tmp_path)
