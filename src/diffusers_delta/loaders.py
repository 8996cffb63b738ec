"""`DeltaAdapterMixin`: the Delta-Adapter lifecycle on a FLUX pipeline, mirroring diffusers' IP-Adapter mixins.

`load_delta_adapter` -> `set_delta_adapter_scale` -> `unload_delta_adapter`, plus `save_delta_adapter`,
`encode_exemplar` and test-time adaptation (`adapt_to_exemplar`, `reset_delta_adapter`, `adapted_to_exemplar`): one
mixin gives any `Flux2KleinPipeline` or `FluxKontextPipeline` class all of it. This module loads and unloads; the
rest lives in rooms of its own, which the mixin includes: the scales (`delta_scales`), exemplar encoding
(`exemplar_encoding`), query preparation (`query_preparation`), the empty prompt (`prompt_conditioning`), saving
(`adapter_saving`) and adaptation (`adaptation`). The adapter folder's files are found, read, checked and written by
`adapter_files`. Loading is atomic: everything is
read and checked before the pipeline is touched, and the one step that can still fail (injecting a LoRA) runs
before anything else changes, so a failed load leaves processors, components, LoRA and outputs exactly as they were.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.hooks.tensor_parallel import _raise_if_tensor_parallel
from diffusers.modular_pipelines import ModularPipeline
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
)
from .adapter_lora import DeltaLoraMixin
from .adapter_saving import DeltaAdapterSavingMixin
from .backbones import adapter_config_for, adapter_mismatches, backbone_of
from .checks import NO_ADAPTER
from .concurrency import changes_the_adapter
from .delta_scales import DeltaScaleMixin
from .exemplar_encoding import ExemplarEncodingMixin
from .model_state import cast_model, copy_state
from .models.delta_adapter import DeltaAdapterModel
from .prompt_conditioning import EmptyPromptMixin
from .query_preparation import QueryPreparationMixin


logger = logging.getLogger(__name__)


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


class DeltaAdapterMixin(
    DeltaScaleMixin,
    ExemplarEncodingMixin,
    QueryPreparationMixin,
    EmptyPromptMixin,
    DeltaAdapterSavingMixin,
    DeltaLoraMixin,
    DeltaAdaptationMixin,
):
    """Loads, scales, saves and unloads a Delta-Adapter on a pipeline with a FLUX transformer (see `backbones`).

    The pipeline gains three components (`delta_adapter`, `image_encoder`, `feature_extractor`) and, when the adapter
    folder has them, the empty prompt's embeddings, so that the text encoder need not be loaded, and a LoRA of the
    transformer.
    """

    #: Original attention processors, kept while an adapter is loaded so that unloading restores them exactly.
    _delta_original_processors: dict | None = None
    #: The empty prompt's embeddings the pipeline had before the first load (its own folder's, or None), by name,
    #: which unloading gives back.
    _delta_original_empty_prompt: dict[str, torch.Tensor] | None = None
    #: Whether the image encoder came with an adapter (a later load then takes the new folder's own encoder).
    _delta_image_encoder_loaded: bool = False
    #: The adapter's weights as loaded (detached copies): `reset_delta_adapter` restores them bit-for-bit.
    _delta_loaded_state: dict[str, torch.Tensor] | None = None
    #: Where the adapter came from (for model cards), and what test-time adaptation has done to it since.
    _delta_adapter_source: str | None = None
    _delta_adaptation: dict | None = None

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

        In every case of an error, the pipeline is left exactly as it was.
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
        config = dict(adapter_config or adapter_config_for(self.transformer, self.image_encoder.config.hidden_size))
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
        mismatches = adapter_mismatches(adapter_config, self.transformer, image_encoder.config.hidden_size)
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
            self._keep_base_state()
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

    def _adopt_delta_adapter(self, adapter: DeltaAdapterModel) -> None:
        """Puts an adapter given as a component in place as it is (not cast, not frozen: a classic pipeline's
        `__init__` and a modular one's `update_components` take one): checked against the transformer and the image
        encoder, the transformer routed through it, remembered as the loaded one."""
        self._check_adapter_fits(adapter.config, self.image_encoder)
        self._keep_base_state()
        self._attach_delta_processors(adapter)
        self._remember_loaded_adapter(adapter, getattr(adapter.config, "_name_or_path", "delta_adapter"))

    def _keep_base_state(self) -> None:
        """What unloading restores, kept as the first adapter goes in: the processors and the empty prompt."""
        if self._delta_original_processors is None:
            self._delta_original_processors = dict(self.transformer.attn_processors)
            self._delta_original_empty_prompt = self._empty_prompt()

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

    # ------------------------------------------------------------------ unloading

    @changes_the_adapter
    def unload_delta_adapter(self) -> None:
        """Removes the adapter, its LoRA and image encoder; restores the original processors and the empty prompt's
        embeddings the pipeline had before loading (those of its own folder, or none)."""
        if self._delta_original_processors is None:
            return
        self._keep_attention_settings()
        self.transformer.set_attn_processor(dict(self._delta_original_processors))
        backbone_of(self.transformer).release(self.transformer)
        self._delta_original_processors = None
        self._delete_delta_lora()
        self._delta_lora_name = None
        self._restore_empty_prompt(self._delta_original_empty_prompt)
        self._delta_original_empty_prompt = None
        self._delta_loaded_state = self._delta_adapter_source = self._delta_adaptation = None
        self._delta_image_encoder_loaded = False
        self._set_delta_components(delta_adapter=None, image_encoder=None, feature_extractor=None)

    def _set_delta_components(self, **modules) -> None:
        """Registers the adapter's modules as components where the pipeline takes them (a `FluxDeltaEditPipeline`'s
        `__init__`, or a modular pipeline's blocks with the Delta-Adapter step), so that they are saved and
        offloaded, and sets them as plain attributes on a pipeline class that only added this mixin (diffusers'
        `components` would refuse unknown ones)."""
        modular = isinstance(self, ModularPipeline)
        if modular:  # its blocks declare the components they use
            known = set(self._component_specs)
        else:
            expected, optional = self._get_signature_keys(self)
            known = set(expected) | set(optional)
        declared = {name: module for name, module in modules.items() if name in known}
        if declared:
            (self.register_components if modular else self.register_modules)(**declared)
        for name, module in modules.items():
            if name not in declared:
                setattr(self, name, module)
