import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

from diffusers_delta.backbones.flux2 import decode_tokens, encode_latents
from diffusers_delta.image_inputs import pil_to_tensor
from diffusers_delta.losses import (
    add_noise,
    delta_consistency_loss,
    estimate_clean_latents,
    flow_matching_loss,
    patch_weights,
    sample_sigmas,
    semantic_delta_consistency_loss,
)
from diffusers_delta.semantic_delta import SiglipPreprocessor, delta_from_features, patch_features, semantic_delta
from diffusers_delta.testing import (
    random_image,
    randomize_,
    tiny_adapter,
    tiny_image_encoder,
    tiny_klein_components,
)
from diffusers_delta.training import DeltaAdapterObjective


def test_noising_target_and_clean_estimate_are_consistent():
    x0, noise, sigmas = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4), torch.tensor([0.1, 0.5, 1.0])
    noisy = add_noise(x0, noise, sigmas)
    torch.testing.assert_close(noisy[2], noise[2])  # σ = 1 is pure noise
    torch.testing.assert_close(noisy[1], 0.5 * x0[1] + 0.5 * noise[1])
    true_velocity = noise - x0
    torch.testing.assert_close(estimate_clean_latents(noisy, true_velocity, sigmas), x0, atol=1e-5, rtol=0)
    assert flow_matching_loss(true_velocity, x0, noise) == 0
    assert flow_matching_loss(torch.zeros_like(x0), x0, noise) > 0
    weights = torch.tensor([0.0, 0.0, 2.0])
    expected = 2.0 * (noise[2] - x0[2]).square().mean() / 3
    torch.testing.assert_close(flow_matching_loss(torch.zeros_like(x0), x0, noise, weights), expected)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap"])
def test_sigmas_lie_on_the_training_grid_and_are_reproducible(scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    draw = lambda: sample_sigmas(scheduler, 256, scheme, generator=torch.Generator().manual_seed(0))  # noqa: E731
    sigmas = draw()
    assert torch.equal(sigmas, draw())
    assert sigmas.shape == (256,) and sigmas.min() > 0 and sigmas.max() <= 1
    assert torch.isin(sigmas, scheduler.sigmas).all()


def test_patch_weights_sum_to_one_and_follow_the_change():
    delta = torch.zeros(2, 4, 8)
    delta[0, 1] = 3.0
    delta[0, 2] = 1.0
    weights = patch_weights(delta)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert weights[0, 1] == pytest.approx(0.75, abs=1e-6) and weights[0, 2] == pytest.approx(0.25, abs=1e-6)
    torch.testing.assert_close(weights[1], torch.full((4,), 0.25))  # no change anywhere: uniform


def test_delta_consistency_is_zero_when_aligned_and_positive_otherwise():
    target = torch.randn(2, 5, 8)
    assert delta_consistency_loss(3.0 * target, target) < 1e-6  # direction matters, not magnitude
    assert delta_consistency_loss(-target, target) == pytest.approx(2.0, abs=1e-5)
    assert 0 < delta_consistency_loss(torch.randn(2, 5, 8), target) < 2


def test_semantic_consistency_on_images_zero_for_the_target():
    encoder, preprocessor = tiny_image_encoder(), SiglipPreprocessor(32)
    source, target, other = (pil_to_tensor(random_image(i)).unsqueeze(0) for i in (1, 2, 3))
    with torch.no_grad():
        source_features = patch_features(encoder, preprocessor(source))
        delta = semantic_delta(encoder, preprocessor(source), preprocessor(target))
        exact = semantic_delta_consistency_loss(encoder, preprocessor, target, source_features, delta)
        wrong = semantic_delta_consistency_loss(encoder, preprocessor, other, source_features, delta)
    assert exact < 1e-5 and wrong > 1e-2


def test_decoding_packed_latents_matches_the_pipeline_decode():
    vae = tiny_klein_components()["vae"]
    pixels = pil_to_tensor(random_image(0)).unsqueeze(0) * 2 - 1  # (1, 3, 64, 64)
    latents = encode_latents(vae, pixels)  # (1, 16, 8, 8)
    with torch.no_grad():
        images = decode_tokens(vae, Flux2KleinPipeline._pack_latents(latents), 8, 8)
        raw = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    assert images.shape == (1, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


def test_objective_gradients_reach_only_the_adapter_through_both_losses():
    components = tiny_klein_components()
    transformer, vae, encoder = components["transformer"], components["vae"], tiny_image_encoder()
    for model in (transformer, vae, encoder):
        model.requires_grad_(False)
    adapter = randomize_(tiny_adapter(transformer), std=0.1).train()
    preprocessor = SiglipPreprocessor(32)
    pixels = torch.stack([pil_to_tensor(random_image(i)) for i in (1, 2)]) * 2 - 1
    latents = encode_latents(vae, pixels)
    with torch.no_grad():
        features = patch_features(encoder, preprocessor(pixels / 2 + 0.5))
    inputs = {
        "source_latents": latents[:1],
        "target_latents": latents[1:],
        "source_features": features[:1],
        "target_features": features[1:],
        "noise": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
        "sigmas": torch.tensor([0.7]),
    }

    prompt_embeds = torch.randn(1, 3, 48)

    def adapter_gradients(lambda_delta):
        objective = DeltaAdapterObjective(
            adapter, transformer, vae, encoder, preprocessor, prompt_embeds, lambda_delta=lambda_delta
        )
        adapter.zero_grad(set_to_none=True)
        losses = objective(**inputs)
        losses["loss"].backward()
        for model in (transformer, vae, encoder):
            assert all(p.grad is None for p in model.parameters())
        return losses, {name: p.grad.clone() for name, p in adapter.named_parameters()}

    fm_only, fm_gradients = adapter_gradients(0.0)
    both, both_gradients = adapter_gradients(1.0)
    assert fm_only["delta_consistency"] == 0 and both["delta_consistency"] > 0
    torch.testing.assert_close(fm_only["flow_matching"], both["flow_matching"])
    assert all(g.abs().sum() > 0 for g in both_gradients.values())
    assert any(not torch.allclose(fm_gradients[n], both_gradients[n]) for n in fm_gradients)  # L_delta adds its own

    # A delta given in place of the features' (the ladder's oracle codes) drives the adapter; the features' own delta
    # given so is the default exactly, and the consistency loss still compares against the features' delta.
    objective = DeltaAdapterObjective(adapter, transformer, vae, encoder, preprocessor, prompt_embeds, lambda_delta=1)
    with torch.no_grad():
        own = delta_from_features(features[:1].float(), features[1:].float())
        same, code = objective(**inputs, delta=own), objective(**inputs, delta=torch.randn_like(own))
        default = objective(**inputs)
    assert torch.equal(same["loss"], default["loss"]) and not torch.equal(code["flow_matching"], same["flow_matching"])
