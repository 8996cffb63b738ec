"""FLUX.3, the third backbone. At the transformer: the branch runs in the image modes' early blocks and every single
block, reaches them through the transformer's pre-hook, leaves upstream's output exact without an edit, traces whole
under `torch.compile(fullgraph=True)`, trains only the adapter, and refuses other backbones' adapters by name. In
its modular pipelines (FLUX.3 and the distilled one): text-free edits, upstream's output at scale 0 and unloaded,
adaptation that moves only the adapter."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor
from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks
from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids

from diffusers_delta.adapter_files import default_feature_extractor, write_adapter_folder
from diffusers_delta.backbones import adapter_config_for, adapter_for, adapter_mismatches, backbone_of, flux3
from diffusers_delta.image_inputs import pil_to_tensor
from diffusers_delta.modular import Flux3DeltaModularPipeline, Flux3DistilledDeltaModularPipeline
from diffusers_delta.semantic_delta import SiglipPreprocessor, patch_features
from diffusers_delta.testing import (
    random_image,
    randomize_,
    tiny_flux3_transformer,
    tiny_image_encoder,
    tiny_transformer,
    tiny_vae,
)
from diffusers_delta.training import DeltaAdapterObjective


GRID = 8  # a 64x64 image: 8x8 patchified latent tokens
PROMPT = torch.randn(1, 8, 48, generator=torch.Generator().manual_seed(0))  # (1, L, D_txt): TINY joint_attention_dim


def forward_inputs(transformer, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    channels = transformer.config.in_channels
    return {
        "hidden_states": torch.randn(1, GRID * GRID, channels, generator=generator),
        "encoder_hidden_states": PROMPT,
        "timestep": torch.tensor([0.6]),
        "img_ids": _prepare_image_ids(GRID, GRID, flux3.IMAGE_ROPE_SCALE),
        "txt_ids": Flux3TextRoPEInputsStep._prepare_text_ids(PROMPT),
        "image_cond_hidden_states": torch.randn(1, GRID * GRID, channels, generator=generator),
        "image_cond_ids": _prepare_image_ids(GRID, GRID, flux3.IMAGE_ROPE_SCALE, l_coord=-1),
        "return_dict": False,
    }


@pytest.fixture
def transformer_and_adapter():
    transformer = tiny_flux3_transformer()
    adapter = randomize_(adapter_for(transformer, image_embed_dim=32), std=0.3)
    return transformer, adapter


def test_the_branch_runs_in_the_image_modes_early_blocks_and_every_single_block(transformer_and_adapter):
    transformer, adapter = transformer_and_adapter
    layers = transformer.config.num_layers
    assert (adapter.config.num_double_blocks, adapter.config.num_single_blocks) == (2 * layers, 2)
    inputs = forward_inputs(transformer)
    with torch.no_grad():
        upstream = transformer(**inputs)[0]
        transformer.set_attn_processor(flux3.processors_for(transformer, adapter))
        processors = transformer.attn_processors
        assert isinstance(processors["txt_mode_blocks.0.attn.processor"], Flux3AttnProcessor)  # the text's: upstream
        places = {name: p.block for name, p in processors.items() if isinstance(p, flux3.Flux3DeltaAttnProcessor)}
        assert places["mode_blocks.image.0.attn.processor"] == ("double", 0)
        assert places["mode_blocks.image_cond.0.attn.processor"] == ("double", layers)
        assert places["single_transformer_blocks.1.attn.processor"] == ("single", 1)
        tokens = torch.randn(1, adapter.config.num_edit_tokens, adapter.config.edit_token_dim)
        assert torch.equal(transformer(**inputs)[0], upstream)  # no edit tokens: upstream's output exactly
        edit = {"delta_hidden_states": tokens}
        assert torch.equal(transformer(**inputs, attention_kwargs={**edit, "delta_scale": 0.0})[0], upstream)
        edited = transformer(**inputs, attention_kwargs=edit)[0]
        assert (edited - upstream).abs().max() > 1e-3
        assert transformer._delta_call.tokens is tokens  # the pre-hook took the tokens out of attention_kwargs
        for processor in processors.values():
            if isinstance(processor, flux3.Flux3DeltaAttnProcessor):
                processor.scale = 0.0
        assert torch.equal(transformer(**inputs, attention_kwargs=edit)[0], upstream)  # every block at 0


def test_the_pre_hook_is_installed_once_and_released(transformer_and_adapter):
    transformer, adapter = transformer_and_adapter
    originals = dict(transformer.attn_processors)
    flux3.processors_for(transformer, adapter)
    flux3.processors_for(transformer, adapter)  # adaptation builds its processors again: still one hook
    assert len(transformer._forward_pre_hooks) == 1
    transformer.set_attn_processor(originals)
    flux3.release(transformer)
    assert len(transformer._forward_pre_hooks) == 0 and not hasattr(transformer, "_delta_call")


def test_torch_compile_traces_flux3_with_the_processors_in_one_graph(transformer_and_adapter):
    transformer, adapter = transformer_and_adapter
    transformer.set_attn_processor(flux3.processors_for(transformer, adapter))
    inputs = forward_inputs(transformer)
    tokens = torch.randn(1, adapter.config.num_edit_tokens, adapter.config.edit_token_dim)
    compiled = torch.compile(transformer, fullgraph=True, backend="eager")  # a graph break would raise
    with torch.no_grad():
        eager = transformer(**inputs, attention_kwargs={"delta_hidden_states": tokens})[0]
        traced = compiled(**inputs, attention_kwargs={"delta_hidden_states": tokens})[0]
        other = compiled(**inputs, attention_kwargs={"delta_hidden_states": 2 * tokens})[0]
    torch.testing.assert_close(traced, eager)
    assert (other - traced).abs().max() > 1e-4  # new tokens are read, not baked into the graph


def test_adapters_of_other_backbones_are_refused_naming_both():
    flux3_transformer, klein_transformer = tiny_flux3_transformer(), tiny_transformer()
    klein_config = adapter_config_for(klein_transformer, 32)
    flux3_config = adapter_config_for(flux3_transformer, 32)
    (on_flux3,) = adapter_mismatches(klein_config, flux3_transformer, 32)
    (on_klein,) = adapter_mismatches(flux3_config, klein_transformer, 32)
    assert "FLUX.2" in on_flux3 and "FLUX.3" in on_flux3
    assert "FLUX.3" in on_klein and "FLUX.2" in on_klein
    assert adapter_mismatches(flux3_config, flux3_transformer, 32) == []
    assert backbone_of(flux3_transformer) is flux3


@pytest.mark.parametrize("flow_map", [False, True], ids=["flux3", "flux3-distilled"])
def test_the_training_objective_on_flux3_moves_only_the_adapter(flow_map):
    transformer, vae, image_encoder = tiny_flux3_transformer(flow_map=flow_map), tiny_vae(), tiny_image_encoder()
    adapter = adapter_for(transformer, image_embed_dim=image_encoder.config.hidden_size)
    for model in (transformer, vae, image_encoder):
        model.requires_grad_(False)
    objective = DeltaAdapterObjective(
        adapter, transformer, vae, image_encoder, SiglipPreprocessor(32), {"prompt_embeds": PROMPT}
    )
    pixels = torch.stack([pil_to_tensor(random_image(seed)) for seed in (1, 2)]) * 2 - 1  # (2, 3, 64, 64)
    latents = flux3.encode_latents(vae, pixels)  # (2, 16, 8, 8)
    features = patch_features(image_encoder, torch.nn.functional.interpolate(pixels, size=32))
    generator = torch.Generator().manual_seed(0)
    losses = objective(
        source_latents=latents[:1],
        target_latents=latents[1:],
        source_features=features[:1],
        target_features=features[1:],
        noise=torch.randn(latents[:1].shape, generator=generator),
        sigmas=torch.tensor([0.5]),
    )
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    moved = {name for name, p in adapter.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(p.grad is None for model in (transformer, vae, image_encoder) for p in model.parameters())


# ---------------------------------------------------------------------------------------------- the modular pipeline

STEPS = {"num_inference_steps": 4, "output_type": "pt", "output": "images"}
EXEMPLAR = (random_image(1), random_image(2))
QUERY = random_image(3)


@pytest.fixture(scope="module", params=[False, True], ids=["flux3", "flux3-distilled"])
def flux3_folders(request, tmp_path_factory):
    """(a FLUX.3 base folder as upstream's modular pipeline saves it, an adapter folder with its SigLIP and the
    empty prompt's embeddings, the upstream blocks class, the Delta pipeline class)."""
    distilled = request.param
    root = tmp_path_factory.mktemp("flux3")
    upstream_class = Flux3DistilledAutoBlocks if distilled else Flux3AutoBlocks
    upstream = upstream_pipeline(upstream_class, tiny_flux3_transformer(flow_map=distilled), tiny_vae())
    upstream.save_pretrained(str(root / "base"), overwrite_modular_index=True)  # upstream takes a str only
    image_encoder = tiny_image_encoder()
    adapter = randomize_(adapter_for(upstream.transformer, image_encoder.config.hidden_size), std=0.3)
    write_adapter_folder(
        root / "adapter",
        adapter,
        image_encoder=image_encoder,
        feature_extractor=default_feature_extractor(image_encoder),
        empty_prompt_embeds={"prompt_embeds": PROMPT},
    )
    delta_class = Flux3DistilledDeltaModularPipeline if distilled else Flux3DeltaModularPipeline
    return root / "base", root / "adapter", upstream_class, delta_class


def upstream_pipeline(blocks_class, transformer=None, vae=None, base=None):
    """Upstream's FLUX.3 modular pipeline without its text steps (the prompt's embeddings are given), no guidance."""
    blocks = blocks_class()
    blocks.sub_blocks.pop("prompt_upsampler")
    blocks.sub_blocks.pop("text_encoder")
    pipe = blocks.init_pipeline(None if base is None else str(base))
    if base is None:
        pipe.update_components(transformer=transformer, vae=vae)
    else:
        pipe.load_components(dtype=torch.float32)
    if getattr(pipe, "guider", None) is not None:
        pipe.guider.disable()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_flux3_modular_pipeline_edits_text_free_and_gives_upstream_s_output_at_scale_zero(flux3_folders):
    base, adapter_folder, upstream_class, delta_class = flux3_folders
    pipe = delta_class.from_pretrained(base)
    pipe.load_components(dtype=torch.float32)
    pipe.load_delta_adapter(adapter_folder)
    pipe.set_progress_bar_config(disable=True)
    assert "prompt_upsampler" not in pipe.blocks.sub_blocks and "text_encoder" not in pipe._component_specs

    def run(pipeline, **kwargs):
        return pipeline(image=QUERY, generator=torch.Generator().manual_seed(0), **STEPS, **kwargs)

    reference = run(upstream_pipeline(upstream_class, base=base), prompt_embeds=PROMPT)
    assert torch.equal(run(pipe, exemplar=EXEMPLAR, delta_scale=0.0), reference)
    edited = run(pipe, exemplar=EXEMPLAR)
    assert (edited - reference).abs().max() > 1e-3
    assert torch.equal(run(pipe, delta_embeds=pipe.encode_exemplar(EXEMPLAR)), edited)
    assert run(pipe, exemplar=EXEMPLAR, num_images_per_prompt=2).shape[0] == 2

    frozen = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    pipe.adapt_to_exemplar(*EXEMPLAR, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(frozen[name], tensor) for name, tensor in pipe.transformer.state_dict().items())
    pipe.reset_delta_adapter()
    assert torch.equal(run(pipe, exemplar=EXEMPLAR), edited)

    pipe.unload_delta_adapter()
    assert pipe.delta_processors == {} and len(pipe.transformer._forward_pre_hooks) == 0
    assert torch.equal(run(pipe, prompt_embeds=PROMPT), reference)  # the step passes everything through


def test_an_adapter_in_memory_goes_in_with_update_components_as_it_is_and_edits_as_a_loaded_one(flux3_folders):
    from transformers import SiglipVisionModel

    from diffusers_delta import DeltaAdapterModel

    base, adapter_folder, _, delta_class = flux3_folders
    loaded = delta_class.from_pretrained(base)
    loaded.load_components(dtype=torch.float32)
    loaded.load_delta_adapter(adapter_folder)
    in_memory = delta_class.from_pretrained(base)
    in_memory.load_components(dtype=torch.float32)
    adapter = DeltaAdapterModel.from_pretrained(adapter_folder).train()  # as a training run holds it
    with pytest.raises(ValueError, match="needs its image_encoder"):
        in_memory.update_components(delta_adapter=adapter)
    with pytest.raises(ValueError, match="unload_delta_adapter"):
        loaded.update_components(delta_adapter=None)
    in_memory.update_components(image_encoder=SiglipVisionModel.from_pretrained(adapter_folder / "image_encoder"),
                                delta_adapter=adapter)  # fmt: skip
    in_memory._restore_empty_prompt(loaded._empty_prompt())
    assert in_memory.delta_adapter is adapter and adapter.training
    assert all(p.requires_grad for p in adapter.parameters())  # not frozen, unlike a loaded one

    def run(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(image=QUERY, exemplar=EXEMPLAR, generator=torch.Generator().manual_seed(0), **STEPS)

    with torch.no_grad():
        assert torch.equal(run(in_memory), run(loaded))


def test_the_cli_edits_with_a_flux3_base_a_query_and_a_folder_as_the_pipeline_does(flux3_folders, tmp_path, run_cli):
    from diffusers_delta.editing import edited_images

    base, adapter_folder, _, delta_class = flux3_folders
    (tmp_path / "queries").mkdir()
    for name, image in (("source", EXEMPLAR[0]), ("target", EXEMPLAR[1]), ("queries/a", QUERY),
                        ("queries/b", random_image(4))):  # fmt: skip
        image.save(tmp_path / f"{name}.png")
    edit = ["edit", "--exemplar", tmp_path / "source.png", tmp_path / "target.png", "--base", base,
            "--adapter", adapter_folder]  # fmt: skip
    code, _, err = run_cli([*edit, "--query", tmp_path / "queries" / "a.png", "--out", tmp_path / "edited.png"])
    assert code == 0, err
    code, _, err = run_cli([*edit, "--queries", tmp_path / "queries", "--out", tmp_path / "out", "--batch-size", "2"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]

    pipe = delta_class.from_pretrained(base)
    pipe.load_components(dtype=torch.float32)
    pipe.load_delta_adapter(adapter_folder)
    pipe.set_progress_bar_config(disable=True)
    expected = edited_images(pipe, QUERY, exemplar=EXEMPLAR, generator=torch.Generator().manual_seed(0))[0]
    two = edited_images(pipe, QUERY, exemplar=EXEMPLAR, num_images_per_prompt=2,
                        generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)])  # fmt: skip
    first, second = (np.asarray(image, dtype=np.int16) for image in two)
    assert np.abs(first - np.asarray(expected, dtype=np.int16)).max() <= 2  # the same seed (batched: within rounding)
    assert np.abs(first - second).max() > 2  # each image its own generator
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "edited.png")), np.asarray(expected))
    from diffusers_delta.app import ExemplarEditor

    editor = ExemplarEditor(pipe)  # the app's editing, on a FLUX.3 pipeline
    (output,) = editor.edit(*EXEMPLAR, [QUERY], steps=STEPS["num_inference_steps"])
    reference = edited_images(pipe, QUERY, delta_embeds=pipe.encode_exemplar(EXEMPLAR), num_inference_steps=4,
                              generator=torch.Generator().manual_seed(0))[0]  # fmt: skip
    assert output.size == QUERY.size and np.array_equal(np.asarray(output), np.asarray(reference))
    with pytest.raises(ValueError, match="use Flux3DeltaModularPipeline with it"):
        editor.edit(*EXEMPLAR, [QUERY], mask=PIL.Image.new("L", QUERY.size, 255))


def test_guidance_runs_from_no_edit_towards_the_edit(flux3_folders):
    from diffusers_delta.modular.guidance import NoEditGuidance

    base, adapter_folder, _, delta_class = flux3_folders
    if delta_class is not Flux3DeltaModularPipeline:
        pytest.skip("the distilled FLUX.3 takes no guidance")
    pipe = delta_class.from_pretrained(base)
    pipe.load_components(dtype=torch.float32)
    pipe.load_delta_adapter(adapter_folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.guider, NoEditGuidance) and not pipe.guider._enabled and pipe.guider.guidance_scale > 1

    def run(**kwargs):
        return pipe(image=QUERY, exemplar=EXEMPLAR, generator=torch.Generator().manual_seed(0), **STEPS, **kwargs)

    unedited, edited = run(delta_scale=0.0), run()
    pipe.guider.enable()
    strengths = []  # the edit's strength in each transformer pass, as the processors read it
    hook = pipe.transformer.register_forward_hook(lambda module, *_: strengths.append(module._delta_call.scale))
    guided = run()
    hook.remove()
    assert strengths == [None, 0.0] * STEPS["num_inference_steps"]  # the edit (default strength), then none
    assert torch.equal(run(delta_scale=0.0), unedited)  # nothing to guide towards: the unedited output
    other = torch.randn(PROMPT.shape, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(run(negative_prompt_embeds=other), guided)  # a given negative prompt is used, not replaced
    assert (guided - unedited).abs().mean() > (edited - unedited).abs().mean()  # the edit, amplified
    assert not pipe.transformer._delta_call.edit_off  # the flag goes with the pass
