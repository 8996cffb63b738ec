import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

from diffusers_delta import Flux2DeltaAttnProcessor, Flux2DeltaParallelSelfAttnProcessor
from diffusers_delta.testing import randomize_, tiny_adapter, tiny_transformer


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
