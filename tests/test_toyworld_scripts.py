"""A few steps of each toy-world training script, chained as the full build chains them (keeps them alive)."""

import fcntl
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKLFlux2
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from diffusers_delta import FluxDeltaEditPipeline, toyworld
from diffusers_delta.adaptation import AdaptationConfig
from diffusers_delta.testing import tiny_image_encoder


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path[:0] = [str(EXAMPLES / "toyworld"), str(EXAMPLES)]
import build_default_model  # noqa: E402
import build_world2  # noqa: E402
import build_world3  # noqa: E402
import pretrain_image_encoder  # noqa: E402
import train_base_editor  # noqa: E402
import train_delta_adapter  # noqa: E402
import train_vae  # noqa: E402
import world2_adaptation  # noqa: E402
import world2_ladder  # noqa: E402
import world2_quality  # noqa: E402
import world3_quality  # noqa: E402

from diffusers_delta.toyworld.instruction_encoder import InstructionEncoder  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    train_vae.main(train_vae.parse_args(
        ["--output_dir", str(root / "vae"), "--max_steps", "2", "--batch_size", "4", "--stats_batches", "1"]
    ))  # fmt: skip
    train_base_editor.main(train_base_editor.parse_args(
        ["--vae_dir", str(root / "vae"), "--output_dir", str(root / "base"), "--max_steps", "2", "--batch_size", "4"]
    ))  # fmt: skip
    return root


def train_tiny_adapter(base: Path, pairs: Path, root: Path) -> None:
    """A 2-step adapter on `base` from `pairs`, with a tiny SigLIP, into `root/adapter` (the encoder in
    `root/siglip`)."""
    tiny_image_encoder().save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    train_delta_adapter.main(train_delta_adapter.parse_args([
        "--pretrained_model_name_or_path", str(base), "--image_encoder", str(root / "siglip"),
        "--empty_prompt_embeds", str(base / "empty_prompt_embeds.safetensors"),
        "--train_data_dir", str(pairs), "--resolution", "64", "--num_edit_tokens", "4",
        "--resampler_dim", "16", "--resampler_depth", "1", "--resampler_heads", "2", "--max_train_steps", "2",
        "--checkpointing_steps", "100", "--report_to", "none", "--output_dir", str(root / "adapter"),
    ]))  # fmt: skip


def test_vae_fills_its_latent_statistics(toy):
    vae = AutoencoderKLFlux2.from_pretrained(toy / "vae")
    assert vae.config.latent_channels == 8 and vae.bn.running_mean.shape == (32,)
    assert not torch.allclose(vae.bn.running_var, torch.ones(32))  # filled from encoded scenes, not the default


def test_base_editor_folder_is_a_text_free_pipeline(toy):
    pipe = FluxDeltaEditPipeline.from_pretrained(toy / "base")
    assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.config.is_distilled
    empty = safetensors.torch.load_file(toy / "base" / "empty_prompt_embeds.safetensors")["prompt_embeds"]
    instructions = safetensors.torch.load_file(toy / "base" / toyworld.EDIT_PROMPT_EMBEDS_NAME)
    assert set(instructions) == set(toyworld.EDITS)  # one learned prompt per edit, unseen ones included
    assert all(prompt.shape == empty.shape and not torch.equal(prompt, empty) for prompt in instructions.values())
    assert pipe.transformer.config.in_channels == 32 and len(pipe.transformer.single_transformer_blocks) == 2


def test_adapter_trains_on_the_toy_base_without_a_text_encoder(toy, tmp_path):
    toyworld.write_pairs(tmp_path / "pairs", ("recolor", "flip"), pairs_per_edit=2)
    train_tiny_adapter(toy / "base", tmp_path / "pairs", tmp_path)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "# adapter: a Delta-Adapter for the toy world's base editor" in card  # not "for base", not klein's
    pipe = FluxDeltaEditPipeline.from_pretrained(toy / "base")
    pipe.load_delta_adapter(tmp_path / "adapter")
    pipe.set_progress_bar_config(disable=True)
    source, target = toyworld.make_pair("recolor", seed=5)
    query, _ = toyworld.make_pair("recolor", seed=6)
    assert pipe(query, exemplar=(source, target), output_type="np").images.shape == (1, 64, 64, 3)


def test_toy_world_2_stand_ins_train_on_every_family(tmp_path, capsys):
    """The VAE and the instruction base editor of toy world 2: structured instructions through a learned encoder;
    their reports give the floor and the base's gap per split and family."""
    train_vae.main(train_vae.parse_args(
        ["--output_dir", str(tmp_path / "vae"), "--max_steps", "1", "--batch_size", "4", "--stats_batches", "1",
         "--world", "families"]
    ))  # fmt: skip
    train_base_editor.main(train_base_editor.parse_args(
        ["--vae_dir", str(tmp_path / "vae"), "--output_dir", str(tmp_path / "base"), "--max_steps", "1",
         "--batch_size", "4", "--world", "families", "--report_queries", "1"]
    ))  # fmt: skip
    printed = capsys.readouterr().out
    assert "floor S3 rotate" in printed and "S4 mean gap closed under the true instruction" in printed
    encoder = InstructionEncoder.from_pretrained(tmp_path / "base" / "instruction_encoder")
    empty = safetensors.torch.load_file(tmp_path / "base" / "empty_prompt_embeds.safetensors")["prompt_embeds"]
    torch.testing.assert_close(encoder.empty_prompt_embeds(), empty)  # the saved encoder gives the saved prompt
    pipe = FluxDeltaEditPipeline.from_pretrained(tmp_path / "base")
    assert torch.equal(pipe.empty_prompt_embeds, empty)  # the pipeline folder carries its empty prompt


@pytest.fixture(scope="module")
def toy3(toy, tmp_path_factory):
    """A world-3 build in miniature, as build_world3.py lays it out: the VAE fine-tuned from an existing one, the base
    editor from an existing transformer reading parameter vectors, pairs each of its own edit, a 2-step adapter."""
    root = tmp_path_factory.mktemp("toy3")
    train_vae.main(train_vae.parse_args(
        ["--output_dir", str(root / "vae"), "--max_steps", "1", "--batch_size", "4", "--stats_batches", "1",
         "--world", "space", "--init_from", str(toy / "vae")]
    ))  # fmt: skip
    train_base_editor.main(train_base_editor.parse_args(
        ["--vae_dir", str(root / "vae"), "--output_dir", str(root / "base"), "--max_steps", "1",
         "--batch_size", "4", "--world", "space", "--init_transformer", str(toy / "base" / "transformer"),
         "--report_queries", "1"]
    ))  # fmt: skip
    toyworld.write_space_pairs(root / "pairs", 8, seed=0)
    train_tiny_adapter(root / "base", root / "pairs", root)
    return root


def test_toy_world_3_stand_ins_start_from_world_2s_and_read_parameter_vectors(toy, toy3, capsys):
    """World 3's VAE is fine-tuned from an existing one and its base editor starts from an existing transformer,
    reading each edit's parameter vector."""
    encoder = InstructionEncoder.from_pretrained(toy3 / "base" / "instruction_encoder")
    assert encoder.config.instruction_width == toyworld.edit_space.INSTRUCTION_WIDTH
    started = safetensors.torch.load_file(toy / "base" / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = safetensors.torch.load_file(toy3 / "base" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert started.keys() == trained.keys()  # the same architecture, trained on from its weights
    assert any(not torch.equal(started[k], trained[k]) for k in started)
    first = safetensors.torch.load_file(toy / "vae" / "diffusion_pytorch_model.safetensors")
    tuned = safetensors.torch.load_file(toy3 / "vae" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == tuned.keys() and any(not torch.equal(first[k], tuned[k]) for k in first)


def test_world_3s_benchmark_measures_every_column_three_ways(toy3, tmp_path, capsys):
    """world3_quality.py on the miniature build: each row's columns with the three measures, the distance of each
    held-out edit to the training edits, the goals, and a JSON of it all."""
    report = world3_quality.main(["--work_dir", str(toy3), "--queries", "1", "--bank", "4", "--edits", "sepia",
                                  "vignette", "--compare", str(toyworld.DEFAULT_MODEL_DIR), "--adapt_steps", "1",
                                  "--adapt_setting",
                                  "num_steps=2,augment=flip_crop,early_stopping=true,eval_every=1", "--arithmetic",
                                  "--json", str(tmp_path / "r.json"), "--grid", str(tmp_path / "g.png")])  # fmt: skip
    results = report["results"]
    compared = f"world {toyworld.showcase.WORLD_NUMBERS[toyworld.model_world()]}'s model"  # --compare's column
    printed = capsys.readouterr().out
    assert set(report["arithmetic"]) == {"identity", "floor", "composition's exemplar", "parts, sum", "parts, mean"}
    assert "Edit arithmetic" in printed
    assert set(results) == {"sepia", "vignette", world3_quality.SAMPLED}
    for row in results.values():
        guarded = "adapt num_steps 2, augment flip_crop, early_stopping True, eval_every 1"
        assert set(row) == {"identity", "floor", "told base", "nearest exactly", "adapter", compared, "adapted(1)",
                            guarded}  # fmt: skip
        assert row["floor"] > 0 and row["identity"] > 0  # (the miniature VAE's floor is above identity)
        for column in ("told base", "nearest exactly", "adapter", compared, "adapted(1)", guarded):
            assert set(row[column]) == {"error", "gap", "shape_gap", "beats_erased"}
            assert 0 <= row[column]["error"] <= 1 and row[column]["beats_erased"] in (0.0, 1.0)
    assert "held-out ratio adapter / told base" in printed and "gap / shapes / beats erased" in printed
    chosen = world3_quality.format_table(results, report["distances"], True, ["adapter", "told base"])
    assert chosen.splitlines()[0] == ("| edit | distance | identity | floor | adapter (gap / shapes / beats erased) | "
                                      "told base (gap / shapes / beats erased) |")  # fmt: skip
    assert json.loads((tmp_path / "r.json").read_text())["distances"]["sepia"] > 0
    # the grid: a row per edit (and the sampled one), the exemplar, query and truth, then each column's output
    assert PIL.Image.open(tmp_path / "g.png").size == (150 + (4 + 6) * 96, 20 + 3 * 96)


def test_world_3s_benchmark_cut_off_goes_on_from_its_record_and_refuses_another_runs(toy3, tmp_path, monkeypatch):
    """With --record, a benchmark run again measures only the queries its record lacks (a line cut off mid-write
    among them) and reports what one uninterrupted run reports; a record of another adapter is refused."""
    record = tmp_path / "record.jsonl"
    argv = ["--work_dir", str(toy3), "--queries", "2", "--bank", "4", "--no_sampled", "--record", str(record)]
    whole = world3_quality.main([*argv[:-2], "--edits", "sepia", "vignette"])  # no record
    world3_quality.main([*argv, "--edits", "sepia"])  # a first session: one row
    lines = record.read_text().splitlines()
    assert len(lines) == 1 + 2 * 5  # the run, then each query's 5 columns
    record.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # the last one cut off mid-write
    measured = []
    original = world3_quality.case_measures
    monkeypatch.setattr(world3_quality, "case_measures", lambda *a: measured.append(1) or original(*a))
    again = world3_quality.main([*argv, "--edits", "sepia", "vignette"])
    assert len(measured) == 1 + 2 * 5  # the cut-off query of sepia, and vignette's row
    assert json.dumps(again["results"]) == json.dumps(whole["results"])  # (nan where the miniature has no gap)
    other = tmp_path / "other_adapter"
    shutil.copytree(toy3 / "adapter", other)
    weights = other / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    safetensors.torch.save_file({k: v + 1 for k, v in state.items()}, weights)
    with pytest.raises(SystemExit, match="records another run"):
        world3_quality.main([*argv, "--adapter", str(other)])


def test_another_benchmark_seed_draws_other_queries_and_exemplars():
    spec = toyworld.edit_space.HELD_OUT_EDITS["vignette"]
    draws = [world3_quality.held_out_cases(spec, 2, seed * world3_quality.SEED_STRIDE) for seed in (0, 1)]
    scenes = [toyworld.render(scene).tobytes() for cases in draws for case in cases
              for scene in (case.query, *case.exemplar)]  # fmt: skip
    assert len(set(scenes)) == len(scenes)  # no scene twice, within a draw or across the two


def test_edit_arithmetic_draws_compositions_whose_every_part_shows():
    """The 13th composition first drawn had a part no scene shows (a faint blur in a small disc): drawing its
    exemplar never ended. Such a composition is drawn again; every exemplar changes its scene visibly."""
    space = toyworld.edit_space
    [(case, *parts)] = world3_quality.arithmetic_cases(1, first=12)
    assert len(case.spec.operations) == 2
    specs = [case.spec, *(space.EditSpec((operation,)) for operation in case.spec.operations)]
    for (scene, _), spec in zip([case.exemplar, *parts], specs):
        assert space.visible_change(spec, scene) >= space.MIN_VISIBLE_CHANGE / 2


def test_the_nearest_training_edit_baseline_finds_an_edit_it_holds():
    """The baseline a perfect recogniser of seen edits would be: given an exemplar of a bank edit, it applies that
    very edit to the query, exactly."""
    spec = toyworld.edit_space.HELD_OUT_EDITS["warm"]
    bank = [toyworld.edit_space.HELD_OUT_EDITS[name] for name in ("sepia", "night", "warm", "vignette")]
    case = world3_quality.held_out_cases(spec, 1)[0]
    assert np.array_equal(world3_quality.nearest_exactly(case, bank), case.images["truth"])


@pytest.mark.parametrize("reuse", ["1", "2"])
def test_the_base_editor_resumes_exactly_where_it_was_cut_off(toy, tmp_path, monkeypatch, reuse):
    """A base editor cut off mid-training and run again ends with the same weights as one never cut off, also when
    it was cut off in the middle of a pool of reused examples; a checkpoint is not resumed with other flags."""
    argv = ["--vae_dir", str(toy / "vae"), "--max_steps", "4", "--batch_size", "2", "--world", "families",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--num_layers", "1", "--num_single_layers", "1",
            "--num_attention_heads", "2", "--reuse", reuse, "--pool_batches", "2"]  # fmt: skip
    train_base_editor.main(train_base_editor.parse_args([*argv, "--output_dir", str(tmp_path / "straight")]))
    real_step, calls = train_base_editor.flow_matching_step, []

    def cut_off_in_step_3(*args):  # the session ends during the third step
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args)

    checkpoint = tmp_path / "checkpoint"
    resumed_argv = [*argv, "--output_dir", str(tmp_path / "resumed"), "--checkpoint_dir", str(checkpoint),
                    "--checkpointing_steps", "2"]  # fmt: skip
    with monkeypatch.context() as patched:
        patched.setattr(train_base_editor, "flow_matching_step", cut_off_in_step_3)
        with pytest.raises(KeyboardInterrupt):
            train_base_editor.main(train_base_editor.parse_args(resumed_argv))
    assert torch.load(checkpoint / "training_state.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "resumed").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint", "straight"]  # fmt: skip
    saved = tree(checkpoint)
    with pytest.raises(SystemExit, match="other --learning_rate.*same flags"):
        train_base_editor.main(train_base_editor.parse_args([*resumed_argv, "--learning_rate", "1e-3"]))
    assert tree(checkpoint) == saved
    train_base_editor.main(train_base_editor.parse_args(resumed_argv))
    for part in ("transformer", "instruction_encoder"):
        straight = safetensors.torch.load_file(tmp_path / "straight" / part / "diffusion_pytorch_model.safetensors")
        resumed = safetensors.torch.load_file(tmp_path / "resumed" / part / "diffusion_pytorch_model.safetensors")
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_vae_resumes_exactly_where_it_was_cut_off(tmp_path, monkeypatch):
    argv = ["--max_steps", "4", "--batch_size", "2", "--stats_batches", "1", "--world", "families",
            "--lr_scheduler", "cosine", "--block_out_channels", "8", "8", "8"]  # fmt: skip
    train_vae.main(train_vae.parse_args([*argv, "--output_dir", str(tmp_path / "straight")]))
    real_batch, calls = train_vae.world_batch, []

    def cut_off_in_step_3(*args, **kwargs):  # the session ends during the third step
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    resumed_argv = [*argv, "--output_dir", str(tmp_path / "resumed"), "--checkpoint_dir", str(tmp_path / "checkpoint"),
                    "--checkpointing_steps", "2"]  # fmt: skip
    with monkeypatch.context() as patched:
        patched.setattr(train_vae, "world_batch", cut_off_in_step_3)
        with pytest.raises(KeyboardInterrupt):
            train_vae.main(train_vae.parse_args(resumed_argv))
    assert torch.load(tmp_path / "checkpoint" / "training_state.pt", weights_only=True)["step"] == 2
    with pytest.raises(SystemExit, match="other --l1_weight"):
        train_vae.main(train_vae.parse_args([*resumed_argv, "--l1_weight", "0.5"]))
    train_vae.main(train_vae.parse_args(resumed_argv))
    straight = safetensors.torch.load_file(tmp_path / "straight" / "diffusion_pytorch_model.safetensors")
    resumed = safetensors.torch.load_file(tmp_path / "resumed" / "diffusion_pytorch_model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_pool_encodes_each_example_once_and_serves_it_reuse_times(toy):
    vae = AutoencoderKLFlux2.from_pretrained(toy / "vae")
    drawn = []

    def draw(rng):  # a batch of 2 scenes, numbered in their instructions
        references, targets, _ = toyworld.world_batch(rng, 2)
        drawn.append(torch.arange(2 * len(drawn), 2 * len(drawn) + 2))
        return references, targets, drawn[-1]

    pool = train_base_editor.ExamplePool(draw, vae, np.random.default_rng(0), pool_batches=3, reuse=2, seed=0)
    served = [pool.batch(step) for step in range(6)]
    assert len(drawn) == 3  # one pool: drawn and encoded once
    numbers = torch.cat([instructions for _, _, instructions in served])
    assert sorted(numbers.tolist()) == sorted(2 * list(range(6)))  # every example twice, once per epoch
    assert sorted(numbers[:6].tolist()) == list(range(6))
    for references, latents, instructions in served:  # each example keeps its own latents
        index = int(instructions[0])
        assert torch.equal(references[0], pool.examples[0][index]) and torch.equal(latents[0], pool.examples[1][index])
    pool.batch(6)
    assert len(drawn) == 6  # the next pool


def test_the_image_encoder_pretrains_without_edit_labels(tmp_path):
    encoder = pretrain_image_encoder.main(pretrain_image_encoder.parse_args(
        ["--output_dir", str(tmp_path / "siglip"), "--max_steps", "2", "--batch_size", "4"]
    ))  # fmt: skip
    reloaded = SiglipVisionModel.from_pretrained(tmp_path / "siglip")
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), reloaded.state_dict().values()))
    assert SiglipImageProcessorPil.from_pretrained(tmp_path / "siglip").size == {"height": 64, "width": 64}


# --base_reuse 1: a 1-step base would otherwise encode a whole pool of 64 batches first (reuse is tested on its own)
BUILD_ARGV = ["--vae_steps", "1", "--base_steps", "1", "--pairs_per_family", "2", "--adapter_steps", "1",
              "--base_layers", "1", "--base_heads", "2", "--base_reuse", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def world2_build(tmp_path_factory):
    work = tmp_path_factory.mktemp("world2")
    build_world2.main(build_world2.parse_args(["--work_dir", str(work), *BUILD_ARGV]))
    return work


def tree(folder):
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def test_the_world_2_build_runs_its_stages_and_resumes(world2_build, capsys):
    pipe = FluxDeltaEditPipeline.from_pretrained(world2_build / "base")
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.config.num_attention_heads == 2
    pipe.load_delta_adapter(world2_build / "adapter")
    pipe.set_progress_bar_config(disable=True)
    source, target = toyworld.make_pair("grayscale", seed=1)
    assert pipe(source, exemplar=(source, target), output_type="np").images.shape == (1, 64, 64, 3)
    build_world2.main(build_world2.parse_args(["--work_dir", str(world2_build), *BUILD_ARGV]))
    printed = capsys.readouterr().out
    assert "stage " not in printed  # every stage is complete: nothing runs again
    assert "VAE done, base editor done, adapter done; about 0.0 h of training left" in printed
    assert [p.name for p in world2_build.glob(".*")] == [".build.lock"]  # no staging folder left behind
    assert not (world2_build / "base_checkpoint").exists()  # spent once base/ is complete


def test_the_world_3_build_starts_from_a_world_2_build_runs_its_stages_exports_and_resumes(
    world2_build, tmp_path, capsys
):
    """build_world3.py from a world-2 build's folder: every stage, then an exported world-3 model; run again, it
    trains nothing; and it refuses to start from a folder whose model is not world 2's (the package's, since world 3
    ships), naming how to build one."""
    from diffusers_delta.toyworld import showcase

    work, shipped = tmp_path / "toy3", tmp_path / "shipped"
    argv = ["--work_dir", str(work), "--world2_dir", str(world2_build), "--vae_steps", "1", "--base_steps", "1",
            "--base_reuse", "1", "--pairs", "16", "--adapter_steps", "1",
            "--export", "--export_dir", str(shipped)]  # fmt: skip
    build_world3.main(build_world3.parse_args(argv))
    assert "stage 6/6: adapter" in capsys.readouterr().out
    assert toyworld.model_world(shipped) == showcase.WORLD_3
    pipe = toyworld.load_pipeline(shipped)
    pipe.set_progress_bar_config(disable=True)
    source, target = toyworld.make_pair("sepia", seed=1)
    assert pipe(source, exemplar=(source, target), output_type="np").images.shape == (1, 64, 64, 3)
    build_world3.main(build_world3.parse_args(argv))
    assert "stage " not in capsys.readouterr().out  # every stage complete: nothing trains again
    with pytest.raises(SystemExit, match=r"holds no world-2 model; build one \(python examples/toyworld/build_world2"):
        build_world3.main(build_world3.parse_args(["--work_dir", str(tmp_path / "again"), "--world2_dir",
                                                   str(shipped)]))  # fmt: skip


def test_the_world_2_build_says_where_it_stands(tmp_path, capsys):
    work = tmp_path / "build"
    (work / "vae").mkdir(parents=True)
    (work / "base_checkpoint").mkdir()
    torch.save({"step": 300}, work / "base_checkpoint" / "training_state.pt")
    (work / "adapter" / "checkpoint-500").mkdir(parents=True)
    args = build_world2.parse_args(["--work_dir", str(work), "--base_steps", "1000", "--adapter_steps", "2000"])
    assert [(name, done, total) for name, done, total, _ in build_world2.progress(args, work)] == [
        ("VAE", 1500, 1500), ("base editor", 300, 1000), ("adapter", 500, 2000)]  # fmt: skip
    left = (700 * build_world2.SECONDS_PER_STEP["base"] + 1500 * build_world2.SECONDS_PER_STEP["adapter"]) / 3600
    build_world2.report_progress(args, work)
    printed = capsys.readouterr().out
    assert "VAE done, base editor 300/1000 steps, adapter 500/2000 steps" in printed
    assert f"about {left:.1f} h of training left" in printed


def test_a_world_2_stage_cut_off_leaves_no_folder_and_runs_again(world2_build, tmp_path, monkeypatch, capsys):
    def crash(args):  # a base editor that dies after writing part of its folder
        (Path(args.output_dir) / "transformer").mkdir()
        raise KeyboardInterrupt

    shutil.copytree(world2_build / "vae", tmp_path / "vae")  # a build whose first stage is done
    argv = build_world2.parse_args(["--work_dir", str(tmp_path), *BUILD_ARGV])
    with monkeypatch.context() as patched:
        patched.setattr(train_base_editor, "main", crash)
        with pytest.raises(KeyboardInterrupt):
            build_world2.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".build.lock") == ["vae"]  # nothing of the base's
    (tmp_path / ".base.tmp-killed").mkdir()  # what a build killed mid-stage (a session's end) leaves behind
    (tmp_path / ".base.tmp-killed" / "part.bin").write_bytes(b"x")
    with open(tmp_path / ".build.lock", "w") as other_build:
        fcntl.flock(other_build, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="Another build is running in"):
            build_world2.main(argv)
    capsys.readouterr()
    build_world2.main(argv)
    assert not list(tmp_path.glob(".base.tmp-*"))
    assert capsys.readouterr().out.count("stage ") == 4  # the VAE is not trained again: base, SigLIP, pairs, adapter
    assert (tmp_path / "base" / "transformer" / "config.json").is_file()


def test_the_world_2_benchmark_compares_the_adapter_with_the_base_and_the_ablations(world2_build, tmp_path, capsys):
    build_world2.main(build_world2.parse_args(["--work_dir", str(world2_build), *BUILD_ARGV, "--ablations"]))
    printed = capsys.readouterr().out
    assert "stage " not in printed and printed.count("ablation: ") == 2  # only the ablation adapters are trained
    grid = tmp_path / "world2.png"
    world2_quality.main([
        "--work_dir", str(world2_build), "--queries", "1", "--splits", "S3", "S4", "--adapt_queries", "1",
        "--adapt_steps", "1", "--markdown", "--grid", str(grid),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    header = "| split | family | identity | floor | base + true instruction | nearest seen edit | adapter | "
    assert header + "adapter, 3 exemplars | adapter + adapt(1) | no consistency | pooled mlp |" in printed
    assert printed.count("| S3 | ") == 4 and printed.count("| S4 | ") == 6  # a row per family
    assert "issue 20's minimum goals:" in printed and "S3 zero-shot mean" in printed  # S3 decides these goals
    assert "adaptation raises S3's mean by" in printed and "S3 adapter " in printed
    assert PIL.Image.open(grid).size == (150 + 7 * 96, 20 + 10 * 96)  # row titles, 7 columns, a row per family
    assert world2_quality.row_title("S4", "flip + remove", "flip(horizontal) + remove(circle)") == (
        "S4 flip + remove\nhorizontal + circle")  # fmt: skip


def test_the_goals_ratio_counts_only_families_the_told_base_makes():
    told, adapter = "base + true instruction", "adapter"
    rows = [  # identity 0.5, floor 0.1: an error e closes (0.5 - e) / 0.4 of the gap
        {"identity": 0.5, "floor": 0.1, told: 0.1, adapter: 0.3},  # told +1.0, adapter +0.5
        {"identity": 0.5, "floor": 0.1, told: 0.3, adapter: 0.4},  # told +0.5, adapter +0.25
        {"identity": 0.5, "floor": 0.1, told: 0.46, adapter: 0.1},  # told +0.1: not counted, whatever the adapter
        {"identity": 0.1, "floor": 0.2, told: 0.1, adapter: 0.1},  # no room above the floor: not counted
    ]
    counted, ratios = world2_quality.ratios_to_told(rows, told)
    assert counted == 2 and ratios[told] == 1.0 and ratios[adapter] == pytest.approx(0.375 / 0.75)
    assert world2_quality.ratios_to_told(rows[2:], told) == (0, {})


def test_the_goals_say_which_are_met():
    told, near, adapter, adapted = "base + true instruction", "nearest seen edit", "adapter", "adapter + adapt(20)"

    def row(*errors):  # identity 0.5, floor 0.1: an error e closes (0.5 - e) / 0.4 of the gap
        return {"identity": 0.5, "floor": 0.1, **dict(zip((told, near, adapter, adapted), errors))}

    table = [("S1", f"family {i}", row(0.1, 0.1, 0.14, 0.14)) for i in range(10)]  # adapter 0.9 of told
    table += [("S1", "unmade", row(0.5, 0.5, 0.5, 0.5))]  # told +0.0: not counted
    table += [("S3", "posterize", row(0.1, 0.45, 0.3, 0.1)), ("S3", "rotate", row(0.2, 0.45, 0.5, 0.5))]
    met = dict(world2_quality.goals(table, adapted))
    assert list(met.values()) == [True, True, False, True, True, True]  # S3: adapter +0.25 / told +0.875 < 0.4
    assert list(met)[:3] == [
        "S1 adapter/told ratio 0.90 (>= 0.8; 10 families)",
        "families counted 10 of S1's 11 (>= 10)",
        "S3 adapter/told ratio 0.29 (>= 0.4; 2 families)",
    ]
    assert "adaptation raises S3's mean by +0.25 (>= +0.20)" in met and "S3 zero-shot mean +0.25 (> +0.15)" in met
    assert not any("S2" in goal for goal in met)  # a split not measured decides nothing


def test_adaptation_settings_are_compared_on_the_same_queries(world2_build, capsys):
    table = world2_adaptation.main([
        "--work_dir", str(world2_build), "--splits", "S1", "S3", "--families", "brightness", "rotate",
        "--queries", "1", "--setting", "num_steps=1",
        "--setting", "num_steps=1,learning_rate=1e-4,trainable=edit_tokens", "--markdown",
    ])  # fmt: skip
    columns = ["zero-shot", "adapt num_steps 1", "adapt num_steps 1, lr 0.0001, trainable edit_tokens"]
    assert [(split, family) for split, family, _ in table] == [("S1", "brightness"), ("S3", "rotate")]
    assert all(list(row)[2:] == columns and 0 <= min(row.values()) for _, _, row in table)
    printed = capsys.readouterr().out
    assert "| split | family | identity | floor | " + " | ".join(columns) + " |" in printed
    assert "  S1: zero-shot " in printed and "of 1 worse)" in printed
    with pytest.raises(ValueError, match="FIELD one of num_steps"):
        world2_adaptation.parse_setting("steps=20")
    assert world2_adaptation.parse_setting("gradient_checkpointing=true,noise_samples=2") == AdaptationConfig(
        gradient_checkpointing=True, noise_samples=2)  # fmt: skip


def test_the_ladder_trains_every_rung_on_the_same_base(world2_build, capsys):
    """Rungs 1-4 and 7 on a tiny build: the told base, the oracle, the delta adapter on one and on two families, and
    the source's tokens beside the delta, each measured on the families it trained on, with the mean and the ratio
    to the told base."""
    table = world2_ladder.main([
        "--work_dir", str(world2_build), "--families", "brightness", "flip", "--family_counts", "1", "2",
        "--steps", "1", "--pairs_per_family", "2", "--queries", "1", "--markdown",
    ])  # fmt: skip
    # the paper's rung on every family first, then the oracle, fewer families, and the source tokens beside the delta
    rungs = ["1 told base", "3 delta (2 families)", "2 oracle", "3 delta (1 family)", "7 source + delta"]
    assert list(table["brightness"])[2:] == rungs
    assert list(table["flip"])[2:] == [rung for rung in rungs if rung != "3 delta (1 family)"]
    assert all(0 <= error <= 1 for row in table.values() for error in row.values())
    printed = capsys.readouterr().out
    assert "| family | identity | floor | " + " | ".join(rungs) + " |" in printed
    assert "| mean |" in printed and "| ratio to the told base (families it closes by 0.3 or more) |" in printed
    told = world2_ladder.main(
        ["--work_dir", str(world2_build), "--families", "flip", "--rungs", "told", "--queries", "1"]
    )  # the ceiling alone: nothing trained, no pairs encoded
    assert list(told["flip"]) == ["identity", "floor", "1 told base"]


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "2"]], ids=["adapter", "adapter-and-lora"])
def test_a_ladder_cut_off_mid_rung_goes_on_exactly(world2_build, tmp_path, monkeypatch, lora):
    """With --state_dir, a ladder killed in the middle of a rung's training (a session's end) resumes from its last
    checkpoint and measures what the uninterrupted ladder measures; a rerun with every rung measured trains nothing.
    With --lora_rank, the LoRA trained beside the adapter resumes as exactly, and each rung's is its own."""
    argv = ["--work_dir", str(world2_build), "--families", "brightness", "--rungs", "told", "oracle", "--steps", "3",
            "--pairs_per_family", "2", "--queries", "1", *lora]  # fmt: skip
    uninterrupted = world2_ladder.main(argv)
    state = ["--state_dir", str(tmp_path / "state"), "--checkpointing_steps", "1"]
    real_save = world2_ladder.save_checkpoint

    def save_then_die(path, checkpoint):
        real_save(path, checkpoint)
        if checkpoint["step"] == 2:
            raise KeyboardInterrupt  # killed after its second checkpoint

    with monkeypatch.context() as patched:
        patched.setattr(world2_ladder, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            world2_ladder.main(argv + state)
    assert world2_ladder.main(argv + state) == uninterrupted  # the told rung kept, the oracle resumed at step 2
    assert not list((tmp_path / "state").glob("*/*/checkpoint.pt"))  # spent once measured
    monkeypatch.setattr(world2_ladder, "train_adapter", None)  # nothing is trained again
    assert world2_ladder.main(argv + state + ["--markdown"]) == uninterrupted
    if lora:  # a rung with a LoRA is named so, and measures something else than the same rung without
        assert list(uninterrupted["brightness"])[-1] == "2 oracle + LoRA r2"


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_failed_export_keeps_the_shipped_model(world2_build, tmp_path, monkeypatch, where):
    real_copy, calls = shutil.copyfile, []

    def copy(*args, **kwargs):  # the disk fills up at the first or the last file copied
        calls.append(args)
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy)
    shipped, failing_call = tmp_path / "default_model", 0
    build_default_model.export(world2_build, shipped)
    before, failing_call = tree(shipped), 1 if where == "first" else len(calls)
    calls.clear()
    with pytest.raises(OSError, match="No space"):
        build_default_model.export(world2_build, shipped)
    assert tree(shipped) == before and sorted(p.name for p in tmp_path.iterdir()) == ["default_model"]


def test_an_export_over_the_size_limit_is_refused_and_keeps_the_shipped_model(world2_build, tmp_path):
    shipped = tmp_path / "default_model"
    build_default_model.export(world2_build, shipped)
    before = tree(shipped)
    with pytest.raises(RuntimeError, match="over 0 MiB.*unchanged"):
        build_default_model.export(world2_build, shipped, max_bytes=1024)
    assert tree(shipped) == before
    build_world2.main(build_world2.parse_args(
        ["--work_dir", str(world2_build), *BUILD_ARGV, "--export", "--export_dir", str(tmp_path / "other")]
    ))  # fmt: skip
    assert tree(tmp_path / "other") == before  # --export writes where --export_dir says


def _exported_demo(build: Path, world: str, label_width: int, tmp_path: Path, capsys):
    """Exports a build's model as the package would ship it, checks its world, runs the demo on it and checks the
    grid's size -> (the exported folder, the world's demo rows, the lines of the demo's table)."""
    from diffusers_delta import cli
    from diffusers_delta.toyworld import showcase

    shipped = tmp_path / "default_model"
    build_default_model.export(build, shipped)
    assert toyworld.model_world(shipped) == world
    out = tmp_path / "demo.png"
    cli.main(["demo", "--out", str(out), "--model-dir", str(shipped)])
    rows = showcase.DEMO_ROWS[world]
    assert PIL.Image.open(out).size == (label_width + 5 * 128, 20 + len(rows) * 128)
    return shipped, rows, capsys.readouterr().out.split(" verdict\n")[1].splitlines()[:-1]


def test_a_world_2_model_shows_world_2_in_the_demo_the_app_and_its_card(world2_build, tmp_path, monkeypatch, capsys):
    """An exported world-2 model (`build_world2.py --export`) is shown as what it is: the demo's rows come from S1, S2
    and S3 with one adapted beside its zero-shot row, the app's examples and page name world 2's edits, and the
    card's snippet draws a world-2 exemplar."""
    from diffusers_delta.app import _toy_examples, describe_model
    from diffusers_delta.toyworld import showcase

    shipped, rows, printed = _exported_demo(world2_build, showcase.WORLD_2, 150, tmp_path, capsys)
    splits = [split for split in ("S1: seen", "S2: held-out value", "S3: unseen family") if any(split in line
              for line in printed)]  # fmt: skip
    assert len(printed) == len(rows) and len(splits) == 3
    adapted_rows = [(name, steps) for name, steps in rows if steps]
    assert adapted_rows
    for name, steps in adapted_rows:
        zero_shot, adapted = [re.search(r" (\d*) +(\d\.\d{4}) +\d\.\d{4}  ", line).groups() for line in printed
                              if line.startswith(f"{name} ")]  # fmt: skip
        assert adapted[0] == str(steps) and adapted[1] == zero_shot[1]  # the same query (its identity), adapted
    card = (shipped / "adapter" / "README.md").read_text()
    assert f'toyworld.make_pair("{rows[0][0]}", seed=0)' in card

    monkeypatch.setattr(toyworld, "DEFAULT_MODEL_DIR", shipped)  # as if the package shipped this model
    assert "posterize" in describe_model(None, None) and "recolor" in describe_model(None, None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gradio"))
    (tmp_path / "gradio").mkdir()
    examples = _toy_examples(toyworld.model_world())
    assert [row[-1] for row in examples] == [steps for *_, steps in showcase.APP_EXAMPLES[showcase.WORLD_2]]
    name, seed, *_ = showcase.APP_EXAMPLES[showcase.WORLD_2][-1]
    drawn = PIL.Image.open(examples[-1][1])  # the exemplar target of the adapted example
    assert np.array_equal(np.asarray(drawn), np.asarray(toyworld.make_pair(name, seed)[1]))


def test_a_world_3_model_shows_held_out_edits_in_the_demo_the_app_and_its_card(toy3, tmp_path, monkeypatch, capsys):
    """An exported world-3 model is shown as what it is: the demo's rows are held-out edits labelled as such, one
    adapted beside its zero-shot row; the app's page and examples and the card's snippet are world 3's."""
    from diffusers_delta.app import _toy_examples, describe_model
    from diffusers_delta.toyworld import showcase

    shipped, rows, printed = _exported_demo(toy3, showcase.WORLD_3, 170, tmp_path, capsys)
    assert len(printed) == len(rows) and all("held out: never trained" in line for line in printed)
    assert all(name in toyworld.edit_space.HELD_OUT_EDITS for name, _ in rows)
    assert any(steps for _, steps in rows) and any(not steps for _, steps in rows)
    card = (shipped / "adapter" / "README.md").read_text()
    assert f'toyworld.make_pair("{rows[0][0]}", seed=0)' in card
    first = showcase.find_example(showcase.WORLD_3, rows[0][0])
    assert [np.asarray(i).tobytes() for i in toyworld.make_pair(rows[0][0], 0)] == [
        np.asarray(i).tobytes() for i in first.pair(0)
    ]  # the snippet's pair is the demo's

    monkeypatch.setattr(toyworld, "DEFAULT_MODEL_DIR", shipped)
    assert "sepia" in describe_model(None, None) and "never trained on" in describe_model(None, None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gradio"))
    (tmp_path / "gradio").mkdir()
    examples = _toy_examples(toyworld.model_world())
    name, seed, *_ = showcase.APP_EXAMPLES[showcase.WORLD_3][0]
    drawn = PIL.Image.open(examples[0][0])  # the first example's exemplar source
    assert np.array_equal(np.asarray(drawn), np.asarray(toyworld.make_pair(name, seed)[0]))


def test_the_demo_refuses_an_edit_its_model_does_not_know_before_loading_it(world2_build, tmp_path, capsys):
    from diffusers_delta import cli

    shipped = tmp_path / "default_model"
    build_default_model.export(world2_build, shipped)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(tmp_path / "demo.png"), "--model-dir", str(shipped), "--edits", "grayscale"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "no edit 'grayscale'" in error and "grey" in error and "posterize" in error
    cli.main(["demo", "--out", str(tmp_path / "demo.png"), "--model-dir", str(shipped), "--edits", "zoom"])
    assert "zoom(×1.5)" in capsys.readouterr().out  # a family: its first edit


def test_a_cut_off_build_trains_its_adapters_on_from_their_last_checkpoint(tmp_path, monkeypatch):
    """The adapter stage (and the ablations') resumes from `adapter/checkpoint-N`, as the build's progress counts it,
    instead of training again from step 0 (`train_delta_adapter` resumes exactly, tests/test_train_script.py)."""
    for stage in ("vae", "base", "siglip", "pairs"):  # complete stages are skipped
        (tmp_path / stage).mkdir()
    runs = []
    monkeypatch.setattr(train_delta_adapter, "main", runs.append)
    build_world2.main(build_world2.parse_args(["--work_dir", str(tmp_path), "--ablations"]))
    assert [Path(run.output_dir).name for run in runs] == ["adapter", "adapter_no_consistency", "adapter_pooled_mlp"]
    assert all(run.resume_from_checkpoint == "latest" for run in runs)
