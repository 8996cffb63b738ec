"""`DeltaAdapterMixin`: the Delta-Adapter lifecycle on a FLUX.2 pipeline, mirroring diffusers' IP-Adapter mixins.

`load_delta_adapter` -> `set_delta_adapter_scale` -> `unload_delta_adapter`, plus `save_delta_adapter`,
`encode_exemplar`, and test-time adaptation (`adapt_to_exemplar`, `reset_delta_adapter`, `adapted_to_exemplar`).
Loading is atomic: everything is read and checked before the pipeline is touched, so a failed load leaves processors,
components and outputs exactly as they were.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import safetensors.torch
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import _get_model_file
from safetensors import SafetensorError, safe_open
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from .adaptation import AdaptationConfig, AdaptationResult, run_adaptation
from .attention_processor import Flux2DeltaAttnProcessor, Flux2DeltaParallelSelfAttnProcessor, delta_processors_for
from .hub import render_model_card
from .image_inputs import ImageInput, to_rgb_image
from .latents import encode_latents
from .models.delta_adapter import DeltaAdapterModel
from .semantic_delta import SiglipPreprocessor, images_to_siglip_pixels, patch_features, semantic_delta
from .training import DeltaAdapterObjective


EMPTY_PROMPT_EMBEDS_NAME = "empty_prompt_embeds.safetensors"
ADAPTER_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA format, written by the training script
LORA_ADAPTER_NAME = "delta_adapter"
_UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")

ExemplarPair = tuple[ImageInput, ImageInput]


def _as_exemplar_pairs(exemplar) -> list[ExemplarPair]:
    """A (source, target) pair or a non-empty list of pairs -> list of pairs; anything else raises."""
    fix = "pass exemplar=(source, target), or a list of such pairs to average their edits"
    if isinstance(exemplar, list) and exemplar and all(isinstance(pair, (tuple, list)) for pair in exemplar):
        pairs = exemplar
    elif isinstance(exemplar, (tuple, list)):
        pairs = [exemplar]
    else:
        raise ValueError(f"exemplar must be a (source, target) pair, got {type(exemplar).__name__}: {fix}.")
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"An exemplar is a (source, target) pair of 2 images, got {len(pair)}: {fix}.")
    return [tuple(pair) for pair in pairs]


def _cast(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | None = None) -> None:
    """Moves a model, casting only when the dtype differs (diffusers warns on every cast through `to()`)."""
    cast = {} if model.dtype == dtype else {"dtype": dtype}
    if device is not None or cast:
        model.to(device=device, **cast)


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def default_feature_extractor(image_encoder: SiglipVisionModel) -> SiglipImageProcessorPil:
    """SigLIP's standard preprocessing at the encoder's resolution, for encoders saved without one."""
    size = image_encoder.config.image_size
    return SiglipImageProcessorPil(size={"height": size, "width": size})


def _where(source: str, subfolder: str | None) -> str:
    return f"{source!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")


def _check_safetensors_only(folder: str) -> None:
    """Refuses a local adapter folder that holds pickled weights instead of safetensors."""
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS_NAME)):
        return
    unsafe = sorted(name for name in os.listdir(folder) if name.endswith(_UNSAFE_WEIGHT_SUFFIXES))
    if unsafe:
        raise ValueError(
            f"{folder} holds {', '.join(unsafe)} but no {ADAPTER_WEIGHTS_NAME}. Delta-Adapter loads only safetensors "
            "weights: convert the file with safetensors.torch.save_file and save it under that name."
        )


class DeltaAdapterMixin:
    """Loads, scales, saves and unloads a Delta-Adapter on a pipeline with a `Flux2Transformer2DModel`.

    The pipeline gains three components (`delta_adapter`, `image_encoder`, `feature_extractor`) and, when the adapter
    folder has them, the empty prompt's embeddings, so that the text encoder need not be loaded.
    """

    #: Original attention processors, kept while an adapter is loaded so that unloading restores them exactly.
    _delta_original_processors: dict | None = None
    #: Whether the loaded adapter brought a LoRA for the transformer (peft adapter `LORA_ADAPTER_NAME`).
    _delta_lora_loaded: bool = False
    #: The adapter's weights as loaded (detached copies): `reset_delta_adapter` restores them bit-for-bit.
    _delta_loaded_state: dict[str, torch.Tensor] | None = None
    #: Where the adapter came from (for model cards), and what test-time adaptation has done to it since.
    _delta_adapter_source: str | None = None
    _delta_adaptation: dict | None = None
    #: (1, L, D_txt) embeddings of the empty prompt, from the adapter folder or `compute_empty_prompt_embeds`.
    empty_prompt_embeds: torch.Tensor | None = None

    # ------------------------------------------------------------------ loading

    def load_delta_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        subfolder: str | None = None,
        image_encoder_folder: str | None = "image_encoder",
        adapter_config: dict | None = None,
        **kwargs,
    ) -> None:
        """Loads a Delta-Adapter and routes the transformer's attention through it.

        Args:
            pretrained_model_name_or_path_or_dict: a Hub repo id (e.g. `"org/delta-adapter"`), a local folder written
                by `save_delta_adapter`, or a state dict of `DeltaAdapterModel` weights.
            subfolder: the adapter's subfolder inside the repo or folder.
            image_encoder_folder: where the SigLIP encoder lies, relative to the repo (a plain name is taken inside
                `subfolder`). Used only when the pipeline has no `image_encoder` yet. `None` to require one already.
            adapter_config: with a state dict, the `DeltaAdapterModel` config; defaults to the standard config for
                this pipeline's transformer and image encoder.
            kwargs: Hub arguments (`cache_dir`, `force_download`, `proxies`, `local_files_only`, `token`,
                `revision`), passed to diffusers' and transformers' `from_pretrained`.
        """
        unknown = set(kwargs) - set(_HUB_KWARGS)
        if unknown:
            raise TypeError(f"load_delta_adapter() got unexpected arguments {sorted(unknown)}.")
        hub_kwargs = dict(kwargs)
        source = pretrained_model_name_or_path_or_dict

        if isinstance(source, dict):
            image_encoder, feature_extractor = self._resolve_image_encoder(
                source, subfolder, image_encoder_folder, hub_kwargs
            )
            config = adapter_config or DeltaAdapterModel.config_for_transformer(
                self.transformer, image_encoder.config.hidden_size
            )
            self._check_adapter_fits(config, image_encoder)
            adapter = DeltaAdapterModel.from_config(config)
            try:
                loaded = adapter.load_state_dict(source, strict=False)
            except RuntimeError as error:  # a shape that disagrees with the config
                raise ValueError(f"The state dict does not fit the adapter config: {error}".strip()) from None
            if loaded.missing_keys or loaded.unexpected_keys:
                raise ValueError(
                    f"The state dict does not fit the adapter config: missing keys {loaded.missing_keys[:5]}, "
                    f"unexpected keys {loaded.unexpected_keys[:5]}. Pass the adapter_config of these weights."
                )
            empty_prompt_embeds = lora_state_dict = None
        else:
            source = str(source)
            config, weights_path = self._load_adapter_config(source, subfolder, hub_kwargs)
            image_encoder, feature_extractor = self._resolve_image_encoder(
                source, subfolder, image_encoder_folder, hub_kwargs
            )
            self._check_adapter_fits(config, image_encoder)
            adapter = self._load_adapter_model(source, subfolder, weights_path, hub_kwargs)
            empty_prompt_embeds = self._load_empty_prompt_embeds(source, subfolder, hub_kwargs)
            lora_state_dict = self._load_lora_state_dict(source, subfolder, hub_kwargs)

        for model in (adapter, image_encoder):
            _cast(model, self.transformer.dtype, self.transformer.device)
            model.eval()
            model.requires_grad_(False)

        # Nothing has been changed so far. The LoRA (if any) goes first: it is the one step that could still fail.
        if self._delta_lora_loaded:
            self.delete_adapters(LORA_ADAPTER_NAME)
            self._delta_lora_loaded = False
        if lora_state_dict is not None:
            self.load_lora_weights(lora_state_dict, adapter_name=LORA_ADAPTER_NAME)
            self._delta_lora_loaded = True
        if self._delta_original_processors is None:
            self._delta_original_processors = dict(self.transformer.attn_processors)
        self.register_modules(delta_adapter=adapter, image_encoder=image_encoder, feature_extractor=feature_extractor)
        if empty_prompt_embeds is not None:
            self.empty_prompt_embeds = empty_prompt_embeds
        self._attach_delta_processors(adapter)
        self._remember_loaded_adapter(adapter, "state dict" if isinstance(source, dict) else source)

    def _resolve_image_encoder(self, source, subfolder, image_encoder_folder, hub_kwargs):
        """The pipeline's own encoder when it has one, else the one in the adapter repo."""
        if getattr(self, "image_encoder", None) is not None:
            feature_extractor = getattr(self, "feature_extractor", None) or default_feature_extractor(
                self.image_encoder
            )
            return self.image_encoder, feature_extractor
        if isinstance(source, dict) or image_encoder_folder is None:
            raise ValueError(
                "This pipeline has no image encoder. Load the adapter from a folder or repo with an image_encoder/ "
                "subfolder, or register one first: "
                "pipe.register_modules(image_encoder=SiglipVisionModel.from_pretrained(...))."
            )
        if os.path.isdir(image_encoder_folder):  # a folder of its own, anywhere on disk
            source, encoder_subfolder = image_encoder_folder, ""
        elif "/" in image_encoder_folder:  # a path inside the repo, as for IP-Adapters
            encoder_subfolder = image_encoder_folder
        else:
            encoder_subfolder = os.path.join(subfolder or "", image_encoder_folder).replace(os.sep, "/")
        try:
            image_encoder = SiglipVisionModel.from_pretrained(
                source, subfolder=encoder_subfolder, use_safetensors=True, **hub_kwargs
            )
        except (OSError, ValueError) as error:
            raise OSError(
                f"Could not load the SigLIP image encoder from {source!r}, subfolder {encoder_subfolder!r} ({error}). "
                "Pass image_encoder_folder= where it lies, or register an image_encoder on the pipeline first."
            ) from None
        try:
            feature_extractor = SiglipImageProcessorPil.from_pretrained(
                source, subfolder=encoder_subfolder, **hub_kwargs
            )
        except OSError:
            feature_extractor = default_feature_extractor(image_encoder)
        return image_encoder, feature_extractor

    @staticmethod
    def _load_adapter_config(source: str, subfolder: str | None, hub_kwargs: dict) -> tuple[dict, str]:
        """The adapter's config and the resolved path of its weights (checked to exist, not yet read)."""
        _check_safetensors_only(os.path.join(source, subfolder or ""))
        try:
            weights_path = _get_model_file(
                source, weights_name=ADAPTER_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs
            )
            return DeltaAdapterModel.load_config(source, subfolder=subfolder, **hub_kwargs), weights_path
        except OSError as error:
            raise OSError(
                f"No Delta-Adapter found at {_where(source, subfolder)}: expected config.json and "
                f"{ADAPTER_WEIGHTS_NAME} ({error})."
            ) from None

    @staticmethod
    def _load_adapter_model(
        source: str, subfolder: str | None, weights_path: str, hub_kwargs: dict
    ) -> DeltaAdapterModel:
        try:
            with safe_open(weights_path, framework="pt"):
                pass
            return DeltaAdapterModel.from_pretrained(source, subfolder=subfolder, use_safetensors=True, **hub_kwargs)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"The Delta-Adapter weights at {_where(source, subfolder)} are corrupt or do not match its "
                f"config.json ({error}). Re-save the adapter with save_delta_adapter, or download it again with "
                "force_download=True."
            ) from None

    @staticmethod
    def _load_empty_prompt_embeds(source: str, subfolder: str | None, hub_kwargs: dict) -> torch.Tensor | None:
        try:
            path = _get_model_file(source, weights_name=EMPTY_PROMPT_EMBEDS_NAME, subfolder=subfolder, **hub_kwargs)
        except OSError:
            return None  # optional: the pipeline then needs its text encoder
        try:
            return safetensors.torch.load_file(path)["prompt_embeds"]
        except (SafetensorError, KeyError) as error:
            raise ValueError(
                f"{EMPTY_PROMPT_EMBEDS_NAME} in {source!r} is corrupt ({error}). Recompute it with "
                "diffusers_delta.compute_empty_prompt_embeds and save the adapter again."
            ) from None

    @staticmethod
    def _load_lora_state_dict(source: str, subfolder: str | None, hub_kwargs: dict) -> dict | None:
        try:
            path = _get_model_file(source, weights_name=LORA_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
        except OSError:
            return None  # optional: most adapters train no LoRA
        try:
            return safetensors.torch.load_file(path)
        except SafetensorError as error:
            raise ValueError(
                f"{LORA_WEIGHTS_NAME} in {source!r} is corrupt ({error}). Download it again with force_download=True."
            ) from None

    def _check_adapter_fits(self, adapter_config, image_encoder: SiglipVisionModel) -> None:
        mismatches = DeltaAdapterModel.signature_mismatches(
            adapter_config, self.transformer, image_encoder.config.hidden_size
        )
        if mismatches:
            raise ValueError(
                "This Delta-Adapter was made for another backbone (" + "; ".join(mismatches) + "). Load an adapter "
                "trained for this transformer and image encoder."
            )

    def _remember_loaded_adapter(self, adapter: DeltaAdapterModel, source: str) -> None:
        self._delta_loaded_state = _copy_state(adapter)
        self._delta_adapter_source = source
        self._delta_adaptation = None

    def _attach_delta_processors(self, adapter: DeltaAdapterModel) -> None:
        """Routes every attention layer through the adapter (replacing the processors of an earlier adapter)."""
        self.transformer.set_attn_processor(dict(self._delta_original_processors))
        self.transformer.set_attn_processor(delta_processors_for(self.transformer, adapter))

    # ------------------------------------------------------------------ using

    @property
    def delta_processors(self) -> dict:
        """The transformer's Delta-Adapter processors by layer name (empty when no adapter is loaded)."""
        return {
            name: processor
            for name, processor in self.transformer.attn_processors.items()
            if isinstance(processor, (Flux2DeltaAttnProcessor, Flux2DeltaParallelSelfAttnProcessor))
        }

    def set_delta_adapter_scale(self, scale: float | dict[str, Sequence[float]]) -> None:
        """Sets the strength of the decoupled branch, for all blocks or per block.

        Args:
            scale: one float for every block, or `{"double": [...], "single": [...]}` with one float per double- and
                per single-stream block (either key may be left out to keep those blocks as they are).
        """
        processors = self.delta_processors
        if not processors:
            raise RuntimeError("No Delta-Adapter is loaded: call load_delta_adapter first.")
        double = [p for n, p in processors.items() if n.startswith("transformer_blocks.")]
        single = [p for n, p in processors.items() if n.startswith("single_transformer_blocks.")]
        if isinstance(scale, (int, float)):
            scales = {"double": [scale] * len(double), "single": [scale] * len(single)}
        elif isinstance(scale, dict):
            unknown = set(scale) - {"double", "single"}
            if unknown:
                raise ValueError(f"Scale keys must be 'double' and/or 'single', got {sorted(unknown)}.")
            scales = {
                "double": scale.get("double", [p.scale for p in double]),
                "single": scale.get("single", [p.scale for p in single]),
            }
        else:
            raise TypeError(f"scale must be a float or a dict of lists, got {type(scale).__name__}.")
        for key, group in (("double", double), ("single", single)):
            if len(scales[key]) != len(group):
                raise ValueError(
                    f"{len(scales[key])} {key}-block scales given, but the transformer has {len(group)} {key}-stream "
                    f"blocks: pass one scale per block."
                )
        for processor, value in zip(double + single, list(scales["double"]) + list(scales["single"])):
            processor.scale = float(value)

    def unload_delta_adapter(self) -> None:
        """Removes the adapter, its LoRA, image encoder and stored embeddings; restores the original processors."""
        if self._delta_original_processors is None:
            return
        self.transformer.set_attn_processor(dict(self._delta_original_processors))
        self._delta_original_processors = None
        if self._delta_lora_loaded:
            self.delete_adapters(LORA_ADAPTER_NAME)
            self._delta_lora_loaded = False
        self.empty_prompt_embeds = None
        self._delta_loaded_state = self._delta_adapter_source = self._delta_adaptation = None
        self.register_modules(delta_adapter=None, image_encoder=None, feature_extractor=None)

    @torch.no_grad()
    def encode_exemplar(
        self, exemplar: ExemplarPair | list[ExemplarPair], device: torch.device | None = None
    ) -> torch.Tensor:
        """Edit tokens of an exemplar pair, or of several pairs whose semantic deltas are averaged.

        Encode once and pass the result as `delta_embeds=` to edit many queries without re-encoding.

        Args:
            exemplar: `(source, target)` images (PIL, numpy or torch), or a list of such pairs.
            device: where to compute; defaults to the pipeline's execution device.

        Returns:
            (1, N, D_edit) edit tokens, in the adapter's dtype.
        """
        if getattr(self, "delta_adapter", None) is None:
            raise RuntimeError("No Delta-Adapter is loaded: call load_delta_adapter first.")
        pairs = _as_exemplar_pairs(exemplar)
        device = device or self._execution_device
        preprocessor = SiglipPreprocessor.from_feature_extractor(self.feature_extractor)
        sources = images_to_siglip_pixels([pair[0] for pair in pairs], preprocessor, "exemplar source")
        targets = images_to_siglip_pixels([pair[1] for pair in pairs], preprocessor, "exemplar target")
        encoder_dtype = self.image_encoder.dtype
        deltas = semantic_delta(
            self.image_encoder, sources.to(device, encoder_dtype), targets.to(device, encoder_dtype)
        )  # (K, P, D_enc)
        mean_delta = deltas.mean(dim=0, keepdim=True).to(self.delta_adapter.dtype)  # (1, P, D_enc)
        return self.delta_adapter(mean_delta)  # (1, N, D_edit)

    # ------------------------------------------------------------------ test-time adaptation

    def adapt_to_exemplar(
        self,
        source: ImageInput,
        target: ImageInput,
        num_steps: int | None = None,
        learning_rate: float | None = None,
        lambda_delta: float | None = None,
        generator: torch.Generator | None = None,
        config: AdaptationConfig | None = None,
        from_loaded: bool = True,
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
    ) -> AdaptationResult:
        """Fine-tunes the adapter on one exemplar pair (flow matching + semantic-delta consistency), then edit as
        usual. Only adapter weights change; `reset_delta_adapter()` brings back the loaded ones.

        Args:
            source: the exemplar's source image (it plays the query during adaptation).
            target: the exemplar's target image.
            num_steps: gradient steps (default `AdaptationConfig.num_steps`, 20).
            learning_rate: AdamW learning rate (default `AdaptationConfig.learning_rate`).
            lambda_delta: weight of the consistency loss (default 1).
            generator: makes the noise draws, and so the result, reproducible.
            config: every other setting (see `AdaptationConfig`); the three arguments above override it.
            from_loaded: start from the loaded weights (default) rather than from the current, already adapted ones.
            max_sequence_length: prompt length, when the empty prompt has to be encoded by the text encoder.
            text_encoder_out_layers: Qwen3 layers stacked into the prompt embeddings, likewise.

        Returns:
            The loss of every step, with its two terms, and the settings used.

        Raises:
            ValueError: bad exemplar images or settings; FloatingPointError: the loss stopped being finite. In
            either case (and on any other error) the adapter is left exactly as it was before the call.
        """
        if getattr(self, "delta_adapter", None) is None:
            raise RuntimeError("No Delta-Adapter is loaded: call load_delta_adapter first.")
        overrides = {"num_steps": num_steps, "learning_rate": learning_rate, "lambda_delta": lambda_delta}
        config = replace(config or AdaptationConfig(), **{k: v for k, v in overrides.items() if v is not None})
        if hasattr(self.transformer, "_hf_hook") or hasattr(self.vae, "_hf_hook"):
            raise RuntimeError(
                "adapt_to_exemplar backpropagates through the transformer, VAE and SigLIP at once, which model CPU "
                "offloading keeps on different devices. Adapt before enable_model_cpu_offload(), or call "
                "pipe.remove_all_hooks() and pipe.to(device) first."
            )
        device = self._execution_device
        pair = self._encode_pair_for_training(source, target, device)
        with torch.no_grad():
            prompt_embeds = self._prompt_embeds("", None, max_sequence_length, text_encoder_out_layers).to(device)

        adapter, transformer, vae = self.delta_adapter, self.transformer, self.vae
        state_before = _copy_state(adapter)
        processors = dict(transformer.attn_processors)  # with the user's per-block scales
        checkpointing = (transformer.is_gradient_checkpointing, vae.is_gradient_checkpointing)
        dtype = adapter.dtype
        try:
            if from_loaded:
                adapter.load_state_dict(self._delta_loaded_state)
            _cast(adapter, torch.float32)  # float32 master weights, whatever the pipeline's dtype
            adapter.train().requires_grad_(True)
            checkpoint = config.gradient_checkpointing
            if checkpoint if checkpoint is not None else torch.device(device).type == "cuda":
                transformer.enable_gradient_checkpointing()
                vae.enable_gradient_checkpointing()
            preprocessor = SiglipPreprocessor.from_feature_extractor(self.feature_extractor)
            objective = DeltaAdapterObjective(
                adapter, transformer, vae, self.image_encoder, preprocessor, prompt_embeds, config.lambda_delta
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
            with torch.enable_grad():
                result = run_adaptation(objective, pair, config, scheduler, generator, self.progress_bar)
        except BaseException:
            _cast(adapter, dtype)
            adapter.load_state_dict(state_before)
            raise
        finally:
            _cast(adapter, dtype)
            adapter.eval().requires_grad_(False)
            for model, was_checkpointing in zip((transformer, vae), checkpointing):
                if not was_checkpointing and model.is_gradient_checkpointing:
                    model.disable_gradient_checkpointing()
            transformer.set_attn_processor(processors)
        self._delta_adaptation = {
            "base_adapter": self._delta_adapter_source,
            "num_steps": config.num_steps,
            "learning_rate": config.learning_rate,
            "lambda_delta": config.lambda_delta,
        }
        return result

    @torch.no_grad()
    def _encode_pair_for_training(self, source: ImageInput, target: ImageInput, device) -> dict[str, torch.Tensor]:
        """The exemplar as the objective reads it: latents of both images at the source's size (as the pipeline
        sizes a query), and SigLIP features as `encode_exemplar` computes them."""
        source_pixels = self._preprocess_queries(source)  # (1, 3, H, W) in [-1, 1]
        height, width = source_pixels.shape[-2:]
        target_rgb = to_rgb_image(target, name="exemplar target")
        target_pixels = self.image_processor.preprocess(target_rgb, height=height, width=width, resize_mode="crop")
        latents = encode_latents(self.vae, torch.cat([source_pixels, target_pixels]).to(device))  # (2, 4C, h, w)
        preprocessor = SiglipPreprocessor.from_feature_extractor(self.feature_extractor)
        siglip = images_to_siglip_pixels([source, target_rgb], preprocessor, "exemplar image")
        features = patch_features(self.image_encoder, siglip.to(device, self.image_encoder.dtype))  # (2, P, D)
        return {
            "source_latents": latents[:1],
            "target_latents": latents[1:],
            "source_features": features[:1],
            "target_features": features[1:],
        }

    def reset_delta_adapter(self) -> None:
        """Restores the adapter's weights as they were loaded, bit-for-bit (undoing `adapt_to_exemplar`)."""
        if getattr(self, "delta_adapter", None) is None:
            raise RuntimeError("No Delta-Adapter is loaded: nothing to reset.")
        self.delta_adapter.load_state_dict(self._delta_loaded_state)
        self._delta_adaptation = None

    @contextmanager
    def adapted_to_exemplar(self, source: ImageInput, target: ImageInput, **kwargs):
        """`with pipe.adapted_to_exemplar(src, tgt) as result: ...` adapts, and on exit (exceptions included)
        restores the adapter as it was on entry. Takes `adapt_to_exemplar`'s arguments; yields its result."""
        state, adaptation = _copy_state(self.delta_adapter), self._delta_adaptation
        try:
            yield self.adapt_to_exemplar(source, target, **kwargs)
        finally:
            self.delta_adapter.load_state_dict(state)
            self._delta_adaptation = adaptation

    # ------------------------------------------------------------------ saving

    def save_delta_adapter(
        self,
        save_directory: str | os.PathLike,
        save_image_encoder: bool = True,
        model_card=None,
        repo_id: str | None = None,
        base_model: str | None = None,
    ) -> None:
        """Writes the adapter in the layout `load_delta_adapter` reads (safetensors only), with a model card when
        one is given, a `repo_id` is named, or the adapter was adapted at test time (the card then says so).

        Args:
            save_directory: the folder to write (created if missing).
            save_image_encoder: also write `image_encoder/` (with its preprocessing config), so the folder is
                self-contained.
            model_card: a `huggingface_hub.ModelCard` to write as `README.md` (see `hub.render_model_card`).
            repo_id: the repo the rendered card's snippet loads (defaults to the folder's name).
            base_model: the base checkpoint named in a rendered card (defaults to the pipeline's own).
        """
        if getattr(self, "delta_adapter", None) is None:
            raise RuntimeError("No Delta-Adapter is loaded: nothing to save.")
        if model_card is None and (repo_id is not None or self._delta_adaptation is not None):
            base_model = base_model or self.name_or_path or self.transformer.config.get("_name_or_path")
            if not base_model:
                raise ValueError("This pipeline was not loaded from a checkpoint: pass base_model= for the card.")
            model_card = render_model_card(
                self.delta_adapter,
                repo_id=repo_id or os.path.basename(os.path.normpath(save_directory)),
                base_model=str(base_model),
                image_encoder=str(self.image_encoder.name_or_path or "SigLIP"),
                adaptation=self._delta_adaptation,
            )
        save_adapter_folder(
            save_directory,
            self.delta_adapter,
            image_encoder=self.image_encoder if save_image_encoder else None,
            feature_extractor=self.feature_extractor,
            empty_prompt_embeds=self.empty_prompt_embeds,
            model_card=model_card,
        )


def save_adapter_folder(
    save_directory: str | os.PathLike,
    adapter: DeltaAdapterModel,
    image_encoder: SiglipVisionModel | None = None,
    feature_extractor: SiglipImageProcessorPil | None = None,
    empty_prompt_embeds: torch.Tensor | None = None,
    model_card=None,
) -> None:
    """Writes an adapter folder: config and weights, and optionally `image_encoder/`, the empty prompt's embeddings
    and the model card. `save_delta_adapter` and the training script both write through here.

    Args:
        save_directory: the folder (created if missing).
        adapter: the adapter.
        image_encoder: the SigLIP encoder to store in `image_encoder/`.
        feature_extractor: its preprocessing config (SigLIP's default at the encoder's size if `None`).
        empty_prompt_embeds: (1, L, D_txt) embeddings of the empty prompt.
        model_card: a `huggingface_hub.ModelCard` to save as `README.md`.
    """
    os.makedirs(save_directory, exist_ok=True)
    adapter.save_pretrained(save_directory, safe_serialization=True)
    if image_encoder is not None:
        encoder_dir = os.path.join(save_directory, "image_encoder")
        image_encoder.save_pretrained(encoder_dir, safe_serialization=True)
        (feature_extractor or default_feature_extractor(image_encoder)).save_pretrained(encoder_dir)
    if empty_prompt_embeds is not None:
        safetensors.torch.save_file(
            {"prompt_embeds": empty_prompt_embeds.detach().to("cpu").contiguous()},
            os.path.join(save_directory, EMPTY_PROMPT_EMBEDS_NAME),
        )
    if model_card is not None:
        model_card.save(os.path.join(save_directory, "README.md"))
