"""`FluxDeltaModularPipeline`: klein's modular pipeline with the Delta-Adapter's blocks and its whole interface."""

from __future__ import annotations

import os

from diffusers.modular_pipelines import Flux2KleinModularPipeline, SequentialPipelineBlocks
from tqdm.auto import tqdm

from ..backbones import flux2
from ..loaders import DeltaAdapterMixin
from .blocks import delta_blocks


class FluxDeltaModularPipeline(DeltaAdapterMixin, Flux2KleinModularPipeline):
    """A `Flux2KleinModularPipeline` that edits by example: its blocks are klein's with the Delta-Adapter step
    (`delta_blocks`), and it loads, scales, encodes, adapts, saves and unloads the adapter as `FluxDeltaEditPipeline`
    does (`DeltaAdapterMixin`). Call it as a modular pipeline: `pipe(image=query, exemplar=(source, target))`.

    Args:
        blocks: the pipeline's blocks (default `delta_blocks()`: klein's auto blocks, text-free, with the step).
        pretrained_model_name_or_path: a klein checkpoint (Hub id or folder) whose components `load_components`
            loads.
        kwargs: the rest of `ModularPipeline`'s arguments (`components_manager`, `collection`, ...).
    """

    backbone = flux2.NAME

    def __init__(
        self,
        blocks: SequentialPipelineBlocks | None = None,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        **kwargs,
    ):
        super().__init__(
            blocks=delta_blocks() if blocks is None else blocks,
            pretrained_model_name_or_path=(
                None if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
            ),
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, text_free: bool = True, **kwargs
    ) -> "FluxDeltaModularPipeline":
        """The pipeline for a klein checkpoint, its components to be loaded with `load_components(...)`.

        Args:
            pretrained_model_name_or_path: a FLUX.2 [klein] repo or folder (`model_index.json` or
                `modular_model_index.json`).
            text_free: blocks without the text encoder step (the adapter brings the empty prompt's embeddings).
            kwargs: `ModularPipeline`'s (`components_manager`, `collection`, and the Hub's `revision`, `token`, ...).
        """
        # os.fspath: upstream's modular loading takes a str only (a Path fails deep inside urlparse)
        return cls(delta_blocks(text_free=text_free), os.fspath(pretrained_model_name_or_path), **kwargs)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Sets the progress bars' tqdm arguments (e.g. `disable=True`): the denoise loop's and adaptation's."""
        super().set_progress_bar_config(**kwargs)
        self._delta_progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with the pipeline's settings, as `DiffusionPipeline.progress_bar` gives (adaptation's steps)."""
        return tqdm(iterable=iterable, total=total, **getattr(self, "_delta_progress_bar_config", {}))
