"""Modular pipelines that edit by example: klein's (`FluxDeltaModularPipeline`), Kontext's
(`FluxKontextDeltaModularPipeline`) and FLUX.3's (`Flux3DeltaModularPipeline`, `Flux3DistilledDeltaModularPipeline`),
each upstream's modular pipeline with the Delta-Adapter's blocks and its whole interface."""

from __future__ import annotations

import os

from diffusers.modular_pipelines import (
    Flux2KleinAutoBlocks,
    Flux2KleinModularPipeline,
    Flux3AutoBlocks,
    Flux3DistilledAutoBlocks,
    Flux3DistilledModularPipeline,
    Flux3ModularPipeline,
    FluxKontextAutoBlocks,
    FluxKontextModularPipeline,
    SequentialPipelineBlocks,
)
from tqdm.auto import tqdm

from ..adapter_files import default_feature_extractor
from ..backbones import flux1, flux2, flux3
from ..loaders import DeltaAdapterMixin
from .blocks import delta_blocks
from .guidance import NoEditGuidance


#: The components `load_delta_adapter` brings, which `load_components` leaves alone.
ADAPTER_COMPONENTS = ("delta_adapter", "image_encoder", "feature_extractor")


class DeltaModularPipelineMixin(DeltaAdapterMixin):
    """What a modular pipeline needs to edit by example: default blocks with the Delta-Adapter's steps, a
    `from_pretrained` that builds them, and adaptation's progress bar; `DeltaAdapterMixin` brings the rest
    (`load_delta_adapter`, scales, `encode_exemplar`, `adapt_to_exemplar`, `save_delta_adapter`, unloading).

    Args:
        blocks: the pipeline's blocks (default: upstream's auto blocks, text-free, with the step: `delta_blocks`).
        pretrained_model_name_or_path: a checkpoint (Hub id or folder) whose components `load_components` loads.
        kwargs: the rest of `ModularPipeline`'s arguments (`components_manager`, `collection`, ...).
    """

    #: Upstream's auto blocks of the backbone, which `delta_blocks` extends.
    upstream_blocks: type[SequentialPipelineBlocks]

    def __init__(
        self,
        blocks: SequentialPipelineBlocks | None = None,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        **kwargs,
    ):
        super().__init__(
            blocks=delta_blocks(self.upstream_blocks()) if blocks is None else blocks,
            # upstream's modular loading takes a str only (a Path fails deep inside urlparse)
            pretrained_model_name_or_path=(
                None if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
            ),
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, text_free: bool = True, **kwargs):
        """The pipeline for a checkpoint of its backbone, its components to be loaded with `load_components(...)`.

        Args:
            pretrained_model_name_or_path: a repo or folder (`model_index.json` or `modular_model_index.json`).
            text_free: blocks without the text encoder step (the adapter brings the empty prompt's embeddings).
            kwargs: `ModularPipeline`'s (`components_manager`, `collection`, and the Hub's `revision`, `token`, ...).
        """
        return cls(delta_blocks(cls.upstream_blocks(), text_free=text_free), pretrained_model_name_or_path, **kwargs)

    def load_components(self, names: list[str] | str | None = None, workflow: str | None = None, **kwargs) -> None:
        """Upstream's `load_components`, except that by default it leaves the adapter's components
        (`ADAPTER_COMPONENTS`) to `load_delta_adapter`: a base's folder may name them (Kontext's `model_index.json`
        lists its IP-Adapter's empty `image_encoder` and `feature_extractor`), but it does not hold them.

        Args:
            names: the components to load (default: every pretrained component of the blocks but the adapter's).
            workflow: load only what this workflow of the blocks uses (as upstream).
            kwargs: `from_pretrained` arguments (`dtype`, `variant`, `revision`, ...), as upstream.
        """
        if names is None:
            names = [
                name
                for name, spec in self._component_specs.items()
                if name not in ADAPTER_COMPONENTS
                and spec.default_creation_method == "from_pretrained"
                and spec.pretrained_model_name_or_path is not None
                and getattr(self, name, None) is None
            ]
        super().load_components(names=names, workflow=workflow, **kwargs)

    def update_components(self, **components) -> None:
        """Upstream's `update_components`; a `delta_adapter` among them is put in place as a classic Delta pipeline's
        `__init__` takes one: as it is (an adapter in training stays trainable, in its dtype), checked against the
        transformer and the `image_encoder` (given here or before), the transformer routed through it. A saved
        adapter loads with `load_delta_adapter`.

        Args:
            components: the components by name, as upstream's (`transformer=...`, `delta_adapter=...`, ...).
        """
        if "delta_adapter" in components and components["delta_adapter"] is None:
            raise ValueError("update_components(delta_adapter=None) would leave the processors in place: call "
                             "unload_delta_adapter() to take the adapter off.")  # fmt: skip
        adapter = components.pop("delta_adapter", None)
        if adapter is not None:
            image_encoder = components.get("image_encoder", getattr(self, "image_encoder", None))
            if image_encoder is None:
                raise ValueError("A delta_adapter needs its image_encoder: pass both, or use load_delta_adapter.")
            if components.get("feature_extractor", getattr(self, "feature_extractor", None)) is None:
                components["feature_extractor"] = default_feature_extractor(image_encoder)  # as loading does
        if components:
            super().update_components(**components)
        if adapter is not None:
            self._adopt_delta_adapter(adapter)  # checked first: one that does not fit is not registered
            self._set_delta_components(delta_adapter=adapter)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Sets the progress bars' tqdm arguments (e.g. `disable=True`): the denoise loop's, wherever it sits among
        the blocks (upstream's reaches only the top level, not a loop inside auto blocks), and adaptation's."""

        def configure(blocks) -> None:
            for block in getattr(blocks, "sub_blocks", {}).values():
                if hasattr(block, "set_progress_bar_config"):
                    block.set_progress_bar_config(**kwargs)
                configure(block)

        configure(self._blocks)  # the blocks that run (`blocks` gives a copy)
        self._delta_progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with the pipeline's settings, as `DiffusionPipeline.progress_bar` gives (adaptation's steps)."""
        return tqdm(iterable=iterable, total=total, **getattr(self, "_delta_progress_bar_config", {}))


class FluxDeltaModularPipeline(DeltaModularPipelineMixin, Flux2KleinModularPipeline):
    """A `Flux2KleinModularPipeline` that edits by example: `pipe(image=query, exemplar=(source, target))`.

    Its default blocks are `Flux2KleinAutoBlocks` with the Delta-Adapter step and the stored empty prompt
    (`delta_blocks`); for the same inputs, seed and adapter it gives `FluxDeltaEditPipeline`'s output bit for bit.
    """

    backbone = flux2.NAME
    upstream_blocks = Flux2KleinAutoBlocks


class FluxKontextDeltaModularPipeline(DeltaModularPipelineMixin, FluxKontextModularPipeline):
    """A `FluxKontextModularPipeline` that edits by example: `pipe(image=query, exemplar=(source, target))`.

    Its default blocks are `FluxKontextAutoBlocks` with the Delta-Adapter step and the stored empty prompt (T5's
    embeddings and CLIP's pooled ones); for the same inputs, seed, size and adapter it gives
    `FluxKontextDeltaEditPipeline`'s output bit for bit. Upstream's modular Kontext resizes the query to Kontext's
    preferred resolution unless `_auto_resize=False`.
    """

    backbone = flux1.NAME
    upstream_blocks = FluxKontextAutoBlocks


class Flux3DeltaModularPipeline(DeltaModularPipelineMixin, Flux3ModularPipeline):
    """A `Flux3ModularPipeline` that edits by example: `pipe(image=query, exemplar=(source, target))`.

    Its default blocks are `Flux3AutoBlocks` with the Delta-Adapter step and the stored empty prompt (Qwen3-VL's), the
    prompt upsampler dropped. Text-free, classifier-free guidance between two empty prompts would change nothing at
    twice the cost, so its guider is a `NoEditGuidance` (from "no edit" towards the exemplar's edit, at upstream's
    scale), disabled: `pipe.guider.enable()` turns it on.
    """

    backbone = flux3.NAME
    upstream_blocks = Flux3AutoBlocks

    def __init__(self, blocks: SequentialPipelineBlocks | None = None, pretrained_model_name_or_path=None, **kwargs):
        super().__init__(blocks, pretrained_model_name_or_path, **kwargs)
        guider = getattr(self, "guider", None)
        if guider is not None and "text_encoder" not in self._component_specs:
            guidance = NoEditGuidance.from_config(guider.config)  # upstream's settings, the scale among them
            guidance.disable()
            self.update_components(guider=guidance)


class Flux3DistilledDeltaModularPipeline(DeltaModularPipelineMixin, Flux3DistilledModularPipeline):
    """A `Flux3DistilledModularPipeline` (the step-distilled, flow-map FLUX.3: 16 steps, no guidance) that edits by
    example: `pipe(image=query, exemplar=(source, target))`. Its default blocks are `Flux3DistilledAutoBlocks` with the
    Delta-Adapter step and the stored empty prompt, the prompt upsampler dropped."""

    backbone = flux3.NAME
    upstream_blocks = Flux3DistilledAutoBlocks
