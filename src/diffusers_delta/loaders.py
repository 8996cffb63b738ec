"""`DeltaAdapterMixin`: the Delta-Adapter lifecycle on a FLUX.2 pipeline, mirroring diffusers' IP-Adapter mixins.

`load_delta_adapter` -> `set_delta_adapter_scale` -> `unload_delta_adapter`, plus `save_delta_adapter`,
`encode_exemplar` and test-time adaptation (`adapt_to_exemplar`, `reset_delta_adapter`, `adapted_to_exemplar`, from
`adaptation.DeltaAdaptationMixin`, which it includes): one mixin gives any `Flux2KleinPipeline` class all of it.
The adapter folder's files are found, read, checked and written by `adapter_files`. Loading is atomic: everything is
read and checked before the pipeline is touched, and the one step that can still fail (injecting a LoRA) runs
before anything else changes, so a failed load leaves processors, components, LoRA and outputs exactly as they were.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from inspect import signature

import numpy as np
import torch
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.hooks.tensor_parallel import _raise_if_tensor_parallel
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from .adaptation import DeltaAdaptationMixin
from .adapter_files import (
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    EMPTY_PROMPT_EMBEDS_NAME,
    HUB_KWARGS,
    IMAGE_ENCODER_FOLDER,
    LORA_WEIGHTS_NAME,
    AdapterLocation,
    build_adapter,
    check_adapter_state_dict,
    check_lora_fits,
    default_feature_extractor,
    read_adapter,
    read_adapter_config,
    read_empty_prompt_embeds,
    read_image_encoder,
    read_lora,
    write_adapter_folder,
)
from .atomic_folder import check_save_directory
from .attention_processor import DeltaBranch
from .backbones import adapter_config_for, adapter_mismatches, backbone_of
from .checks import check_finite, finite_float, positive_int
from .concurrency import changes_the_adapter
from .hub import push_folder, render_model_card
from .image_inputs import ImageInput, to_rgb_image
from .model_state import cast_model, copy_state
from .models.delta_adapter import DeltaAdapterModel
from .semantic_delta import SiglipPreprocessor, images_to_siglip_pixels, semantic_delta


#: The peft adapter name of an adapter folder's LoRA (a second one, loaded while the first is still in place, gets
#: a numbered name, so that a failed load can leave the first untouched).
LORA_ADAPTER_NAME = "delta_adapter"

logger = logging.getLogger(__name__)
ExemplarPair = tuple[ImageInput, ImageInput]
NO_ADAPTER = "No Delta-Adapter is loaded: call pipe.load_delta_adapter(...) first."


def _as_exemplar_pairs(exemplar) -> list[ExemplarPair]:
    """A (source, target) pair or a non-empty list of pairs -> list of pairs; anything else raises."""
    fix = "pass exemplar=(source, target), or a list of such pairs to average their edits"
    if isinstance(exemplar, list) and any(isinstance(pair, (tuple, list)) for pair in exemplar):  # several pairs
        for number, pair in enumerate(exemplar, start=1):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                got = f"{len(pair)} images" if isinstance(pair, (tuple, list)) else f"a {type(pair).__name__}"
                raise ValueError(
                    f"exemplar {number} of {len(exemplar)} is not a (source, target) pair (it is {got}): {fix}."
                )
        return [tuple(pair) for pair in exemplar]
    if not isinstance(exemplar, (tuple, list)):
        raise ValueError(f"exemplar must be a (source, target) pair, got {type(exemplar).__name__}: {fix}.")
    if len(exemplar) != 2:
        raise ValueError(f"An exemplar is a (source, target) pair of 2 images, got {len(exemplar)}: {fix}.")
    return [tuple(exemplar)]


@dataclass
class _IncomingAdapter:
    """Everything a load brings, read and checked, before anything of the pipeline changes."""

    adapter: DeltaAdapterModel
    image_encoder: SiglipVisionModel
    feature_extractor: SiglipImageProcessorPil
    image_encoder_is_new: bool
    empty_prompt_embeds: dict[str, torch.Tensor] | None
    lora: tuple[dict[str, torch.Tensor], dict | None] | None
    source_name: str


#: How `encode_exemplar` combines several pairs' semantic deltas.
EXEMPLAR_COMBINATIONS = ("mean", "sum")


class DeltaAdapterMixin(DeltaAdaptationMixin):
    """Loads, scales, saves and unloads a Delta-Adapter on a pipeline with a `Flux2Transformer2DModel`.

    The pipeline gains three components (`delta_adapter`, `image_encoder`, `feature_extractor`) and, when the adapter
    folder has them, the empty prompt's embeddings, so that the text encoder need not be loaded, and a LoRA of the
    transformer.
    """

    #: Original attention processors, kept while an adapter is loaded so that unloading restores them exactly.
    _delta_original_processors: dict | None = None
    #: The empty prompt's embeddings the pipeline had before the first load (its own folder's, or None), by name,
    #: which unloading gives back.
    _delta_original_empty_prompt: dict[str, torch.Tensor] | None = None
    #: The peft adapter name of the LoRA the loaded adapter brought, if any.
    _delta_lora_name: str | None = None
    #: Whether the image encoder came with an adapter (a later load then takes the new folder's own encoder).
    _delta_image_encoder_loaded: bool = False
    #: The adapter's weights as loaded (detached copies): `reset_delta_adapter` restores them bit-for-bit.
    _delta_loaded_state: dict[str, torch.Tensor] | None = None
    #: Where the adapter came from (for model cards), and what test-time adaptation has done to it since.
    _delta_adapter_source: str | None = None
    _delta_adaptation: dict | None = None
    #: (1, L, D_txt) embeddings of the empty prompt, from the adapter folder or `compute_empty_prompt_embeds`.
    empty_prompt_embeds: torch.Tensor | None = None
    #: (1, D_pooled) pooled embeddings of the empty prompt, for backbones that take them (FLUX.1: CLIP's).
    empty_pooled_prompt_embeds: torch.Tensor | None = None

    def _require_delta_adapter(self) -> DeltaAdapterModel:
        adapter = getattr(self, "delta_adapter", None)
        if adapter is None:
            raise RuntimeError(NO_ADAPTER)
        return adapter

    # ------------------------------------------------------------------ loading

    @changes_the_adapter
    def load_delta_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        subfolder: str | None = None,
        weight_name: str | None = None,
        image_encoder_folder: str | os.PathLike | None = IMAGE_ENCODER_FOLDER,
        adapter_config: dict | None = None,
        low_cpu_mem_usage: bool = True,
        **kwargs,
    ) -> None:
        """Loads a Delta-Adapter and routes the transformer's attention through it.

        Args:
            pretrained_model_name_or_path_or_dict: a Hub repo id (e.g. `"org/delta-adapter"`), a local folder written
                by `save_delta_adapter`, or a state dict of `DeltaAdapterModel` weights.
            subfolder: the adapter's subfolder inside the repo or folder.
            weight_name: the adapter's weights file (default `diffusion_pytorch_model.safetensors`; safetensors only).
            image_encoder_folder: where the SigLIP encoder lies, as in `load_ip_adapter`: a plain name is a folder
                inside the adapter's `subfolder`, a relative path with `/` a folder inside the repo, and a `Path`,
                an absolute path or one starting with `./`, `../` or `~` a folder on disk. Used when the pipeline
                has no `image_encoder` of its own yet (one brought by an earlier adapter is replaced). `None` to
                require one already.
            adapter_config: with a state dict, the `DeltaAdapterModel` config; defaults to the standard config for
                this pipeline's transformer and image encoder.
            low_cpu_mem_usage: build the adapter empty and take the loaded tensors as its weights (no random
                initialisation first).
            kwargs: Hub arguments (`cache_dir`, `force_download`, `local_files_only`, `token`, `revision`; `proxies`
                is accepted for compatibility: huggingface_hub reads proxies from the environment).

        Raises:
            ValueError: the files are corrupt, do not fit each other or this pipeline's backbone, or hold NaN.
            OSError: a file could not be found or downloaded (the message says which, and why).
            In every case the pipeline is left exactly as it was.
        """
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, (str, os.PathLike, dict)) or source == "":
            raise TypeError(
                f"load_delta_adapter() takes a Hub repo id, a folder or a state dict, got {type(source).__name__} "
                f"{source!r}."
            )
        if not isinstance(source, dict) and adapter_config is not None:
            raise ValueError("adapter_config= applies to a state dict: a folder or repo carries its own config.json.")
        if isinstance(source, dict) and (weight_name is not None or subfolder is not None):
            raise ValueError("weight_name= and subfolder= name files of a folder or repo, not of a state dict.")
        unknown = set(kwargs) - set(HUB_KWARGS)
        if unknown:
            raise TypeError(
                f"load_delta_adapter() got unexpected arguments {sorted(unknown)}; it takes subfolder, weight_name, "
                f"image_encoder_folder, adapter_config, low_cpu_mem_usage and {', '.join(HUB_KWARGS)}."
            )
        if weight_name is not None and not str(weight_name).endswith(".safetensors"):
            raise ValueError(
                f"weight_name={weight_name!r}: Delta-Adapter loads only safetensors weights. Convert the file with "
                "safetensors.torch.save_file and pass its .safetensors name."
            )
        self._check_backbone_placement()
        if isinstance(source, dict):
            incoming = self._read_state_dict_adapter(source, adapter_config, image_encoder_folder, low_cpu_mem_usage)
        else:
            incoming = self._read_adapter_folder(
                source, subfolder, weight_name or ADAPTER_WEIGHTS_NAME, image_encoder_folder, low_cpu_mem_usage, kwargs
            )
        self._install_delta_adapter(incoming)

    def _read_state_dict_adapter(self, state_dict, adapter_config, image_encoder_folder, low_cpu_mem_usage):
        if getattr(self, "image_encoder", None) is None:
            raise ValueError(
                "This pipeline has no image encoder. Load the adapter from a folder or repo with an image_encoder/ "
                "subfolder, or register one first: "
                "pipe.register_modules(image_encoder=SiglipVisionModel.from_pretrained(...))."
            )
        config = dict(
            adapter_config
            or adapter_config_for(self.transformer, self.image_encoder.config.hidden_size)
        )
        self._check_adapter_fits(config, self.image_encoder)
        check_adapter_state_dict(config, state_dict, "the state dict")
        # Not low_cpu_mem_usage's assignment: the adapter must own copies, or adapting it would write into the dict.
        adapter = build_adapter(config, state_dict, low_cpu_mem_usage=False)
        feature_extractor = getattr(self, "feature_extractor", None) or default_feature_extractor(self.image_encoder)
        return _IncomingAdapter(adapter, self.image_encoder, feature_extractor, False, None, None, "state dict")

    def _read_adapter_folder(self, source, subfolder, weight_name, image_encoder_folder, low_cpu_mem_usage, hub):
        location = AdapterLocation.resolve(source, subfolder, hub)
        config = read_adapter_config(location.fetch(CONFIG_NAME, required=True))
        weights_path = location.fetch(weight_name, required=True)
        image_encoder, feature_extractor, is_new = self._image_encoder_for(location, image_encoder_folder)
        self._check_adapter_fits(config, image_encoder)
        where = location.describe()
        adapter = read_adapter(config, weights_path, where, low_cpu_mem_usage)
        embeds_path = location.fetch(EMPTY_PROMPT_EMBEDS_NAME, required=False)
        embeds = read_empty_prompt_embeds(embeds_path, *self._empty_prompt_dims()) if embeds_path else None
        lora_path = location.fetch(LORA_WEIGHTS_NAME, required=False)
        lora = read_lora(lora_path) if lora_path else None
        if lora is not None:
            check_lora_fits(lora[0], self.transformer, where)
        return _IncomingAdapter(adapter, image_encoder, feature_extractor, is_new, embeds, lora, str(source))

    def _image_encoder_for(self, location: AdapterLocation, image_encoder_folder):
        """The pipeline's own encoder when it has one (and did not come with an earlier adapter), else the one in
        the adapter's folder: -> (encoder, feature extractor, whether it is new)."""
        current = getattr(self, "image_encoder", None)
        if current is not None and (not self._delta_image_encoder_loaded or image_encoder_folder is None):
            if image_encoder_folder not in (None, IMAGE_ENCODER_FOLDER):
                logger.warning(
                    f"The pipeline has an image encoder of its own, so image_encoder_folder={image_encoder_folder!r} "
                    "is not used. To use that encoder, register it: pipe.register_modules(image_encoder=...)."
                )
            feature_extractor = getattr(self, "feature_extractor", None) or default_feature_extractor(current)
            return current, feature_extractor, False
        if image_encoder_folder is None:
            raise ValueError(
                "This pipeline has no image encoder and image_encoder_folder=None. Register one first: "
                "pipe.register_modules(image_encoder=SiglipVisionModel.from_pretrained(...))."
            )
        try:
            folder = location.fetch_image_encoder(image_encoder_folder)
        except OSError:
            if current is not None:  # an earlier adapter's encoder: keep it when the new folder brings none
                return current, self.feature_extractor, False
            raise
        return (*read_image_encoder(folder), True)

    def _check_adapter_fits(self, adapter_config, image_encoder: SiglipVisionModel) -> None:
        mismatches = adapter_mismatches(
            adapter_config, self.transformer, image_encoder.config.hidden_size
        )
        if mismatches:
            raise ValueError(
                "This Delta-Adapter was made for another backbone (" + "; ".join(mismatches) + "). Load an adapter "
                "trained for this transformer and image encoder."
            )

    def _check_not_tensor_parallel(self) -> None:
        """Refuses a transformer sharded with tensor parallelism (at load, and at every call)."""
        _raise_if_tensor_parallel(
            self.transformer,
            "run a Delta-Adapter",
            "Its attention queries hold this rank's heads while the adapter's per-block keys and values hold all of "
            "them. Use the pipeline without tensor parallelism (context parallelism works).",
        )

    def _check_backbone_placement(self) -> None:
        """Refuses a transformer the adapter cannot be loaded beside: sharded with tensor parallelism, or
        group-offloaded already (that offloading would not place the adapter's weights)."""
        self._check_not_tensor_parallel()
        if any(_is_group_offload_enabled(c) for c in self.components.values() if isinstance(c, torch.nn.Module)):
            raise ValueError(
                "Group offloading is enabled, and it would not place the adapter's weights, which run inside the "
                "transformer. Load the Delta-Adapter first, then call pipe.enable_group_offload(...), which offloads "
                "the adapter and its image encoder with the rest."
            )

    def _install_delta_adapter(self, incoming: _IncomingAdapter) -> None:
        """Puts a read and checked adapter in place. Only the LoRA's injection can fail, and it runs first.

        Under model or sequential CPU offloading the hooks are taken off while the adapter goes in and put back
        afterwards (also when the LoRA fails), so that the new image encoder is offloaded like every model and the
        adapter, whose weights run inside the transformer, sits on the accelerator.
        """
        model_offload, sequential_offload, _ = self._optionally_disable_offloading(self)
        offloaded_to = getattr(self, "_offload_device", None) if model_offload or sequential_offload else None
        new_models = [incoming.adapter] + ([incoming.image_encoder] if incoming.image_encoder_is_new else [])
        for model in new_models:  # offloaded pipelines: offloading places them below
            cast_model(model, self.transformer.dtype, None if offloaded_to else self.transformer.device)
            model.eval().requires_grad_(False)
        try:
            lora_name = self._inject_delta_lora(*incoming.lora, incoming.source_name) if incoming.lora else None
            self._delete_delta_lora()
            self._delta_lora_name = lora_name
            if self._delta_original_processors is None:
                self._delta_original_processors = dict(self.transformer.attn_processors)
                self._delta_original_empty_prompt = self._empty_prompt()
            self._set_delta_components(
                delta_adapter=incoming.adapter,
                image_encoder=incoming.image_encoder,
                feature_extractor=incoming.feature_extractor,
            )
            self._delta_image_encoder_loaded = self._delta_image_encoder_loaded or incoming.image_encoder_is_new
            if incoming.empty_prompt_embeds is not None:
                self._restore_empty_prompt(incoming.empty_prompt_embeds)
            self._attach_delta_processors(incoming.adapter)
            self._remember_loaded_adapter(incoming.adapter, incoming.source_name)
        finally:
            if model_offload:
                self.enable_model_cpu_offload(device=offloaded_to)
            elif sequential_offload:
                self.enable_sequential_cpu_offload(device=offloaded_to)

    def _inject_delta_lora(self, state_dict: dict, metadata: dict | None, source_name: str) -> str:
        """Adds the adapter's LoRA under a name of its own, beside any LoRA already there; -> that name."""
        taken = set(getattr(self.transformer, "peft_config", {}) or {})
        name = next(
            candidate
            for candidate in [LORA_ADAPTER_NAME] + [f"{LORA_ADAPTER_NAME}_{i}" for i in range(1, len(taken) + 2)]
            if candidate not in taken
        )
        # FLUX.1's loader (FluxLoraLoaderMixin) takes the kohya-style alphas too: none here, the metadata has them
        alphas = (
            {"network_alphas": None}
            if "network_alphas" in signature(self.load_lora_into_transformer).parameters
            else {}
        )
        try:
            self.load_lora_into_transformer(  # offloading is handled by the caller
                dict(state_dict), transformer=self.transformer, adapter_name=name, metadata=metadata, **alphas
            )
        except Exception as error:  # peft's own errors (IndexError, KeyError, ...) say little about the file
            raise ValueError(
                f"The LoRA ({LORA_WEIGHTS_NAME}) of {source_name!r} could not be loaded into this transformer "
                f"({type(error).__name__}: {error}). Save the adapter's LoRA again with save_delta_adapter."
            ) from None
        if name not in (getattr(self.transformer, "peft_config", {}) or {}):
            raise ValueError(f"The LoRA of {source_name!r} holds no weights for this transformer.")
        return name

    def _delete_delta_lora(self) -> None:
        """Removes the LoRA the loaded adapter brought (unless the user already removed it). When it is the only
        LoRA, peft's wrapper layers go too, so that the transformer's modules and state-dict names are those it had
        before (`save_pretrained` would otherwise write `to_q.base_layer.weight`, which `from_pretrained` ignores)."""
        loras = getattr(self.transformer, "peft_config", None) or {}
        if self._delta_lora_name not in loras:
            return
        if set(loras) == {self._delta_lora_name}:
            self.transformer.unload_lora()
        else:  # the user's own LoRA stays, in its wrappers
            self.delete_adapters(self._delta_lora_name)

    def _remember_loaded_adapter(self, adapter: DeltaAdapterModel, source: str) -> None:
        self._delta_loaded_state = copy_state(adapter)
        self._delta_adapter_source = source
        self._delta_adaptation = None

    def _keep_attention_settings(self) -> None:
        """Gives the original processors the attention backend and parallel config the layers have now, so that a
        `set_attention_backend` (or `enable_parallelism`) made while an adapter is loaded outlives it."""
        current = self.transformer.attn_processors
        for name, original in self._delta_original_processors.items():
            for setting in ("_attention_backend", "_parallel_config"):
                if hasattr(original, setting) and name in current:
                    setattr(original, setting, getattr(current[name], setting, None))

    def _attach_delta_processors(self, adapter: DeltaAdapterModel) -> None:
        """Routes every attention layer through the adapter (replacing the processors of an earlier adapter)."""
        self._keep_attention_settings()
        self.transformer.set_attn_processor(dict(self._delta_original_processors))
        self.transformer.set_attn_processor(backbone_of(self.transformer).processors_for(self.transformer, adapter))

    # ------------------------------------------------------------------ using

    @property
    def delta_processors(self) -> dict:
        """The transformer's Delta-Adapter processors by layer name (empty when no adapter is loaded)."""
        return {
            name: processor
            for name, processor in self.transformer.attn_processors.items()
            if isinstance(processor, DeltaBranch)
        }

    def get_delta_adapter_scale(self) -> dict[str, list[float]]:
        """The strength of every block: `{"double": [...], "single": [...]}`, as `set_delta_adapter_scale` takes."""
        processors = self.delta_processors
        if not processors:
            raise RuntimeError(NO_ADAPTER)
        return {
            kind: [p.scale for n, p in processors.items() if n.startswith(prefix)]
            for kind, prefix in (("double", "transformer_blocks."), ("single", "single_transformer_blocks."))
        }

    @changes_the_adapter
    def set_delta_adapter_scale(self, scale: float | dict[str, float | Sequence[float]]) -> None:
        """Sets the strength of the decoupled branch, for all blocks or per block. Everything is checked before any
        block changes. Negative values push away from the edit.

        Args:
            scale: one number for every block, or `{"double": ..., "single": ...}` where each value is one number
                for all blocks of that kind or a list of one number per block (a key left out keeps those blocks).
        """
        current = self.get_delta_adapter_scale()
        if isinstance(scale, dict):
            unknown = set(scale) - set(current)
            if unknown:
                raise ValueError(f"Scale keys must be 'double' and/or 'single', got {sorted(unknown)}.")
            requested = {**current, **scale}
        else:
            requested = dict.fromkeys(current, scale)
        scales = {}
        for kind, value in requested.items():
            count = len(current[kind])
            if isinstance(value, (list, tuple, np.ndarray)) or isinstance(value, torch.Tensor) and value.ndim == 1:
                values = list(value)
            elif isinstance(value, (numbers.Real, np.generic)) or isinstance(value, torch.Tensor) and value.ndim == 0:
                values = [value] * count  # one number for every block of this kind
            else:
                raise TypeError(
                    f"The {kind}-block scale must be a number or a list of {count} numbers, got "
                    f"{type(value).__name__} {value!r}."
                )
            if len(values) != count:
                raise ValueError(
                    f"{len(values)} {kind}-block scales given, but the transformer has {count} {kind}-stream blocks: "
                    "pass one scale per block, or one number for all of them."
                )
            scales[kind] = [finite_float(v, f"The {kind}-block scale") for v in values]
        for name, processor in self.delta_processors.items():
            kind = "double" if name.startswith("transformer_blocks.") else "single"
            processor.scale = scales[kind][int(name.split(".")[1])]

    def _preprocess_queries(
        self, image: ImageInput | list[ImageInput], height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Query images -> (B, 3, H, W) in [-1, 1]: resized to `height` x `width` when given (multiples of 16),
        else sized as the backbone's pipeline sizes its reference image (`preprocess_query`)."""
        queries = self._query_images(image)
        self._check_output_size(height, width)
        multiple_of = self.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width)):
            if value is not None and (positive_int(value, name) % multiple_of):
                raise ValueError(f"{name} must be a multiple of {multiple_of}, got {value}.")
        backbone = backbone_of(self.transformer)
        processed = []
        for rgb in queries:
            if height is not None:  # the size asked for: the query is resized to it
                processed.append(self.image_processor.preprocess(rgb, height=height, width=width))
            else:
                processed.append(backbone.preprocess_query(self, rgb))
        self._one_query_size({tuple(p.shape[-2:]) for p in processed})
        return torch.cat(processed, dim=0)

    def _check_output_size(self, height: int | None, width: int | None) -> None:
        """`height` and `width` of a call: both or neither, and the one size a model that knows one size takes."""
        if (height is None) != (width is None):
            raise ValueError("Give both height and width (the output size), or neither (the query's size).")
        fixed = self.config.get("image_size")
        if height is not None and fixed is not None and (height, width) != (fixed, fixed):
            raise ValueError(f"This model edits only {fixed}x{fixed} images: height and width must be {fixed}.")

    @staticmethod
    def _one_query_size(sizes: set[tuple[int, int]]) -> tuple[int, int]:
        """The one (height, width) every query of a call has after preprocessing; several are refused."""
        if len(sizes) > 1:
            raise ValueError(
                f"Queries in one call must share a size after preprocessing, got {sorted(sizes)}: resize them to one "
                "size, or call the pipeline once per size."
            )
        return next(iter(sizes))

    def _query_images(self, image: ImageInput | list[ImageInput]) -> list:
        """The queries as RGB images (checked, EXIF-free), refused when a model that knows one size gets another, or
        (FLUX.2) when their aspect ratio or size is out of the image processor's limits."""
        queries = image if isinstance(image, list) else [image]
        if not queries:
            raise ValueError("image must be a query image or a non-empty list of them.")
        fixed = self.config.get("image_size")
        images = []
        for index, query in enumerate(queries):
            name = f"query {index}" if len(queries) > 1 else "query"
            rgb = to_rgb_image(query, name=name)
            if fixed is not None and rgb.size != (fixed, fixed):
                raise ValueError(
                    f"This model edits only {fixed}x{fixed} images and the {name} is {rgb.width}x{rgb.height}: resize "
                    f"it to {fixed}x{fixed} first (diffusers-delta edit does that for you)."
                )
            if hasattr(self.image_processor, "check_image_input"):  # FLUX.2's: its aspect-ratio and size limits
                self.image_processor.check_image_input(rgb)
            images.append(rgb)
        return images

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

    @changes_the_adapter
    def unload_delta_adapter(self) -> None:
        """Removes the adapter, its LoRA and image encoder; restores the original processors and the empty prompt's
        embeddings the pipeline had before loading (those of its own folder, or none)."""
        if self._delta_original_processors is None:
            return
        self._keep_attention_settings()
        self.transformer.set_attn_processor(dict(self._delta_original_processors))
        self._delta_original_processors = None
        self._delete_delta_lora()
        self._delta_lora_name = None
        self._restore_empty_prompt(self._delta_original_empty_prompt)
        self._delta_original_empty_prompt = None
        self._delta_loaded_state = self._delta_adapter_source = self._delta_adaptation = None
        self._delta_image_encoder_loaded = False
        self._set_delta_components(delta_adapter=None, image_encoder=None, feature_extractor=None)

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

    def _set_delta_components(self, **modules) -> None:
        """Registers the adapter's modules as components where the pipeline's `__init__` takes them (as
        `FluxDeltaEditPipeline`'s does, so that they are saved and offloaded), and sets them as plain attributes on
        a pipeline class that only added this mixin (diffusers' `components` would refuse unknown ones)."""
        expected, optional = self._get_signature_keys(self)
        declared = {name: module for name, module in modules.items() if name in set(expected) | set(optional)}
        if declared:
            self.register_modules(**declared)
        for name, module in modules.items():
            if name not in declared:
                setattr(self, name, module)

    @torch.no_grad()
    def encode_exemplar(
        self,
        exemplar: ExemplarPair | list[ExemplarPair],
        device: torch.device | None = None,
        combine: str = "mean",
    ) -> torch.Tensor:
        """Edit tokens of an exemplar pair, or of several pairs whose semantic deltas are combined.

        Encode once and pass the result as `delta_embeds=` to edit many queries without re-encoding.

        Args:
            exemplar: `(source, target)` images (PIL, numpy or torch), or a list of such pairs.
            device: where to compute; defaults to the pipeline's execution device.
            combine: how several pairs' semantic deltas make one: `"mean"` (several exemplars of one edit: a steadier
                delta) or `"sum"` (exemplars of different edits: edit arithmetic, whose sum stands for the edits
                composed). One pair is the same either way.

        Returns:
            (1, N, D_edit) edit tokens, in the adapter's dtype.
        """
        self._require_delta_adapter()
        if combine not in EXEMPLAR_COMBINATIONS:
            raise ValueError(f"combine must be one of {EXEMPLAR_COMBINATIONS}, got {combine!r}.")
        pairs = _as_exemplar_pairs(exemplar)
        device = device or self._execution_device
        preprocessor = SiglipPreprocessor.from_feature_extractor(self.feature_extractor)
        sources = images_to_siglip_pixels([pair[0] for pair in pairs], preprocessor, "exemplar source")
        targets = images_to_siglip_pixels([pair[1] for pair in pairs], preprocessor, "exemplar target")
        encoder_dtype = self.image_encoder.dtype
        deltas = semantic_delta(
            self.image_encoder, sources.to(device, encoder_dtype), targets.to(device, encoder_dtype)
        )  # (K, P, D_enc)
        combined = deltas.sum(dim=0, keepdim=True) if combine == "sum" else deltas.mean(dim=0, keepdim=True)
        return self.delta_adapter(combined.to(self.delta_adapter.dtype))  # (1, P, D_enc) -> (1, N, D_edit)

    # ------------------------------------------------------------------ saving

    def save_delta_adapter(
        self,
        save_directory: str | os.PathLike,
        save_image_encoder: bool = True,
        model_card=None,
        repo_id: str | None = None,
        base_model: str | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
    ) -> None:
        """Writes the adapter in the layout `load_delta_adapter` reads (safetensors only): its weights, its LoRA
        (with rank, alpha and targets), the image encoder and the empty prompt's embeddings, and a model card (the
        one given, or one rendered whose snippet loads this folder or `repo_id`; it says when the adapter was adapted
        at test time). The write is atomic: the folder then holds exactly what was saved, and a failed save leaves
        it exactly as it was.

        Args:
            save_directory: the folder to write (created if missing; other files in it are left alone).
            save_image_encoder: also write `image_encoder/` (with its preprocessing config), so the folder is
                self-contained.
            model_card: a `huggingface_hub.ModelCard` to write as `README.md` (see `hub.render_model_card`).
            repo_id: the Hub repo to push to and that the rendered card's snippet loads (defaults to the folder).
            base_model: the base checkpoint named in a rendered card (defaults to the pipeline's own).
            is_main_process: whether this process writes (pass `accelerator.is_main_process` under distributed runs).
            push_to_hub: also upload the folder to the Hub repo `repo_id` (created if needed).
            token: the Hub token for the upload (defaults to the logged-in one).
            private: create the repo private.
            commit_message: the upload's commit message.
        """
        adapter = self._require_delta_adapter()
        check_save_directory(save_directory)
        if model_card is None:  # every saved folder carries a card whose snippet loads it
            base_model = base_model or self.name_or_path or self.transformer.config.get("_name_or_path")
            if not base_model and (push_to_hub or repo_id is not None):
                raise ValueError("This pipeline was not loaded from a checkpoint: pass base_model= for the card.")
            model_card = render_model_card(
                adapter,
                repo_id=repo_id or os.fspath(save_directory),
                base_model=str(base_model) if base_model else None,
                image_encoder=str(self.image_encoder.name_or_path or "SigLIP"),
                adaptation=self._delta_adaptation,
            )
        if not is_main_process:
            return
        lora_state_dict = lora_metadata = None
        if self._delta_lora_name is not None:
            from peft.utils import get_peft_model_state_dict

            lora_state_dict = get_peft_model_state_dict(self.transformer, adapter_name=self._delta_lora_name)
            lora_metadata = self.transformer.peft_config[self._delta_lora_name].to_dict()
        write_adapter_folder(
            save_directory,
            adapter,
            image_encoder=self.image_encoder if save_image_encoder else None,
            feature_extractor=self.feature_extractor,
            empty_prompt_embeds=self._empty_prompt(),
            lora_state_dict=lora_state_dict,
            lora_metadata=lora_metadata,
            model_card=model_card,
        )
        if push_to_hub:
            push_folder(
                save_directory,
                repo_id or os.path.basename(os.path.normpath(os.fspath(save_directory))),
                token=token,
                private=private,
                commit_message=commit_message or "Upload Delta-Adapter",
            )
