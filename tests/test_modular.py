"""Delta-Adapter on Modular Diffusers: klein's and Kontext's modular pipelines with the Delta-Adapter step edit as the
classic `FluxDeltaEditPipeline` and `FluxKontextDeltaEditPipeline` do, bit for bit, and give the upstream modular
pipeline's output exactly at scale 0 and once unloaded."""

import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxKontextPipeline
from diffusers.modular_pipelines import (
    Flux2KleinAutoBlocks,
    Flux2KleinModularPipeline,
    FluxKontextAutoBlocks,
    SequentialPipelineBlocks,
)

from diffusers_delta.modular import (
    DeltaAdapterStep,
    DeltaEmptyPromptStep,
    FluxDeltaModularPipeline,
    FluxKontextDeltaModularPipeline,
    delta_blocks,
)
from diffusers_delta.testing import KONTEXT_TEXT_KWARGS, TEXT_KWARGS, random_image, tiny_delta_pipeline


BASE_COMPONENTS = ("vae", "transformer", "scheduler", "text_encoder", "tokenizer")
SIZE = {"height": 64, "width": 64, "num_inference_steps": 4}
EXEMPLAR = (random_image(1), random_image(2))
QUERY = random_image(3)


@pytest.fixture(scope="module")
def classic():
    """A classic klein delta pipeline with a trained-like adapter and the empty prompt stored."""
    pipe = tiny_delta_pipeline(adapter_std=0.3)
    pipe.encode_empty_prompt(**TEXT_KWARGS)
    return pipe


@pytest.fixture(scope="module")
def folders(classic, tmp_path_factory):
    """(a klein base folder, an adapter folder with its SigLIP and empty-prompt embeddings)."""
    root = tmp_path_factory.mktemp("modular")
    base = {name: classic.components[name] for name in BASE_COMPONENTS}
    Flux2KleinPipeline(**base, is_distilled=True).save_pretrained(root / "base")
    classic.save_delta_adapter(root / "adapter")
    return root / "base", root / "adapter"


def modular(folders, text_free=True) -> FluxDeltaModularPipeline:
    base, adapter = folders
    pipe = FluxDeltaModularPipeline.from_pretrained(base, text_free=text_free)
    pipe.load_components(dtype=torch.float32)
    pipe.load_delta_adapter(adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def upstream(classic) -> Flux2KleinModularPipeline:
    pipe = Flux2KleinAutoBlocks().init_pipeline()
    pipe.update_components(**{name: classic.components[name] for name in BASE_COMPONENTS})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, **kwargs) -> torch.Tensor:
    text = {} if isinstance(pipe.blocks.sub_blocks["text_encoder"], DeltaEmptyPromptStep) else TEXT_KWARGS
    generator = torch.Generator().manual_seed(seed)
    return pipe(image=QUERY, generator=generator, output_type="pt", output="images", **SIZE, **text, **kwargs)


def classic_edit(classic, seed=0, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return classic(QUERY, generator=generator, output_type="pt", **SIZE, **TEXT_KWARGS, **kwargs).images


def test_a_text_free_modular_klein_pipeline_edits_as_the_classic_pipeline_bit_for_bit(classic, folders):
    pipe = modular(folders)
    assert "text_encoder" not in {name for name, model in pipe.components.items() if model is not None}
    edited = run(pipe, exemplar=EXEMPLAR)
    assert torch.equal(edited, classic_edit(classic, exemplar=EXEMPLAR))
    assert (edited - run(pipe, exemplar=EXEMPLAR, delta_scale=0.0)).abs().max() > 1e-3  # the edit shows
    tokens = pipe.encode_exemplar(EXEMPLAR)
    assert torch.equal(run(pipe, delta_embeds=tokens), edited)
    several = [EXEMPLAR, (random_image(4), random_image(5))]
    summed = classic_edit(classic, exemplar=several, combine="sum")
    assert torch.equal(run(pipe, exemplar=several, combine="sum"), summed)


def test_the_step_inserted_by_hand_beside_klein_s_text_encoder_step_edits_the_same(classic, folders):
    blocks = Flux2KleinAutoBlocks()  # as the documentation shows it
    blocks.sub_blocks.insert("delta_adapter", DeltaAdapterStep(), list(blocks.sub_blocks).index("denoise"))
    pipe = FluxDeltaModularPipeline(blocks, folders[0])
    pipe.load_components(dtype=torch.float32)
    pipe.load_delta_adapter(folders[1])
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(run(pipe, exemplar=EXEMPLAR), classic_edit(classic, exemplar=EXEMPLAR))
    copies = run(pipe, exemplar=EXEMPLAR, num_images_per_prompt=2)
    assert copies.shape[0] == 2
    assert torch.equal(copies, classic_edit(classic, exemplar=EXEMPLAR, num_images_per_prompt=2))


def test_scale_zero_and_an_unloaded_adapter_give_the_upstream_modular_pipeline_exactly(classic, folders):
    reference = run(upstream(classic))
    pipe = modular(folders, text_free=False)
    assert torch.equal(run(pipe, exemplar=EXEMPLAR, delta_scale=0.0), reference)
    pipe.set_delta_adapter_scale({"double": 0.0, "single": [0.0] * len(pipe.get_delta_adapter_scale()["single"])})
    assert torch.equal(run(pipe, exemplar=EXEMPLAR), reference)
    pipe.unload_delta_adapter()
    assert pipe.delta_adapter is None and pipe.delta_processors == {}
    assert torch.equal(run(pipe), reference)  # the step passes everything through


def test_adaptation_on_a_modular_pipeline_moves_only_the_adapter_and_resets_exactly(folders):
    pipe = modular(folders)
    frozen = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    before = run(pipe, exemplar=EXEMPLAR)
    result = pipe.adapt_to_exemplar(*EXEMPLAR, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(result.losses) == 2
    assert all(torch.equal(frozen[name], tensor) for name, tensor in pipe.transformer.state_dict().items())
    assert not torch.equal(run(pipe, exemplar=EXEMPLAR), before)
    pipe.reset_delta_adapter()
    assert torch.equal(run(pipe, exemplar=EXEMPLAR), before)


def test_the_step_and_the_blocks_name_what_is_wrong(classic, folders):
    pipe = modular(folders)
    with pytest.raises(ValueError, match="exactly one of exemplar"):
        run(pipe, exemplar=EXEMPLAR, delta_embeds=pipe.encode_exemplar(EXEMPLAR))
    with pytest.raises(ValueError, match="exactly one of exemplar"):
        run(pipe)
    pipe.unload_delta_adapter()  # the stored empty prompt went with the adapter, and there is no text encoder
    with pytest.raises(ValueError, match="no text_encoder, tokenizer and no stored empty-prompt embeddings"):
        run(pipe)
    pipe = modular(folders, text_free=False)
    pipe.unload_delta_adapter()
    with pytest.raises(RuntimeError, match="load_delta_adapter"):
        run(pipe, exemplar=EXEMPLAR)
    plain = delta_blocks(Flux2KleinAutoBlocks(), text_free=False).init_pipeline()  # upstream's class, no loader
    plain.update_components(**{name: classic.components[name] for name in BASE_COMPONENTS})
    with pytest.raises(TypeError, match="FluxDeltaModularPipeline"):
        plain(image=QUERY, exemplar=EXEMPLAR, output="images", **SIZE, **TEXT_KWARGS)
    with pytest.raises(ValueError, match="already hold"):
        delta_blocks(delta_blocks())
    with pytest.raises(ValueError, match="'denoise' step"):
        delta_blocks(SequentialPipelineBlocks.from_blocks_dict({"step": DeltaAdapterStep()}))


KONTEXT_COMPONENTS = BASE_COMPONENTS + ("text_encoder_2", "tokenizer_2")
KONTEXT_SIZE = {**SIZE, "_auto_resize": False, "max_area": 64 * 64}  # upstream's modular Kontext would go to 1024²


def test_kontext_s_modular_pipeline_edits_as_the_classic_kontext_pipeline_and_gives_upstream_at_scale_zero(
    tmp_path,
):
    classic = tiny_delta_pipeline(adapter_std=0.3, backbone="flux1")  # the empty prompt stored, T5 and CLIP
    FluxKontextPipeline(**{name: classic.components[name] for name in KONTEXT_COMPONENTS}).save_pretrained(
        tmp_path / "base"
    )
    classic.save_delta_adapter(tmp_path / "adapter")
    pipe = FluxKontextDeltaModularPipeline.from_pretrained(tmp_path / "base")
    pipe.load_components(dtype=torch.float32)
    pipe.load_delta_adapter(tmp_path / "adapter")
    pipe.set_progress_bar_config(disable=True)
    loaded = {name for name, model in pipe.components.items() if model is not None}
    assert not {"text_encoder", "text_encoder_2"} & loaded  # text-free: neither T5 nor CLIP loaded

    def edit(pipeline, **kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipeline(image=QUERY, generator=generator, output_type="pt", output="images", **KONTEXT_SIZE, **kwargs)

    generator = torch.Generator().manual_seed(0)
    expected = classic(QUERY, exemplar=EXEMPLAR, generator=generator, output_type="pt", **SIZE).images
    edited = edit(pipe, exemplar=EXEMPLAR)
    assert torch.equal(edited, expected)
    reference = FluxKontextAutoBlocks().init_pipeline()
    reference.update_components(**{name: classic.components[name] for name in KONTEXT_COMPONENTS})
    reference.set_progress_bar_config(disable=True)
    upstream_output = edit(reference, prompt="", **KONTEXT_TEXT_KWARGS)
    assert torch.equal(edit(pipe, exemplar=EXEMPLAR, delta_scale=0.0), upstream_output)
    assert (edited - upstream_output).abs().max() > 1e-3


def test_the_step_saved_as_a_hub_custom_block_loads_back_and_edits_the_same(classic, folders, tmp_path):
    from diffusers.modular_pipelines import ModularPipelineBlocks

    DeltaAdapterStep().save_pretrained(tmp_path / "step", delta_adapter="org/delta-adapter")
    assert sorted(path.name for path in (tmp_path / "step").iterdir()) == [
        "README.md",
        "block.py",
        "modular_config.json",
    ]
    config = ModularPipelineBlocks.load_config(tmp_path / "step")
    assert config["auto_map"] == {"ModularPipelineBlocks": "block.DeltaAdapterStep"}
    assert "diffusers-delta" in config["requirements"] and config["delta_adapter"] == "org/delta-adapter"
    assert 'load_delta_adapter("org/delta-adapter")' in (tmp_path / "step" / "README.md").read_text()
    step = ModularPipelineBlocks.from_pretrained(str(tmp_path / "step"), trust_remote_code=True)
    assert type(step).__name__ == "DeltaAdapterStep"
    blocks = Flux2KleinAutoBlocks()
    blocks.sub_blocks.insert("delta_adapter", step, list(blocks.sub_blocks).index("denoise"))
    pipe = FluxDeltaModularPipeline(blocks, folders[0])
    pipe.load_components(dtype=torch.float32)
    pipe.load_delta_adapter(folders[1])
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(run(pipe, exemplar=EXEMPLAR), classic_edit(classic, exemplar=EXEMPLAR))


def test_set_progress_bar_config_reaches_the_denoise_loop_inside_the_auto_blocks(folders, capfd):
    pipe = modular(folders)  # set_progress_bar_config(disable=True)
    capfd.readouterr()
    run(pipe, exemplar=EXEMPLAR)
    pipe.adapt_to_exemplar(*EXEMPLAR, num_steps=1)
    assert "it/s" not in capfd.readouterr().err  # upstream's setting stops at the top level: the loop would show
