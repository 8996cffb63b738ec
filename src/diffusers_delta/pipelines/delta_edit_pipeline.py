"""`DeltaEditPipelineMixin`: what every Delta-Adapter pipeline adds to its diffusers pipeline, whatever the backbone:
the adapter's components at construction, `from_pipe` sharing the adapter's state, `save_pretrained` and
`from_pretrained` keeping the empty prompt's embeddings and the per-block strengths, and the edit tokens of a call.

Each backbone's pipeline (`FluxDeltaEditPipeline` on FLUX.2 [klein], `FluxKontextDeltaEditPipeline` on FLUX.1
Kontext) is this mixin + its diffusers pipeline + its `__call__`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import SiglipImageProcessorPil, SiglipVisionModel

from ..adapter_files import (
    EMPTY_PROMPT_EMBEDS_NAME,
    HUB_KWARGS,
    AdapterLocation,
    default_feature_extractor,
    hub_unreachable_error,
    is_hub_unreachable,
    read_empty_prompt_embeds,
    write_empty_prompt_embeds,
)
from ..atomic_folder import atomic_folder, check_save_directory
from ..backbones import BACKBONES, backbone_of
from ..checks import finite_float, positive_int
from ..hub import push_folder
from ..loaders import DeltaAdapterMixin
from ..models.delta_adapter import DeltaAdapterModel


#: The per-block strengths (`get_delta_adapter_scale`), saved beside a pipeline by `save_pretrained`.
DELTA_SCALES_NAME = "delta_adapter_scales.json"

#: What a pipeline made by `from_pipe` takes over from the one whose transformer and adapter it shares.
_SHARED_ADAPTER_STATE = (
    "_delta_original_processors",
    "_delta_original_empty_prompt",
    "_delta_lora_name",
    "_delta_loaded_state",
    "_delta_adapter_source",
    "_delta_adaptation",
    "_delta_image_encoder_loaded",
)


class DeltaEditPipelineMixin(DeltaAdapterMixin):
    """The pipeline-level part of Delta-Adapter, shared by every backbone's pipeline (see the module's docstring)."""

    def _register_delta_components(
        self,
        image_encoder: SiglipVisionModel | None,
        feature_extractor: SiglipImageProcessorPil | None,
        delta_adapter: DeltaAdapterModel | None,
        image_size: int | None,
    ) -> None:
        """The `__init__` part of every Delta-Adapter pipeline: registers the adapter's components and the config's
        `image_size` and, when an adapter is given (as `from_pretrained` and `from_pipe` give it), routes the
        transformer through it."""
        if image_encoder is not None and feature_extractor is None:
            feature_extractor = default_feature_extractor(image_encoder)  # as load_delta_adapter does
        self.register_modules(
            image_encoder=image_encoder, feature_extractor=feature_extractor, delta_adapter=delta_adapter
        )
        if delta_adapter is not None:
            if image_encoder is None:
                raise ValueError("A delta_adapter needs its image_encoder: pass both, or use load_delta_adapter.")
            self._adopt_delta_adapter(delta_adapter)
        self.register_to_config(image_size=None if image_size is None else positive_int(image_size, "image_size"))

    def _check_edit_request(
        self, image, exemplar, delta_embeds, delta_scale, num_images_per_prompt, attention_kwargs
    ) -> tuple[float, int]:
        """The checks every pipeline's call starts with: a query, exactly one of the exemplar and its edit tokens, a
        loaded adapter, a finite strength and no edit smuggled through the attention kwargs.

        Returns:
            `delta_scale` and `num_images_per_prompt`, as a float and an int.
        """
        if image is None:
            raise ValueError("image (the query to edit) is required.")
        if (exemplar is None) == (delta_embeds is None):
            raise ValueError(
                "Pass exactly one of exemplar=(source, target) or delta_embeds=pipe.encode_exemplar(...)."
            )
        self._require_delta_adapter()
        if attention_kwargs and {"delta_hidden_states", "delta_scale"} & set(attention_kwargs):
            raise ValueError("Pass the edit through exemplar/delta_embeds/delta_scale, not the attention kwargs.")
        return finite_float(delta_scale, "delta_scale"), positive_int(num_images_per_prompt, "num_images_per_prompt")

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`: a pipeline sharing `pipeline`'s models (no extra memory), which is the way to
        edit from several threads (one pipeline each). It gets a scheduler of its own, built from the same config
        (a scheduler holds one call's timesteps), unless one is given; and when it shares the transformer and the
        loaded adapter, it shares the adapter's state too: the same processors with their per-block scales, the
        empty prompt, and what `reset_delta_adapter` and `unload_delta_adapter` restore.

        Args:
            pipeline: the pipeline whose models to share.
            kwargs: components or config values to replace, as diffusers' `from_pipe` takes them.

        Raises:
            ValueError: a pipeline whose transformer is another backbone's (its models cannot serve this pipeline).
        """
        transformer = kwargs.get("transformer", getattr(pipeline, "transformer", None))
        if transformer is not None and backbone_of(transformer).NAME != cls.backbone:
            ours, theirs = BACKBONES[cls.backbone], backbone_of(transformer)
            raise ValueError(
                f"{cls.__name__} runs on {ours.FAMILY} bases, and this pipeline's transformer is "
                f"{theirs.DISPLAY_NAME}: use {theirs.DELTA_PIPELINE} with it."
            )
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is not None and "scheduler" not in kwargs:
            kwargs["scheduler"] = type(scheduler).from_config(scheduler.config)
        adapter = getattr(pipeline, "delta_adapter", None)
        shares_adapter = (
            adapter is not None
            and kwargs.get("transformer", pipeline.transformer) is pipeline.transformer
            and kwargs.get("delta_adapter", adapter) is adapter
        )
        processors = dict(pipeline.transformer.attn_processors) if shares_adapter else None  # before __init__ swaps
        new = super().from_pipe(pipeline, **kwargs)
        if shares_adapter:
            new.transformer.set_attn_processor(processors)  # the very processors, with the user's scales
            for name in _SHARED_ADAPTER_STATE:
                setattr(new, name, getattr(pipeline, name))
        if new.empty_prompt_embeds is None and isinstance(pipeline, DeltaAdapterMixin):
            new._restore_empty_prompt(pipeline._empty_prompt())
        return new

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """diffusers' `save_pretrained`, made atomic, plus what lives beside the components: the stored empty-prompt
        embeddings and the per-block edit strengths, so that `from_pretrained` gives the same edits bit-for-bit.
        The folder then holds exactly this pipeline (other files in it are left alone); a failed save leaves it
        exactly as it was.

        Args:
            save_directory: the folder to write (created if missing).
            safe_serialization: write safetensors (the default; always for the adapter).
            variant: a weights variant name, e.g. `"fp16"`.
            max_shard_size: the largest weights file before sharding.
            push_to_hub: also upload the folder to the Hub; `repo_id` (defaults to the folder's name), `token`,
                `private` and `commit_message` may be passed as keyword arguments.
        """
        if self._delta_lora_name is not None:
            raise ValueError(
                "The loaded Delta-Adapter brought a LoRA, which a pipeline folder cannot hold beside the transformer "
                "weights: save the adapter with save_delta_adapter(folder), and the pipeline after "
                "unload_delta_adapter()."
            )
        target = check_save_directory(save_directory)
        owned = {"model_index.json", EMPTY_PROMPT_EMBEDS_NAME, DELTA_SCALES_NAME}
        owned |= set(self.components) | set(self._optional_components) | self._components_saved_in(target)
        with atomic_folder(target, owned=owned) as staging:
            super().save_pretrained(
                staging, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
            )
            if self.empty_prompt_embeds is not None:
                write_empty_prompt_embeds(self._empty_prompt(), staging / EMPTY_PROMPT_EMBEDS_NAME)
            if self.delta_processors:
                (staging / DELTA_SCALES_NAME).write_text(json.dumps(self.get_delta_adapter_scale(), indent=2))
        if push_to_hub:
            push_folder(
                target,
                kwargs.get("repo_id") or target.absolute().name,
                token=kwargs.get("token"),
                private=kwargs.get("private"),
                commit_message=kwargs.get("commit_message") or f"Upload {type(self).__name__}",
            )

    @staticmethod
    def _components_saved_in(folder: Path) -> set[str]:
        """The component folders an earlier pipeline saved in `folder` (named by its model_index.json)."""
        try:
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        return {name for name in index if not name.startswith("_")} if isinstance(index, dict) else set()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' `from_pretrained`, plus the empty-prompt embeddings and per-block strengths that
        `save_pretrained` stores beside the components (a folder without them loads as before)."""
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            if os.path.isdir(pretrained_model_name_or_path) or not is_hub_unreachable(error):
                raise
            raise hub_unreachable_error(
                str(pretrained_model_name_or_path), "the pipeline", kwargs.get("local_files_only", False)
            ) from None
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        location = AdapterLocation.resolve(pretrained_model_name_or_path, None, hub_kwargs)
        embeds_path = location.fetch(EMPTY_PROMPT_EMBEDS_NAME, required=False)
        if embeds_path is not None:
            pipe._restore_empty_prompt(read_empty_prompt_embeds(embeds_path, *pipe._empty_prompt_dims()))
        scales_path = location.fetch(DELTA_SCALES_NAME, required=False)
        if scales_path is not None and pipe.delta_processors:
            try:
                pipe.set_delta_adapter_scale(json.loads(Path(scales_path).read_text(encoding="utf-8")))
            except (ValueError, TypeError) as error:
                raise ValueError(
                    f"{scales_path} does not hold this pipeline's per-block scales ({error}). Delete it to load the "
                    "pipeline with every scale at 1."
                ) from None
        return pipe
