"""Test-time adaptation: fine-tune a loaded Delta-Adapter on the one exemplar pair a user gives (section 4.5).

`DeltaAdaptationMixin` gives the pipeline `adapt_to_exemplar`, `reset_delta_adapter` and `adapted_to_exemplar`;
`run_adaptation` is the optimisation loop, `AdaptationConfig` its settings.

Single-pair supervision makes this possible without a second pair: the exemplar's source is the query and its
target the reconstruction target, exactly as in training, with the same objective (`DeltaAdapterObjective`).
Only the adapter's weights move; the transformer, VAE and SigLIP stay frozen.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from .backbones import backbone_of
from .checks import finite_float, positive_int
from .concurrency import changes_the_adapter, model_access
from .image_inputs import ImageInput, to_rgb_image
from .losses import sample_sigmas
from .model_state import cast_model, copy_state
from .semantic_delta import SiglipPreprocessor, images_to_siglip_pixels, patch_features
from .training import DeltaAdapterObjective, enable_image_encoder_checkpointing


#: The noise-level densities `sample_sigmas` and `loss_weighting` know.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")

#: What `AdaptationConfig.trainable` may move: the adapter's submodules of each choice.
TRAINABLE_PARTS = {
    "all": None,
    "edit_tokens": ("refiner", "resampler", "token_projection", "pooled_projection"),
    "injection": ("double_blocks", "single_blocks"),
}


def trainable_parameters(adapter: torch.nn.Module, trainable: str) -> list[torch.nn.Parameter]:
    """The adapter's parameters that `trainable` (a key of `TRAINABLE_PARTS`) lets adaptation move."""
    parts = TRAINABLE_PARTS[trainable]
    if parts is None:
        return list(adapter.parameters())
    return [p for name, child in adapter.named_children() if name in parts for p in child.parameters()]


@dataclass
class AdaptationConfig:
    """Settings of `adapt_to_exemplar`.

    The learning rate comes from `python benchmarks/adaptation.py --sweep 1e-4 1e-3 1e-2` (held-out objective of the
    pair after 20 steps, SMALL CPU configuration with random weights): 1e-4 barely moves the adapter in 20 steps,
    1e-3 and 1e-2 reach the same held-out loss, and 1e-3 is the safer of the two. On toy world 1's trained model
    (`benchmarks/toyworld_quality.py`), these defaults raise the unseen edits' mean gap closed from -0.70 to -0.31; on
    world 2's, the embedded one (`benchmarks/toyworld2_quality.py`), held-out values (S2) from -0.14 to +0.08 and seen
    edits (S1) from +0.42 to +0.48, and held-out families (S3) not at all (-0.09 to -0.12).
    """

    num_steps: int = field(default=20, metadata={"help": "Gradient steps on the pair (the paper uses 20)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    lambda_delta: float = field(default=1.0, metadata={"help": "Weight of the semantic-delta consistency loss."})
    noise_samples: int = field(
        default=1,
        metadata={"help": "Noise draws of the pair per step (a batch): more steady the gradient, at a cost."},
    )
    weighting_scheme: str = field(
        default="logit_normal",
        metadata={
            "help": "Noise-level density: 'logit_normal', 'mode' or 'none' (uniform). Logit-normal, as the toy-world "
            "build trains (the training script's default is uniform, as in diffusers' scripts): 20 steps on one "
            "pair are best spent on the middle noise levels, where an edit is decided."
        },
    )
    trainable: str = field(
        default="all",
        metadata={
            "help": "Which of the adapter's weights move: 'all', 'edit_tokens' (the refiner, resampler and token "
            "projection, which turn the delta into edit tokens; every block's keys and values stay as trained) or "
            "'injection' (every block's key and value projections and gates)."
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (none: the pair is all we have)."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in backward instead of keeping them: True for the transformer, VAE "
            "decoder and SigLIP (least memory), False for none (least time). None: on CUDA, the VAE decoder and "
            "SigLIP only, whose full-resolution feature maps hold most of the activations, and not the transformer, "
            "whose recomputation would cost a quarter of an edit per step (benchmarks/real_scale.py: klein-4B at "
            "1024², 20 steps = 13.4 edits and about 31 GB of activations, against 18.2 edits and 7 GB with True); "
            "off elsewhere."
        },
    )

    def __post_init__(self):
        self.num_steps = positive_int(self.num_steps, "num_steps")
        self.learning_rate = finite_float(self.learning_rate, "learning_rate")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        self.lambda_delta = finite_float(self.lambda_delta, "lambda_delta", minimum=0.0)
        self.noise_samples = positive_int(self.noise_samples, "noise_samples")
        self.max_grad_norm = finite_float(self.max_grad_norm, "max_grad_norm")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}.")
        self.weight_decay = finite_float(self.weight_decay, "weight_decay", minimum=0.0)
        if self.trainable not in TRAINABLE_PARTS:
            raise ValueError(f"trainable must be one of {tuple(TRAINABLE_PARTS)}, got {self.trainable!r}.")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}.")
        if self.gradient_checkpointing not in (None, True, False):
            raise TypeError(
                f"gradient_checkpointing must be None, True or False, got {self.gradient_checkpointing!r}."
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdaptationResult:
    """What `adapt_to_exemplar` did, step by step, so a user can see whether it converged.

    Args:
        losses: the total loss of each step.
        flow_matching: its flow-matching term per step.
        delta_consistency: its consistency term per step.
        config: the settings used.
    """

    losses: list[float]
    flow_matching: list[float]
    delta_consistency: list[float]
    config: AdaptationConfig


def run_adaptation(
    objective: DeltaAdapterObjective,
    pair: dict[str, torch.Tensor],
    config: AdaptationConfig,
    scheduler,
    generator: torch.Generator | list[torch.Generator] | None,
    progress_bar,
) -> AdaptationResult:
    """The optimisation loop. Raises `FloatingPointError` on a non-finite loss (the caller restores the weights).

    Args:
        objective: the objective around the adapter to adapt (its adapter trains, nothing else).
        pair: the encoded exemplar: `source_latents`, `target_latents` (1, 4C, h, w) and `source_features`,
            `target_features` (1, P, D).
        config: the settings.
        scheduler: a flow-matching scheduler in its training state, for the σ grid.
        generator: makes the noise and σ draws reproducible; they are drawn on its device, as diffusers draws them
            (`randn_tensor`). A list holds one generator per noise draw (`config.noise_samples`).
        progress_bar: a context manager yielding a tqdm-like bar (the pipeline's `progress_bar`).
    """
    if isinstance(generator, list) and len(generator) != config.noise_samples:
        raise ValueError(
            f"{len(generator)} generators given for {config.noise_samples} noise draws per step: pass one generator, "
            "or one per draw (AdaptationConfig.noise_samples)."
        )
    parameters = trainable_parameters(objective.adapter, config.trainable)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    batch = {key: value.expand(config.noise_samples, *value.shape[1:]) for key, value in pair.items()}
    target = batch["target_latents"]
    losses, flow_matching, delta_consistency = [], [], []
    with progress_bar(total=config.num_steps) as bar:
        for step in range(config.num_steps):
            sigmas = sample_sigmas(scheduler, config.noise_samples, config.weighting_scheme, generator=generator)
            noise = randn_tensor(target.shape, generator=generator, device=target.device, dtype=torch.float32)
            noise = noise.to(target.dtype)  # (S, 4C, h, w)
            terms = objective(**batch, noise=noise, sigmas=sigmas.to(target.device))
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(
                    f"The adaptation loss became {terms['loss'].item()} at step {step + 1}: lower learning_rate."
                )
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(terms["loss"].item())
            flow_matching.append(terms["flow_matching"].item())
            delta_consistency.append(terms["delta_consistency"].item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
    return AdaptationResult(losses, flow_matching, delta_consistency, config)


class DeltaAdaptationMixin:
    """Test-time adaptation of a loaded Delta-Adapter (`adapt_to_exemplar`, `reset_delta_adapter`,
    `adapted_to_exemplar`), part of `loaders.DeltaAdapterMixin`, which a pipeline takes."""

    @changes_the_adapter
    def adapt_to_exemplar(
        self,
        source: ImageInput,
        target: ImageInput,
        num_steps: int | None = None,
        learning_rate: float | None = None,
        lambda_delta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        config: AdaptationConfig | None = None,
        from_loaded: bool = True,
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
    ) -> AdaptationResult:
        """Fine-tunes the adapter on one exemplar pair (flow matching + semantic-delta consistency), then edit as
        usual. Only adapter weights change; `reset_delta_adapter()` brings back the loaded ones.

        Args:
            source: the exemplar's source image (it plays the query during adaptation).
            target: the exemplar's target image.
            num_steps: gradient steps (default `AdaptationConfig.num_steps`, 20).
            learning_rate: AdamW learning rate (default `AdaptationConfig.learning_rate`).
            lambda_delta: weight of the consistency loss (default 1).
            generator: makes the noise draws, and so the result, reproducible (drawn on its device; a list holds one
                per noise draw).
            config: every other setting (see `AdaptationConfig`); the three arguments above override it.
            from_loaded: start from the loaded weights (default) rather than from the current, already adapted ones.
            max_sequence_length: prompt length, when the empty prompt has to be encoded by the text encoder.
            text_encoder_out_layers: Qwen3 layers stacked into the prompt embeddings, likewise.

        Returns:
            The loss of every step, with its two terms, and the settings used.

        Raises:
            ValueError: bad exemplar images or settings; FloatingPointError: the loss stopped being finite. In
            either case (and on any other error) the adapter is left exactly as it was before the call.
        """
        self._require_delta_adapter()
        overrides = {"num_steps": num_steps, "learning_rate": learning_rate, "lambda_delta": lambda_delta}
        config = replace(config or AdaptationConfig(), **{k: v for k, v in overrides.items() if v is not None})
        if hasattr(self.transformer, "_hf_hook") or hasattr(self.vae, "_hf_hook"):
            raise RuntimeError(
                "adapt_to_exemplar backpropagates through the transformer, VAE and SigLIP at once, which model CPU "
                "offloading keeps on different devices. Adapt before enable_model_cpu_offload(), or call "
                "pipe.remove_all_hooks() and pipe.to(device) first."
            )
        device = self._execution_device
        pair = self._encode_pair_for_training(source, target, device)
        with torch.no_grad():
            text_conditioning = self._text_conditioning("", max_sequence_length, text_encoder_out_layers)
            text_conditioning = {name: tensor.to(device) for name, tensor in text_conditioning.items()}

        adapter, transformer, vae, image_encoder = self.delta_adapter, self.transformer, self.vae, self.image_encoder
        state_before = copy_state(adapter)  # on the CPU
        processors = dict(transformer.attn_processors)  # with the user's per-block scales
        # `from_pretrained` leaves every weight differentiable: freeze the backbone for the adaptation (or backward
        # would fill gigabytes of its gradients), and give every flag back afterwards.
        models = (adapter, transformer, vae, image_encoder)
        requires_grad = [[p.requires_grad for p in model.parameters()] for model in models]
        checkpointing = (transformer.is_gradient_checkpointing, vae.is_gradient_checkpointing)
        encoder_checkpointing, encoder_training = image_encoder.is_activation_checkpointing, image_encoder.training
        dtype = adapter.dtype
        try:
            if from_loaded:
                adapter.load_state_dict(self._delta_loaded_state)
            cast_model(adapter, torch.float32)  # float32 master weights, whatever the pipeline's dtype
            for model in (transformer, vae, image_encoder):
                model.requires_grad_(False)
            adapter.train().requires_grad_(False)
            for parameter in trainable_parameters(adapter, config.trainable):
                parameter.requires_grad_(True)
            checkpoint = config.gradient_checkpointing
            if checkpoint:
                transformer.enable_gradient_checkpointing()
            if checkpoint if checkpoint is not None else torch.device(device).type == "cuda":
                vae.enable_gradient_checkpointing()
                enable_image_encoder_checkpointing(image_encoder)
            preprocessor = SiglipPreprocessor.from_feature_extractor(self.feature_extractor)
            objective = DeltaAdapterObjective(
                adapter, transformer, vae, image_encoder, preprocessor, text_conditioning, config.lambda_delta
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
            with torch.enable_grad():
                result = run_adaptation(objective, pair, config, scheduler, generator, self.progress_bar)
        except BaseException:
            cast_model(adapter, dtype)
            adapter.load_state_dict(state_before)
            raise
        finally:
            cast_model(adapter, dtype)
            adapter.eval().zero_grad(set_to_none=True)
            for model, flags in zip(models, requires_grad):
                for parameter, flag in zip(model.parameters(), flags):
                    parameter.requires_grad_(flag)
            for model, was_checkpointing in zip((transformer, vae), checkpointing):
                if not was_checkpointing and model.is_gradient_checkpointing:
                    model.disable_gradient_checkpointing()
            if not encoder_checkpointing and image_encoder.is_activation_checkpointing:
                image_encoder.activation_checkpointing_disable()
            image_encoder.train(encoder_training)
            transformer.set_attn_processor(processors)
        self._delta_adaptation = {
            "base_adapter": self._delta_adapter_source,
            "num_steps": config.num_steps,
            "learning_rate": config.learning_rate,
            "lambda_delta": config.lambda_delta,
            "trainable": config.trainable,
        }
        return result

    @torch.no_grad()
    def _encode_pair_for_training(self, source: ImageInput, target: ImageInput, device) -> dict[str, torch.Tensor]:
        """The exemplar as the objective reads it: latents of both images at the source's size (as the pipeline
        sizes a query), and SigLIP features as `encode_exemplar` computes them."""
        source_pixels = self._preprocess_queries(source)  # (1, 3, H, W) in [-1, 1]
        height, width = source_pixels.shape[-2:]
        target_rgb = to_rgb_image(target, name="exemplar target")
        target_pixels = self.image_processor.preprocess(target_rgb, height=height, width=width, resize_mode="crop")
        pixels = torch.cat([source_pixels, target_pixels]).to(device)
        latents = backbone_of(self.transformer).encode_latents(self.vae, pixels)  # (2, C', h, w)
        preprocessor = SiglipPreprocessor.from_feature_extractor(self.feature_extractor)
        siglip = images_to_siglip_pixels([source, target_rgb], preprocessor, "exemplar image")
        features = patch_features(self.image_encoder, siglip.to(device, self.image_encoder.dtype))  # (2, P, D)
        return {
            "source_latents": latents[:1],
            "target_latents": latents[1:],
            "source_features": features[:1],
            "target_features": features[1:],
        }

    @changes_the_adapter
    def reset_delta_adapter(self) -> None:
        """Restores the adapter's weights as they were loaded, bit-for-bit (undoing `adapt_to_exemplar`)."""
        self._require_delta_adapter()
        self.delta_adapter.load_state_dict(self._delta_loaded_state)
        self._delta_adaptation = None

    def adapted_to_exemplar(self, source: ImageInput, target: ImageInput, **kwargs):
        """`with pipe.adapted_to_exemplar(src, tgt) as result: ...` adapts, and on exit (exceptions included)
        restores the adapter as it was on entry. Takes `adapt_to_exemplar`'s arguments; yields its result."""
        self._require_delta_adapter()
        return self._adapted_to_exemplar(source, target, **kwargs)

    @contextmanager
    def _adapted_to_exemplar(self, source: ImageInput, target: ImageInput, **kwargs):
        state, adaptation = copy_state(self.delta_adapter), self._delta_adaptation
        try:
            yield self.adapt_to_exemplar(source, target, **kwargs)
        finally:
            with model_access(self.transformer).exclusive():
                self.delta_adapter.load_state_dict(state)
                self._delta_adaptation = adaptation
