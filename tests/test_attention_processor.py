import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

from diffusers_delta import Flux2DeltaAttnProcessor, Flux2DeltaParallelSelfAttnProcessor, FluxDeltaAttnProcessor
from diffusers_delta.backbones import backbone_of
from diffusers_delta.testing import (
    KONTEXT_TEXT_KWARGS,
    TEXT_KWARGS,
    random_image,
    randomize_,
    tiny_adapter,
    tiny_delta_pipeline,
    tiny_flux_transformer,
    tiny_transformer,
)


@pytest.fixture(scope="module")
def blocks():
    transformer = tiny_transformer()
    adapter = randomize_(tiny_adapter(transformer))
    return transformer.transformer_blocks[0].attn, transformer.single_transformer_blocks[0].attn, adapter


def _rotary(length: int, head_dim: int = 16):
    angles = torch.randn(length, head_dim)
    return angles.cos(), angles.sin()


def _double_inputs():
    torch.manual_seed(0)
    image, text = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    return image, text, _rotary(9)


def test_double_stream_without_delta_equals_upstream(blocks):
    attn, _, adapter = blocks
    image, text, rotary = _double_inputs()
    upstream = Flux2AttnProcessor()(attn, image, text, image_rotary_emb=rotary)
    ours = Flux2DeltaAttnProcessor(adapter.double_blocks[0])
    edit_tokens = torch.randn(2, 4, 32)
    for result in (
        ours(attn, image, text, image_rotary_emb=rotary),
        ours(attn, image, text, image_rotary_emb=rotary, delta_hidden_states=edit_tokens, delta_scale=0.0),
        Flux2DeltaAttnProcessor(adapter.double_blocks[0], scale=0.0)(
            attn, image, text, image_rotary_emb=rotary, delta_hidden_states=edit_tokens
        ),
    ):
        assert len(result) == 2
        assert torch.equal(result[0], upstream[0]) and torch.equal(result[1], upstream[1])


def test_double_stream_branch_is_the_decoupled_attention(blocks):
    attn, _, adapter = blocks
    image, text, rotary = _double_inputs()
    edit_tokens = torch.randn(2, 4, 32)
    processor = Flux2DeltaAttnProcessor(adapter.double_blocks[0], scale=0.7)
    edited_image, edited_text = processor(
        attn, image, text, image_rotary_emb=rotary, delta_hidden_states=edit_tokens, delta_scale=2.0
    )
    upstream_image, upstream_text = Flux2AttnProcessor()(attn, image, text, image_rotary_emb=rotary)
    assert torch.equal(edited_text, upstream_text)  # only the image stream reads the edit tokens

    # The reference: softmax(Q K_Δᵀ/√d) V_Δ with the block's query after norm_q, before RoPE, through to_out.
    query = attn.norm_q(attn.to_q(image).unflatten(-1, (2, 16))).transpose(1, 2)  # (B, H, S, D)
    key, value = adapter.double_blocks[0](edit_tokens)
    branch = torch.nn.functional.scaled_dot_product_attention(query, key.transpose(1, 2), value.transpose(1, 2))
    expected = upstream_image + 1.4 * (branch.transpose(1, 2).flatten(2) @ attn.to_out[0].weight.T)
    torch.testing.assert_close(edited_image, expected, atol=1e-5, rtol=1e-5)


def test_single_stream_without_delta_equals_upstream_and_with_delta_differs(blocks):
    _, attn, adapter = blocks
    torch.manual_seed(0)
    tokens, rotary = torch.randn(2, 9, 32), _rotary(9)
    upstream = Flux2ParallelSelfAttnProcessor()(attn, tokens, image_rotary_emb=rotary)
    processor = Flux2DeltaParallelSelfAttnProcessor(adapter.single_blocks[0])
    assert torch.equal(processor(attn, tokens, image_rotary_emb=rotary), upstream)
    edited = processor(attn, tokens, image_rotary_emb=rotary, delta_hidden_states=torch.randn(2, 4, 32))
    assert edited.shape == upstream.shape and not torch.allclose(edited, upstream)


def test_transformer_forward_routes_the_kwargs_to_every_block(blocks):
    """Through the real Flux2Transformer2DModel forward: the named kwargs reach the processors, no warning."""
    transformer = tiny_transformer()
    adapter = randomize_(tiny_adapter(transformer))
    inputs = {
        "hidden_states": torch.randn(1, 8, 16),
        "encoder_hidden_states": torch.randn(1, 3, 48),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.cartesian_prod(torch.arange(1), torch.arange(2), torch.arange(4), torch.arange(1)),
        "txt_ids": torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(3)),
        "return_dict": False,
    }
    with torch.no_grad():
        base = transformer(**inputs)[0]
        transformer.set_attn_processor(
            {
                "transformer_blocks.0.attn.processor": Flux2DeltaAttnProcessor(adapter.double_blocks[0]),
                "single_transformer_blocks.0.attn.processor": Flux2DeltaParallelSelfAttnProcessor(
                    adapter.single_blocks[0]
                ),
                "single_transformer_blocks.1.attn.processor": Flux2DeltaParallelSelfAttnProcessor(
                    adapter.single_blocks[1]
                ),
            }
        )
        kwargs = {"delta_hidden_states": torch.randn(1, 4, 32), "delta_scale": 1.0}
        edited = transformer(**inputs, joint_attention_kwargs=kwargs)[0]
        unedited = transformer(**inputs, joint_attention_kwargs={**kwargs, "delta_scale": 0.0})[0]
    assert torch.equal(unedited, base)
    assert not torch.allclose(edited, base)


@pytest.fixture(scope="module")
def flux1_blocks():
    transformer = tiny_flux_transformer()
    adapter = randomize_(tiny_adapter(transformer))
    return transformer.transformer_blocks[0].attn, transformer.single_transformer_blocks[0].attn, adapter


def test_flux1_double_stream_is_upstream_plus_the_decoupled_attention(flux1_blocks):
    attn, _, adapter = flux1_blocks
    image, text, rotary = _double_inputs()
    upstream_image, upstream_text = FluxAttnProcessor()(attn, image, text, image_rotary_emb=rotary)
    processor = FluxDeltaAttnProcessor(adapter.double_blocks[0], scale=0.7)
    edit_tokens = torch.randn(2, 4, 32)
    unedited = processor(attn, image, text, image_rotary_emb=rotary, delta_hidden_states=edit_tokens, delta_scale=0)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(unedited, (upstream_image, upstream_text)))

    edited_image, edited_text = processor(
        attn, image, text, image_rotary_emb=rotary, delta_hidden_states=edit_tokens, delta_scale=2.0
    )
    assert torch.equal(edited_text, upstream_text)  # only the image stream reads the edit tokens
    query = attn.norm_q(attn.to_q(image).unflatten(-1, (2, 16))).transpose(1, 2)  # (B, H, S, D), before RoPE
    key, value = adapter.double_blocks[0](edit_tokens)
    branch = torch.nn.functional.scaled_dot_product_attention(query, key.transpose(1, 2), value.transpose(1, 2))
    expected = upstream_image + 1.4 * (branch.transpose(1, 2).flatten(2) @ attn.to_out[0].weight.T)
    torch.testing.assert_close(edited_image, expected, atol=1e-5, rtol=1e-5)


def test_flux1_single_stream_adds_the_branch_to_the_attention_output(flux1_blocks):
    _, attn, adapter = flux1_blocks
    torch.manual_seed(0)
    tokens, rotary, edit_tokens = torch.randn(2, 9, 32), _rotary(9), torch.randn(2, 4, 32)
    upstream = FluxAttnProcessor()(attn, tokens, image_rotary_emb=rotary)
    processor = FluxDeltaAttnProcessor(adapter.single_blocks[0])
    assert torch.equal(processor(attn, tokens, image_rotary_emb=rotary), upstream)
    query = attn.norm_q(attn.to_q(tokens).unflatten(-1, (2, 16))).transpose(1, 2)  # every token's query
    key, value = adapter.single_blocks[0](edit_tokens)
    branch = torch.nn.functional.scaled_dot_product_attention(query, key.transpose(1, 2), value.transpose(1, 2))
    edited = processor(attn, tokens, image_rotary_emb=rotary, delta_hidden_states=edit_tokens)
    torch.testing.assert_close(edited, upstream + branch.transpose(1, 2).flatten(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["flux2", "flux1"])
def test_the_transformer_compiles_whole_without_graph_breaks(backbone):
    """`torch.compile(fullgraph=True)` traces the transformer with the adapter's processors in one graph (the eager
    backend: the tracing is what is checked, not a compiler), and the compiled edit equals the eager one."""
    pipe = tiny_delta_pipeline(adapter_std=0.3, backbone=backbone)
    conditioning = pipe._text_conditioning("", **(TEXT_KWARGS if backbone == "flux2" else KONTEXT_TEXT_KWARGS))
    conditioning.update(backbone_of(pipe.transformer).training_conditioning())
    latents = torch.randn(1, 16, 8, 8) if backbone == "flux2" else torch.randn(1, 4, 16, 16)  # patchified or not
    kwargs = {"delta_hidden_states": pipe.encode_exemplar((random_image(1), random_image(2)))}
    predict = backbone_of(pipe.transformer).predict_velocity
    with torch.no_grad():
        eager = predict(pipe.transformer, latents, latents, conditioning, torch.tensor([0.5]), kwargs)[0]
        torch._dynamo.reset()
        compiled = torch.compile(pipe.transformer, fullgraph=True, backend="eager")
        traced = predict(compiled, latents, latents, conditioning, torch.tensor([0.5]), kwargs)[0]
    torch.testing.assert_close(traced, eager)
