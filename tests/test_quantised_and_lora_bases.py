"""Bases as users run them: klein quantised with torchao (int8 weight-only), klein loaded from a GGUF file (Q8_0, as
the community publishes it), and klein with a LoRA of the user's own beside the adapter, in either load order."""

import gguf
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, GGUFQuantizationConfig
from diffusers.loaders.single_file_utils import swap_scale_shift
from peft import LoraConfig

from diffusers_delta import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from diffusers_delta.testing import (
    TEXT_KWARGS,
    random_image,
    tiny_delta_pipeline,
    tiny_klein_components,
    tiny_transformer,
)


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def render(pipe, **kwargs):
    return pipe(QUERY, exemplar=(SOURCE, TARGET), generator=torch.Generator().manual_seed(0), output_type="np",
                **TEXT_KWARGS, **kwargs).images  # fmt: skip


def klein(pipe):
    """Upstream klein's own output on the same weights (no adapter branch)."""
    return Flux2KleinPipeline.__call__(pipe, image=QUERY, prompt="", generator=torch.Generator().manual_seed(0),
                                       output_type="np", num_inference_steps=4,
                                       **TEXT_KWARGS).images  # fmt: skip


def test_an_int8_weight_only_transformer_edits_adapts_and_keeps_scale_0_exact():
    quantization = pytest.importorskip(
        "torchao.quantization",
        reason="pip install torchao to run it (not in the test extra: beside torch's CPU build, torchao 0.18 prints "
        "library-load warnings at every import of diffusers)",
    )
    pipe = tiny_delta_pipeline(adapter_std=0.3)
    quantization.quantize_(pipe.transformer, quantization.Int8WeightOnlyConfig())
    assert "Int8" in type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__
    assert (render(pipe, delta_scale=0.0) == klein(pipe)).all()  # the quantised klein, bit for bit
    assert not (render(pipe) == klein(pipe)).all()
    frozen = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    result = pipe.adapt_to_exemplar(SOURCE, TARGET, num_steps=2, generator=torch.Generator().manual_seed(0),
                                    **TEXT_KWARGS)  # fmt: skip
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[name].dequantize() if hasattr(after[name], "dequantize") else after[name],
                           tensor.dequantize() if hasattr(tensor, "dequantize") else tensor)
               for name, tensor in frozen.items())  # fmt: skip


@pytest.fixture
def adapter_folder(tmp_path):
    pipe = tiny_delta_pipeline(adapter_std=0.3)
    pipe.empty_prompt_embeds = compute_empty_prompt_embeds(pipe, **TEXT_KWARGS)
    pipe.save_delta_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


# diffusers' names -> Black Forest Labs' names (the layout of published klein checkpoints and their GGUF files),
# the inverse of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`.
BFL_NAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "attn.to_out.0": "img_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "attn.to_add_out": "txt_attn.proj",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
    "attn.to_qkv_mlp_proj": "linear1",
}
BFL_NORMS = {  # RMSNorm weights are BFL "scale"s, named per block kind
    "transformer_blocks": {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm",
                           "norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"},
    "single_transformer_blocks": {"norm_q": "norm.query_norm", "norm_k": "norm.key_norm"},
}  # fmt: skip
FUSED_QKV = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}


def bfl_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The transformer's weights as a published klein checkpoint names them: fused QKV in double blocks, the
    output modulation as (shift, scale)."""
    state = transformer.state_dict()
    bfl = {}
    for key, tensor in state.items():
        kind, _, rest = key.partition(".")
        if kind in BFL_NORMS:
            index, _, name = rest.removesuffix(".weight").partition(".")
            block = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}[kind]
            if name.removeprefix("attn.") in FUSED_QKV["img"] + FUSED_QKV["txt"]:
                continue  # fused below
            if name.startswith("attn.norm"):
                bfl[f"{block}.{index}.{BFL_NORMS[kind][name.removeprefix('attn.')]}.scale"] = tensor
            else:
                name = "linear2" if (kind, name) == ("single_transformer_blocks", "attn.to_out") else BFL_NAMES[name]
                bfl[f"{block}.{index}.{name}.weight"] = tensor
        elif key == "norm_out.linear.weight":
            bfl["final_layer.adaLN_modulation.1.weight"] = swap_scale_shift(tensor, 0)
        else:
            bfl[f"{BFL_NAMES[key.removesuffix('.weight')]}.weight"] = tensor
    for index in range(len(transformer.transformer_blocks)):
        for stream, names in FUSED_QKV.items():
            fused = [state[f"transformer_blocks.{index}.attn.{name}.weight"] for name in names]
            bfl[f"double_blocks.{index}.{stream}_attn.qkv.weight"] = torch.cat(fused)
    return bfl


def write_q8_gguf(transformer, path) -> None:
    """Writes the transformer as a GGUF file in the published layout: matrices whose rows fill Q8_0 blocks (32
    values) quantised to Q8_0, the rest (norms, the narrow input projections) in float32, as community files keep
    them."""
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in bfl_state_dict(transformer).items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_q8_transformer_edits_adapts_and_unloads_exactly(tmp_path, adapter_folder):
    full_precision = tiny_transformer()
    write_q8_gguf(full_precision, tmp_path / "klein-Q8_0.gguf")
    full_precision.save_config(tmp_path / "klein" / "transformer")  # the base's folder, whose config `config=` reads
    transformer = Flux2Transformer2DModel.from_single_file(
        str(tmp_path / "klein-Q8_0.gguf"), config=str(tmp_path / "klein"), subfolder="transformer",
        torch_dtype=torch.float32, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
    )  # fmt: skip
    assert type(transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "GGUFParameter"
    pipe = FluxDeltaEditPipeline(**{**tiny_klein_components(), "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    quantised_klein = klein(pipe)
    pipe.load_delta_adapter(adapter_folder)
    assert (render(pipe, delta_scale=0.0) == quantised_klein).all()  # the GGUF klein, bit for bit
    edited = render(pipe)
    reference = fresh()
    reference.load_delta_adapter(adapter_folder)
    full_edit = render(reference)
    # The edit survives Q8_0: its output lies far nearer the full-precision edit than the unedited base.
    assert abs(edited - full_edit).mean() < 0.5 * abs(edited - quantised_klein).mean()

    frozen = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    result = pipe.adapt_to_exemplar(SOURCE, TARGET, num_steps=2, generator=torch.Generator().manual_seed(0),
                                    **TEXT_KWARGS)  # fmt: skip
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in frozen.items())
    pipe.unload_delta_adapter()
    assert (klein(pipe) == quantised_klein).all()


def add_user_lora(pipe):
    """The user's own klein LoRA ("style"), with non-zero weights."""
    pipe.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_v"]),
        adapter_name="style",
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B.style" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def fresh():
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_users_lora_and_the_adapter_agree_in_either_load_order_and_unload_exactly(adapter_folder):
    lora_first = fresh()
    add_user_lora(lora_first)
    with_lora_only = klein(lora_first)
    lora_first.load_delta_adapter(adapter_folder)
    adapter_first = fresh()
    adapter_first.load_delta_adapter(adapter_folder)
    add_user_lora(adapter_first)
    both = render(lora_first)
    assert (render(adapter_first) == both).all() and not (both == with_lora_only).all()
    assert (render(lora_first, delta_scale=0.0) == with_lora_only).all()  # the LoRA'd base, bit for bit

    adapter_first.unload_delta_adapter()  # the user's LoRA stays, and gives what it gave alone
    assert (klein(adapter_first) == with_lora_only).all()
    lora_first.delete_adapters("style")  # the adapter stays, and gives what it gives on the bare base
    alone = fresh()
    alone.load_delta_adapter(adapter_folder)
    assert (render(lora_first) == render(alone)).all()


def test_fusing_and_unfusing_a_users_lora_beside_the_adapter(adapter_folder):
    pipe = fresh()
    add_user_lora(pipe)
    pipe.load_delta_adapter(adapter_folder)
    both = render(pipe)
    pipe.fuse_lora(adapter_names=["style"])  # into the weights: the same edit, to float rounding
    torch.testing.assert_close(render(pipe), both, atol=2 / 255, rtol=0)
    pipe.unfuse_lora()
    torch.testing.assert_close(render(pipe), both, atol=2 / 255, rtol=0)
    assert pipe.delta_adapter is not None and "style" in pipe.transformer.peft_config
