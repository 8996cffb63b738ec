"""`DeltaAdapterObjective`: Delta-Adapter's training loss on a batch of single exemplar pairs, as one module.

Single-pair supervision (Delta-Adapter, section 4.1): the pair's source is the query (the backbone's reference
image), its semantic delta conditions the transformer through the adapter, and the pair's target is what the model
must reconstruct. One `forward` gives `L = L_fm + λ_delta · L_delta` (see `losses.py`). What differs per backbone
(latent layout, the transformer's inputs) comes from its module in `backbones`.

The training script wraps this module with accelerate (DDP sees one forward per step, so gradients of the adapter,
whose per-block weights are called from inside the transformer, are synchronised), and `adapt_to_exemplar` uses it
for test-time adaptation: one implementation of the objective.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import SiglipVisionModel

from .backbones import backbone_of
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


class DeltaAdapterObjective(nn.Module):
    """The frozen transformer (FLUX.2 or FLUX.1), VAE and SigLIP around a trainable `DeltaAdapterModel`.

    Attaches the adapter's processors to the transformer on construction.

    Args:
        adapter: the adapter to train.
        transformer: the frozen transformer (may carry trainable LoRA layers).
        vae: the backbone's VAE; its decoder turns x̂0 into pixels for the consistency loss.
        image_encoder: the frozen SigLIP encoder.
        preprocessor: SigLIP's differentiable preprocessing.
        text_conditioning: the empty prompt's embeddings as the backbone's `predict_velocity` takes them: for
            FLUX.2 (1, L, D_txt) (a tensor, or `{"prompt_embeds": ...}`); for FLUX.1 `prompt_embeds` and
            `pooled_prompt_embeds`. The backbone's `training_conditioning` (FLUX.1: the distilled guidance) is
            added, unless given here.
        lambda_delta: weight of the semantic-delta consistency loss (0 turns it off, and skips the decode).
    """

    def __init__(
        self,
        adapter: DeltaAdapterModel,
        transformer,
        vae,
        image_encoder: SiglipVisionModel,
        preprocessor: SiglipPreprocessor,
        text_conditioning: torch.Tensor | dict[str, torch.Tensor],
        lambda_delta: float = 1.0,
    ):
        super().__init__()
        self.adapter = adapter
        self.transformer = transformer
        self.vae = vae
        self.image_encoder = image_encoder
        self.preprocessor = preprocessor
        self.lambda_delta = float(lambda_delta)
        self.backbone = backbone_of(transformer)
        if isinstance(text_conditioning, torch.Tensor):
            text_conditioning = {"prompt_embeds": text_conditioning}
        text_conditioning = {**self.backbone.training_conditioning(), **text_conditioning}
        self.text_conditioning_names = tuple(text_conditioning)
        for name, tensor in text_conditioning.items():  # buffers: they follow the module to its device
            self.register_buffer(name, tensor, persistent=False)
        transformer.set_attn_processor(self.backbone.processors_for(transformer, adapter))

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
            source_latents: (B, C', h, w) the sources' (the queries') latents, as the backbone's `encode_latents`
                gives them.
            target_latents: (B, C', h, w) the same for the targets (x0).
            source_features: (B, P, D) SigLIP patch features of the sources.
            target_features: (B, P, D) SigLIP patch features of the targets.
            noise: (B, C', h, w) Gaussian noise.
            sigmas: (B,) noise levels.
            loss_weights: optional (B,) flow-matching weights.
            delta: optional (B, P, D) input for the adapter in place of the features' semantic delta (a measurement
                of the injection path alone, as `examples/toyworld/world2_ladder.py`'s oracle rung feeds it a learned
                code per edit); the consistency loss still compares against the features' delta.

        Returns:
            `loss` (to backpropagate), and the detached `flow_matching` and `delta_consistency` terms.
        """
        height, width = target_latents.shape[-2:]

        delta_of_features = delta_from_features(source_features.float(), target_features.float())  # (B, P, D)
        adapter_input = delta_of_features if delta is None else delta
        edit_tokens = self.adapter(adapter_input.to(self.adapter.dtype))  # (B, N, D_edit)

        noisy_latents = add_noise(target_latents, noise, sigmas)  # (B, C', h, w)
        text_conditioning = {name: getattr(self, name) for name in self.text_conditioning_names}
        velocity, packed_noisy = self.backbone.predict_velocity(
            self.transformer, noisy_latents, source_latents, text_conditioning, sigmas,
            joint_attention_kwargs={"delta_hidden_states": edit_tokens},
        )  # fmt: skip  # (B, S, D_tok) each: the noisy tokens and their velocity

        packed_target = self.backbone.pack_latents(target_latents)
        packed_noise = self.backbone.pack_latents(noise)
        fm_loss = flow_matching_loss(velocity, packed_target, packed_noise, loss_weights)

        if self.lambda_delta > 0:
            clean_estimate = estimate_clean_latents(packed_noisy.float(), velocity.float(), sigmas)  # (B, S, D_tok)
            images = self.backbone.decode_tokens(self.vae, clean_estimate, height, width)  # (B, 3, H, W)
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
