import numpy as np
import pytest
import torch

from diffusers_delta import toyworld
from diffusers_delta.data import LocalPairDataset
from diffusers_delta.toyworld.scenes import BACKGROUND_PALETTE, SHAPE_PALETTE, generate_scene, render


def scenes(count=40, seed=0):
    rng = np.random.default_rng(seed)
    return [generate_scene(rng) for _ in range(count)]


def test_generation_is_a_function_of_the_seed():
    first, second = scenes(seed=7), scenes(seed=7)
    assert first == second
    assert all(np.array_equal(render(a), render(b)) for a, b in zip(first, second))
    assert scenes(seed=8) != first
    source, target = toyworld.make_pair("recolor", seed=3)
    assert np.array_equal(np.asarray(source), np.asarray(toyworld.make_pair("recolor", seed=3)[0]))
    assert source.size == (64, 64) and source.mode == "RGB"


def test_scenes_use_disjoint_palettes_and_show_their_shapes():
    assert not set(SHAPE_PALETTE) & set(BACKGROUND_PALETTE)
    for scene in scenes():
        assert 1 <= len(scene.shapes) <= 3
        colors = {tuple(c) for c in render(scene).reshape(-1, 3)}
        assert colors <= set(SHAPE_PALETTE) | set(BACKGROUND_PALETTE)
        assert colors & set(SHAPE_PALETTE)  # at least one shape is visible


@pytest.mark.parametrize("name", [name for name, edit in toyworld.EDITS.items() if edit.image_fn is not None])
def test_pixel_edits_are_exact(name):
    """Editing the scene and rendering it gives the same image as editing the rendered image."""
    edit = toyworld.EDITS[name]
    for scene in scenes():
        edited = render(edit(scene))
        assert np.array_equal(edit.image_fn(render(scene)), edited)
        assert not np.array_equal(edited, render(scene))  # every edit changes every picture


def test_geometric_edits_move_exactly_what_they_say():
    for scene in scenes():
        enlarged, moved = toyworld.EDITS["enlarge"](scene), toyworld.EDITS["move"](scene)
        for original, bigger, shifted in zip(scene.shapes, enlarged.shapes, moved.shapes):
            assert bigger.size == pytest.approx(original.size * 1.5) and bigger.center == original.center
            assert shifted.center == pytest.approx((original.center[0] + 12.8, original.center[1]))
            assert (bigger.kind, bigger.color) == (shifted.kind, shifted.color) == (original.kind, original.color)
        assert not np.array_equal(render(enlarged), render(scene))


def test_seen_and_unseen_edits_split_all_edits():
    assert set(toyworld.SEEN_EDITS).isdisjoint(toyworld.UNSEEN_EDITS)
    assert set(toyworld.SEEN_EDITS) | set(toyworld.UNSEEN_EDITS) == set(toyworld.EDITS)


def test_written_pairs_are_a_training_folder(tmp_path):
    toyworld.write_pairs(tmp_path, ("recolor", "flip"), pairs_per_edit=3, seed=1)
    dataset = LocalPairDataset(tmp_path)
    assert len(dataset) == 6
    pair = dataset[0]
    expected_source, expected_target = toyworld.make_pair("flip", seed=1_000_003)
    assert np.array_equal(np.asarray(pair["source"]), np.asarray(expected_source))
    assert np.array_equal(np.asarray(pair["target"]), np.asarray(expected_target))


def test_scene_batches_can_show_edited_scenes_without_changing_unedited_ones():
    plain = toyworld.scene_batch(np.random.default_rng(0), 6)
    assert plain.shape == (6, 3, 64, 64) and -1 <= plain.min() and plain.max() <= 1
    assert torch.equal(plain, toyworld.scene_batch(np.random.default_rng(0), 6, edited_fraction=0.0))
    assert not torch.equal(plain, toyworld.scene_batch(np.random.default_rng(0), 6, edited_fraction=1.0))


def test_instruction_batches_pair_each_reference_with_its_instructed_edit():
    references, targets, instructions = toyworld.instruction_batch(np.random.default_rng(3), 24)
    assert references.shape == targets.shape == (24, 3, 64, 64) and instructions.shape == (24,)
    assert (instructions == -1).any() and (instructions >= 0).any()
    names = list(toyworld.EDITS)
    for reference, target, instruction in zip(references, targets, instructions.tolist()):
        if instruction < 0:  # the empty instruction: reproduce
            assert torch.equal(reference, target)
            continue
        edit = toyworld.EDITS[names[instruction]]
        if edit.image_fn is not None:
            pixels = ((reference + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            expected = torch.from_numpy(edit.image_fn(pixels)).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.equal(target, expected)
        else:
            assert not torch.equal(reference, target)
    _, _, none = toyworld.instruction_batch(np.random.default_rng(3), 8, instruction_fraction=0.0)
    assert (none == -1).all()
