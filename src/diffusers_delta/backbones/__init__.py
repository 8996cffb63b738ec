"""The backbones Delta-Adapter runs on, one module each, all with the same names:

- `NAME` (recorded in an adapter's config), `DISPLAY_NAME` (for messages), `TRANSFORMER_CLASS`, `VAE_CLASS`,
  `TEXT_COMPONENTS` (the pipeline components that encode a prompt), `BASE_PIPELINES` (the diffusers pipelines
  whose folders hold it), `PIPELINE_CLASS` and `TEXT_ENCODERS` (to build a base's text-only pipeline), and for
  cards `FAMILY`, `DELTA_PIPELINE` and `DEFAULT_BASE`;
- `processors_for(transformer, adapter)`: one Delta-Adapter processor per attention layer the branch runs in (the
  others keep theirs), and `release(transformer)`, what unloading takes off besides them (FLUX.3's pre-hook);
- `block_counts(config)`: the adapter's (double, single) block counts for a transformer config;
- `preprocess_query(pipe, rgb)`: a query sized and normalised as the backbone's pipeline does its reference image;
- `encode_prompt(pipe, prompt, max_sequence_length, text_encoder_out_layers)`: a prompt's conditioning by name;
- `training_conditioning()`: what the objective adds to the prompt's (FLUX.1: the distilled guidance);
- `encode_latents(vae, pixels)`: images -> the latent grid the objective noises, (B, C', h, w);
- `pack_latents(latents)`: that grid -> the transformer's tokens; `decode_tokens(vae, tokens, h, w)`: back to pixels;
- `predict_velocity(transformer, noisy, reference, text_conditioning, sigmas, joint_attention_kwargs)`: one
  prediction with a reference image, as the backbone's pipeline lays it out.

Everything else (the adapter model, its files and checks, the mixin, adaptation, the training objective) is shared.
This package matches an adapter to a transformer (`adapter_config_for`, `adapter_for`, `adapter_mismatches`): the
adapter model knows no backbone, only the name its config records.
"""

from __future__ import annotations

from types import ModuleType

from ..models.delta_adapter import DeltaAdapterModel
from . import flux1, flux2, flux3


BACKBONES: dict[str, ModuleType] = {module.NAME: module for module in (flux2, flux1, flux3)}


def backbone_of(transformer) -> ModuleType:
    """The backbone module of a transformer (a model or its class), by its class.

    Raises:
        TypeError: a transformer of no known backbone.
    """
    cls = transformer if isinstance(transformer, type) else type(transformer)
    for module in BACKBONES.values():
        if issubclass(cls, module.TRANSFORMER_CLASS):
            return module
    known = ", ".join(module.TRANSFORMER_CLASS.__name__ for module in BACKBONES.values())
    raise TypeError(f"Delta-Adapter runs on {known}, not on a {cls.__name__}.")


def pipeline_class_name(base, **hub_kwargs) -> str:
    """The `_class_name` of a base pipeline folder or Hub repo: its `model_index.json`'s, else its
    `modular_model_index.json`'s (FLUX.3 has only modular pipelines).

    Args:
        base: a folder or Hub id.
        hub_kwargs: `revision`, `cache_dir`, ... as `load_config` takes them.

    Raises:
        OSError: neither index could be read; KeyError: the index names no class.
    """
    from diffusers import DiffusionPipeline
    from diffusers.modular_pipelines import ModularPipeline

    try:
        return DiffusionPipeline.load_config(base, **hub_kwargs)["_class_name"]
    except (OSError, KeyError):
        return ModularPipeline.load_config(base, **hub_kwargs)["_class_name"]


def backbone_of_pipeline(class_name: str) -> ModuleType:
    """The backbone module of a pipeline folder, by its `model_index.json`'s `_class_name`.

    Raises:
        ValueError: a pipeline of no known backbone.
    """
    for module in BACKBONES.values():
        if class_name in module.BASE_PIPELINES:
            return module
    known = ", ".join(name for module in BACKBONES.values() for name in module.BASE_PIPELINES)
    raise ValueError(f"Delta-Adapter runs on the bases of {known}, not on a {class_name}.")


def adapter_config_for(transformer, image_embed_dim: int, **overrides) -> dict:
    """The config dict of a `DeltaAdapterModel` for a transformer and an image encoder width.

    Args:
        transformer: a FLUX transformer of a known backbone (its class names the backbone).
        image_embed_dim: the image encoder's hidden size.
        overrides: any other `DeltaAdapterModel` argument (e.g. `num_edit_tokens=64`).
    """
    config = transformer.config
    inner_dim = config.num_attention_heads * config.attention_head_dim
    backbone = backbone_of(transformer)
    num_double_blocks, num_single_blocks = backbone.block_counts(config)
    signature = {
        "backbone": backbone.NAME,
        "image_embed_dim": image_embed_dim,
        "edit_token_dim": inner_dim,
        "transformer_inner_dim": inner_dim,
        "transformer_head_dim": config.attention_head_dim,
        "num_double_blocks": num_double_blocks,
        "num_single_blocks": num_single_blocks,
    }
    return {**signature, **overrides}


def adapter_for(transformer, image_embed_dim: int, **overrides) -> DeltaAdapterModel:
    """A freshly initialised adapter for `transformer` (see `adapter_config_for` for the arguments)."""
    return DeltaAdapterModel(**adapter_config_for(transformer, image_embed_dim, **overrides))


def adapter_mismatches(adapter_config, transformer, image_embed_dim: int) -> list[str]:
    """What in an adapter config disagrees with a transformer and image encoder width; empty if nothing.

    Args:
        adapter_config: a `DeltaAdapterModel` config (dict or `FrozenDict`; one without `backbone` is FLUX.2's).
        transformer: a FLUX transformer of a known backbone.
        image_embed_dim: the image encoder's hidden size.
    """
    expected = adapter_config_for(transformer, image_embed_dim)
    expected.pop("edit_token_dim")  # free to differ: it only has to agree with the adapter's own K/V inputs
    made_for, backbone = adapter_config.get("backbone", "flux2"), expected.pop("backbone")
    if made_for != backbone:  # the rest is then beside the point
        trained_for = BACKBONES[made_for].DISPLAY_NAME if made_for in BACKBONES else repr(made_for)
        this_one = BACKBONES[backbone].DISPLAY_NAME
        return [f"it was trained for {trained_for}, and this pipeline's transformer is {this_one}"]
    return [
        f"{key}: adapter has {adapter_config.get(key)}, backbone has {value}"
        for key, value in expected.items()
        if adapter_config.get(key) != value
    ]
