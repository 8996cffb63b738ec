"""FLUX.2's latent conventions in one place: VAE latents are 2x2-patchified and normalised with the VAE's batch-norm
running statistics before the transformer sees them, and packed into token sequences."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline


def latent_statistics(vae: AutoencoderKLFlux2, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm mean and standard deviation, (1, 4C, 1, 1) each, on `like`'s device and dtype."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


@torch.no_grad()
def encode_latents(vae: AutoencoderKLFlux2, pixels: torch.Tensor) -> torch.Tensor:
    """Images -> normalised, patchified latents, as the pipeline encodes its reference image.

    Args:
        vae: FLUX.2's VAE.
        pixels: (B, 3, H, W) in [-1, 1].

    Returns:
        (B, 4C, H / 2f, W / 2f) for a VAE that downsamples f times (f = 8 for FLUX.2's).
    """
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()  # (B, C, H / f, W / f)
    latents = Flux2KleinPipeline._patchify_latents(latents)  # (B, 4C, H / 2f, W / 2f)
    mean, std = latent_statistics(vae, latents)
    return (latents - mean) / std


def unpack_to_vae_latents(
    vae: AutoencoderKLFlux2, packed_latents: torch.Tensor, latent_ids: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Packed, normalised tokens -> the VAE's own latents, ready for `vae.decode`.

    Args:
        vae: FLUX.2's VAE.
        packed_latents: (B, h·w, 4C) as the transformer sees them.
        latent_ids: (B, h·w, 4) their position ids.
        height: h, the patchified latent height.
        width: w, the patchified latent width.

    Returns:
        (B, C, 2h, 2w).
    """
    latents = Flux2KleinPipeline._unpack_latents_with_ids(packed_latents, latent_ids, height, width)  # (B, 4C, h, w)
    mean, std = latent_statistics(vae, latents)
    return Flux2KleinPipeline._unpatchify_latents(latents * std + mean)


def decode_packed_latents(
    vae: AutoencoderKLFlux2, packed_latents: torch.Tensor, latent_ids: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Packed, normalised tokens -> images in [0, 1], (B, 3, H, W) float32, differentiably (see
    `unpack_to_vae_latents` for the arguments)."""
    latents = unpack_to_vae_latents(vae, packed_latents, latent_ids, height, width)
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # (B, 3, H, W) in about [-1, 1]
    return (images.float() / 2 + 0.5).clamp(0, 1)
