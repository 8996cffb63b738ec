"""Delta-Adapter's training objective as small pure functions (Delta-Adapter, sections 3 and 4.4).

    L = L_fm + λ_delta · L_delta

- `L_fm`, flow matching as FLUX.2 [klein] is trained: `x_t = (1 − σ)·x0 + σ·noise`, target velocity `noise − x0`,
  σ drawn with diffusers' timestep densities (`logit_normal`, `mode`, `uniform`).
- `L_delta`, semantic-delta consistency: the clean estimate `x̂0 = x_t − σ·v̂` is decoded to pixels and encoded by
  SigLIP; its delta from the source, `Δ̂ = LN(f(x̂0)) − LN(f(src))`, should point where the exemplar's delta `Δ` points,
  patch by patch, weighted by how much each patch changes: `Σ_i w_i (1 − cos(Δ̂_i, Δ_i))`, `w_i ∝ ‖Δ_i‖`.

The training script and test-time adaptation both use these functions (through `DeltaAdapterObjective`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from transformers import SiglipVisionModel

from .semantic_delta import SiglipPreprocessor, delta_from_features, patch_features


def sample_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler,
    batch_size: int,
    weighting_scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Noise levels σ for a batch, on the scheduler's training grid, as diffusers' training examples draw them.

    Args:
        scheduler: a flow-matching scheduler in its training state (not `set_timesteps`-ed).
        batch_size: number of σ to draw.
        weighting_scheme: `"logit_normal"`, `"mode"`, or anything else for uniform (`"none"`, `"sigma_sqrt"`,
            `"cosmap"` sample uniformly and weight the loss instead, see `loss_weighting`).
        logit_mean: mean of the logit-normal density.
        logit_std: standard deviation of the logit-normal density.
        mode_scale: scale of the `mode` density.
        generator: for reproducible draws, drawn on the generator's own device (a CUDA generator draws on CUDA), or
            one generator per sample, as diffusers' pipelines take them.

    Returns:
        (B,) σ in (0, 1], on the CPU.
    """
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators given for a batch of {batch_size}: pass one per sample.")
        draws = [
            sample_sigmas(scheduler, 1, weighting_scheme, logit_mean, logit_std, mode_scale, g) for g in generator
        ]
        return torch.cat(draws)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=generator.device if generator is not None else "cpu",
        generator=generator,
    ).cpu()
    num_train_timesteps = scheduler.config.num_train_timesteps
    indices = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    return scheduler.sigmas[indices].float()


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights for the schemes that sample σ uniformly (`sigma_sqrt`, `cosmap`; else ones): (B,)."""
    return compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like`."""
    return sigmas.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(clean_latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """`x_t = (1 − σ)·x0 + σ·noise`: (B, ...) latents, (B, ...) noise, (B,) σ -> (B, ...)."""
    sigma = _per_sample(sigmas, clean_latents)
    return (1.0 - sigma) * clean_latents + sigma * noise


def flow_matching_loss(
    predicted_velocity: torch.Tensor,
    clean_latents: torch.Tensor,
    noise: torch.Tensor,
    weighting: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error to the velocity target `noise − x0`, averaged per sample then over the batch.

    Args:
        predicted_velocity: (B, ...) the transformer's prediction.
        clean_latents: (B, ...) x0.
        noise: (B, ...) the noise x_t was made with.
        weighting: optional (B,) per-sample weights (see `loss_weighting`).

    Returns:
        A scalar, computed in float32.
    """
    target = noise.float() - clean_latents.float()
    per_sample = (predicted_velocity.float() - target).square().flatten(1).mean(dim=1)  # (B,)
    if weighting is not None:
        per_sample = weighting.float().to(per_sample.device) * per_sample
    return per_sample.mean()


def estimate_clean_latents(noisy_latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """`x̂0 = x_t − σ·v̂`: (B, ...) noisy latents, (B, ...) predicted velocity, (B,) σ -> (B, ...)."""
    return noisy_latents - _per_sample(sigmas, noisy_latents) * velocity


def patch_weights(delta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`w_i = ‖Δ_i‖ / Σ_j ‖Δ_j‖`: (B, P, D) delta -> (B, P) weights summing to 1 per sample (uniform if Δ = 0)."""
    norms = delta.float().norm(dim=-1) + eps  # (B, P)
    return norms / norms.sum(dim=-1, keepdim=True)


def delta_consistency_loss(predicted_delta: torch.Tensor, target_delta: torch.Tensor) -> torch.Tensor:
    """Patch-weighted cosine distance `Σ_i w_i (1 − cos(Δ̂_i, Δ_i))`, averaged over the batch.

    Args:
        predicted_delta: (B, P, D) Δ̂, the delta of the generated image from the source.
        target_delta: (B, P, D) Δ, the exemplar's delta; it sets the weights and gets no gradient.

    Returns:
        A scalar in [0, 2], float32.
    """
    target_delta = target_delta.detach().float()
    cosine = F.cosine_similarity(predicted_delta.float(), target_delta, dim=-1, eps=1e-8)  # (B, P)
    return (patch_weights(target_delta) * (1.0 - cosine)).sum(dim=-1).mean()


def semantic_delta_consistency_loss(
    image_encoder: SiglipVisionModel,
    preprocessor: SiglipPreprocessor,
    generated_images: torch.Tensor,
    source_features: torch.Tensor,
    target_delta: torch.Tensor,
) -> torch.Tensor:
    """`L_delta` from decoded images: SigLIP-encode them, take their delta from the source, compare to Δ.

    Args:
        image_encoder: the (frozen) SigLIP encoder that made the exemplar's features.
        preprocessor: its differentiable preprocessing.
        generated_images: (B, 3, H, W) decoded x̂0 in [0, 1].
        source_features: (B, P, D) SigLIP features of the source images.
        target_delta: (B, P, D) the exemplar's normalised delta `LN(f_tgt) − LN(f_src)`.

    Returns:
        A scalar.
    """
    pixels = preprocessor(generated_images.to(image_encoder.dtype))  # (B, 3, S, S)
    generated_features = patch_features(image_encoder, pixels)  # (B, P, D)
    predicted_delta = delta_from_features(source_features, generated_features)  # (B, P, D) float32
    return delta_consistency_loss(predicted_delta, target_delta)
