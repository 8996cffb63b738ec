#!/usr/bin/env python
"""Wall time of an edit on Modular Diffusers against the classic pipeline, measured side by side.

Four pipelines with identical weights (the `SMALL` CPU configuration of `diffusers_delta.testing`, a trained-like
random adapter) edit the same 256x256 query with the same seed, 4 steps, in interleaved runs:

- `Flux2KleinPipeline` and upstream's `Flux2KleinModularPipeline` (no adapter): what the modular framework costs;
- `FluxDeltaEditPipeline` and `FluxDeltaModularPipeline` (text-free blocks with the Delta-Adapter step): what the
  step costs on top of it.

Medians are printed with their ratios. Goal: the modular Delta-Adapter pipeline's ratio to the classic one is no
larger than upstream's modular pipeline's ratio to its classic one (the step adds no time of its own).

    python benchmarks/modular_overhead.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from diffusers import Flux2KleinPipeline
from diffusers.modular_pipelines import Flux2KleinAutoBlocks
from overhead import timed

from diffusers_delta.modular import FluxDeltaModularPipeline
from diffusers_delta.testing import SMALL, TEXT_KWARGS, random_image, tiny_delta_pipeline


BASE_COMPONENTS = ("vae", "transformer", "scheduler", "text_encoder", "tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    classic = tiny_delta_pipeline(SMALL, adapter_std=0.05)
    classic.encode_empty_prompt(**TEXT_KWARGS)
    base = {name: classic.components[name] for name in BASE_COMPONENTS}
    plain = Flux2KleinPipeline(**base, is_distilled=True)
    blocks = Flux2KleinAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")  # the prompt's embeddings are given, as to the three others
    upstream = blocks.init_pipeline()
    upstream.update_components(**{name: base[name] for name in ("vae", "transformer", "scheduler")})
    modular = FluxDeltaModularPipeline()
    modular.update_components(**{name: base[name] for name in ("vae", "transformer", "scheduler")})
    with tempfile.TemporaryDirectory() as folder:
        classic.save_delta_adapter(folder)
        modular.load_delta_adapter(folder)
    for pipe in (classic, plain, upstream, modular):
        pipe.set_progress_bar_config(disable=True)

    size = (SMALL.image_size, SMALL.image_size)
    query, exemplar = random_image(0, size), (random_image(1, size), random_image(2, size))
    prompt_embeds = classic.empty_prompt_embeds
    steps = {"num_inference_steps": 4, "height": size[0], "width": size[1]}

    def generator():
        return torch.Generator().manual_seed(0)

    runs = {
        "Flux2KleinPipeline": lambda: plain(
            image=query, prompt_embeds=prompt_embeds, generator=generator(), output_type="np", **steps
        ),
        "Flux2KleinModularPipeline": lambda: upstream(
            image=query, prompt_embeds=prompt_embeds, generator=generator(), output="images", **steps
        ),
        "FluxDeltaEditPipeline": lambda: classic(
            query, exemplar=exemplar, generator=generator(), output_type="np", **steps, **TEXT_KWARGS
        ),
        "FluxDeltaModularPipeline": lambda: modular(
            image=query, exemplar=exemplar, generator=generator(), output="images", **steps
        ),
    }
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(timed(run))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:<28} {median * 1000:8.1f} ms")
    upstream_ratio = medians["Flux2KleinModularPipeline"] / medians["Flux2KleinPipeline"]
    delta_ratio = medians["FluxDeltaModularPipeline"] / medians["FluxDeltaEditPipeline"]
    print(f"modular / classic, upstream klein:  {upstream_ratio:.3f}x")
    print(f"modular / classic, Delta-Adapter:   {delta_ratio:.3f}x")
    print(f"the step's own share: {100 * (delta_ratio / upstream_ratio - 1):+.1f}% (goal: within the noise, about 0)")


if __name__ == "__main__":
    main()
