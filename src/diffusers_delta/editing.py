"""One way to call any Delta-Adapter pipeline, classic or modular, on a query or a batch of queries."""

from __future__ import annotations

import PIL.Image
import torch
from diffusers.modular_pipelines import ModularPipeline


def edited_images(
    pipe,
    images: PIL.Image.Image | list[PIL.Image.Image],
    generator: torch.Generator | list[torch.Generator] | None = None,
    **kwargs,
) -> list[PIL.Image.Image]:
    """The edits of one query or a list of queries, whatever the pipeline's kind.

    A classic pipeline (`FluxDeltaEditPipeline`, ...) edits the list as one batch and gives its `.images`; a modular
    one (`Flux3DeltaModularPipeline`, ...) gives its `images` output, called once per query of a list, since its
    `image` holds the references of one output, not a batch.

    Args:
        pipe: a Delta-Adapter pipeline with an adapter loaded.
        images: the query, or a list of queries.
        generator: as the pipeline takes it for one query (one, or one per image of `num_images_per_prompt`); for a
            list of queries, one, or one per query.
        kwargs: the rest of the call (`exemplar` or `delta_embeds`, `num_inference_steps`, ...).
    """
    if not isinstance(pipe, ModularPipeline):
        return pipe(images, generator=generator, **kwargs).images
    if not isinstance(images, list):
        return pipe(image=images, generator=generator, output="images", **kwargs)
    generators = generator if isinstance(generator, list) else [generator] * len(images)
    if len(generators) != len(images):
        raise ValueError(f"{len(generators)} generators for {len(images)} queries: give one per query, or one.")
    edited = []
    for query, query_generator in zip(images, generators):
        edited.extend(pipe(image=query, generator=query_generator, output="images", **kwargs))
    return edited
