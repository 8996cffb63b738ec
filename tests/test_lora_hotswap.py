"""LoRA hotswap under `torch.compile` beside Delta-Adapter: a user swaps klein LoRAs into the compiled transformer
(`enable_lora_hotswap`, `load_lora_weights(..., hotswap=True)`) with the adapter loaded, without recompiling, and
gets what a fresh load of that LoRA gives."""

import torch
from diffusers import Flux2KleinPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_delta.testing import TEXT_KWARGS, random_image, randomize_, tiny_delta_pipeline, tiny_transformer


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def save_lora(folder, seed):
    """A klein LoRA file of non-zero weights on the attention keys and values."""
    transformer = tiny_transformer()
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_v"])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    Flux2KleinPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder


def pipeline():
    pipe = tiny_delta_pipeline()
    randomize_(pipe.delta_adapter)
    return pipe


def edit(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(QUERY, exemplar=(SOURCE, TARGET), generator=generator, output_type="pt", **TEXT_KWARGS).images


def test_hotswapping_a_lora_into_the_compiled_transformer_beside_the_adapter(tmp_path):
    first, second = save_lora(tmp_path / "first", 1), save_lora(tmp_path / "second", 2)
    pipe = pipeline()
    pipe.enable_lora_hotswap(target_rank=4)
    pipe.load_lora_weights(first, adapter_name="style")
    pipe.transformer.compile(fullgraph=True, backend="eager")
    with_first = edit(pipe)
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.load_lora_weights(second, adapter_name="style", hotswap=True)
        with_second = edit(pipe)
        again = edit(pipe)
    fresh = pipeline()
    fresh.load_lora_weights(second, adapter_name="style")
    torch.testing.assert_close(with_second, edit(fresh), rtol=0, atol=1e-6)
    assert (with_second == again).all() and (with_second - with_first).abs().max() > 1e-3
