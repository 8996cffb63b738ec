"""`DeltaAdapterObjective`: Delta-Adapter's training loss on a batch of single exemplar pairs, as one module.

Single-pair supervision (Delta-Adapter, section 4.1): the pair's source is the query (FLUX.2's reference image), its
semantic delta conditions the transformer through the adapter, and the pair's target is what the model must
reconstruct. One `forward` gives `L = L_fm + λ_delta · L_delta` (see `losses.py`).

The training script wraps this module with accelerate (DDP sees one forward per step, so gradients of the adapter,
whose per-block weights are called from inside the transformer, are synchronised), and `adapt_to_exemplar` uses it
for test-time adaptation: one implementation of the objective.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import SiglipVisionModel

from .attention_processor import delta_processors_for
from .latents import decode_packed_latents
from .losses import (
    add_noise,
    estimate_clean_latents,
    flow_matching_loss,
    semantic_delta_consistency_loss,
)
from .models.delta_adapter import DeltaAdapterModel
from .semantic_delta import SiglipPreprocessor, delta_from_features


def enable_image_encoder_checkpointing(image_encoder: SiglipVisionModel) -> None:
    """Recomputes SigLIP's layers in backward instead of keeping their activations (the consistency loss
    backpropagates through it for the whole batch). transformers checkpoints only modules in training mode, and
    SigLIP's train mode differs from eval mode only in its attention dropout, which is 0: so it is switched on."""
    if image_encoder.config.attention_dropout:
        raise ValueError(
            "The image encoder has attention dropout: gradient checkpointing it would need train mode, which would "
            "change its features. Set its config.attention_dropout to 0."
        )
    image_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    image_encoder.train()


def predict_velocity(
    transformer: Flux2Transformer2DModel,
    noisy_latents: torch.Tensor,
    reference_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    joint_attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FLUX.2 [klein] prediction with a reference image, laid out as the pipeline lays it out.

    Args:
        transformer: the FLUX.2 transformer.
        noisy_latents: (B, 4C, h, w) x_t, normalised and patchified.
        reference_latents: (B, 4C, h, w) the reference (query) image's latents, ridden as extra tokens.
        prompt_embeds: (1 or B, L, D_txt) prompt embeddings.
        sigmas: (B,) noise levels (klein's timestep / 1000 is σ on the training grid).
        joint_attention_kwargs: passed to the attention processors (e.g. `delta_hidden_states`).

    Returns:
        The velocity for the noisy tokens (B, hw, 4C), the packed noisy latents (B, hw, 4C) and their ids (B, hw, 4).
    """
    batch_size = noisy_latents.shape[0]
    device, dtype = noisy_latents.device, transformer.dtype
    latent_ids = Flux2KleinPipeline._prepare_latent_ids(noisy_latents).to(device)  # (B, hw, 4)
    reference_ids = Flux2KleinPipeline._prepare_image_ids([reference_latents[:1]]).to(device)  # (1, hw, 4)
    packed_noisy = Flux2KleinPipeline._pack_latents(noisy_latents)  # (B, hw, 4C)
    model_input = torch.cat([packed_noisy, Flux2KleinPipeline._pack_latents(reference_latents)], dim=1)
    image_ids = torch.cat([latent_ids, reference_ids.expand(batch_size, -1, -1)], dim=1)  # (B, 2hw, 4)
    prompt_embeds = prompt_embeds.expand(batch_size, -1, -1).to(dtype)  # (B, L, D_txt)
    velocity = transformer(
        hidden_states=model_input.to(dtype),
        timestep=sigmas.to(device, dtype),
        guidance=None,
        encoder_hidden_states=prompt_embeds,
        txt_ids=Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(device),
        img_ids=image_ids,
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )[0][:, : packed_noisy.shape[1]]  # predictions for the noisy tokens only
    return velocity, packed_noisy, latent_ids


class DeltaAdapterObjective(nn.Module):
    """The frozen FLUX.2 transformer, VAE and SigLIP around a trainable `DeltaAdapterModel`.

    Attaches the adapter's processors to the transformer on construction.

    Args:
        adapter: the adapter to train.
        transformer: the frozen FLUX.2 transformer (may carry trainable LoRA layers).
        vae: FLUX.2's VAE; its decoder turns x̂0 into pixels for the consistency loss.
        image_encoder: the frozen SigLIP encoder.
        preprocessor: SigLIP's differentiable preprocessing.
        prompt_embeds: (1, L, D_txt) embeddings of the empty prompt.
        lambda_delta: weight of the semantic-delta consistency loss (0 turns it off, and skips the decode).
    """

    def __init__(
        self,
        adapter: DeltaAdapterModel,
        transformer: Flux2Transformer2DModel,
        vae: AutoencoderKLFlux2,
        image_encoder: SiglipVisionModel,
        preprocessor: SiglipPreprocessor,
        prompt_embeds: torch.Tensor,
        lambda_delta: float = 1.0,
    ):
        super().__init__()
        self.adapter = adapter
        self.transformer = transformer
        self.vae = vae
        self.image_encoder = image_encoder
        self.preprocessor = preprocessor
        self.lambda_delta = float(lambda_delta)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        transformer.set_attn_processor(delta_processors_for(transformer, adapter))

    def frozen_state_names(self) -> list[str]:
        """Names of the parameters and buffers that never train (for DDP to leave alone)."""
        frozen = [name for name, parameter in self.named_parameters() if not parameter.requires_grad]
        return frozen + [name for name, _ in self.named_buffers()]

    def forward(
        self,
        source_latents: torch.Tensor,
        target_latents: torch.Tensor,
        source_features: torch.Tensor,
        target_features: torch.Tensor,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        loss_weights: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss of one batch.

        Args:
            source_latents: (B, 4C, h, w) normalised, patchified VAE latents of the sources (the queries).
            target_latents: (B, 4C, h, w) the same for the targets (x0).
            source_features: (B, P, D) SigLIP patch features of the sources.
            target_features: (B, P, D) SigLIP patch features of the targets.
            noise: (B, 4C, h, w) Gaussian noise.
            sigmas: (B,) noise levels.
            loss_weights: optional (B,) flow-matching weights.
            delta: optional (B, P, D) input for the adapter in place of the features' semantic delta (a measurement
                of the injection path alone, as `benchmarks/toyworld2_ladder.py`'s oracle rung feeds it a learned
                code per edit); the consistency loss still compares against the features' delta.

        Returns:
            `loss` (to backpropagate), and the detached `flow_matching` and `delta_consistency` terms.
        """
        height, width = target_latents.shape[-2:]

        delta_of_features = delta_from_features(source_features.float(), target_features.float())  # (B, P, D)
        adapter_input = delta_of_features if delta is None else delta
        edit_tokens = self.adapter(adapter_input.to(self.adapter.dtype))  # (B, N, D_edit)

        noisy_latents = add_noise(target_latents, noise, sigmas)  # (B, 4C, h, w)
        velocity, packed_noisy, latent_ids = predict_velocity(
            self.transformer, noisy_latents, source_latents, self.prompt_embeds, sigmas,
            joint_attention_kwargs={"delta_hidden_states": edit_tokens},
        )  # fmt: skip

        packed_target = Flux2KleinPipeline._pack_latents(target_latents)
        packed_noise = Flux2KleinPipeline._pack_latents(noise)
        fm_loss = flow_matching_loss(velocity, packed_target, packed_noise, loss_weights)

        if self.lambda_delta > 0:
            clean_estimate = estimate_clean_latents(packed_noisy.float(), velocity.float(), sigmas)  # (B, hw, 4C)
            images = decode_packed_latents(self.vae, clean_estimate, latent_ids, height, width)  # (B, 3, H, W)
            delta_loss = semantic_delta_consistency_loss(
                self.image_encoder, self.preprocessor, images, source_features, delta_of_features
            )
        else:
            delta_loss = torch.zeros((), device=fm_loss.device)

        return {
            "loss": fm_loss + self.lambda_delta * delta_loss,
            "flow_matching": fm_loss.detach(),
            "delta_consistency": delta_loss.detach(),
        }
