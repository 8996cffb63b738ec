"""`EmptyPromptMixin`: the prompt conditioning of an edit, from the stored empty prompt or the text encoders.

Delta-Adapter edits with the empty prompt; its embeddings travel with the adapter folder
(`empty_prompt_embeds.safetensors`), so a pipeline that loads the adapter needs no text encoder.
"""

from __future__ import annotations

import torch

from .backbones import backbone_of
from .checks import check_finite


class EmptyPromptMixin:
    """Stores the empty prompt's embeddings and gives a call its prompt conditioning. Part of `DeltaAdapterMixin`."""

    #: (1, L, D_txt) embeddings of the empty prompt, from the adapter folder or `compute_empty_prompt_embeds`.
    empty_prompt_embeds: torch.Tensor | None = None
    #: (1, D_pooled) pooled embeddings of the empty prompt, for backbones that take them (FLUX.1: CLIP's).
    empty_pooled_prompt_embeds: torch.Tensor | None = None

    def _text_conditioning(
        self, prompt: str = "", max_sequence_length: int = 512, text_encoder_out_layers=(9, 18, 27)
    ) -> dict[str, torch.Tensor]:
        """The prompt's conditioning by name, as the backbone's transformer takes it (`prompt_embeds`, and
        `pooled_prompt_embeds` for FLUX.1): the stored empty prompt's for `""`, else the text encoders'.

        Args:
            prompt: the prompt (Delta-Adapter is trained with the empty one).
            max_sequence_length: prompt length for the text encoder.
            text_encoder_out_layers: FLUX.2's Qwen3 layers stacked into the prompt embeddings (FLUX.1: unused).
        """
        if prompt == "" and self.empty_prompt_embeds is not None:
            stored = self._empty_prompt()
            for name, tensor in stored.items():
                check_finite(tensor, f"pipe.empty_{name}")
            return {name: tensor.to(self.transformer.dtype) for name, tensor in stored.items()}
        return self._encode_prompt(prompt, max_sequence_length, text_encoder_out_layers)

    def _encode_prompt(self, prompt: str, max_sequence_length: int, text_encoder_out_layers) -> dict:
        """A prompt's conditioning by name from the pipeline's text encoders (see `_text_conditioning`)."""
        backbone = backbone_of(self.transformer)
        missing = [name for name in backbone.TEXT_COMPONENTS if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"This pipeline has no {', '.join(missing)} and no stored empty-prompt embeddings: load an adapter "
                f"whose folder has empty_prompt_embeds.safetensors, or pass {', '.join(backbone.TEXT_COMPONENTS)}."
            )
        return backbone.encode_prompt(self, prompt, max_sequence_length, text_encoder_out_layers)

    @torch.no_grad()
    def encode_empty_prompt(self, max_sequence_length: int = 512, text_encoder_out_layers=(9, 18, 27)) -> None:
        """Encodes the empty prompt with the pipeline's text encoders and stores its embeddings
        (`empty_prompt_embeds`, and `empty_pooled_prompt_embeds` for FLUX.1), so that `save_delta_adapter` writes
        them and pipelines that load the adapter run without text encoders.

        Args:
            max_sequence_length: the padded prompt length the pipeline uses (512 for klein and Kontext).
            text_encoder_out_layers: FLUX.2's Qwen3 layers stacked into the embeddings (klein's default; FLUX.1:
                unused).
        """
        embeds = self._encode_prompt("", max_sequence_length, text_encoder_out_layers)
        self._restore_empty_prompt({name: tensor.to("cpu") for name, tensor in embeds.items()})

    def _empty_prompt_dims(self) -> tuple[int, int | None]:
        """The widths of the empty prompt's embeddings this transformer takes: (D_txt, D_pooled or None)."""
        config = self.transformer.config
        return config.joint_attention_dim, config.get("pooled_projection_dim")

    def _empty_prompt(self) -> dict[str, torch.Tensor] | None:
        """The stored empty prompt's embeddings by name (as its file holds them), or None when there are none."""
        if self.empty_prompt_embeds is None:
            return None
        embeds = {"prompt_embeds": self.empty_prompt_embeds}
        if self.empty_pooled_prompt_embeds is not None:
            embeds["pooled_prompt_embeds"] = self.empty_pooled_prompt_embeds
        return embeds

    def _restore_empty_prompt(self, embeds: dict[str, torch.Tensor] | None) -> None:
        """Stores the empty prompt's embeddings by name (None: none)."""
        embeds = embeds or {}
        self.empty_prompt_embeds = embeds.get("prompt_embeds")
        self.empty_pooled_prompt_embeds = embeds.get("pooled_prompt_embeds")
