"""The paths that only break on an accelerator at klein size, made right by construction and checked on the CPU:
what is differentiated, where random numbers and snapshots live, offloading before and after loading, the offload
order, SigLIP checkpointing, the delta's precision, and tensor parallelism refused."""

import pytest
import torch
from diffusers.models._modeling_parallel import ParallelConfig, TensorParallelConfig

from diffusers_delta import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from diffusers_delta.adaptation import AdaptationConfig
from diffusers_delta.semantic_delta import SiglipPreprocessor, images_to_siglip_pixels, patch_features, semantic_delta
from diffusers_delta.testing import (
    TEXT_KWARGS,
    random_image,
    randomize_,
    tiny_delta_pipeline,
    tiny_image_encoder,
    tiny_klein_components,
)


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def edit(pipe, **kwargs):
    return pipe(
        QUERY, exemplar=(SOURCE, TARGET), generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    ).images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A text-free pipeline folder with a trained-like adapter, and the adapter folder alone."""
    root = tmp_path_factory.mktemp("gpu_path")
    pipe = tiny_delta_pipeline(adapter_std=0.3)
    pipe.empty_prompt_embeds = compute_empty_prompt_embeds(pipe, **TEXT_KWARGS)
    pipe.save_delta_adapter(root / "adapter")
    text_free = FluxDeltaEditPipeline.from_pipe(pipe, text_encoder=None, tokenizer=None)
    text_free.empty_prompt_embeds = pipe.empty_prompt_embeds
    text_free.save_pretrained(root / "pipe")
    return root


@pytest.fixture
def loaded(saved):
    """The pipeline as `from_pretrained` gives it to a user: every weight differentiable."""
    pipe = FluxDeltaEditPipeline.from_pretrained(saved / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_adaptation_differentiates_only_the_adapter_and_leaves_every_flag_as_it_was(loaded):
    backbone = [loaded.transformer, loaded.vae, loaded.image_encoder]
    assert all(p.requires_grad for model in backbone for p in model.parameters())  # as users get them
    flags = {name: [p.requires_grad for p in model.parameters()] for name, model in loaded.components.items()
             if isinstance(model, torch.nn.Module)}  # fmt: skip
    during = []
    hook = loaded.transformer.register_forward_pre_hook(
        lambda module, args: during.append(any(p.requires_grad for model in backbone for p in model.parameters()))
    )
    loaded.adapt_to_exemplar(SOURCE, TARGET, num_steps=2, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert during == [False, False]  # only the adapter was differentiable while adapting
    for name, model in loaded.components.items():
        if isinstance(model, torch.nn.Module):
            assert [p.requires_grad for p in model.parameters()] == flags[name], name
            assert all(p.grad is None for p in model.parameters()), f"{name} holds gradients"


def test_generator_lists_draw_one_noise_per_sample(loaded):
    def adapt(generator, samples):
        loaded.reset_delta_adapter()
        config = AdaptationConfig(num_steps=2, noise_samples=samples)
        return loaded.adapt_to_exemplar(SOURCE, TARGET, config=config, generator=generator).losses

    assert adapt([torch.Generator().manual_seed(3)], 1) == adapt(torch.Generator().manual_seed(3), 1)
    pair = adapt([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)], 2)
    assert pair == adapt([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)], 2)
    with pytest.raises(ValueError, match="3 generators given for 2 noise draws per step"):
        adapt([torch.Generator()] * 3, 2)


def test_weight_snapshots_are_copies_on_the_cpu(loaded):
    snapshot = loaded._delta_loaded_state
    for name, parameter in loaded.delta_adapter.state_dict().items():
        assert snapshot[name].device.type == "cpu" and snapshot[name].data_ptr() != parameter.data_ptr()


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_loading_after_offloading_offloads_the_new_encoder_and_places_the_adapter(saved, mode):
    reference = FluxDeltaEditPipeline(**tiny_klein_components())
    reference.set_progress_bar_config(disable=True)
    reference.load_delta_adapter(saved / "adapter")
    expected = edit(reference, **TEXT_KWARGS)

    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    enable = pipe.enable_model_cpu_offload if mode == "model" else pipe.enable_sequential_cpu_offload
    enable(device="cpu")  # the hooks and placement logic, on the only device here
    pipe.load_delta_adapter(saved / "adapter")
    hook = type(getattr(pipe.image_encoder, "_hf_hook", None)).__name__
    assert hook == ("CpuOffload" if mode == "model" else "AlignDevicesHook") or any(
        hasattr(module, "_hf_hook") for module in pipe.image_encoder.modules()
    )
    assert not any(hasattr(module, "_hf_hook") for module in pipe.delta_adapter.modules())  # it stays placed
    if mode == "model":  # accelerate's sequential offloading cannot execute with the CPU as its accelerator
        assert (edit(pipe, **TEXT_KWARGS) == expected).all()


def test_group_offloading_before_loading_is_refused_and_after_works(saved):
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    with pytest.raises(ValueError, match="Load the Delta-Adapter first, then call pipe.enable_group_offload"):
        pipe.load_delta_adapter(saved / "adapter")
    assert pipe.delta_adapter is None and pipe.image_encoder is None


def test_models_run_in_the_offload_order(saved):
    pipe = tiny_delta_pipeline(adapter_std=0.3)  # with its text encoder, no stored embeddings: the prompt is encoded
    pipe.enable_model_cpu_offload(device="cpu")
    order = []
    for name in ("text_encoder", "image_encoder", "transformer", "vae"):
        getattr(pipe, name).register_forward_pre_hook(lambda module, args, name=name: order.append(name))
    edit(pipe, **TEXT_KWARGS)
    chain = pipe.model_cpu_offload_seq.split("->")
    first_calls = [name for index, name in enumerate(order) if name not in order[:index]]
    assert [name for name in first_calls if name != "vae"] == [name for name in chain if name != "vae"]


def test_siglip_is_checkpointed_while_adapting_when_asked(loaded):
    seen = []
    loaded.image_encoder.register_forward_pre_hook(
        lambda module, args: (
            seen.append(module.is_activation_checkpointing and module.training) if torch.is_grad_enabled() else None
        )
    )
    losses = {}
    for checkpointing in (False, True):
        loaded.reset_delta_adapter()
        config = AdaptationConfig(num_steps=2, gradient_checkpointing=checkpointing)
        result = loaded.adapt_to_exemplar(SOURCE, TARGET, config=config, generator=torch.Generator().manual_seed(0))
        losses[checkpointing] = result.losses
    assert seen == [False, False, True, True]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)  # the same adaptation, less memory
    assert not loaded.image_encoder.is_activation_checkpointing and not loaded.image_encoder.training


def test_the_semantic_delta_is_computed_in_float32_from_bfloat16_features():
    encoder = tiny_image_encoder().to(torch.bfloat16)
    randomize_(encoder, std=0.5)
    preprocessor = SiglipPreprocessor(32)
    sources = images_to_siglip_pixels([SOURCE], preprocessor, "source").to(torch.bfloat16)
    targets = images_to_siglip_pixels([TARGET], preprocessor, "target").to(torch.bfloat16)
    delta = semantic_delta(encoder, sources, targets)
    features = patch_features(encoder, torch.cat([sources, targets])).float()  # bfloat16 features, as SigLIP gives
    normed = torch.nn.functional.layer_norm(features, features.shape[-1:], eps=1e-6)
    assert delta.dtype == torch.float32 and torch.equal(delta, normed[1:] - normed[:1])


def test_tensor_parallel_transformers_are_refused_at_load_and_at_call(saved):
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_delta_adapter(saved / "adapter")
    # Tensor parallelism needs an accelerator mesh; its marker on the model is what diffusers itself checks.
    pipe.transformer._parallel_config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    with pytest.raises(ValueError, match="sharded with tensor parallelism, so it cannot run a Delta-Adapter"):
        edit(pipe, **TEXT_KWARGS)
    with pytest.raises(ValueError, match="queries hold this rank's heads"):
        pipe.load_delta_adapter(saved / "adapter")


def test_the_branch_is_local_so_a_sequence_split_between_ranks_gives_the_same_edit(delta_pipe):
    """Under context parallelism each rank holds a slice of the sequence and the whole edit tokens; the branch
    attends only to the edit tokens, so slices give the rows of the whole. (diffusers' context parallelism itself
    needs an accelerator: it picks its device as rank % torch.accelerator.device_count().)"""
    randomize_(delta_pipe.delta_adapter)
    processor = delta_pipe.delta_processors["single_transformer_blocks.0.attn.processor"]
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 40, 2, 16, generator=generator)  # (B, S, H, D), S split 25 + 15
    tokens = torch.randn(2, 4, 32, generator=generator)  # (B, N, D_edit), whole on every rank
    whole = processor._branch(query, tokens, strength=1.0)
    halves = torch.cat([processor._branch(part, tokens, 1.0) for part in query.split([25, 15], dim=1)], dim=1)
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-6)
