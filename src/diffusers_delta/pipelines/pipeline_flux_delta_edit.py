"""`FluxDeltaEditPipeline`: edit a query image the way an exemplar pair shows, on FLUX.2 [klein], with no text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device

from ..backbones.flux2 import unpack_to_vae_latents
from ..checks import as_tensor, finite_float, positive_int
from ..concurrency import one_call_at_a_time
from ..exemplar_encoding import ExemplarPair
from ..image_inputs import ImageInput
from .klein_delta_pipeline import KleinDeltaPipelineMixin


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from diffusers_delta import FluxDeltaEditPipeline

        >>> pipe = FluxDeltaEditPipeline.from_pretrained(
        ...     "black-forest-labs/FLUX.2-klein-4B", text_encoder=None, tokenizer=None, dtype=torch.bfloat16
        ... )
        >>> pipe.load_delta_adapter("org/delta-adapter")  # also brings SigLIP and the empty prompt's embeddings
        >>> pipe.to("cuda")
        >>> source, target = load_image("exemplar_before.png"), load_image("exemplar_after.png")
        >>> edited = pipe(load_image("query.png"), exemplar=(source, target)).images[0]
        >>> edited.save("edited.png")
        ```
"""


@torch.no_grad()
def compute_empty_prompt_embeds(
    pipe: Flux2KleinPipeline, max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] = (9, 18, 27)
) -> torch.Tensor:
    """The empty prompt's embeddings, computed once with the pipeline's text encoder.

    Store them with `pipe.empty_prompt_embeds = ...` and `save_delta_adapter` writes them to
    `empty_prompt_embeds.safetensors`; pipelines that load that adapter then run without a text encoder.

    Args:
        pipe: a FLUX.2 [klein] pipeline with its `text_encoder` and `tokenizer`.
        max_sequence_length: the padded prompt length the pipeline uses (512 for klein).
        text_encoder_out_layers: the Qwen3 layers whose hidden states are stacked (klein's default).

    Returns:
        (1, max_sequence_length, D_txt) on the CPU, in the text encoder's dtype.
    """
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise ValueError("compute_empty_prompt_embeds needs the pipeline's text_encoder and tokenizer.")
    prompt_embeds, _ = pipe.encode_prompt(
        prompt="",
        device=pipe._execution_device,
        max_sequence_length=max_sequence_length,
        text_encoder_out_layers=text_encoder_out_layers,
    )
    return prompt_embeds.to("cpu")


class FluxDeltaEditPipeline(KleinDeltaPipelineMixin, Flux2KleinPipeline):
    r"""Exemplar-based image editing with Delta-Adapter on FLUX.2 [klein].

    The query image rides as FLUX.2's reference image; the exemplar pair's semantic delta, turned into edit tokens by
    the `delta_adapter`, reaches every transformer block through a decoupled cross-attention branch. Defaults fit the
    step-distilled klein-4B: 4 steps, guidance 1, the empty prompt.

    Args:
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): the flow-matching scheduler.
        vae ([`AutoencoderKLFlux2`]): FLUX.2's VAE.
        text_encoder ([`Qwen3ForCausalLM`], *optional*): only needed when the adapter has no stored empty-prompt
            embeddings, or for a non-empty `prompt`.
        tokenizer (`Qwen2TokenizerFast`, *optional*): the text encoder's tokenizer.
        transformer ([`Flux2Transformer2DModel`]): the frozen FLUX.2 transformer.
        image_encoder ([`SiglipVisionModel`], *optional*): the exemplar encoder, set by `load_delta_adapter`.
        feature_extractor ([`SiglipImageProcessorPil`], *optional*): the encoder's preprocessing settings.
        delta_adapter ([`DeltaAdapterModel`], *optional*): the adapter, set by `load_delta_adapter`.
        is_distilled (`bool`): whether the transformer is step-distilled (guidance is then ignored).
        image_size (`int`, *optional*): the one image side the models were trained for, for models that know only
            one size (the toy-world model: 64); queries of another size are then refused. `None` (FLUX.2 [klein]):
            any size.
    """

    def _velocity_predictor(
        self, latent_ids: torch.Tensor, image_latents: torch.Tensor, image_latent_ids: torch.Tensor
    ) -> Callable[..., torch.Tensor]:
        """How one call predicts: the query's latents ride as the reference image, after the noisy ones, as
        `Flux2KleinPipeline` lays them out.

        Args:
            latent_ids: (B, hw, 4) the noisy tokens' position ids.
            image_latents: (B, hw, C) the packed reference (query) latents.
            image_latent_ids: (B, hw, 4) their position ids.

        Returns:
            `predict(latents, prompt_embeds, text_ids, timestep, cache_name, attention_kwargs, step)` -> the
            velocity of the noisy tokens (B, hw, C); `cache_name` (`"cond"`, `"uncond"`) names the pass and `step`
            (`step_index`, `sigma`, `num_inference_steps`, `timestep`) the step, for caching hooks.
        """
        model_image_ids = torch.cat([latent_ids, image_latent_ids], dim=1)  # (B, 2hw, 4)

        def predict(latents, prompt_embeds, text_ids, timestep, cache_name, attention_kwargs, step=None):
            model_input = torch.cat([latents, image_latents], dim=1).to(self.transformer.dtype)  # (B, 2hw, C)
            with self.transformer.cache_context(cache_name, **(step or {})):
                prediction = self.transformer(
                    hidden_states=model_input,
                    timestep=timestep / 1000,
                    guidance=None,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids,
                    img_ids=model_image_ids,
                    joint_attention_kwargs=attention_kwargs,
                    return_dict=False,
                )[0]
            return prediction[:, : latents.size(1)]  # predictions for the noisy tokens only

        return predict

    # ------------------------------------------------------------------ call

    @one_call_at_a_time
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput | list[ImageInput] | None = None,
        exemplar: ExemplarPair | list[ExemplarPair] | None = None,
        delta_embeds: torch.Tensor | None = None,
        delta_scale: float = 1.0,
        combine: str = "mean",
        prompt: str = "",
        height: int | None = None,
        width: int | None = None,
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
        r"""Applies the exemplar's edit to the query image(s).

        Args:
            image: the query: a PIL image, numpy array or tensor (values in [0, 1]), or a list of queries of one
                size, edited as one batch.
            exemplar: `(source, target)` showing the edit, or a list of such pairs (their semantic deltas are
                combined as `combine` says). Give this or `delta_embeds`.
            delta_embeds: (1 or B, N, D_edit) edit tokens from `encode_exemplar`, to edit many queries with one
                encoding.
            combine: with several exemplar pairs, `"mean"` (exemplars of one edit, the default) or `"sum"` (exemplars
                of different edits, their semantic deltas added: edit arithmetic, see `encode_exemplar`).
            delta_scale: edit strength; 0 gives the base model's output, 1 the trained strength.
            height: the output's height (with `width`; multiples of 16): the query is resized to it. By default the
                query's own size (its area capped at 1024², rounded down to multiples of 16), as klein sizes it.
            width: the output's width (with `height`).
            prompt: an optional text prompt; Delta-Adapter is trained with the empty prompt.
            num_inference_steps: denoising steps (4 for the step-distilled klein).
            sigmas: custom sigmas for the scheduler.
            guidance_scale: for non-distilled transformers only, guidance from "no edit" towards the exemplar's edit.
            num_images_per_prompt: outputs per query.
            generator: a generator, or one per output, for reproducible noise.
            latents: pre-generated noise latents, (B, H/16 · W/16, C) packed.
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
        # 1. Check inputs
        delta_scale, num_images_per_prompt = self._check_edit_request(
            image, exemplar, delta_embeds, delta_scale, num_images_per_prompt, attention_kwargs
        )
        guidance_scale = finite_float(guidance_scale, "guidance_scale")
        num_inference_steps = positive_int(num_inference_steps, "num_inference_steps")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if latents is not None:
            latents = as_tensor(latents, "latents", "pass pre-generated noise as a torch tensor")
        if prompt_embeds is not None:
            prompt_embeds = as_tensor(prompt_embeds, "prompt_embeds", "pass them as a torch tensor")
        if callback_on_step_end_tensor_inputs and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}.")
        self._guidance_scale = guidance_scale
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        # 2. Preprocess the queries
        query_pixels = self._preprocess_queries(image, height, width)  # (B, 3, H, W) in [-1, 1]
        batch_size = query_pixels.shape[0]
        total = batch_size * num_images_per_prompt
        height, width = query_pixels.shape[-2:]

        # 3. Prompt embeddings (the empty prompt's, stored with the adapter, by default)
        if prompt_embeds is None:
            text_conditioning = self._text_conditioning(prompt, max_sequence_length, text_encoder_out_layers)
            prompt_embeds = text_conditioning["prompt_embeds"]  # (1, L, D_txt)
        prompt_embeds, text_ids = self.encode_prompt(
            prompt=None,
            prompt_embeds=prompt_embeds.to(device).expand(total, -1, -1),
            device=device,
            max_sequence_length=max_sequence_length,
        )  # (B * n, L, D_txt), (B * n, L, 4)

        # 4. Edit tokens from the exemplar (or the given ones), after the prompt: the offload order
        edit_tokens = self._edit_tokens(exemplar, delta_embeds, batch_size, device, combine)  # (B, N, D_edit)
        edit_tokens = edit_tokens.repeat_interleave(num_images_per_prompt, dim=0)  # (B * n, N, D_edit)
        self._attention_kwargs = {
            **(attention_kwargs or {}),
            "delta_hidden_states": edit_tokens,
            "delta_scale": delta_scale,
        }

        # 5. Reference latents of the queries, one reference per sample
        query_latents = self._encode_vae_image(
            query_pixels.to(device=device, dtype=self.vae.dtype), generator=generator
        )  # (B, C, h, w), normalised and patchified
        image_latent_ids = (
            self._prepare_image_ids([query_latents[:1]]).to(device).repeat(total, 1, 1)
        )  # (B * n, h * w, 4)
        image_latents = self._pack_latents(query_latents).repeat_interleave(
            num_images_per_prompt, dim=0
        )  # (B * n, h * w, C)

        # 6. Noise latents
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_ids = self.prepare_latents(
            batch_size=total,
            num_latents_channels=num_channels_latents,
            height=height,
            width=width,
            dtype=prompt_embeds.dtype,
            device=device,
            generator=generator,
            latents=latents,
        )  # (B * n, h * w, C), (B * n, h * w, 4)

        # 7. Timesteps
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=num_inference_steps)
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu
        )
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        # 8. Denoising loop
        predict_velocity = self._velocity_predictor(latent_ids, image_latents, image_latent_ids)
        # the steps' noise levels for caching hooks, read once (none on the meta device, where FLOPs are counted)
        step_sigmas = None if self.scheduler.sigmas.is_meta else self.scheduler.sigmas.tolist()
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                conditioning = (latents, prompt_embeds, text_ids, timestep)
                # where the loop is, for caching hooks that need it (SeaCache)
                step = {"step_index": i, "sigma": None if step_sigmas is None else step_sigmas[i], "timestep": t,
                        "num_inference_steps": len(timesteps)}  # fmt: skip

                noise_pred = predict_velocity(*conditioning, "cond", self._attention_kwargs, step)
                if self.do_classifier_free_guidance:
                    unedited_kwargs = {**self._attention_kwargs, "delta_scale": 0.0}
                    unedited_pred = predict_velocity(*conditioning, "uncond", unedited_kwargs, step)
                    noise_pred = unedited_pred + guidance_scale * (noise_pred - unedited_pred)

                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()

        self._current_timestep = None
        del predict_velocity  # and what it holds (the KV pipeline's reference keys and values) before decoding

        # 9. Decode
        patch = self.vae_scale_factor * 2
        latents = unpack_to_vae_latents(
            self.vae, latents, latent_ids, height // patch, width // patch
        )  # (B*n, C, 2h, 2w)
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(
                latents.to(get_module_execution_device(self.vae), self.vae.dtype), return_dict=False
            )[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return Flux2PipelineOutput(images=images)
