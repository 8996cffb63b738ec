"""`FluxDeltaInpaintPipeline`: masked edits on FLUX.2 [klein], the exemplar's edit applied only inside a user's mask,
through `Flux2KleinInpaintPipeline`'s own loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import Flux2KleinInpaintPipeline
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput
from diffusers.utils import replace_example_docstring

from ..checks import as_tensor, finite_float, positive_int
from ..concurrency import one_call_at_a_time
from ..exemplar_encoding import ExemplarPair
from ..image_inputs import ImageInput, to_rgb_image
from .klein_delta_pipeline import KleinDeltaPipelineMixin


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from diffusers_delta import FluxDeltaEditPipeline, FluxDeltaInpaintPipeline

        >>> pipe = FluxDeltaEditPipeline.from_pretrained(
        ...     "black-forest-labs/FLUX.2-klein-4B", text_encoder=None, tokenizer=None, dtype=torch.bfloat16
        ... )
        >>> pipe.load_delta_adapter("org/delta-adapter")
        >>> masked = FluxDeltaInpaintPipeline.from_pipe(pipe).to("cuda")  # the same models and adapter
        >>> source, target = load_image("exemplar_before.png"), load_image("exemplar_after.png")
        >>> query, mask = load_image("query.png"), load_image("mask.png")  # white: edit here
        >>> edited = masked(query, mask_image=mask, exemplar=(source, target)).images[0]
        ```
"""


class FluxDeltaInpaintPipeline(KleinDeltaPipelineMixin, Flux2KleinInpaintPipeline):
    r"""Masked exemplar edits with Delta-Adapter on FLUX.2 [klein]: inside the mask the query is edited the way the
    exemplar pair shows, outside it stays as `Flux2KleinInpaintPipeline` keeps it (the query's latents, put back at
    every step). This is upstream's inpainting loop with the empty prompt and the edit tokens in the attention
    kwargs, so with `delta_scale=0` it is `Flux2KleinInpaintPipeline` exactly, and its `strength`,
    `padding_mask_crop` and `image_reference` work as there.

    Components and constructor: `FluxDeltaEditPipeline`'s (`KleinDeltaPipelineMixin`).
    """

    @one_call_at_a_time
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        exemplar: ExemplarPair | list[ExemplarPair] | None = None,
        delta_embeds: torch.Tensor | None = None,
        delta_scale: float = 1.0,
        combine: str = "mean",
        strength: float = 1.0,
        image_reference: ImageInput | list[ImageInput] | None = None,
        padding_mask_crop: int | None = None,
        prompt: str = "",
        num_inference_steps: int = 4,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
    ) -> Flux2PipelineOutput | tuple:
        r"""Applies the exemplar's edit to the query inside the mask.

        Args:
            image: the query, one image (PIL, numpy array or tensor in [0, 1]).
            mask_image: where to edit: white (1) edits, black (0) keeps; the query's size (any mode; binarised at 0.5).
            exemplar: `(source, target)` showing the edit, or a list of such pairs. Give this or `delta_embeds`.
            delta_embeds: (1, N, D_edit) edit tokens from `encode_exemplar`.
            delta_scale: edit strength; 0 gives `Flux2KleinInpaintPipeline`'s output.
            combine: with several exemplar pairs, `"mean"` or `"sum"` (see `encode_exemplar`).
            strength: how much of the masked area is made anew (1: from pure noise, the edit's full reach; lower keeps
                more of the query there).
            image_reference: further reference images, as upstream takes them.
            padding_mask_crop: edit only a crop around the mask, padded by this many pixels, as upstream does.
            prompt: an optional prompt; Delta-Adapter is trained with the empty one.
            num_inference_steps: denoising steps before `strength` shortens them (4 for the distilled klein).
            sigmas: custom sigmas for the scheduler.
            guidance_scale: upstream's prompt guidance (against the empty prompt), non-distilled bases only: it needs a
                prompt, as the edit is in both passes.
            num_images_per_prompt: outputs per call.
            generator: a generator, or one per output, for reproducible noise.
            latents: pre-generated noise latents.
            prompt_embeds: pre-computed (1, L, D_txt) prompt embeddings.
            output_type: `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict: return a `Flux2PipelineOutput` instead of a tuple.
            attention_kwargs: extra kwargs for the attention processors (e.g. a LoRA `scale`).
            callback_on_step_end: called after each step as in diffusers pipelines.
            callback_on_step_end_tensor_inputs: tensors passed to the callback.
            max_sequence_length: prompt length for the text encoder.
            text_encoder_out_layers: Qwen3 layers stacked into the prompt embeddings.

        Examples:

        Returns:
            [`~pipelines.flux2.Flux2PipelineOutput`] or `tuple` whose first element is the list of edited images.
        """
        if isinstance(image, list):
            raise ValueError("A masked edit takes one query: call the pipeline once per query.")
        delta_scale, num_images_per_prompt = self._check_edit_request(
            image, exemplar, delta_embeds, delta_scale, num_images_per_prompt, attention_kwargs
        )
        query = self._query_images(image)[0]
        mask = self._mask_for(mask_image, query.size)
        strength = finite_float(strength, "strength")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        guidance_scale = finite_float(guidance_scale, "guidance_scale")
        if guidance_scale > 1.0 and not self.config.is_distilled and prompt == "" and prompt_embeds is None:
            raise ValueError(
                "guidance_scale > 1 guides a prompt against the empty one, and this masked edit has no prompt (the "
                "edit is in both passes): leave guidance_scale at 1, or give a prompt."
            )
        positive_int(num_inference_steps, "num_inference_steps")
        device = self._execution_device

        if prompt_embeds is None:
            prompt_embeds = self._text_conditioning(prompt, max_sequence_length, text_encoder_out_layers)[
                "prompt_embeds"
            ]
        prompt_embeds = as_tensor(prompt_embeds, "prompt_embeds", "pass them as a torch tensor").to(device)
        edit_tokens = self._edit_tokens(exemplar, delta_embeds, 1, device, combine)  # (1, N, D_edit)
        attention_kwargs = {
            **(attention_kwargs or {}),
            "delta_hidden_states": edit_tokens.repeat_interleave(num_images_per_prompt, dim=0),
            "delta_scale": delta_scale,
        }
        negative_prompt_embeds = None
        if guidance_scale > 1.0 and not self.config.is_distilled:
            negative_prompt_embeds = self._text_conditioning("", max_sequence_length, text_encoder_out_layers)[
                "prompt_embeds"
            ].to(device)
        return Flux2KleinInpaintPipeline.__call__(
            self,
            image=query,
            mask_image=mask,
            image_reference=image_reference,
            padding_mask_crop=padding_mask_crop,
            strength=strength,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            output_type=output_type,
            return_dict=return_dict,
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
            text_encoder_out_layers=text_encoder_out_layers,
        )

    @staticmethod
    def _mask_for(mask_image: ImageInput | None, size: tuple[int, int]):
        """The mask as a greyscale image of the query's `size` (width, height); a missing or other-sized one is
        refused."""
        if mask_image is None:
            raise ValueError("mask_image is required: white where to edit, black where to keep the query.")
        mask = to_rgb_image(mask_image, name="mask_image", min_side=1).convert("L")
        if mask.size != size:
            raise ValueError(
                f"mask_image is {mask.width}x{mask.height} and the query {size[0]}x{size[1]}: draw or resize the mask "
                "at the query's size."
            )
        return mask
