"""The toy world's stand-in for FLUX.2 [klein]'s text encoder: structured instructions -> prompt embeddings.

klein reads an edit from its prompt; the toy base editor reads it from a structured instruction
(`families.instruction_vector`: the family and its parameters, for one or two steps), which this small learned
network turns into prompt embeddings, trained with the base editor. The empty instruction (all zeros) gives the
embeddings the base editor reproduces its reference under, and that Delta-Adapter always runs it with.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .families import INSTRUCTION_WIDTH


class InstructionEncoder(ModelMixin, ConfigMixin):
    """Instruction vectors (B, instruction_width) -> prompt embeddings (B, prompt_tokens, prompt_dim).

    Args:
        instruction_width: width of the structured instruction.
        hidden_dim: the MLP's hidden width.
        prompt_tokens: L, tokens of the prompt embeddings.
        prompt_dim: D_txt, the transformer's text width (`joint_attention_dim`).
    """

    @register_to_config
    def __init__(
        self, instruction_width: int = INSTRUCTION_WIDTH, hidden_dim: int = 256, prompt_tokens: int = 8,
        prompt_dim: int = 64,
    ):  # fmt: skip
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(instruction_width, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, prompt_tokens * prompt_dim),
        )

    def forward(self, instructions: torch.Tensor) -> torch.Tensor:
        """(B, instruction_width) -> (B, L, D_txt)."""
        return self.mlp(instructions).unflatten(-1, (self.config.prompt_tokens, self.config.prompt_dim))

    @torch.no_grad()
    def empty_prompt_embeds(self) -> torch.Tensor:
        """(1, L, D_txt) embeddings of the empty instruction."""
        return self(torch.zeros(1, self.config.instruction_width, device=self.device, dtype=self.dtype))
