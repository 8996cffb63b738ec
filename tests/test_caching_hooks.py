"""diffusers' model hooks on a transformer with Delta-Adapter loaded: the caching hooks (`transformer.enable_cache`),
group offloading and layerwise casting each run, give upstream klein's output with the same hook at scale 0, and let
the edit through. (FirstBlockCache and FasterCache fail on FLUX.2's blocks in diffusers 0.42.1 with or without the
adapter; see docs/using.md.)"""

import numpy as np
import pytest
import torch
from diffusers import MagCacheConfig, SeaCacheConfig, TaylorSeerCacheConfig, TextKVCacheConfig
from diffusers.hooks import PyramidAttentionBroadcastConfig

from diffusers_delta.testing import TEXT_KWARGS, random_image, randomize_, tiny_delta_pipeline, tiny_klein_pipeline


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)
STEPS = 6

HOOKS = {
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2),
    "mag": lambda pipe: MagCacheConfig(num_inference_steps=STEPS, mag_ratios=np.ones(STEPS), threshold=0.5),
    "pyramid_attention_broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
    "text_kv": lambda pipe: TextKVCacheConfig(),
    "sea": lambda pipe: SeaCacheConfig(threshold=0.5),
}


def edit(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        QUERY, exemplar=(SOURCE, TARGET), num_inference_steps=STEPS, generator=generator, output_type="np",
        **TEXT_KWARGS, **kwargs,
    ).images  # fmt: skip


def klein(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        image=QUERY, prompt="", num_inference_steps=STEPS, generator=generator, output_type="np", **TEXT_KWARGS
    ).images


def trained_like_pipeline():
    pipe = tiny_delta_pipeline()
    randomize_(pipe.delta_adapter)
    return pipe


@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_caching_hook_gives_upstreams_output_at_scale_zero_and_lets_the_edit_through(hook):
    pipe, upstream = trained_like_pipeline(), tiny_klein_pipeline()
    pipe.transformer.enable_cache(HOOKS[hook](pipe))
    upstream.transformer.enable_cache(HOOKS[hook](upstream))
    base = klein(upstream)
    assert (edit(pipe, delta_scale=0.0) == base).all()
    edited = edit(pipe)
    assert abs(edited - base).max() > 1e-3
    assert (edit(pipe) == edited).all()  # the hook's state is reset between calls


def test_group_offloading_and_layerwise_casting_keep_the_edit():
    pipe = trained_like_pipeline()
    reference = edit(pipe)
    pipe.transformer.enable_group_offload(
        onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    assert (edit(pipe) == reference).all()

    pipe, upstream = trained_like_pipeline(), tiny_klein_pipeline()
    for transformer in (pipe.transformer, upstream.transformer):
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert (edit(pipe, delta_scale=0.0) == klein(upstream)).all()
    cast = edit(pipe)
    assert abs(cast - klein(upstream)).max() > 1e-3 and abs(cast - reference).max() < 0.2
