#!/usr/bin/env python
"""FLOPs and training memory of Delta-Adapter at real size, counted from the project's own code paths.

The real FLUX.2 [klein] 4B and 9B transformers and FLUX.2 VAE, FLUX.1 Kontext [dev]'s transformer and VAE, or
FLUX.3's transformer (diffusers' `Flux3Transformer2DModel` defaults, its published config; the distilled flow-map
variant too) with the FLUX.2 VAE, SigLIP-so400m and the adapter are built on the `meta` device (no weights, no
download), in bfloat16. What runs is the library itself: the pipeline's `__call__` for an edit (klein:
`FluxDeltaEditPipeline`, 4 steps; Kontext: `FluxKontextDeltaEditPipeline`, 28 steps; the padded empty prompt of 512
tokens; FLUX.3: `Flux3DeltaModularPipeline`, 50 steps without guidance, or the distilled one's 16, the empty prompt
padded to 80 tokens), `_encode_pair_for_training` and one forward and backward of `DeltaAdapterObjective` for an
adaptation step, as `adapt_to_exemplar` runs it on CUDA.
Beside Kontext, RelationAdapter's edit (FLUX.1-dev, 24 steps, the source's tokens in context as Kontext lays its
reference, SigLIP and a decoupled branch like ours; its unmerged LoRA not counted) is estimated from the same counts.
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and attention;
elementwise work is not counted). Memory: weights and the adapter's optimizer state are counted from the parameters;
activations are the peak of a training step on `meta`, every tensor followed from its creation to its release
(`TensorMemory`: recomputation inside checkpointed regions included, and the gradients made; the suite checks the
count against peaks measured on the CPU). Not counted, and to be added from experience: the CUDA context and
allocator slack (about 2-4 GB), and transient buffers inside fused kernels.

    python benchmarks/real_scale.py [--backbones klein-4B klein-9B kontext-dev flux3 flux3-distilled]
        [--sizes 512 1024] [--batches 1 4 16]
"""

from __future__ import annotations

import argparse
import itertools
import weakref
from contextlib import contextmanager

import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    Flux3Transformer2DModel,
    FluxTransformer2DModel,
)
from diffusers.modular_pipelines import ModularPipeline
from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids
from param_count import KLEIN_CONFIGS, KONTEXT_TRANSFORMER, SIGLIP_SO400M_HIDDEN
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from transformers import SiglipVisionConfig, SiglipVisionModel

from diffusers_delta import FluxDeltaEditPipeline, FluxKontextDeltaEditPipeline
from diffusers_delta.adaptation import AdaptationConfig
from diffusers_delta.adapter_files import default_feature_extractor
from diffusers_delta.attention_processor import delta_processors_for
from diffusers_delta.backbones import adapter_for, flux3
from diffusers_delta.data import check_resolution
from diffusers_delta.model_state import cast_model
from diffusers_delta.modular import Flux3DeltaModularPipeline, Flux3DistilledDeltaModularPipeline
from diffusers_delta.semantic_delta import SiglipPreprocessor
from diffusers_delta.testing import tiny_scheduler
from diffusers_delta.training import DeltaAdapterObjective, enable_image_encoder_checkpointing


SIGLIP_SO400M = {  # google/siglip-so400m-patch14-384
    "hidden_size": SIGLIP_SO400M_HIDDEN,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}
PROMPT_TOKENS = 512  # klein and Kontext pad the (empty) prompt to 512 tokens
FLUX3_PROMPT_TOKENS = 80  # FLUX.3 pads it to a multiple of 80 tokens (upstream's Flux3TextEncoderStep)
# each pipeline's default; FLUX.3 without guidance (Flux3DeltaModularPipeline's guider starts disabled)
STEPS = {"klein-4B": 4, "klein-9B": 4, "kontext-dev": 28, "flux3": 50, "flux3-distilled": 16}
FLUX3 = ("flux3", "flux3-distilled")  # diffusers' Flux3Transformer2DModel defaults are FLUX.3's published config
RELATION_ADAPTER_STEPS = 24
ADAPTATION_STEPS = 20
GPU_MEMORY = 80e9
CUDA_CONTEXT = 3e9  # the CUDA context and allocator slack a run adds to what is counted (2-4 GB)
# black-forest-labs/FLUX.1-Kontext-dev: its vae/config.json (the transformer's: param_count.KONTEXT_TRANSFORMER)
FLUX1_VAE = {
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 16,
    "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.1159, "scaling_factor": 0.3611,
}  # fmt: skip
BACKBONE_CHOICES = [*KLEIN_CONFIGS, "kontext-dev", *FLUX3]


def build(backbone: str, size: int, device: str | torch.device = "meta"):
    """The real-size pipeline in bfloat16, frozen as `load_delta_adapter` leaves it: on the `meta` device (no
    memory) to count, or with random weights on `device` to run (`gpu_check.py`). Kontext's is fixed to `size` (its
    `image_size`), so that queries, outputs and the training pair keep that size instead of Kontext's preferred
    resolution."""
    with torch.device(device), bfloat16_by_default():
        if backbone == "kontext-dev":
            transformer = FluxTransformer2DModel(**KONTEXT_TRANSFORMER)
            vae = AutoencoderKL(**FLUX1_VAE)
        elif backbone in FLUX3:
            transformer = Flux3Transformer2DModel(flow_map=backbone == "flux3-distilled")
            vae = AutoencoderKLFlux2()
        else:
            transformer = Flux2Transformer2DModel(
                attention_head_dim=128, axes_dims_rope=(32, 32, 32, 32), **KLEIN_CONFIGS[backbone]
            )
            vae = AutoencoderKLFlux2()
        image_encoder = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M))
        adapter = adapter_for(transformer, SIGLIP_SO400M_HIDDEN)
    models = (transformer, vae, image_encoder, adapter)
    for model in models:
        cast_model(model, torch.bfloat16)
        model.eval().requires_grad_(False)
    parts = {
        "vae": vae, "transformer": transformer, "image_encoder": image_encoder, "delta_adapter": adapter,
        "feature_extractor": default_feature_extractor(image_encoder),
    }  # fmt: skip
    text_dim = transformer.config.joint_attention_dim
    tokens = FLUX3_PROMPT_TOKENS if backbone in FLUX3 else PROMPT_TOKENS
    embeds = {"prompt_embeds": torch.zeros(1, tokens, text_dim, device=device, dtype=torch.bfloat16)}
    if backbone in FLUX3:
        return flux3_pipeline(backbone, parts, embeds)
    if backbone == "kontext-dev":
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        pipe = FluxKontextDeltaEditPipeline(
            scheduler=scheduler,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            image_size=size,
            **parts,
        )
        embeds["pooled_prompt_embeds"] = torch.zeros(1, 768, device=device, dtype=torch.bfloat16)
    else:
        pipe = FluxDeltaEditPipeline(scheduler=tiny_scheduler(), text_encoder=None, tokenizer=None, is_distilled=True,
                                     **parts)  # fmt: skip
    pipe._restore_empty_prompt(embeds)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def bfloat16_by_default():
    """Builds modules in bfloat16 (a real-size transformer built in float32 first would need twice the memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flux3_pipeline(backbone: str, parts: dict, embeds: dict):
    """FLUX.3's Delta-Adapter modular pipeline around the meta-device models, the adapter attached as
    `load_delta_adapter` attaches it."""
    pipe = (Flux3DistilledDeltaModularPipeline if backbone == "flux3-distilled" else Flux3DeltaModularPipeline)()
    pipe.update_components(**parts)
    pipe._restore_empty_prompt(embeds)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_edit(pipe, image: PIL.Image.Image, scale: float, steps: int):
    """One edit of `image` by the exemplar (image, image) through the pipeline's own call (classic or modular)."""
    modular = {"output": "images"} if isinstance(pipe, ModularPipeline) else {}  # which of the state to return
    return pipe(
        image=image, exemplar=(image, image), delta_scale=scale, num_inference_steps=steps, output_type="pt", **modular
    )


def count(work) -> tuple[float, dict[str, float]]:
    """FLOPs of `work()`: the total and the total of each module (by FlopCounterMode's module names)."""
    with FlopCounterMode(display=False) as counter:
        work()
    per_module = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return float(counter.get_total_flops()), per_module


def edit_parts(pipe, size: int, steps: int) -> dict[str, float]:
    """FLOPs of one edit of `steps` steps and of its parts, from two runs of the pipeline: with the branch and with
    delta_scale=0."""
    image = PIL.Image.new("RGB", (size, size))

    def edit(scale):
        return lambda: run_edit(pipe, image, scale, steps)

    with_branch, _ = count(edit(1.0))
    without_branch, modules = count(edit(0.0))  # the branch is skipped at strength 0
    siglip, projection = modules["SiglipVisionModel"], modules["DeltaAdapterModel"]
    transformer = modules[type(pipe.transformer).__name__]
    return {
        "edit": with_branch,
        "base edit": without_branch - siglip - projection,  # the base model's own edit: VAE + its steps
        "vae encode": modules["Encoder"],
        "vae decode": modules["Decoder"],
        "siglip": siglip,
        "projection": projection,
        "transformer step": transformer / steps,
        "branch step": (with_branch - without_branch) / steps,
    }


@contextmanager
def flash_attention(device: str = "cuda"):
    """Routes `scaled_dot_product_attention` to the flash-attention kernel `device`'s dispatcher picks: CUDA's for
    bfloat16 or float16 without a mask, the CPU's for any float without one (what `peak_memory` is checked against).
    On the `meta` device SDPA would otherwise decompose into the float32 math path, which keeps the whole (S, S)
    attention matrix for backward, a cost neither pays."""
    original = torch.nn.functional.scaled_dot_product_attention
    dtypes = (torch.bfloat16, torch.float16) if device == "cuda" else (torch.bfloat16, torch.float16, torch.float32)

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or query.dtype not in dtypes or enable_gqa:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if device == "cuda":
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                      scale=scale)[0]  # fmt: skip
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]  # fmt: skip

    torch.nn.functional.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def objective_for(pipe, frozen: bool, checkpointing: str, lambda_delta: float = 1.0) -> DeltaAdapterObjective:
    """`DeltaAdapterObjective` around the pipeline's models, set up as `adapt_to_exemplar` sets it up (with
    `frozen=False`, as it did before the backbone was frozen). `checkpointing`: `"all"` (transformer, VAE decoder and
    SigLIP, as `--gradient_checkpointing` in training), `"image"` (VAE decoder and SigLIP: adaptation's CUDA default)
    or `"none"`; `lambda_delta`: the consistency loss's weight (0 skips its decode and SigLIP pass)."""
    pipe.delta_adapter.to(torch.float32).train().requires_grad_(True)  # float32 master weights
    for model in (pipe.transformer, pipe.vae, pipe.image_encoder):
        model.requires_grad_(not frozen)
    pipe.transformer.disable_gradient_checkpointing()
    pipe.vae.disable_gradient_checkpointing()
    pipe.image_encoder.activation_checkpointing_disable()
    pipe.image_encoder.eval()
    if checkpointing == "all":
        pipe.transformer.enable_gradient_checkpointing()
    if checkpointing in ("all", "image"):
        pipe.vae.enable_gradient_checkpointing()
        enable_image_encoder_checkpointing(pipe.image_encoder)
    preprocessor = SiglipPreprocessor.from_feature_extractor(pipe.feature_extractor)
    return DeltaAdapterObjective(
        pipe.delta_adapter,
        pipe.transformer,
        pipe.vae,
        pipe.image_encoder,
        preprocessor,
        pipe._empty_prompt(),
        lambda_delta,
    )


def training_step(objective: DeltaAdapterObjective, pair: dict, batch_size: int):
    """One forward and backward of the objective on a batch of `batch_size` copies of the encoded pair."""
    batch = {key: value.expand(batch_size, *value.shape[1:]) for key, value in pair.items()}
    noise = torch.randn_like(batch["target_latents"])
    sigmas = torch.full((batch_size,), 0.5, device=noise.device)

    def step():
        with torch.enable_grad():
            objective(**batch, noise=noise, sigmas=sigmas)["loss"].backward()

    return step


class TensorMemory(TorchDispatchMode):
    """The bytes of tensor storage alive at once while it is active, and their peak: every storage an operation
    creates is counted from its creation until it is released (weights and anything made before are not), so the
    activations a checkpointed region recomputes in backward count as they will be spent. On `meta` it counts what
    a device would hold, allocator slack aside (the suite checks it against peaks measured on the CPU)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._storages and self._storages[key]() is storage:
            return  # a view or an in-place result: its storage is counted already
        size = storage.nbytes()
        self._storages[key] = weakref.ref(storage, lambda _, key=key, size=size: self._release(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self._storages.pop(key, None)


def peak_memory(step) -> int:
    """Bytes of the peak of `step` (a training step's forward and backward) beyond what existed before it:
    activations saved and recomputed, temporaries and the gradients made (`TensorMemory`)."""
    with TensorMemory() as memory:
        step()
    return memory.peak


def activation_memory(pipe, objective: DeltaAdapterObjective, pair: dict, batch_size: int) -> int:
    """Bytes at the peak of one training step beyond the weights (`peak_memory`), whatever is checkpointed."""
    return peak_memory(training_step(objective, pair, batch_size))


def adaptation(pipe, size: int, edit_flops: float) -> dict[str, float]:
    """20 adaptation steps, with the pair's encoding, in units of edits of `size`: as implemented on CUDA (frozen
    backbone, the image-space models checkpointed, the pair scaled down to `AdaptationConfig.resolution`), the
    alternatives, and the same at the pair's own size; and the peak of a step beyond the weights (GB)."""
    image = PIL.Image.new("RGB", (size, size))
    resolution = AdaptationConfig().resolution
    one_size = pipe.config.get("image_size")  # fixed here for Kontext's edits; a user's pipeline knows no one size

    def encode(scaled: bool) -> dict:
        pipe.register_to_config(image_size=None if scaled else one_size)  # so that adaptation may scale it down
        try:
            return pipe._encode_pair_for_training(image, image, torch.device("meta"), resolution if scaled else None)
        finally:
            pipe.register_to_config(image_size=one_size)

    results = {}
    for label, frozen, checkpointing, scaled in (
        ("default", True, "image", True), ("all", True, "all", True), ("none", True, "none", True),
        ("not frozen", False, "image", True), ("full size", True, "image", False),
    ):  # fmt: skip
        encoding, _ = count(lambda scaled=scaled: encode(scaled))
        pair = encode(scaled)
        objective = objective_for(pipe, frozen, checkpointing)
        step, _ = count(training_step(objective, pair, 1))
        results[label] = (encoding + ADAPTATION_STEPS * step) / edit_flops
        if label in ("default", "full size"):
            results[f"{label} step"] = step / edit_flops
            results[f"{label} peak"] = activation_memory(pipe, objective, pair, 1) / 1e9
    return results


def training_memory(pipe, size: int, batch_size: int, checkpointing: str) -> dict[str, float]:
    """GB per GPU of one training step at `batch_size`: bf16 frozen weights, the adapter's float32 weights,
    Adam states, and the step's peak beyond the weights (activations and the gradients made: `activation_memory`)."""
    image = PIL.Image.new("RGB", (size, size))
    pair = pipe._encode_pair_for_training(image, image, torch.device("meta"))
    objective = objective_for(pipe, frozen=True, checkpointing=checkpointing)
    frozen = sum(p.numel() * p.element_size() for m in (pipe.transformer, pipe.vae, pipe.image_encoder)
                 for p in m.parameters())  # fmt: skip
    adapter = sum(p.numel() for p in pipe.delta_adapter.parameters()) * 4 * 3  # weights, Adam m and v
    activations = activation_memory(pipe, objective, pair, batch_size)
    return {"weights": frozen / 1e9, "adapter state": adapter / 1e9, "activations": activations / 1e9}


def flux3_placements(pipe, size: int) -> dict[str, float]:
    """The branch's share of one FLUX.3 transformer step at `size`, wherever it could run: the image modes' early
    blocks and every single block (the choice), every single block only, and every block (the text's early blocks
    too). Counted on one forward with the edit against one at strength 0."""
    transformer, adapter = pipe.transformer, pipe.delta_adapter
    layers = transformer.config.num_layers
    latents = pipe._preprocess_queries(PIL.Image.new("RGB", (size, size))).shape[-1] // 16  # tokens per side
    prompt = pipe.empty_prompt_embeds

    def forward(scale: float):
        ids = _prepare_image_ids(latents, latents, flux3.IMAGE_ROPE_SCALE).to("meta")
        reference_ids = _prepare_image_ids(latents, latents, flux3.IMAGE_ROPE_SCALE, l_coord=-1).to("meta")
        tokens = torch.empty(1, latents * latents, transformer.config.in_channels, device="meta", dtype=torch.bfloat16)
        edit = torch.empty(1, adapter.config.num_edit_tokens, adapter.config.edit_token_dim, device="meta")
        return lambda: transformer(
            hidden_states=tokens, encoder_hidden_states=prompt, timestep=torch.ones(1, device="meta"),
            img_ids=ids, txt_ids=Flux3TextRoPEInputsStep._prepare_text_ids(prompt).to("meta"),
            image_cond_hidden_states=tokens, image_cond_ids=reference_ids,
            target_timestep=torch.ones(1, device="meta") if transformer.config.flow_map else None,
            attention_kwargs={"delta_hidden_states": edit.to(torch.bfloat16), "delta_scale": scale},
        )  # fmt: skip

    def everywhere(name: str):
        parts = name.split(".")
        if parts[0] == "txt_mode_blocks":
            return "double", 2 * layers + int(parts[1])
        return flux3.layout(layers)(name)

    layouts = {
        "image modes' early blocks + single blocks (the choice)": flux3.layout(layers),
        "single blocks only": lambda name: flux3.layout(layers)(name) if name.startswith("single") else None,
        "every block (the text's early blocks too)": everywhere,
    }
    current, upstream, shares = dict(transformer.attn_processors), dict(pipe._delta_original_processors), {}
    with torch.device("meta"):  # room for every block
        wide = adapter_for(transformer, SIGLIP_SO400M_HIDDEN, num_double_blocks=3 * layers)
    cast_model(wide, torch.bfloat16)
    for label, layout in layouts.items():
        processors = {"double": flux3.Flux3DeltaAttnProcessor, "single": flux3.Flux3DeltaAttnProcessor}
        transformer.set_attn_processor(dict(upstream))  # (it empties the dict it is given)
        transformer.set_attn_processor(
            delta_processors_for(transformer, wide, processors, layout, call=flux3.call_of(transformer))
        )
        with torch.no_grad():
            with_branch, _ = count(forward(1.0))
            without, _ = count(forward(0.0))
        shares[label] = (with_branch - without) / without
    transformer.set_attn_processor(current)
    return shares


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=BACKBONE_CHOICES, choices=BACKBONE_CHOICES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--markdown", action="store_true", help="Print the tables as markdown.")
    args = parser.parse_args(argv)
    try:  # the training script's own rules, before any model is built
        for size in args.sizes:
            check_resolution(size, flag="--sizes")
    except ValueError as error:
        parser.error(str(error))
    if any(batch < 1 for batch in args.batches):
        parser.error(f"--batches must all be at least 1, got {args.batches}.")
    return args


def main() -> None:
    args = parse_args()

    flops_rows, memory_rows, relation_rows, placement_rows = [], [], [], []
    with flash_attention():
        run(args, flops_rows, memory_rows, relation_rows, placement_rows)

    flops_header = [
        "backbone", "size", "steps", "edit TFLOP", "VAE enc", "VAE dec", "SigLIP", "projection", "transformer step",
        "+ branch", "branch / step", "adapter / edit", "adapt step (edits)", "20 steps (edits)",
        "adapt step peak GB", "20, all ckpt", "20, no ckpt", "20, backbone not frozen", "20 at full size (edits)",
        "full-size step peak GB",
    ]  # fmt: skip
    memory_header = [
        "backbone", "size", "batch", "checkpointing", "frozen weights GB", "adapter + Adam GB", "step peak GB",
        "total GB", "fits 80 GB (+3 GB)",
    ]  # fmt: skip
    relation_header = ["size", "RelationAdapter edit TFLOP (24 steps)", "edit TFLOP", "edit / RelationAdapter's"]
    tables = [(flops_header, flops_rows), (memory_header, memory_rows)]
    if relation_rows:
        tables.append((["backbone", *relation_header], relation_rows))
    if placement_rows:
        tables.append((["backbone", "size", "FLUX.3: the branch in", "branch / step"], placement_rows))
    for header, rows in tables:
        print_table(header, rows, args.markdown)
        print()
    print("Adaptation: 20 steps with the pair's encoding; the default checkpoints the VAE decoder and SigLIP on CUDA.")
    print("Goals (klein-4B, 1024²): adapter <= 1% of an edit; 20 adaptation steps <= 12 edits; training at batch 16")
    print("per GPU within 80 GB with checkpointing (at the training script's default 512²; counted: add 2-4 GB of")
    print("CUDA context and allocator slack). Kontext [dev], 1024²: the branch <= 0.2% of a step; 20 adaptation")
    print("steps <= 2.5 edits; FLUX.3 the same. RelationAdapter's edit: FLUX.1-dev with the source in context")
    print("(Kontext's layout), 24 steps, SigLIP and its branch as ours; its LoRA, if left unmerged, would add to it.")


def run(args, flops_rows: list, memory_rows: list, relation_rows: list, placement_rows: list) -> None:
    """Fills the rows of the FLOP, memory, RelationAdapter and FLUX.3 placement tables."""
    relation = {}  # size -> RelationAdapter's edit FLOPs, from Kontext's layout at 24 steps
    edits = {}  # (backbone, size) -> edit FLOPs
    for backbone in args.backbones:
        for size in args.sizes:
            pipe = build(backbone, size)
            steps = STEPS[backbone]
            parts = edit_parts(pipe, size, steps)
            edits[backbone, size] = parts["edit"]
            if backbone == "kontext-dev":
                step = parts["transformer step"] + parts["branch step"]
                relation[size] = parts["edit"] - (steps - RELATION_ADAPTER_STEPS) * step
            adapt = adaptation(pipe, size, parts["edit"])
            if backbone in FLUX3:
                for label, share in flux3_placements(pipe, size).items():
                    placement_rows.append([backbone, f"{size}²", label, f"{100 * share:.2f}%"])
            tera = {key: value / 1e12 for key, value in parts.items()}
            flops_rows.append([
                backbone, f"{size}²", str(steps), f"{tera['edit']:.1f}", f"{tera['vae encode']:.2f}",
                f"{tera['vae decode']:.2f}",
                f"{tera['siglip']:.2f}", f"{tera['projection']:.3f}", f"{tera['transformer step']:.2f}",
                f"{tera['transformer step'] + tera['branch step']:.2f}",
                f"{100 * parts['branch step'] / parts['transformer step']:.2f}%",
                f"{100 * (parts['edit'] - parts['base edit']) / parts['base edit']:.2f}%",
                f"{adapt['default step']:.2f}", f"{adapt['default']:.1f}", f"{adapt['default peak']:.1f}",
                f"{adapt['all']:.1f}", f"{adapt['none']:.1f}", f"{adapt['not frozen']:.1f}",
                f"{adapt['full size']:.1f}", f"{adapt['full size peak']:.1f}",
            ])  # fmt: skip
        for size, batch_size in itertools.product(args.sizes, args.batches):
            pipe = build(backbone, size)
            for checkpointing in ("none", "all"):  # the training script's --gradient_checkpointing: all three
                memory = training_memory(pipe, size, batch_size, checkpointing)
                total = sum(memory.values())
                memory_rows.append([
                    backbone, f"{size}²", str(batch_size), "yes" if checkpointing == "all" else "no",
                    f"{memory['weights']:.1f}", f"{memory['adapter state']:.1f}", f"{memory['activations']:.1f}",
                    f"{total:.1f}", "yes" if total * 1e9 + CUDA_CONTEXT <= GPU_MEMORY else "no",
                ])  # fmt: skip
    for (backbone, size), flops in edits.items():
        if size in relation:
            relation_rows.append([backbone, f"{size}²", f"{relation[size] / 1e12:.1f}", f"{flops / 1e12:.1f}",
                                  f"{flops / relation[size]:.2f}"])  # fmt: skip


def print_table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
