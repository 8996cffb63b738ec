"""The Delta-Adapter's pipeline blocks for Modular Diffusers.

`DeltaAdapterStep` turns the exemplar pair (or `delta_embeds`) into edit tokens and hands them to the denoise loop in
`joint_attention_kwargs`, where the adapter's attention processors read them, as `StableDiffusionXLIPAdapterStep`
prepares IP-Adapter embeddings for the UNet's processors. `DeltaEmptyPromptStep` gives the denoise loop the empty
prompt's embeddings stored with the adapter, in place of the text encoder step, so that no text encoder is loaded.
`delta_blocks` puts both into upstream's blocks (klein's, Kontext's).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.modular_pipelines import ModularPipelineBlocks, PipelineState, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from ..atomic_folder import atomic_folder, write_text_atomically
from ..checks import finite_float, positive_int
from ..hub import push_folder
from ..loaders import DeltaAdapterMixin
from ..models.delta_adapter import DeltaAdapterModel
from ..version import __version__


#: A saved step's module file, and the distribution its `modular_config.json` requires.
BLOCK_MODULE = "block"
DISTRIBUTION = "diffusers-delta"
BLOCK_SOURCE = (
    '"""The Delta-Adapter step of diffusers-delta (`pip install diffusers-delta`), as a Hub custom block."""\n\n'
    "from diffusers_delta.modular.blocks import DeltaAdapterStep  # noqa: F401\n"
)

#: The names the Delta-Adapter's blocks take in a sequence of blocks.
DELTA_STEP_NAME = "delta_adapter"
EMPTY_PROMPT_STEP_NAME = "text_encoder"
PROMPT_UPSAMPLER_STEP_NAME = "prompt_upsampler"


def _require_delta_loader(components) -> None:
    if not isinstance(components, DeltaAdapterMixin):
        raise TypeError(
            f"The Delta-Adapter step runs in a pipeline that loads the adapter, not in a {type(components).__name__}: "
            "build it with diffusers_delta.modular.FluxDeltaModularPipeline(blocks=...) (FLUX.1 Kontext: "
            "FluxKontextDeltaModularPipeline), or its from_pretrained(...), then call pipe.load_delta_adapter(...)."
        )


class DeltaAdapterStep(ModularPipelineBlocks):
    """Encodes the exemplar pair (or takes `delta_embeds`) into edit tokens and adds them, with `delta_scale`, to the
    `joint_attention_kwargs` the denoise loop passes to the transformer. Place it before the denoise step, after the
    step that makes `prompt_embeds` (the batch is the prompts' times `num_images_per_prompt`). With no adapter
    loaded it passes everything through, so the pipeline gives the upstream output."""

    model_name = None  # backbone-agnostic: it only reads the pipeline's adapter components

    @property
    def description(self) -> str:
        """What the step does, as the blocks' documentation shows it."""
        return (
            "Delta-Adapter step: the exemplar pair (source, target) or delta_embeds -> edit tokens, handed to the "
            "denoise loop in joint_attention_kwargs. Load the adapter with pipe.load_delta_adapter(...)."
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        """The adapter and its SigLIP encoder and preprocessing (registered by `load_delta_adapter`)."""
        return [
            ComponentSpec("delta_adapter", DeltaAdapterModel),
            ComponentSpec("image_encoder", SiglipVisionModel),
            ComponentSpec("feature_extractor", SiglipImageProcessorPil),
        ]

    @property
    def inputs(self) -> list[InputParam]:
        """The exemplar (or its edit tokens), the strength and how several pairs combine, and the batch."""
        return [
            InputParam("exemplar", description="A (source, target) pair of images, or a list of pairs."),
            InputParam("delta_embeds", type_hint=torch.Tensor, description="Edit tokens from encode_exemplar."),
            InputParam("delta_scale", type_hint=float, description="The edit's strength for this call (default 1)."),
            InputParam("combine", type_hint=str, default="mean", description="'mean' or 'sum' of several pairs."),
            InputParam("num_images_per_prompt", default=1),
            InputParam("prompt_embeds", type_hint=torch.Tensor, required=True, description="The prompts' embeddings."),
            InputParam("joint_attention_kwargs", description="Other arguments of the attention processors."),
            InputParam("attention_kwargs", description="The same, as FLUX.3 names them."),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        """The denoise loop's attention arguments with the edit tokens (`joint_attention_kwargs` as FLUX.1's and
        FLUX.2's loops read them, `attention_kwargs` as FLUX.3's), and the tokens per prompt."""
        return [
            OutputParam("joint_attention_kwargs", type_hint=dict, description="With the edit tokens and strength."),
            OutputParam(
                "attention_kwargs",
                kwargs_type="denoiser_input_fields",
                type_hint=dict,
                description="With the edit tokens and strength (FLUX.3's transformer takes them through a pre-hook).",
            ),
            OutputParam("delta_embeds", type_hint=torch.Tensor, description="Edit tokens per prompt (B, N, D_edit)."),
        ]

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        delta_adapter: str | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        token: str | None = None,
        private: bool | None = None,
    ) -> None:
        """Writes the step as a Hub custom block, which `ModularPipelineBlocks.from_pretrained(folder_or_repo,
        trust_remote_code=True)` loads back: `block.py` (the step, from this package), `modular_config.json` (its
        `auto_map`, the package as a requirement, and `delta_adapter`, the adapter to load beside it) and a card.
        The write is atomic: a failed save leaves the folder as it was.

        Args:
            save_directory: the folder to write (other files in it are left alone).
            delta_adapter: the adapter (Hub id or folder) the card's snippet loads with `load_delta_adapter`.
            push_to_hub: also upload the folder to `repo_id`.
            repo_id: the Hub repo (defaults to the folder's name).
            token: the Hub token for the upload.
            private: create the repo private.
        """
        self.register_to_config(
            auto_map={"ModularPipelineBlocks": f"{BLOCK_MODULE}.{type(self).__name__}"},
            requirements={DISTRIBUTION: f">={__version__}"},
            delta_adapter=delta_adapter,
        )
        repo_id = repo_id or Path(save_directory).name
        with atomic_folder(save_directory, owned=(f"{BLOCK_MODULE}.py", self.config_name, "README.md")) as staging:
            write_text_atomically(BLOCK_SOURCE, staging / f"{BLOCK_MODULE}.py")
            self.save_config(staging)
            write_text_atomically(_block_card(delta_adapter, repo_id), staging / "README.md")
        if push_to_hub:
            push_folder(
                save_directory,
                repo_id,
                token=token,
                private=private,
                commit_message="Upload the Delta-Adapter step",
            )

    @torch.no_grad()
    def __call__(self, components, state: PipelineState) -> tuple[object, PipelineState]:
        """Adds the edit tokens of this call to the state's `joint_attention_kwargs`."""
        block_state = self.get_block_state(state)
        adapter = getattr(components, "delta_adapter", None)
        if adapter is None:  # nothing loaded: the upstream pipeline, unchanged
            if block_state.exemplar is not None or block_state.delta_embeds is not None:
                _require_delta_loader(components)
                components._require_delta_adapter()
            self.set_block_state(state, block_state)
            return components, state
        _require_delta_loader(components)
        if (block_state.exemplar is None) == (block_state.delta_embeds is None):
            raise ValueError("Pass exactly one of exemplar=(source, target) and delta_embeds= (from encode_exemplar).")
        copies = positive_int(block_state.num_images_per_prompt, "num_images_per_prompt")
        prompts = block_state.prompt_embeds.shape[0]
        tokens = components._edit_tokens(
            block_state.exemplar,
            block_state.delta_embeds,
            prompts,
            components._execution_device,
            block_state.combine,
        )  # (prompts, N, D_edit)
        block_state.delta_embeds = tokens
        edit = {"delta_hidden_states": tokens.repeat_interleave(copies, dim=0)}  # as the prompts repeat
        if block_state.delta_scale is not None:
            edit["delta_scale"] = finite_float(block_state.delta_scale, "delta_scale")
        # both names: each backbone's loop reads its own and leaves the other alone
        block_state.joint_attention_kwargs = {**(block_state.joint_attention_kwargs or {}), **edit}
        block_state.attention_kwargs = {**(block_state.attention_kwargs or {}), **edit}
        self.set_block_state(state, block_state)
        return components, state


class DeltaEmptyPromptStep(ModularPipelineBlocks):
    """The empty prompt's conditioning, as the adapter trained with it: the embeddings its folder brought (or, without
    them, the pipeline's text encoder's), unless the call gives `prompt_embeds`. It takes the text encoder step's
    place, so no text encoder is loaded."""

    model_name = None

    @property
    def description(self) -> str:
        """What the step does, as the blocks' documentation shows it."""
        return "The empty prompt's embeddings stored with the Delta-Adapter, in place of the text encoder step."

    @property
    def inputs(self) -> list[InputParam]:
        """Embeddings given for this call (they win), and the text encoder's settings, used only when no embeddings
        are stored."""
        return [
            InputParam("prompt_embeds", type_hint=torch.Tensor, description="Embeddings to use instead."),
            InputParam("pooled_prompt_embeds", type_hint=torch.Tensor, description="Pooled ones (FLUX.1)."),
            InputParam("negative_prompt_embeds", type_hint=torch.Tensor, description="Unconditional ones to use."),
            InputParam("max_sequence_length", type_hint=int, default=512),
            InputParam("text_encoder_out_layers", type_hint=tuple[int], default=(9, 18, 27)),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        """The prompt's embeddings, and the pooled ones for backbones that take them (FLUX.1; None on klein)."""
        return [
            OutputParam(  # FLUX.3's loop gathers its inputs by kind; FLUX.1's and FLUX.2's read them by name
                "prompt_embeds",
                kwargs_type="denoiser_input_fields",
                type_hint=torch.Tensor,
                description="(1, L, D_txt) the empty prompt's embeddings",
            ),
            OutputParam("pooled_prompt_embeds", type_hint=torch.Tensor, description="(1, D_pooled), or None"),
            OutputParam(
                "negative_prompt_embeds",
                kwargs_type="denoiser_input_fields",
                type_hint=torch.Tensor,
                description="those given; else, when the pipeline's guider wants an unconditional pass (FLUX.3's "
                "`NoEditGuidance`: the pass without the edit), the prompt's own; else None",
            ),
        ]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState) -> tuple[object, PipelineState]:
        """Puts the empty prompt's embeddings into the state."""
        _require_delta_loader(components)
        block_state = self.get_block_state(state)
        if block_state.prompt_embeds is None:  # none given for this call
            conditioning = components._text_conditioning(
                "", block_state.max_sequence_length, block_state.text_encoder_out_layers
            )
            device = components._execution_device
            block_state.prompt_embeds = conditioning["prompt_embeds"].to(device)
            pooled = conditioning.get("pooled_prompt_embeds")
            block_state.pooled_prompt_embeds = None if pooled is None else pooled.to(device)
        if block_state.negative_prompt_embeds is None and getattr(components, "requires_unconditional_embeds", False):
            block_state.negative_prompt_embeds = block_state.prompt_embeds  # a guider's pass without the edit
        self.set_block_state(state, block_state)
        return components, state


def delta_blocks(blocks: SequentialPipelineBlocks | None = None, text_free: bool = True) -> SequentialPipelineBlocks:
    """Blocks with the Delta-Adapter step before their denoise step, and, `text_free`, the stored empty prompt in
    place of their text encoder step.

    Args:
        blocks: a sequence of blocks with `denoise` (and `text_encoder`) steps, such as `Flux2KleinAutoBlocks()`
            (the default) or `FluxKontextAutoBlocks()`. Changed in place and returned.
        text_free: replace the text encoder step by `DeltaEmptyPromptStep` (the adapter edits with the empty prompt;
            its folder carries the embeddings, so the text encoder need not be loaded), and drop FLUX.3's prompt
            upsampler.

    Raises:
        ValueError: blocks without a `denoise` step, or that already hold the Delta-Adapter step.
    """
    if blocks is None:
        from diffusers.modular_pipelines import Flux2KleinAutoBlocks

        blocks = Flux2KleinAutoBlocks()
    names = list(blocks.sub_blocks)
    if DELTA_STEP_NAME in names:
        raise ValueError(f"These blocks already hold the Delta-Adapter step ({DELTA_STEP_NAME!r}).")
    if "denoise" not in names:
        raise ValueError(f"The Delta-Adapter step goes before a 'denoise' step; these blocks have {names}.")
    if text_free and EMPTY_PROMPT_STEP_NAME in names:
        blocks.sub_blocks[EMPTY_PROMPT_STEP_NAME] = DeltaEmptyPromptStep()
        if PROMPT_UPSAMPLER_STEP_NAME in names:  # FLUX.3's: it rewrites a prompt there no longer is
            blocks.sub_blocks.pop(PROMPT_UPSAMPLER_STEP_NAME)
            names.remove(PROMPT_UPSAMPLER_STEP_NAME)
    blocks.sub_blocks.insert(DELTA_STEP_NAME, DeltaAdapterStep(), names.index("denoise"))
    return blocks


def _block_card(delta_adapter: str | None, repo_id: str) -> str:
    """The README of a saved step: what it is, how to use it, how to publish it."""
    adapter = delta_adapter or "org/delta-adapter"
    return f"""---
library_name: diffusers
tags:
- modular-diffusers
- delta-adapter
---

# The Delta-Adapter step (diffusers-delta)

A Modular Diffusers block that turns an exemplar pair (a source image and its edited version) into edit tokens for
the denoise loop of FLUX.2 [klein] or FLUX.1 Kontext, so that the query is edited the same way, with no text. It
needs `pip install diffusers-delta`, and an adapter loaded into the pipeline (`{adapter}`).

```python
import torch
from diffusers.modular_pipelines import Flux2KleinAutoBlocks, ModularPipelineBlocks
from diffusers_delta.modular import FluxDeltaModularPipeline

step = ModularPipelineBlocks.from_pretrained("{repo_id}", trust_remote_code=True)
blocks = Flux2KleinAutoBlocks()
blocks.sub_blocks.insert("delta_adapter", step, list(blocks.sub_blocks).index("denoise"))
pipe = FluxDeltaModularPipeline(blocks, "black-forest-labs/FLUX.2-klein-4B")
pipe.load_components(dtype=torch.bfloat16)
pipe.load_delta_adapter("{adapter}")
edited = pipe(image=query, exemplar=(source, target), output="images")[0]
```

Publish it with `DeltaAdapterStep().save_pretrained(folder, delta_adapter="{adapter}", push_to_hub=True,
repo_id="your-name/delta-adapter-step")`, or upload this folder as it is (`block.py`, `modular_config.json` and this
card).
"""
