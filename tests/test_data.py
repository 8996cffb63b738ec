import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_delta.data import (
    HubPairDataset,
    LocalPairDataset,
    MixedPairs,
    MixedStream,
    NHREditDataset,
    PairTransform,
    PicoBananaDataset,
    SideBySideDataset,
    TransformedPairs,
    collate_pairs,
    relation_split,
    split_side_by_side,
)
from diffusers_delta.semantic_delta import SiglipPreprocessor
from diffusers_delta.testing import random_image


def test_split_side_by_side_recovers_both_halves():
    source, target = np.asarray(random_image(1, (48, 32))), np.asarray(random_image(2, (48, 32)))
    joined = PIL.Image.fromarray(np.concatenate([source, target], axis=1))  # as Relation252K stores a pair
    left, right = split_side_by_side(joined)
    assert np.array_equal(np.asarray(left), source) and np.array_equal(np.asarray(right), target)
    odd = PIL.Image.fromarray(np.concatenate([source, np.zeros((32, 1, 3), np.uint8), target], axis=1))
    left, right = split_side_by_side(odd)  # a 1-pixel divider is dropped
    assert np.array_equal(np.asarray(left), source) and np.array_equal(np.asarray(right), target)


def test_local_folder_layout_matches_names_and_skips_what_it_cannot_read(tmp_path, caplog):
    for folder in ("source", "target"):
        (tmp_path / folder).mkdir()
    for name, seed in (("a", 0), ("b", 1), ("broken", 2)):
        random_image(seed).save(tmp_path / "source" / f"{name}.png")
        random_image(seed + 10).save(tmp_path / "target" / f"{name}.jpg")
    random_image(5).save(tmp_path / "source" / "lonely.png")
    (tmp_path / "source" / "broken.png").write_bytes(b"not an image")
    dataset = LocalPairDataset(tmp_path)
    assert [s.stem for s, _ in dataset.pairs] == ["a", "b", "broken"]
    assert "1 images" in caplog.text  # lonely.png has no counterpart
    assert dataset[0]["source"].size == (64, 64) and dataset[2] is None
    transformed = TransformedPairs(dataset, PairTransform(64, SiglipPreprocessor(32)))
    replaced = transformed[2]  # the broken pair gives way to the next readable one (wrapping to index 0)
    assert replaced["skipped"] == 1 and torch.equal(replaced["source_pixels"], transformed[0]["source_pixels"])
    assert collate_pairs([replaced, transformed[1]])["skipped"] == 1


def test_local_metadata_jsonl_layout(tmp_path):
    random_image(0).save(tmp_path / "x.png")
    random_image(1).save(tmp_path / "y.png")
    lines = [{"source": "x.png", "target": "y.png"}, {"source": "x.png", "target": "missing.png"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    dataset = LocalPairDataset(tmp_path)
    assert len(dataset) == 1
    assert np.array_equal(np.asarray(dataset[0]["target"]), np.asarray(random_image(1)))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"source": "x.png", "edited": "y.png"}) + "\n")
    with pytest.raises(ValueError, match=r'metadata.jsonl:1 is not a pair record .*write one \{"source"'):
        LocalPairDataset(tmp_path)


def test_local_folder_of_another_layout_says_which_layouts_work(tmp_path):
    with pytest.raises(ValueError, match="source/ and target/.*metadata.jsonl"):
        LocalPairDataset(tmp_path)


def test_side_by_side_dataset_reads_tasks_from_folders(tmp_path):
    for task in ("recolor", "sketch"):
        (tmp_path / task).mkdir()
        joined = np.concatenate([np.asarray(random_image(1)), np.asarray(random_image(2))], axis=1)
        PIL.Image.fromarray(joined).save(tmp_path / task / "0001.png")
    dataset = SideBySideDataset(tmp_path)
    assert dataset.tasks == ["recolor", "sketch"] and len(dataset) == 2
    assert np.array_equal(np.asarray(dataset[0]["source"]), np.asarray(random_image(1)))


def test_hub_dataset_columns(tmp_path):
    table = datasets.Dataset.from_dict(
        {"before": [random_image(0), random_image(1)], "after": [random_image(2), random_image(3)]},
        features=datasets.Features({"before": datasets.Image(), "after": datasets.Image()}),
    )
    dataset = HubPairDataset(table, "before", "after")
    assert np.array_equal(np.asarray(dataset[1]["target"]), np.asarray(random_image(3)))
    with pytest.raises(ValueError, match=r"no column \['edited'\]"):
        HubPairDataset(table, "before", "edited")


def test_pair_transform_shapes_and_ranges():
    transform = PairTransform(64, SiglipPreprocessor(32))
    item = TransformedPairs([{"source": random_image(0, (96, 64)), "target": random_image(1)}], transform)[0]
    assert item["source_pixels"].shape == item["target_pixels"].shape == (3, 64, 64)
    assert item["source_pixels"].min() >= -1 and item["source_pixels"].max() <= 1
    assert item["source_siglip"].shape == (3, 32, 32) and item["skipped"] == 0
    batch = collate_pairs([item, item])
    assert batch["skipped"] == 0 and batch["target_pixels"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        PairTransform(72, SiglipPreprocessor(32))
    assert torch.is_tensor(batch["source_siglip"])


def test_random_crops_keep_a_pair_aligned_and_are_a_function_of_the_key():
    wide = PIL.Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (64, 1, 3)))  # 256x64 ramp
    pair = {"source": wide, "target": wide}
    random_crop = PairTransform(64, SiglipPreprocessor(32), center_crop=False, seed=0)
    crops = [random_crop(pair, key=f"0/{index}") for index in range(8)]
    assert all(torch.equal(c["source_pixels"], c["target_pixels"]) for c in crops)  # one window for both images
    assert len({round(float(c["source_pixels"][0, 0, 0]), 3) for c in crops}) > 4  # different places per pair
    assert torch.equal(random_crop(pair, key="0/3")["source_pixels"], crops[3]["source_pixels"])  # reproducible
    center = PairTransform(64, SiglipPreprocessor(32), center_crop=True)(pair, key="0/3")["source_pixels"]
    assert float(center[0, 0, 0]) == pytest.approx(96 / 255 * 2 - 1)  # the middle 64 columns of 256


def _relation_folder(root, tasks: dict[str, int]):
    """A Relation252K-style folder: per task, that many side-by-side pair images."""
    for task, count in tasks.items():
        (root / task).mkdir(parents=True)
        for index in range(count):
            joined = np.concatenate([np.asarray(random_image(index)), np.asarray(random_image(100 + index))], axis=1)
            PIL.Image.fromarray(joined).save(root / task / f"pair_{index:02d}.jpg")
    return root


def test_the_relation_split_holds_out_an_exemplar_and_queries_per_task_by_a_seeded_rule(tmp_path):
    root = _relation_folder(tmp_path / "relation", {"add_hat": 9, "to_sketch": 8, "tiny": 3, "single": 1})
    split = relation_split(root, seed=0, queries_per_task=5)
    assert sorted(split.evaluation) == ["add_hat", "tiny", "to_sketch"]  # a one-pair task only trains
    assert [len(queries) for _, queries in split.evaluation.values()] == [5, 2, 5]
    held = {path for exemplar, queries in split.evaluation.values() for path in (exemplar, *queries)}
    assert not held & set(split.train) and len(held) + len(split.train) == 21  # disjoint, and nothing lost
    assert relation_split(root, seed=0, queries_per_task=5) == split  # the same seed, the same split
    assert relation_split(root, seed=1, queries_per_task=5).evaluation != split.evaluation

    subset = relation_split(root, seed=0, queries_per_task=5, train_pairs=4)
    assert len(subset.train) == 4 and set(subset.train) <= set(split.train)
    assert subset.evaluation == split.evaluation  # the subset never reaches into the evaluation pairs
    with pytest.raises(ValueError, match="holds 6 training pairs after the evaluation split: fewer than 9"):
        relation_split(root, seed=0, train_pairs=9)
    assert len(SideBySideDataset(root, subset.train)) == 4


class _Numbered(torch.utils.data.Dataset):
    """A source whose items say which source and item they are."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"source": self.name, "target": index}


def test_a_mix_draws_sources_by_weight_from_its_seed_alone_and_cycles_a_small_source():
    big, small = _Numbered("big", 300), _Numbered("small", 10)
    mix = MixedPairs([big, small], [1.0, 3.0], seed=0, length=4000)
    drawn = [mix[i] for i in range(len(mix))]
    share = sum(item["source"] == "small" for item in drawn) / len(drawn)
    assert abs(share - 0.75) < 0.03  # 3 : 1
    small_items = [item["target"] for item in drawn if item["source"] == "small"]
    assert sorted(small_items[:10]) == list(range(10)) and small_items[10:20] == small_items[:10]  # each once a round
    assert [MixedPairs([big, small], [1.0, 3.0], seed=0, length=4000)[i] for i in range(50)] == drawn[:50]
    assert [MixedPairs([big, small], [1.0, 3.0], seed=1, length=4000)[i] for i in range(50)] != drawn[:50]
    assert len(MixedPairs([big, small], [1.0, 1.0])) == 310  # an epoch: the sources' total by default
    with pytest.raises(ValueError, match="weights must be positive"):
        MixedPairs([big, small], [1.0, 0.0])


def pico_banana_fixture(root):
    """Pico-Banana-400K's single-turn layout: sft.jsonl, the edited images under images/positive-edit/, the Open
    Images sources where Apple's mapping script records them (local_input_image) or by file name in a folder."""
    (root / "images" / "positive-edit").mkdir(parents=True)
    (root / "openimage_source_images" / "train_0").mkdir(parents=True)
    (root / "flickr").mkdir()
    records = []
    for index in range(4):
        url = f"https://farm6.staticflickr.com/1/{index:04d}_o.jpg"
        record = {"open_image_input_url": url, "text": f"Edit number {index}.", "edit_type": "Change color",
                  "output_image": f"images/positive-edit/{index + 1}.png", "summarized_text": "x"}  # fmt: skip
        random_image(100 + index).save(root / record["output_image"])
        if index < 2:  # mapped by map_openimage_url_to_local.py
            record["local_input_image"] = f"openimage_source_images/train_0/{index:016x}.jpg"
            random_image(index).save(root / record["local_input_image"])
        elif index == 2:  # found by its URL's file name
            random_image(index).save(root / "flickr" / f"{index:04d}_o.jpg")
        records.append(record)  # index 3: its source was never downloaded
    (root / "sft.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def test_pico_banana_single_turn_records_read_as_published_and_missing_sources_skipped(tmp_path, caplog):
    root = pico_banana_fixture(tmp_path / "pico")
    dataset = PicoBananaDataset(root / "sft.jsonl", source_images_dir=root / "flickr")
    items = [dataset[index] for index in range(len(dataset))]
    assert [item is not None for item in items] == [True, True, True, False]
    assert items[0]["instruction"] == "Edit number 0." and items[0]["edit_type"] == "Change color"
    assert np.array_equal(np.asarray(items[2]["target"]), np.asarray(random_image(102)))
    without_folder = PicoBananaDataset(root / "sft.jsonl")
    assert without_folder[2] is None and "map_openimage_url_to_local.py" in caplog.text
    (tmp_path / "other.jsonl").write_text(json.dumps({"source": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="other.jsonl:1 is not a Pico-Banana single-turn record"):
        PicoBananaDataset(tmp_path / "other.jsonl")


def nhr_edit_fixture(root):
    """NHR-Edit's layout: train/metadata.jsonl, train/images/NN/image_X_original.jpg and its edits
    image_X_edited_Y.jpg, two edits of one original; the last record's edit was never downloaded."""
    images = root / "train" / "images"
    records = []
    for number, (original, edit) in enumerate([(7, 0), (7, 1), (12, 0), (12, 1)]):
        folder = images / f"{original % 2:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        source, edited = f"image_{original}_original.jpg", f"image_{original}_edited_{edit}.jpg"
        random_image(original).save(folder / source)
        if number < 3:
            random_image(100 + number).save(folder / edited)
        records.append({"sample_id": f"s{number}", "source_file_name": f"images/{folder.name}/{source}",
                        "edited_file_name": f"images/{folder.name}/{edited}", "edit_instruction": f"Edit {number}.",
                        "category": "Object addition", "kind": "original", "style": "photo",
                        "img_width": 64, "img_height": 64})  # fmt: skip
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def test_nhr_edit_triplets_read_as_published_and_missing_edits_skipped(tmp_path):
    root = nhr_edit_fixture(tmp_path / "nhr-edit")
    for given in (root, root / "train", root / "train" / "metadata.jsonl"):
        dataset = NHREditDataset(given)
        items = [dataset[index] for index in range(len(dataset))]
        assert [item is not None for item in items] == [True, True, True, False]
    assert items[1]["instruction"] == "Edit 1." and items[1]["edit_type"] == "Object addition"
    assert np.array_equal(np.asarray(items[0]["source"]), np.asarray(items[1]["source"]))  # one original, two edits
    saved = PIL.Image.open(root / "train" / "images" / "00" / "image_12_edited_0.jpg")
    assert np.array_equal(np.asarray(items[2]["target"]), np.asarray(saved))  # the file under its manifest name
    (root / "train" / "other.jsonl").write_text(json.dumps({"source": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="other.jsonl:1 is not an NHR-Edit record"):
        NHREditDataset(root / "train" / "other.jsonl")
    (root / "train" / "cut.jsonl").write_text(json.dumps(records_of(root)[0]) + "\n" + '{"source_file_na')
    with pytest.raises(ValueError, match="cut.jsonl:2 is not JSON"):
        NHREditDataset(root / "train" / "cut.jsonl")
    with pytest.raises(ValueError, match="No manifest at .*metadata.jsonl: pass NHR-Edit's folder"):
        NHREditDataset(tmp_path)


def records_of(root):
    return [json.loads(line) for line in (root / "train" / "metadata.jsonl").read_text().splitlines()]


class _NumberedStream(torch.utils.data.IterableDataset):
    """A stream whose pairs say which stream and item they are, re-ordered by its epoch."""

    def __init__(self, name: str, size: int):
        self.name, self.size, self.epoch = name, size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for index in range(self.size):
            yield {"source": self.name, "target": (index + self.epoch) % self.size}


def test_a_stream_mix_draws_by_weight_from_its_seed_and_epoch_alone_until_every_stream_ran_out():
    def run(seed=0, epoch=0):
        mix = MixedStream([_NumberedStream("big", 40), _NumberedStream("small", 4)], [1.0, 3.0], seed=seed)
        mix.set_epoch(epoch)
        return list(mix)

    drawn = run()
    assert {item["target"] for item in drawn if item["source"] == "big"} == set(range(40))  # every big pair once
    small = [item for item in drawn if item["source"] == "small"]
    assert len(small) > 4 and abs(len(small) / len(drawn) - 0.75) < 0.12  # the small stream cycles, 3 : 1
    assert run() == drawn and run(seed=1) != drawn and run(epoch=1) != drawn  # what a resume re-reads


class _UnreadableFirstStream(_NumberedStream):
    """A stream whose first pair could not be read (None, as StreamingHubPairDataset yields it)."""

    def __iter__(self):
        yield None
        yield from super().__iter__()


def test_a_stream_mix_goes_on_past_an_unreadable_pair_where_a_stream_starts_again():
    mix = MixedStream([_NumberedStream("big", 40), _UnreadableFirstStream("small", 2)], [1.0, 3.0], seed=0)
    drawn = list(mix)
    assert {item["target"] for item in drawn if item and item["source"] == "big"} == set(range(40))
    assert drawn.count(None) > 1  # passed on for the transform to skip and count, each time the small one restarts


def _escaping_layouts(root, outside):
    """A dataset folder `root` whose manifest names, besides a good pair, an absolute path, one climbing out with
    `..`, and a symbolic link inside the folder that points out of it; `outside` holds the files they reach."""
    root.mkdir()
    outside.mkdir()
    for name, seed in (("a.png", 0), ("b.png", 1)):
        random_image(seed).save(root / name)
    random_image(2).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    return [("a.png", "b.png"), (str(outside / "secret.png"), "b.png"), ("a.png", "../outside/secret.png"),
            ("link.png", "b.png")]  # fmt: skip


def test_manifest_paths_that_leave_the_dataset_are_skipped_unless_allowed(tmp_path, caplog):
    root = tmp_path / "pairs"
    records = _escaping_layouts(root, tmp_path / "outside")
    lines = [json.dumps({"source": source, "target": target}) for source, target in records]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    dataset = LocalPairDataset(root)
    assert len(dataset) == 1 and dataset.skipped_at_load == {"outside the root": 3, "missing": 0}
    assert "Skipped 3 records whose paths leave" in caplog.text and "../outside/secret.png" in caplog.text
    assert "--allow_paths_outside_dataset" in caplog.text
    trusted = LocalPairDataset(root, allow_outside_root=True)
    assert len(trusted) == 4 and np.array_equal(np.asarray(trusted[1]["source"]), np.asarray(random_image(2)))
    (root / "metadata.jsonl").unlink()  # the folder layout: a link out of source/ is skipped the same way
    for sub in ("source", "target"):
        (root / sub).mkdir()
    random_image(3).save(root / "source" / "x.png")
    random_image(4).save(root / "target" / "x.png")
    (root / "source" / "y.png").symlink_to(tmp_path / "outside" / "secret.png")
    random_image(5).save(root / "target" / "y.png")
    assert [s.name for s, _ in LocalPairDataset(root).pairs] == ["x.png"]


def test_pico_banana_and_nhr_edit_records_leaving_their_root_are_skipped(tmp_path, caplog):
    root = pico_banana_fixture(tmp_path / "pico")
    random_image(9).save(tmp_path / "elsewhere.png")
    lines = (root / "sft.jsonl").read_text().splitlines()
    climbing = {**json.loads(lines[0]), "output_image": "../elsewhere.png"}
    absolute_source = {**json.loads(lines[1]), "local_input_image": str(tmp_path / "elsewhere.png")}
    climbing_source = {**json.loads(lines[1]), "local_input_image": "../elsewhere.png"}
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in (climbing, absolute_source, climbing_source)))
    dataset = PicoBananaDataset(root / "sft.jsonl")
    assert dataset[0] is None and "'../elsewhere.png'" in caplog.text and "leaves" in caplog.text
    # an absolute local_input_image is read where it points: Apple's mapping script may write absolute paths
    assert np.array_equal(np.asarray(dataset[1]["source"]), np.asarray(random_image(9)))
    assert dataset[2] is None
    assert PicoBananaDataset(root / "sft.jsonl", allow_outside_root=True)[0] is not None

    nhr = nhr_edit_fixture(tmp_path / "nhr")
    metadata = nhr / "train" / "metadata.jsonl"
    first = json.loads(metadata.read_text().splitlines()[0])
    escaping = [{**first, "edited_file_name": str(tmp_path / "elsewhere.png")},
                {**first, "source_file_name": "../../elsewhere.png"}]  # fmt: skip
    metadata.write_text("\n".join(json.dumps(r) for r in [first, *escaping]))
    dataset = NHREditDataset(metadata)
    assert dataset[0] is not None and dataset[1] is None and dataset[2] is None
    assert NHREditDataset(metadata, allow_outside_root=True)[1] is not None


def test_a_thousand_missing_images_are_warned_in_a_few_lines_and_named_in_the_count(tmp_path, caplog):
    root = tmp_path / "pico"
    (root / "images").mkdir(parents=True)
    records = [{"open_image_input_url": f"u/{i}.jpg", "output_image": f"images/{i}.png",
                "local_input_image": f"images/{i}-source.png"} for i in range(1000)]  # fmt: skip
    for i in range(4):
        random_image(i).save(root / f"images/{i}.png")
        random_image(i + 10).save(root / f"images/{i}-source.png")
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    transformed = TransformedPairs(PicoBananaDataset(root / "sft.jsonl"), PairTransform(64, SiglipPreprocessor(32)))
    caplog.clear()
    items = [transformed[0], transformed[4]]  # the second passes over 996 missing pairs to wrap round to pair 0
    assert items[1]["skipped"] == 996 and items[1]["skipped_names"][0].endswith("images/4.png")
    assert len(caplog.records) <= 4 and "counted, not named" in caplog.text
    batch = collate_pairs(items)
    assert batch["skipped"] == 996 and len(batch["skipped_names"]) == 996


def test_an_empty_mix_source_is_named_and_weights_must_be_finite(tmp_path):
    random_image(0).save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"source": "x.png", "target": "x.png"}))
    full = LocalPairDataset(tmp_path)
    with pytest.raises(ValueError, match="source folder:/data/empty holds no pairs"):
        MixedPairs([full, []], [1.0, 1.0], names=["folder:/data/full", "folder:/data/empty"])
    for weight in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="positive finite"):
            MixedPairs([full, full], [1.0, weight])
