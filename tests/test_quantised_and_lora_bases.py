"""Bases as users run them: klein quantised with torchao (int8 weight-only), and klein with a LoRA of the user's own
beside the adapter, in either load order."""

import pytest
import torch
from diffusers import Flux2KleinPipeline
from peft import LoraConfig

from diffusers_delta import FluxDeltaEditPipeline, compute_empty_prompt_embeds
from diffusers_delta.testing import TEXT_KWARGS, random_image, tiny_delta_pipeline, tiny_klein_components


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
