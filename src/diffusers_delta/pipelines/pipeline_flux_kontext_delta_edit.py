"""`FluxKontextDeltaEditPipeline`: edit a query image the way an exemplar pair shows, on FLUX.1 Kontext [dev], with no
text."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import replace_example_docstring
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    SiglipImageProcessorPil,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..backbones.flux1 import reference_size
from ..checks import finite_float, positive_int
from ..concurrency import one_call_at_a_time
from ..exemplar_encoding import ExemplarPair
from ..image_inputs import ImageInput
from ..models.delta_adapter import DeltaAdapterModel
from .delta_edit_pipeline import DeltaEditPipelineMixin


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from diffusers_delta import FluxKontextDeltaEditPipeline

        >>> pipe = FluxKontextDeltaEditPipeline.from_pretrained(
        ...     "black-forest-labs/FLUX.1-Kontext-dev",
        ...     text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,  # the adapter brings
        ...     dtype=torch.bfloat16,                                                    # the empty prompt's
        ... )
        >>> pipe.load_delta_adapter("path/to/your-kontext-delta-adapter")  # one you trained: none is published yet
        >>> pipe.to("cuda")
        >>> source, target = load_image("exemplar_before.png"), load_image("exemplar_after.png")
        >>> edited = pipe(load_image("query.png"), exemplar=(source, target)).images[0]
        >>> edited.save("edited.png")
        ```
"""


class FluxKontextDeltaEditPipeline(DeltaEditPipelineMixin, FluxKontextPipeline):
    r"""Exemplar-based image editing with Delta-Adapter on FLUX.1 Kontext [dev].

    The query rides as Kontext's reference image; the exemplar pair's semantic delta, turned into edit tokens by the
    `delta_adapter`, reaches every double- and single-stream block through a decoupled cross-attention branch. The
    call is `FluxKontextPipeline`'s (its steps, distilled guidance, `max_area`, true CFG and callbacks) with the
    empty prompt, whose T5 and CLIP embeddings the adapter folder stores, so T5-XXL need not be loaded.

    Args:
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): the flow-matching scheduler.
        vae ([`AutoencoderKL`]): FLUX.1's VAE.
        text_encoder ([`CLIPTextModel`], *optional*): only needed without stored empty-prompt embeddings, or for a
            non-empty `prompt`.
        tokenizer ([`CLIPTokenizer`], *optional*): its tokenizer.
        text_encoder_2 ([`T5EncoderModel`], *optional*): likewise.
        tokenizer_2 ([`T5TokenizerFast`], *optional*): its tokenizer.
        transformer ([`FluxTransformer2DModel`]): the frozen FLUX.1 Kontext transformer.
        image_encoder ([`SiglipVisionModel`], *optional*): the exemplar encoder, set by `load_delta_adapter` (it takes
            the place of Kontext's IP-Adapter encoder: the two adapters do not load together).
        feature_extractor ([`SiglipImageProcessorPil`], *optional*): the encoder's preprocessing settings.
        delta_adapter ([`DeltaAdapterModel`], *optional*): the adapter, set by `load_delta_adapter`.
        image_size (`int`, *optional*): the one image side the models were trained for, for models that know only
            one size (test and toy models); queries of another size are then refused, and the output and reference
            keep that size. `None` (Kontext [dev]): any size.
    """

    #: The backbone it runs on (`backbones`), as adapter configs name it.
    backbone = "flux1"
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    _optional_components = [
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "image_encoder",
        "feature_extractor",
        "delta_adapter",
    ]
    # The processors call the adapter's per-block weights inside the transformer's forward, so the (small) adapter
    # stays on the accelerator instead of being offloaded as a model of its own.
    _exclude_from_cpu_offload = ["delta_adapter"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        text_encoder_2: T5EncoderModel | None,
        tokenizer_2: T5TokenizerFast | None,
        transformer: FluxTransformer2DModel,
        image_encoder: SiglipVisionModel | None = None,
        feature_extractor: SiglipImageProcessorPil | None = None,
        delta_adapter: DeltaAdapterModel | None = None,
        image_size: int | None = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
        self._register_delta_components(image_encoder, feature_extractor, delta_adapter, image_size)

    def load_ip_adapter(self, *args, **kwargs):
        """Refused: Kontext's IP-Adapter and the Delta-Adapter do not load together (each brings its image encoder as
        `image_encoder` and its own attention processors). Use `FluxKontextPipeline` for the IP-Adapter."""
        raise ValueError(
            "Kontext's IP-Adapter and the Delta-Adapter do not load together: both set the image_encoder component "
            "and the transformer's attention processors. Load the IP-Adapter on a FluxKontextPipeline "
            "(FluxKontextPipeline.from_pipe(pipe) shares the models), or use the Delta-Adapter alone."
        )

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
        negative_prompt: str | None = None,
        true_cfg_scale: float = 1.0,
        negative_exemplar: ExemplarPair | list[ExemplarPair] | None = None,
        negative_delta_embeds: torch.Tensor | None = None,
        negative_delta_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        max_area: int | None = None,
        _auto_resize: bool = True,
    ) -> FluxPipelineOutput | tuple:
        r"""Applies the exemplar's edit to the query image(s), through `FluxKontextPipeline`'s call.

        Args:
            image: the query: a PIL image, numpy array or tensor (values in [0, 1]), or a list of queries of one
                size, edited as one batch. Kontext gives it its preferred resolution nearest its aspect ratio.
            exemplar: `(source, target)` showing the edit, or a list of such pairs (their semantic deltas are
                combined as `combine` says). Give this or `delta_embeds`.
            delta_embeds: (1 or B, N, D_edit) edit tokens from `encode_exemplar`, to edit many queries with one
                encoding.
            combine: with several exemplar pairs, `"mean"` (exemplars of one edit, the default) or `"sum"` (exemplars
                of different edits, their semantic deltas added: edit arithmetic, see `encode_exemplar`).
            delta_scale: edit strength; 0 gives Kontext's own output with the empty prompt, 1 the trained strength.
            prompt: an optional text prompt; Delta-Adapter is trained with the empty prompt.
            negative_prompt: with `true_cfg_scale` > 1, Kontext's true classifier-free guidance (needs the text
                encoders).
            true_cfg_scale: Kontext's true CFG scale. Its negative pass gets the same edit tokens as the positive one
                by default, so true CFG amplifies the text's difference and keeps the edit as it is; the three
                arguments below change that, as IP-Adapter's `negative_ip_adapter_image` does.
            negative_exemplar: with true CFG, a pair whose edit the negative pass gets instead (guidance then moves
                the output from that edit towards the exemplar's).
            negative_delta_embeds: the same as edit tokens (`encode_exemplar`), instead of `negative_exemplar`.
            negative_delta_scale: with true CFG, the negative pass's edit strength (default: `delta_scale`); 0 gives
                it no edit, so guidance amplifies the exemplar's edit itself. With any of these three and no negative
                prompt, the negative pass uses the positive prompt's embeddings: only the edit is guided.
            height: the output's height, before Kontext fits it to `max_area` (with `width`). By default the query's
                size as Kontext sizes its reference (upstream defaults to 1024x1024 whatever the query's shape).
            width: the output's width (with `height`).
            num_inference_steps: denoising steps (Kontext's 28).
            sigmas: custom sigmas for the scheduler.
            guidance_scale: Kontext's distilled guidance (its default 3.5).
            num_images_per_prompt: outputs per query, ordered as Kontext tiles its references: every query once, then
                every query again (q1, q2, q1, q2 for two queries and two images each).
            generator: a generator, or one per output, for reproducible noise.
            latents: pre-generated noise latents, packed.
            prompt_embeds: pre-computed (1 or B, L, D_t5) T5 embeddings (with `pooled_prompt_embeds`).
            pooled_prompt_embeds: pre-computed (1 or B, D_clip) pooled CLIP embeddings.
            negative_prompt_embeds: pre-computed negative T5 embeddings, for true CFG.
            negative_pooled_prompt_embeds: pre-computed negative pooled CLIP embeddings, for true CFG.
            output_type: `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict: return a `FluxPipelineOutput` instead of a tuple.
            joint_attention_kwargs: extra kwargs for the attention processors (e.g. a LoRA `scale`).
            callback_on_step_end: called after each step as in diffusers pipelines.
            callback_on_step_end_tensor_inputs: tensors passed to the callback.
            max_sequence_length: T5 prompt length, when a prompt is encoded.
            max_area: the output's area, as Kontext fits its size to it (default 1024², or `image_size`² for a
                fixed-size model).
            _auto_resize: Kontext's own flag: give the reference its preferred resolution (off for fixed-size models).

        Examples:

        Returns:
            [`~pipelines.flux.FluxPipelineOutput`] or `tuple` whose first element is the list of edited images.
        """
        delta_scale, num_images_per_prompt = self._check_edit_request(
            image, exemplar, delta_embeds, delta_scale, num_images_per_prompt, joint_attention_kwargs
        )
        self._check_output_size(height, width)
        negative_edit = any(value is not None for value in (negative_exemplar, negative_delta_embeds,
                                                            negative_delta_scale))  # fmt: skip
        if negative_edit:
            if negative_exemplar is not None and negative_delta_embeds is not None:
                raise ValueError("Pass at most one of negative_exemplar and negative_delta_embeds.")
            if not true_cfg_scale > 1:
                raise ValueError(
                    "negative_exemplar, negative_delta_embeds and negative_delta_scale act on true CFG's negative "
                    f"pass: give true_cfg_scale > 1 (got {true_cfg_scale})."
                )
            if negative_delta_scale is not None:
                negative_delta_scale = finite_float(negative_delta_scale, "negative_delta_scale")
        queries = self._query_images(image)
        fixed = self.config.get("image_size")
        auto_resize = _auto_resize and fixed is None
        query_size = self._one_query_size({reference_size(self, rgb, auto_resize) for rgb in queries})
        if height is None:
            height, width = query_size
        if max_area is None:
            max_area = fixed * fixed if fixed is not None else 1024**2
        batch_size = len(queries)
        device = self._execution_device

        # Every output is one row of Kontext's batch: the queries tiled n times (q1, q2, q1, q2), as Kontext tiles its
        # references, and upstream called with one image each (given embeddings are not repeated upstream: a batch
        # of B embeddings with n images each would meet B x n latents).
        outputs = batch_size * num_images_per_prompt
        references = queries * num_images_per_prompt

        # The empty prompt's stored T5 and CLIP embeddings (or the text encoders'), one per output
        if prompt_embeds is None:
            text = self._text_conditioning(prompt, max_sequence_length)
            prompt_embeds, pooled_prompt_embeds = text["prompt_embeds"], text["pooled_prompt_embeds"]
        prompt_embeds = _per_output(prompt_embeds, batch_size, num_images_per_prompt, "prompt_embeds")
        pooled_prompt_embeds = _per_output(pooled_prompt_embeds, batch_size, num_images_per_prompt,
                                           "pooled_prompt_embeds")  # fmt: skip
        negative_prompt_embeds = _per_output(negative_prompt_embeds, batch_size, num_images_per_prompt,
                                             "negative_prompt_embeds")  # fmt: skip
        negative_pooled_prompt_embeds = _per_output(negative_pooled_prompt_embeds, batch_size, num_images_per_prompt,
                                                    "negative_pooled_prompt_embeds")  # fmt: skip
        if negative_edit and negative_prompt is None and negative_prompt_embeds is None:
            negative_prompt_embeds, negative_pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        if negative_edit and not has_negative:  # upstream would run no negative pass for the edit to act in
            raise ValueError(
                "With negative_prompt_embeds, give negative_pooled_prompt_embeds too (true CFG needs both)."
            )

        # Edit tokens, tiled as the references: (B * n, N, D_edit)
        edit_tokens = self._edit_tokens(exemplar, delta_embeds, batch_size, device, combine)
        edit_tokens = edit_tokens.repeat(num_images_per_prompt, 1, 1)
        attention_kwargs = {**(joint_attention_kwargs or {}), "delta_hidden_states": edit_tokens}
        attention_kwargs["delta_scale"] = delta_scale
        negative_pass = {}  # what the negative pass of true CFG gets instead
        if negative_exemplar is not None or negative_delta_embeds is not None:
            negative_tokens = self._edit_tokens(negative_exemplar, negative_delta_embeds, batch_size, device)
            negative_pass["delta_hidden_states"] = negative_tokens.repeat(num_images_per_prompt, 1, 1)
        if negative_delta_scale is not None:
            negative_pass["delta_scale"] = negative_delta_scale

        with _negative_pass(self.transformer, negative_pass):
            return super().__call__(
                image=references if outputs > 1 else references[0],
                prompt=None,
                negative_prompt=negative_prompt,
                true_cfg_scale=true_cfg_scale,
                height=height,
                width=width,
                num_inference_steps=positive_int(num_inference_steps, "num_inference_steps"),
                sigmas=sigmas,
                guidance_scale=finite_float(guidance_scale, "guidance_scale"),
                num_images_per_prompt=1,  # the references are already one per output
                generator=generator,
                latents=latents,
                prompt_embeds=prompt_embeds.to(device),  # (B * n, L, D_t5)
                pooled_prompt_embeds=None if pooled_prompt_embeds is None else pooled_prompt_embeds.to(device),
                negative_prompt_embeds=negative_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                output_type=output_type,
                return_dict=return_dict,
                joint_attention_kwargs=attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                max_sequence_length=max_sequence_length,
                max_area=max_area,
                _auto_resize=auto_resize,
            )


def _per_output(embeds: torch.Tensor | None, batch_size: int, num_images_per_prompt: int, name: str):
    """Prompt embeddings given once or once per query (1 or B rows), as one row per output (B * n rows, tiled as the
    references are); None stays None."""
    if embeds is None:
        return None
    if embeds.shape[0] not in (1, batch_size):
        raise ValueError(f"{name} has {embeds.shape[0]} rows: give 1, or one per query ({batch_size}).")
    if embeds.shape[0] == 1:
        embeds = embeds.expand(batch_size, *embeds.shape[1:])
    return embeds.repeat(num_images_per_prompt, *([1] * (embeds.ndim - 1)))


@contextlib.contextmanager
def _negative_pass(transformer, negative: dict) -> Iterator[None]:
    """While upstream's loop runs in this thread, every second transformer call (true CFG's negative pass: upstream
    calls the positive pass, then the negative one, each step) gets `negative`'s attention kwargs in place of the
    call's. Nothing changes when `negative` is empty; calls from other threads (pipelines sharing the transformer)
    are left alone."""
    if not negative:
        yield
        return
    thread, calls = threading.get_ident(), itertools.count()

    def swap(module, args, kwargs):
        if threading.get_ident() != thread or next(calls) % 2 == 0:
            return None
        kwargs["joint_attention_kwargs"] = {**(kwargs.get("joint_attention_kwargs") or {}), **negative}
        return args, kwargs

    handle = transformer.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
