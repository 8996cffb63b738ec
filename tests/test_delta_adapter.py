import pytest
import torch

from diffusers_delta.backbones import adapter_config_for, adapter_mismatches
from diffusers_delta.models.delta_adapter import (
    DeltaAdapterModel,
    DeltaBlockProjection,
    GatedResidualRefiner,
    PerceiverResampler,
    PerTokenProjection,
)
from diffusers_delta.testing import randomize_, tiny_adapter, tiny_transformer


def test_shapes_through_every_module():
    delta = torch.randn(3, 16, 32)  # (B, P, D_enc)
    assert GatedResidualRefiner(32)(delta).shape == (3, 16, 32)
    resampler = PerceiverResampler(input_dim=32, dim=24, depth=2, heads=2, head_dim=8, num_latents=5, ff_mult=2)
    assert resampler(delta).shape == (3, 5, 24)
    assert PerTokenProjection(num_tokens=5, input_dim=24, output_dim=40)(torch.randn(3, 5, 24)).shape == (3, 5, 40)
    key, value = DeltaBlockProjection(edit_token_dim=40, inner_dim=32, head_dim=16)(torch.randn(3, 5, 40))
    assert key.shape == value.shape == (3, 5, 2, 16)

    adapter = tiny_adapter(tiny_transformer())
    assert adapter(delta).shape == (3, 4, 32)  # (B, N, D_edit = transformer inner dim)
    assert len(adapter.double_blocks) == 1 and len(adapter.single_blocks) == 2


def test_refiner_starts_as_identity_and_gate_is_bounded():
    refiner = GatedResidualRefiner(8)
    delta = torch.randn(2, 3, 8)
    assert torch.equal(refiner(delta), delta)
    with torch.no_grad():
        refiner.gate.fill_(1e6)
    torch.testing.assert_close(refiner(delta), delta + refiner.proj(delta))  # tanh(α) saturates at 1


def test_per_token_projection_is_one_affine_map_per_token():
    projection = PerTokenProjection(num_tokens=3, input_dim=4, output_dim=2)
    tokens = torch.randn(2, 3, 4)
    out = projection(tokens)
    for i in range(3):
        expected = tokens[:, i] @ projection.weight[i] + projection.bias[i]
        torch.testing.assert_close(out[:, i], expected)


def test_fresh_block_projection_adds_nothing():
    key, value = DeltaBlockProjection(edit_token_dim=8, inner_dim=16, head_dim=8)(torch.randn(1, 4, 8))
    assert value.abs().max() == 0 and key.abs().max() > 0


def test_config_records_the_backbone_signature():
    transformer = tiny_transformer()
    config = adapter_config_for(transformer, image_embed_dim=32)
    assert config == {
        "backbone": "flux2",
        "image_embed_dim": 32,
        "edit_token_dim": 32,
        "transformer_inner_dim": 32,
        "transformer_head_dim": 16,
        "num_double_blocks": 1,
        "num_single_blocks": 2,
    }
    adapter = tiny_adapter(transformer)
    assert adapter_mismatches(adapter.config, transformer, 32) == []
    other = DeltaAdapterModel.from_config({**adapter.config, "num_single_blocks": 3, "transformer_head_dim": 8})
    assert adapter_mismatches(other.config, transformer, 48) == [
        "image_embed_dim: adapter has 32, backbone has 48",
        "transformer_head_dim: adapter has 8, backbone has 16",
        "num_single_blocks: adapter has 3, backbone has 2",
    ]


def test_defaults_fit_klein_4b_and_inner_dim_must_split_into_heads():
    with torch.device("meta"):
        adapter = DeltaAdapterModel()
    assert (
        adapter.config.transformer_inner_dim,
        adapter.config.num_double_blocks,
        adapter.config.num_single_blocks,
    ) == (3072, 5, 20)
    with pytest.raises(ValueError, match="multiple"):
        DeltaAdapterModel(transformer_inner_dim=100, transformer_head_dim=16, num_double_blocks=0, num_single_blocks=0)


def test_save_then_load_round_trips_weights_and_config(tmp_path):
    adapter = randomize_(tiny_adapter(tiny_transformer()))
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DeltaAdapterModel.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(adapter.config)
    original, reloaded = adapter.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


def test_adapter_parameter_names_carry_the_delta_prefix():
    names = [name for name, _ in tiny_adapter(tiny_transformer()).named_parameters() if "blocks." in name]
    leaf_names = {name.split(".")[-2] for name in names if name.endswith("weight")}
    assert leaf_names == {"to_k_delta", "to_v_delta", "norm_k_delta"}
    assert not any(name.split(".")[-2] in {"to_k", "to_v", "to_out"} for name in names)  # not LoRA target names


def test_pooled_mlp_ablation_has_the_same_interface():
    config = {**adapter_config_for(tiny_transformer(), 32), "num_edit_tokens": 4}
    pooled = DeltaAdapterModel(**config, resampler_dim=16, projection_type="pooled_mlp")
    assert pooled(torch.randn(2, 16, 32)).shape == (2, 4, 32)
    assert not hasattr(pooled, "resampler") and len(pooled.single_blocks) == 2
    with pytest.raises(ValueError, match="projection_type"):
        DeltaAdapterModel(**config, projection_type="mlp")
