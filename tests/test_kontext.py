"""Delta-Adapter on FLUX.1 Kontext: the klein invariants, on tiny real Kontext models (`FluxTransformer2DModel`,
`AutoencoderKL`, CLIP and T5 text encoders, SigLIP)."""

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from diffusers import FluxKontextPipeline

from diffusers_delta import (
    DeltaAdapterModel,
    FluxDeltaAttnProcessor,
    FluxDeltaEditPipeline,
    FluxKontextDeltaEditPipeline,
)
from diffusers_delta.testing import (
    KONTEXT_TEXT_KWARGS,
    random_image,
    tiny_delta_pipeline,
    tiny_kontext_components,
)


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)
STEPS = 3


def render(pipe, query=QUERY, seed=0, **kwargs):
    return pipe(query, exemplar=kwargs.pop("exemplar", (SOURCE, TARGET)), num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images  # fmt: skip


def kontext(pipe, query=QUERY, seed=0, **kwargs):
    """Upstream `FluxKontextPipeline`'s own output with the empty prompt, on the same weights and size."""
    return FluxKontextPipeline.__call__(
        pipe, image=query, prompt_embeds=pipe.empty_prompt_embeds,
        pooled_prompt_embeds=pipe.empty_pooled_prompt_embeds, height=64, width=64, max_area=64 * 64,
        _auto_resize=False, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
        output_type="np", **kwargs,
    ).images  # fmt: skip


@pytest.fixture
def pipe():
    return tiny_delta_pipeline(adapter_std=0.3, backbone="flux1")


def test_processors_reach_every_double_and_single_block_and_record_the_backbone(pipe):
    processors = pipe.delta_processors
    assert len(processors) == len(pipe.transformer.attn_processors) == 3  # 1 double + 2 single blocks
    assert all(isinstance(p, FluxDeltaAttnProcessor) for p in processors.values())
    assert pipe.delta_adapter.config.backbone == "flux1"
    assert pipe.get_delta_adapter_scale() == {"double": [1.0], "single": [1.0, 1.0]}


def test_scale_0_and_a_fresh_adapter_give_kontext_bit_for_bit(pipe):
    base = kontext(pipe)
    assert (render(pipe, delta_scale=0.0) == base).all()
    edited = render(pipe)
    assert np.abs(edited - base).max() > 1e-3
    pipe.set_delta_adapter_scale({"double": 0.0, "single": 0.0})
    assert (render(pipe) == base).all()
    fresh = tiny_delta_pipeline(backbone="flux1")  # to_v_delta starts at zero: nothing added
    assert (render(fresh) == kontext(fresh)).all()


def test_kontexts_guidance_reaches_the_transformer(pipe):
    assert (render(pipe, guidance_scale=2.0) != render(pipe)).any()
    assert (render(pipe, guidance_scale=2.0, delta_scale=0.0) == kontext(pipe, guidance_scale=2.0)).all()


def test_unload_restores_kontext_exactly_and_the_empty_prompt(pipe):
    base = kontext(pipe)
    pipe.unload_delta_adapter()
    assert not any(isinstance(p, FluxDeltaAttnProcessor) for p in pipe.transformer.attn_processors.values())
    assert (kontext(pipe) == base).all()


def test_a_batch_equals_its_singles_and_delta_embeds_equal_the_exemplar(pipe):
    other = random_image(5)
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    both = pipe([QUERY, other], exemplar=(SOURCE, TARGET), num_inference_steps=STEPS, generator=generators,
                output_type="np").images  # fmt: skip
    assert np.allclose(both[0], render(pipe, seed=0), atol=1e-5)
    assert np.allclose(both[1], render(pipe, query=other, seed=1), atol=1e-5)
    tokens = pipe.encode_exemplar((SOURCE, TARGET))
    by_tokens = pipe(QUERY, delta_embeds=tokens, num_inference_steps=STEPS, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert (by_tokens == render(pipe)).all()
    two = pipe(QUERY, delta_embeds=tokens, num_inference_steps=STEPS, output_type="np", num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert two.shape == (2, 64, 64, 3) and not np.allclose(two[0], two[1])


def test_callbacks_see_every_step_and_may_change_the_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    out = render(pipe, callback_on_step_end=callback)
    zero = render(pipe, callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros_like(k["latents"])})
    assert seen == list(range(STEPS)) and (out == zero).all()


def test_save_and_load_text_free_bit_identical_and_another_backbones_adapter_refused(pipe, tmp_path):
    edited = render(pipe)
    pipe.save_delta_adapter(tmp_path / "adapter")
    stored = safetensors.torch.load_file(tmp_path / "adapter" / "empty_prompt_embeds.safetensors")
    assert set(stored) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert DeltaAdapterModel.load_config(tmp_path / "adapter")["backbone"] == "flux1"

    components = tiny_kontext_components()
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        components[name] = None  # no T5, no CLIP: the adapter brings the empty prompt's embeddings
    text_free = FluxKontextDeltaEditPipeline(**components, image_size=64)
    text_free.set_progress_bar_config(disable=True)
    text_free.load_delta_adapter(tmp_path / "adapter")
    assert (render(text_free) == edited).all()

    klein = FluxDeltaEditPipeline(
        **{k: v for k, v in tiny_delta_pipeline().components.items() if k != "delta_adapter"}
    )
    with pytest.raises(ValueError, match=r"trained for FLUX.1 \(FluxTransformer2DModel\), and this pipeline's "
                                         r"transformer is FLUX.2 \(Flux2Transformer2DModel\)"):  # fmt: skip
        klein.load_delta_adapter(tmp_path / "adapter")
    assert klein.delta_adapter is None
    tiny_delta_pipeline().save_delta_adapter(tmp_path / "klein_adapter")
    with pytest.raises(ValueError, match=r"trained for FLUX.2 .*this pipeline's transformer is FLUX.1"):
        pipe.load_delta_adapter(tmp_path / "klein_adapter")
    assert (render(pipe) == edited).all()


def test_adaptation_moves_only_the_adapter_and_resets_exactly(pipe):
    before = render(pipe)
    frozen = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    flags = [p.requires_grad for p in pipe.transformer.parameters()]  # as from_pretrained leaves them: True
    result = pipe.adapt_to_exemplar(SOURCE, TARGET, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert all(torch.equal(pipe.transformer.state_dict()[name], tensor) for name, tensor in frozen.items())
    assert [p.requires_grad for p in pipe.transformer.parameters()] == flags
    assert all(p.grad is None for p in pipe.transformer.parameters())
    assert (render(pipe) != before).any()
    pipe.reset_delta_adapter()
    assert (render(pipe) == before).all()


def test_a_non_empty_prompt_needs_the_text_encoders_and_uses_them(pipe):
    with_text = render(pipe, prompt="make it red", max_sequence_length=KONTEXT_TEXT_KWARGS["max_sequence_length"])
    assert (with_text != render(pipe)).any()
    pipe.text_encoder_2 = None
    with pytest.raises(ValueError, match="no text_encoder_2 and no stored empty-prompt embeddings"):
        render(pipe, prompt="make it red")


def test_a_query_or_output_of_another_size_is_refused_by_a_fixed_size_model(pipe):
    with pytest.raises(ValueError, match="edits only 64x64 images and the query is 96x64"):
        render(pipe, query=random_image(0, (96, 64)))
    with pytest.raises(ValueError, match="edits only 64x64 images: height and width must be 64"):
        render(pipe, height=128, width=128)
    with pytest.raises(ValueError, match="Give both height and width"):
        render(pipe, height=64)


def test_model_cpu_offload_after_or_before_loading_keeps_the_edit(pipe, tmp_path):
    expected = render(pipe)
    pipe.save_delta_adapter(tmp_path / "adapter")
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks and placement logic, on the only device here
    assert not hasattr(pipe.delta_adapter, "_hf_hook") and hasattr(pipe.transformer, "_hf_hook")
    assert (render(pipe) == expected).all()

    offloaded_first = FluxKontextDeltaEditPipeline(**tiny_kontext_components(), image_size=64)
    offloaded_first.set_progress_bar_config(disable=True)
    offloaded_first.enable_model_cpu_offload(device="cpu")
    offloaded_first.load_delta_adapter(tmp_path / "adapter")
    assert type(getattr(offloaded_first.image_encoder, "_hf_hook", None)).__name__ == "CpuOffload"
    assert (render(offloaded_first) == expected).all()


def test_from_pipe_shares_the_adapter_and_gives_its_own_scheduler(pipe):
    pipe.set_delta_adapter_scale({"single": [0.5, 1.0]})
    expected = render(pipe)
    twin = FluxKontextDeltaEditPipeline.from_pipe(pipe)
    twin.set_progress_bar_config(disable=True)
    assert twin.transformer is pipe.transformer and twin.scheduler is not pipe.scheduler
    assert twin.get_delta_adapter_scale() == {"double": [1.0], "single": [0.5, 1.0]}
    assert (render(twin) == expected).all()


def test_whole_pipeline_save_and_from_pretrained_keeps_the_adapter_and_the_empty_prompt(pipe, tmp_path):
    pipe.set_delta_adapter_scale(0.75)
    expected = render(pipe)
    pipe.save_pretrained(tmp_path / "pipeline")
    reloaded = FluxKontextDeltaEditPipeline.from_pretrained(tmp_path / "pipeline")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.get_delta_adapter_scale() == {"double": [0.75], "single": [0.75, 0.75]}
    assert torch.equal(reloaded.empty_pooled_prompt_embeds, pipe.empty_pooled_prompt_embeds)
    assert (render(reloaded) == expected).all()


def test_the_card_names_kontext_and_its_snippet_runs_text_free(pipe, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from diffusers_delta.hub import render_model_card

    card = render_model_card(pipe.delta_adapter, "org/kontext-adapter", "black-forest-labs/FLUX.1-Kontext-dev", "s")
    data = card.data.to_dict()
    assert data["base_model"] == "black-forest-labs/FLUX.1-Kontext-dev" and "flux1" in data["tags"]
    assert data["license_name"] == "flux-1-dev-non-commercial-license"

    base = tmp_path / "kontext-base"
    FluxKontextDeltaEditPipeline(**tiny_kontext_components(), image_size=64).save_pretrained(base)
    pipe.save_delta_adapter(tmp_path / "my-adapter", base_model=str(base))
    card = ModelCard.load(tmp_path / "my-adapter" / "README.md")
    assert card.text.lstrip().startswith("# my-adapter: a Delta-Adapter for kontext-base")
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "FluxKontextDeltaEditPipeline.from_pretrained(BASE, text_encoder=None, tokenizer=None, " in snippet
    snippet = snippet.replace("path/to/kontext-base", str(base)).replace(
        "path/to/my-adapter", str(tmp_path / "my-adapter")
    )
    for name, seed in (("before", 1), ("after", 2), ("query", 0)):
        random_image(seed).save(tmp_path / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace("edited = pipe(query,", "edited = pipe(num_inference_steps=2, image=query,"),
                 "card-snippet", "exec"), {})  # fmt: skip
    assert (tmp_path / "edited.png").exists()


def test_the_cli_recognises_a_kontext_base_and_edits_text_free(pipe, tmp_path, capsys):
    from diffusers_delta import cli
    from diffusers_delta.app import default_steps, describe_model

    base = tmp_path / "kontext-base"
    FluxKontextDeltaEditPipeline(**tiny_kontext_components(), image_size=64).save_pretrained(base)
    pipe.save_delta_adapter(tmp_path / "adapter")
    for name, seed in (("source", 1), ("target", 2), ("query", 0)):
        random_image(seed).save(tmp_path / f"{name}.png")
    out = tmp_path / "edited.png"
    cli.main(["edit", "--exemplar", str(tmp_path / "source.png"), str(tmp_path / "target.png"), "--query",
              str(tmp_path / "query.png"), "--out", str(out), "--base", str(base), "--adapter",
              str(tmp_path / "adapter"), "--adapt-steps", "1"])  # fmt: skip
    assert PIL.Image.open(out).size == (64, 64) and "Adapted for 1 steps" in capsys.readouterr().out
    (tmp_path / "queries").mkdir()
    for index in range(3):
        random_image(10 + index).save(tmp_path / "queries" / f"{index}.png")
    cli.main(["edit", "--exemplar", str(tmp_path / "source.png"), str(tmp_path / "target.png"), "--queries",
              str(tmp_path / "queries"), "--out", str(tmp_path / "edited"), "--base", str(base), "--adapter",
              str(tmp_path / "adapter"), "--batch-size", "2"])  # fmt: skip
    assert sorted(path.name for path in (tmp_path / "edited").iterdir()) == ["0.png", "1.png", "2.png"]
    loaded = cli.load_edit_pipeline(str(base), str(tmp_path / "adapter"))
    assert type(loaded) is FluxKontextDeltaEditPipeline and loaded.text_encoder_2 is None
    assert default_steps(loaded) == 28 and "FLUX.1 Kontext [dev]" in describe_model(str(base), "a", loaded)


def test_set_attention_backend_reaches_the_processors_before_and_after_loading(pipe, tmp_path):
    expected = render(pipe)
    try:
        pipe.transformer.set_attention_backend("native")  # after loading: diffusers sets it on our processors
        assert all(p._attention_backend == "native" for p in pipe.delta_processors.values())
        assert (render(pipe) == expected).all()
        pipe.save_delta_adapter(tmp_path / "adapter")
        pipe.unload_delta_adapter()  # the layers keep the backend chosen while the adapter was loaded
        assert all(p._attention_backend == "native" for p in pipe.transformer.attn_processors.values())
        pipe.load_delta_adapter(tmp_path / "adapter")  # before loading: the new processors keep it
        assert all(p._attention_backend == "native" for p in pipe.delta_processors.values())
        for processor in pipe.delta_processors.values():
            processor._attention_backend = "_native_math"
        pipe.load_delta_adapter(tmp_path / "adapter")  # a second adapter in place of the first: the same
        assert all(p._attention_backend == "_native_math" for p in pipe.delta_processors.values())
    finally:  # diffusers also sets a process-wide active backend: "native" is its default, so nothing leaks
        pipe.transformer.reset_attention_backend()


def test_sequential_offload_before_loading_hooks_the_encoder_and_keeps_the_adapter_placed(pipe, tmp_path):
    pipe.save_delta_adapter(tmp_path / "adapter")
    offloaded = FluxKontextDeltaEditPipeline(**tiny_kontext_components(), image_size=64)
    offloaded.enable_sequential_cpu_offload(device="cpu")
    offloaded.load_delta_adapter(tmp_path / "adapter")
    assert any(hasattr(module, "_hf_hook") for module in offloaded.image_encoder.modules())
    assert not any(hasattr(module, "_hf_hook") for module in offloaded.delta_adapter.modules())


# What diffusers' own FluxKontextPipeline tests check, where it applies to the Delta-Adapter pipeline (their IP-Adapter
# tests do not: both adapters use the `image_encoder` component).


def test_the_output_size_follows_height_width_and_max_area_as_kontext_rounds_them(pipe):
    any_size = FluxKontextDeltaEditPipeline.from_pipe(pipe, image_size=None)  # the same models, any size
    any_size.set_progress_bar_config(disable=True)
    multiple = 2 * pipe.vae_scale_factor  # latents are packed 2x2
    for height, width in ((64, 64), (72, 57)):
        images = render(any_size, height=height, width=width, max_area=height * width, _auto_resize=False)
        assert images.shape[1:3] == (height - height % multiple, width - width % multiple)


def test_true_cfg_with_a_negative_prompt_changes_the_edit(pipe):
    text = {"max_sequence_length": KONTEXT_TEXT_KWARGS["max_sequence_length"]}
    plain = render(pipe, **text)
    guided = render(pipe, negative_prompt="bad quality", true_cfg_scale=2.0, **text)
    assert not np.allclose(plain, guided)


def test_memory_and_cache_hooks_of_diffusers_run_with_the_adapter(pipe):
    from diffusers import PyramidAttentionBroadcastConfig

    expected = render(pipe)
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")  # after loading
    assert (render(pipe) == expected).all()

    casting = tiny_delta_pipeline(adapter_std=0.3, backbone="flux1")
    casting.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    cast = render(casting)
    assert np.isfinite(cast).all() and np.abs(cast - expected).max() < 0.1  # float8 storage: close, not equal

    cached = tiny_delta_pipeline(adapter_std=0.3, backbone="flux1")
    cached.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: cached.current_timestep,
    ))  # fmt: skip
    reused = render(cached)
    assert np.isfinite(reused).all() and np.abs(reused - expected).max() < 0.1


def test_the_mixin_alone_gives_a_users_own_kontext_pipeline_the_interface(pipe, tmp_path):
    from diffusers_delta import DeltaAdapterMixin

    class MyKontextPipeline(DeltaAdapterMixin, FluxKontextPipeline):
        pass

    pipe.save_delta_adapter(tmp_path / "adapter")
    mine = MyKontextPipeline(**tiny_kontext_components())
    mine.set_progress_bar_config(disable=True)
    mine.load_delta_adapter(tmp_path / "adapter")  # with its SigLIP and the empty prompt's T5 and CLIP embeddings
    tokens = mine.encode_exemplar((SOURCE, TARGET))
    edited = kontext(mine, joint_attention_kwargs={"delta_hidden_states": tokens})  # upstream's call, edit added
    assert (edited == render(pipe)).all()
    mine.unload_delta_adapter()
    assert mine.empty_prompt_embeds is None and mine.delta_adapter is None
    mine.empty_prompt_embeds, mine.empty_pooled_prompt_embeds = (
        pipe.empty_prompt_embeds,
        pipe.empty_pooled_prompt_embeds,
    )
    assert (kontext(mine) == kontext(pipe)).all()  # the same weights, upstream's processors back


def test_several_queries_with_several_images_each_give_each_query_its_own_edits(pipe):
    """diffusers' test_num_images_per_prompt, with two queries: four outputs, ordered as Kontext tiles its references
    (q1, q2, q1, q2), each the edit of its query that a call of its own gives."""
    queries = [QUERY, random_image(5)]
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    images = pipe(queries, exemplar=(SOURCE, TARGET), num_inference_steps=STEPS, num_images_per_prompt=2,
                  generator=generators, output_type="np").images  # fmt: skip
    assert images.shape == (4, 64, 64, 3)
    for index, query in enumerate(queries * 2):
        single = render(pipe, query=query, seed=index)[0]
        np.testing.assert_allclose(images[index], single, atol=1e-4)  # a batch's sums, in another order
    assert np.abs(images[0] - images[2]).max() > 1e-3  # two images of one query: two noises


def test_kontexts_ip_adapter_is_refused_up_front_with_the_reason(pipe):
    before = {name: type(p) for name, p in pipe.transformer.attn_processors.items()}
    with pytest.raises(ValueError, match="Kontext's IP-Adapter and the Delta-Adapter do not load together"):
        pipe.load_ip_adapter("XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors")
    assert {name: type(p) for name, p in pipe.transformer.attn_processors.items()} == before


def test_true_cfgs_negative_pass_takes_a_negative_exemplar_or_no_edit(pipe):
    """By default true CFG's negative pass gets the same edit tokens; a negative exemplar or strength replaces them
    there only, as IP-Adapter's negative image does. Measured on the tiny model: a negative pass that is the positive
    one gives the unguided output exactly, and one without the edit amplifies the edit."""
    text = {"max_sequence_length": KONTEXT_TEXT_KWARGS["max_sequence_length"]}
    plain, base = render(pipe, **text), render(pipe, delta_scale=0.0, **text)
    guided = render(pipe, negative_prompt="bad quality", true_cfg_scale=2.0, **text)
    same = render(pipe, negative_prompt="bad quality", true_cfg_scale=2.0, negative_delta_scale=1.0, **text)
    assert (same == guided).all()  # the default, said explicitly: the same tokens at the same strength
    mirrored = render(pipe, true_cfg_scale=2.0, negative_exemplar=(SOURCE, TARGET), **text)
    assert (mirrored == plain).all()  # the negative pass is the positive one: guidance adds nothing
    tokens = pipe.encode_exemplar((TARGET, SOURCE))
    reverse = render(pipe, true_cfg_scale=2.0, negative_delta_embeds=tokens, **text)
    assert np.abs(reverse - plain).max() > 1e-3
    amplified = render(pipe, true_cfg_scale=2.0, negative_delta_scale=0.0, **text)
    assert np.abs(amplified - base).mean() > 1.2 * np.abs(plain - base).mean()
    assert (render(pipe, **text) == plain).all()  # the swap was for that call only
    with pytest.raises(ValueError, match="act on true CFG's negative pass: give true_cfg_scale > 1"):
        render(pipe, negative_delta_scale=0.0)
    with pytest.raises(ValueError, match="at most one of negative_exemplar and negative_delta_embeds"):
        render(pipe, true_cfg_scale=2.0, negative_exemplar=(SOURCE, TARGET), negative_delta_embeds=tokens)
