"""The KV-cached klein (`Flux2KleinKVPipeline`, klein-9B-KV) with Delta-Adapter, and the per-edit K/V cache of the
edit tokens every processor keeps."""

import pytest
import torch
from diffusers import Flux2KleinKVPipeline
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    Flux2ParallelSelfAttnProcessor,
)

from diffusers_delta import Flux2DeltaAttnProcessor, Flux2DeltaParallelSelfAttnProcessor, FluxDeltaKVEditPipeline
from diffusers_delta.attention_processor import EditKeyValues
from diffusers_delta.models.delta_adapter import DeltaBlockProjection
from diffusers_delta.pipelines import delta_pipeline_for
from diffusers_delta.testing import (
    TEXT_KWARGS,
    random_image,
    randomize_,
    tiny_adapter,
    tiny_image_encoder,
    tiny_klein_components,
    tiny_transformer,
)


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def kv_delta_pipeline(adapter_std=0.3, **components) -> FluxDeltaKVEditPipeline:
    pipe = FluxDeltaKVEditPipeline(**{**tiny_klein_components(), **components})
    pipe.register_modules(image_encoder=tiny_image_encoder())
    adapter = randomize_(tiny_adapter(pipe.transformer), std=adapter_std)
    pipe.load_delta_adapter(adapter.state_dict(), adapter_config=dict(adapter.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit(pipe, seed=0, **kwargs):
    kwargs.setdefault("exemplar", (SOURCE, TARGET))
    generator = torch.Generator().manual_seed(seed)
    return pipe(QUERY, generator=generator, output_type="np", **TEXT_KWARGS, **kwargs).images


def count_extractions(transformer) -> list[str]:
    """Records the `kv_cache_mode` of every transformer call."""
    modes = []
    transformer.register_forward_pre_hook(
        lambda module, args, kwargs: modes.append(kwargs.get("kv_cache_mode")), with_kwargs=True
    )
    return modes


def test_scale_zero_is_upstream_kv_pipeline_and_the_cache_is_extracted_once():
    pipe = kv_delta_pipeline()
    upstream = Flux2KleinKVPipeline(**tiny_klein_components())
    upstream.set_progress_bar_config(disable=True)
    base = upstream(
        image=QUERY,
        prompt="",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **TEXT_KWARGS,
    ).images
    modes = count_extractions(pipe.transformer)
    assert (edit(pipe, delta_scale=0.0) == base).all()
    assert modes == ["extract", "cached", "cached", "cached"]
    edited = edit(pipe)
    assert abs(edited - base).max() > 1e-3  # the edit shows through the KV-cached loop


def test_guidance_keeps_keys_and_values_per_pass():
    pipe = kv_delta_pipeline(is_distilled=False)
    modes = count_extractions(pipe.transformer)
    edit(pipe, guidance_scale=2.0, num_inference_steps=3)
    assert modes == ["extract", "extract", "cached", "cached", "cached", "cached"]


@pytest.mark.parametrize("mode", ["extract", "cached"])
def test_the_delta_term_is_the_one_plain_attention_gets(mode):
    """Each token's edit term depends on its own query only, so under KV caching a processor adds what it adds
    without: delta minus upstream is the same in both attentions."""
    transformer = tiny_transformer()
    adapter = randomize_(tiny_adapter(transformer))
    generator = torch.Generator().manual_seed(0)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    txt, ref, img = (torch.randn(1, n, inner, generator=generator) for n in (5, 6, 7))
    edit_tokens = torch.randn(1, 4, adapter.config.edit_token_dim, generator=generator)
    delta = {"delta_hidden_states": edit_tokens}
    cache_store = []

    class Cache:  # the two methods of upstream's layer cache that a processor calls
        def store(self, key, value):
            cache_store[:] = [key, value]

        def get(self):
            return tuple(cache_store)

    for block, delta_cls, kv_cls, plain_cls, kwargs in (
        (0, Flux2DeltaAttnProcessor, Flux2KVAttnProcessor, Flux2AttnProcessor, {}),
        (
            1,
            Flux2DeltaParallelSelfAttnProcessor,
            Flux2KVParallelSelfAttnProcessor,
            Flux2ParallelSelfAttnProcessor,
            {"num_txt_tokens": 5},
        ),
    ):
        if block == 0:
            attn = transformer.transformer_blocks[0].attn
            projection = adapter.double_blocks[0]
            image = torch.cat([ref, img], dim=1) if mode == "extract" else img
            inputs = {"hidden_states": image, "encoder_hidden_states": txt}
        else:
            attn = transformer.single_transformer_blocks[0].attn
            projection = adapter.single_blocks[0]
            joint = torch.cat([txt, ref, img] if mode == "extract" else [txt, img], dim=1)
            inputs = {"hidden_states": joint}
        if mode == "cached":  # what the extract step stored
            kv_cls()(
                attn,
                **{
                    **inputs,
                    "hidden_states": torch.cat([ref, img], 1) if block == 0 else torch.cat([txt, ref, img], 1),
                },
                kv_cache=Cache(),
                kv_cache_mode="extract",
                num_ref_tokens=6,
                **kwargs,
            )
        kv = {"kv_cache": Cache(), "kv_cache_mode": mode, "num_ref_tokens": 6 if mode == "extract" else 0, **kwargs}
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        with torch.no_grad():
            term_kv = first(delta_cls(projection)(attn, **inputs, **kv, **delta)) - first(
                kv_cls()(attn, **inputs, **kv)
            )
            term_plain = first(delta_cls(projection)(attn, **inputs, **delta)) - first(plain_cls()(attn, **inputs))
        assert term_plain.abs().max() > 1e-3
        torch.testing.assert_close(term_kv, term_plain, rtol=0, atol=1e-5)


def test_unload_restores_upstreams_kv_processors_and_kv_bases_get_the_kv_pipeline(tmp_path):
    pipe = kv_delta_pipeline()
    pipe.unload_delta_adapter()
    kinds = {type(processor) for processor in pipe.transformer.attn_processors.values()}
    assert kinds == {Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor}
    Flux2KleinKVPipeline(**tiny_klein_components()).save_pretrained(tmp_path)
    assert delta_pipeline_for(str(tmp_path)) is FluxDeltaKVEditPipeline
    loaded = FluxDeltaKVEditPipeline.from_pretrained(tmp_path)
    assert {type(p) for p in loaded.transformer.attn_processors.values()} == kinds


# ---------------------------------------------------------------- the per-edit K/V cache of the edit tokens


def count_projections(pipe) -> list[int]:
    calls = []
    for module in pipe.delta_adapter.modules():
        if isinstance(module, DeltaBlockProjection):
            module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_edit_keys_and_values_are_projected_once_per_edit_and_give_identical_outputs(delta_pipe, monkeypatch):
    randomize_(delta_pipe.delta_adapter)
    blocks = len(delta_pipe.delta_adapter.double_blocks) + len(delta_pipe.delta_adapter.single_blocks)
    calls = count_projections(delta_pipe)
    cached = edit(delta_pipe, num_inference_steps=4)
    assert len(calls) == blocks  # not blocks x steps
    monkeypatch.setattr(EditKeyValues, "fits", lambda self, sources: False)
    calls.clear()
    assert (edit(delta_pipe, num_inference_steps=4) == cached).all()
    assert len(calls) == 4 * blocks


def test_edit_keys_and_values_follow_a_new_exemplar_a_scale_and_new_weights(delta_pipe):
    randomize_(delta_pipe.delta_adapter)
    first = edit(delta_pipe)
    other_exemplar = edit(delta_pipe, exemplar=(TARGET, SOURCE))
    assert abs(other_exemplar - first).max() > 1e-3
    assert (edit(delta_pipe) == first).all()  # and back
    delta_pipe.set_delta_adapter_scale(0.5)
    half = edit(delta_pipe)
    delta_pipe.set_delta_adapter_scale(1.0)
    assert (edit(delta_pipe, delta_scale=0.5) == half).all() and abs(half - first).max() > 1e-3
    tokens = delta_pipe.encode_exemplar((SOURCE, TARGET))
    before = edit(delta_pipe, exemplar=None, delta_embeds=tokens)
    randomize_(delta_pipe.delta_adapter, seed=7)  # the same tokens, new weights in place
    changed = edit(delta_pipe, exemplar=None, delta_embeds=tokens)
    assert abs(changed - before).max() > 1e-3
    for processor in delta_pipe.delta_processors.values():
        processor._edit_key_values = None  # nothing stored: what fresh processors give
    assert (edit(delta_pipe, exemplar=None, delta_embeds=tokens) == changed).all()
    tokens.mul_(2.0)  # the same tensor, changed in place
    doubled = edit(delta_pipe, exemplar=None, delta_embeds=tokens)
    assert abs(doubled - changed).max() > 1e-3
    for parameter in delta_pipe.delta_adapter.parameters():  # new memory through `.data` (as `.to()` moves
        parameter.data = parameter.data * 1.5  # weights): no version change, yet other weights
    rescaled = edit(delta_pipe, exemplar=None, delta_embeds=tokens)
    assert abs(rescaled - doubled).max() > 1e-3
