"""Test-time adaptation: fine-tune a loaded Delta-Adapter on the one exemplar pair a user gives (section 4.5).

`DeltaAdaptationMixin` gives the pipeline `adapt_to_exemplar`, `reset_delta_adapter` and `adapted_to_exemplar`;
`run_adaptation` is the optimisation loop, `AdaptationConfig` its settings.

Single-pair supervision makes this possible without a second pair: the exemplar's source is the query and its
target the reconstruction target, exactly as in training, with the same objective (`DeltaAdapterObjective`).
Only the adapter's weights move; the transformer, VAE and SigLIP stay frozen.

Twenty steps on one pair can overfit it. Three guards, each off by default (`AdaptationConfig`): views of the pair
(`augment`: the same flip or crop applied to source and target), a pull toward the weights adaptation starts from
(`anchor_weight`), and early stopping on a view it does not train on (`early_stopping`).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import PIL.Image
import PIL.ImageOps
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

#: Views of the exemplar pair `AdaptationConfig.augment` trains on: the same change of both images (the pair itself
#: first, then a mirror image and two crops of 7/8 of each side, enlarged back).
AUGMENTATIONS = ("none", "flip_crop")
#: The crop of the `flip_crop` views, as a share of each side.
VIEW_CROP = 7 / 8


def pair_views(source: PIL.Image.Image, target: PIL.Image.Image, augment: str) -> list[tuple[PIL.Image.Image, ...]]:
    """The views of an exemplar pair adaptation trains on: `[(source, target)]` for `"none"`; for `"flip_crop"`, the
    pair, its mirror image, and crops of 7/8 of each side at the top left and the bottom right, enlarged back to the
    pair's size (the same transform for both images, so each view is an exemplar of the same edit of another
    picture)."""
    views = [(source, target)]
    if augment == "flip_crop":
        views.append((PIL.ImageOps.mirror(source), PIL.ImageOps.mirror(target)))
        for corner in (0.0, 1.0):

            def crop(image: PIL.Image.Image, corner=corner) -> PIL.Image.Image:
                width, height = image.size
                w, h = round(width * VIEW_CROP), round(height * VIEW_CROP)
                left, top = round((width - w) * corner), round((height - h) * corner)
                return image.crop((left, top, left + w, top + h)).resize(image.size, PIL.Image.Resampling.BICUBIC)

            views.append((crop(source), crop(target)))
    return views


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
    (`examples/toyworld/world1_quality.py`), these defaults raise the unseen edits' mean gap closed from -0.70 to
    -0.31; on world 2's, the embedded one (`examples/toyworld/world2_quality.py`), held-out values (S2) from -0.14 to
    +0.08 and seen edits (S1) from +0.42 to +0.48, and held-out families (S3) not at all (-0.09 to -0.12).
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
    augment: str = field(
        default="none",
        metadata={
            "help": "Views of the pair to train on, one per step in turn: 'none' (the pair) or 'flip_crop' (the "
            "pair, its mirror image and two crops of 7/8 of each side, the same for source and target)."
        },
    )
    anchor_weight: float = field(
        default=0.0,
        metadata={
            "help": "Pull toward the weights adaptation starts from: adds anchor_weight times the mean squared change "
            "of the moving weights to the loss (0: none)."
        },
    )
    early_stopping: bool = field(
        default=False,
        metadata={
            "help": "Every `eval_every` steps, measure the objective on a view it does not train on (with "
            "'flip_crop', the mirror image, then left out of training; else the pair itself) at fixed noise, and "
            "keep the weights where it was lowest (the start included)."
        },
    )
    eval_every: int = field(default=5, metadata={"help": "Steps between two early-stopping measurements."})
    resolution: int | None = field(
        default=512,
        metadata={
            "help": "Adapt at most at this resolution: an exemplar of more than resolution² pixels is scaled down "
            "(aspect kept, to multiples of 16) for the latents adaptation trains on, as the training script's "
            "--resolution (512 by default) sizes its pairs; the semantic delta is SigLIP's at its own 384² either "
            "way, and the adapter then edits at any size, as after training. None: at the size the pipeline would "
            "edit the source at. At klein-4B 1024², 20 steps cost 2.9 edits at 512 against 13.4 at full size "
            "(benchmarks/real_scale.py)."
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
            "whose recomputation would cost a third more (benchmarks/real_scale.py: klein-4B, a 1024² exemplar "
            "adapted at the default resolution, 512: 20 steps = 2.9 edits with a 21.5 GB step peak, against 4.0 "
            "edits with True and 2.8 with False); off elsewhere."
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
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}.")
        self.anchor_weight = finite_float(self.anchor_weight, "anchor_weight", minimum=0.0)
        if not isinstance(self.early_stopping, bool):
            raise TypeError(f"early_stopping must be True or False, got {self.early_stopping!r}.")
        self.eval_every = positive_int(self.eval_every, "eval_every")
        if self.resolution is not None:
            self.resolution = positive_int(self.resolution, "resolution")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}.")
        if self.gradient_checkpointing not in (None, True, False):
            raise TypeError(
                f"gradient_checkpointing must be None, True or False, got {self.gradient_checkpointing!r}."
            )

    def to_dict(self) -> dict:
        """The settings as a plain dict (for model cards and `adapter_config.json`'s adaptation record)."""
        return asdict(self)


def parse_setting(text: str) -> AdaptationConfig:
    """`"num_steps=20,learning_rate=1e-3"` -> the `AdaptationConfig` with those fields (the rest as defaults)."""
    types = {field.name: type(field.default) for field in dataclasses.fields(AdaptationConfig)}
    optional = {field.name for field in dataclasses.fields(AdaptationConfig) if "None" in str(field.type)}
    flags = {"true": True, "false": False, "none": None}  # gradient_checkpointing
    values = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in types or not value:
            raise ValueError(f"Setting {text!r}: expected FIELD=VALUE pairs, FIELD one of {', '.join(types)}.")
        kind = types[name]
        if name in optional and value.lower() == "none":
            values[name] = None
        elif kind in (int, float, str):
            values[name] = kind(value)
        elif value.lower() in flags:
            values[name] = flags[value.lower()]
        else:
            raise ValueError(f"Setting {text!r}: {name} takes true, false or none.")
    return AdaptationConfig(**values)


def setting_name(config: AdaptationConfig) -> str:
    """The fields a setting changes from the defaults, e.g. `"adapt lr 0.0003, trainable edit_tokens"`."""
    defaults = AdaptationConfig()
    changed = [f"{field.name} {getattr(config, field.name)}" for field in dataclasses.fields(config)
               if getattr(config, field.name) != getattr(defaults, field.name)]  # fmt: skip
    return "adapt " + (", ".join(changed).replace("learning_rate", "lr") or "(defaults)")


@dataclass
class AdaptationResult:
    """What `adapt_to_exemplar` did, step by step, so a user can see whether it converged.

    Args:
        losses: the total loss of each step.
        flow_matching: its flow-matching term per step.
        delta_consistency: its consistency term per step.
        config: the settings used.
        held_out: with early stopping, (step, loss on the held-out view) of each measurement (step 0: the start).
        kept_step: with early stopping, the step whose weights were kept.
    """

    losses: list[float]
    flow_matching: list[float]
    delta_consistency: list[float]
    config: AdaptationConfig
    held_out: list[tuple[int, float]] = field(default_factory=list)
    kept_step: int | None = None


def run_adaptation(
    objective: DeltaAdapterObjective,
    pair: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    config: AdaptationConfig,
    scheduler,
    generator: torch.Generator | list[torch.Generator] | None,
    progress_bar,
) -> AdaptationResult:
    """The optimisation loop. Raises `FloatingPointError` on a non-finite loss (the caller restores the weights).

    Args:
        objective: the objective around the adapter to adapt (its adapter trains, nothing else).
        pair: the encoded exemplar: `source_latents`, `target_latents` (1, 4C, h, w) and `source_features`,
            `target_features` (1, P, D); or its views (`pair_views`, encoded), the pair first, one a step in turn
            (with early stopping and several views, the second is held out instead).
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
    views = [pair] if isinstance(pair, dict) else list(pair)
    held_out_view = views.pop(1) if config.early_stopping and len(views) > 1 else views[0]
    batches = [{key: value.expand(config.noise_samples, *value.shape[1:]) for key, value in view.items()}
               for view in views]  # fmt: skip
    target = batches[0]["target_latents"]
    anchor = [parameter.detach().clone() for parameter in parameters] if config.anchor_weight else None
    held_out = _HeldOutView(objective, held_out_view, config, scheduler, generator) if config.early_stopping else None
    result = AdaptationResult([], [], [], config)
    if held_out is not None:
        held_out.measure(0, parameters, result)
    with progress_bar(total=config.num_steps) as bar:
        for step in range(config.num_steps):
            batch = batches[step % len(batches)]
            sigmas = sample_sigmas(scheduler, config.noise_samples, config.weighting_scheme, generator=generator)
            noise = randn_tensor(target.shape, generator=generator, device=target.device, dtype=torch.float32)
            noise = noise.to(target.dtype)  # (S, 4C, h, w)
            terms = objective(**batch, noise=noise, sigmas=sigmas.to(target.device))
            loss = terms["loss"]
            if anchor is not None:  # the mean squared change of the moving weights
                change = sum(((p - p0) ** 2).sum() for p, p0 in zip(parameters, anchor))
                loss = loss + config.anchor_weight * change / sum(p.numel() for p in parameters)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"The adaptation loss became {loss.item()} at step {step + 1}: lower learning_rate."
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss.item())
            result.flow_matching.append(terms["flow_matching"].item())
            result.delta_consistency.append(terms["delta_consistency"].item())
            if held_out is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.num_steps):
                held_out.measure(step + 1, parameters, result)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            bar.update()
    if held_out is not None:
        held_out.keep_best(parameters, result)
    return result


class _HeldOutView:
    """Early stopping's measure: the objective on a view adaptation does not train on, at noise and noise levels
    drawn once (so that measurements differ only by the weights), and the weights where it was lowest."""

    def __init__(self, objective, view: dict[str, torch.Tensor], config: AdaptationConfig, scheduler, generator):
        self.objective = objective
        self.batch = {key: value.expand(config.noise_samples, *value.shape[1:]) for key, value in view.items()}
        target = self.batch["target_latents"]
        self.sigmas = sample_sigmas(scheduler, config.noise_samples, config.weighting_scheme, generator=generator)
        self.sigmas = self.sigmas.to(target.device)
        noise = randn_tensor(target.shape, generator=generator, device=target.device, dtype=torch.float32)
        self.noise = noise.to(target.dtype)
        self.best: tuple[float, int, list[torch.Tensor]] | None = None

    @torch.no_grad()
    def measure(self, step: int, parameters: list[torch.nn.Parameter], result: AdaptationResult) -> None:
        loss = self.objective(**self.batch, noise=self.noise, sigmas=self.sigmas)["loss"].item()
        result.held_out.append((step, loss))
        if self.best is None or loss < self.best[0]:
            self.best = (loss, step, [parameter.detach().clone() for parameter in parameters])

    @torch.no_grad()
    def keep_best(self, parameters: list[torch.nn.Parameter], result: AdaptationResult) -> None:
        _, result.kept_step, weights = self.best
        for parameter, weight in zip(parameters, weights):
            parameter.copy_(weight)


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
            ValueError: bad exemplar images or settings.
            FloatingPointError: the loss stopped being finite.

        On these and any other error the adapter is left exactly as it was before the call.
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
        views = pair_views(to_rgb_image(source, name="exemplar source"), to_rgb_image(target, name="exemplar target"),
                           config.augment)  # fmt: skip
        pair = [self._encode_pair_for_training(view_source, view_target, device, config.resolution)
                for view_source, view_target in views]  # fmt: skip
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
            "resolution": config.resolution,
            **{name: getattr(config, name) for name in ("augment", "anchor_weight", "early_stopping")
               if getattr(config, name) != getattr(AdaptationConfig, name)},
        }  # fmt: skip
        return result

    @torch.no_grad()
    def _encode_pair_for_training(
        self, source: ImageInput, target: ImageInput, device, resolution: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The exemplar as the objective reads it: latents of both images at the source's size (as the pipeline
        sizes a query), scaled down to at most `resolution`² pixels when given, and SigLIP features as
        `encode_exemplar` computes them."""
        source_pixels = self._preprocess_queries(source)  # (1, 3, H, W) in [-1, 1]
        height, width = source_pixels.shape[-2:]
        target_rgb = to_rgb_image(target, name="exemplar target")
        target_pixels = self._preprocess_at_size(target_rgb, height, width, resize_mode="crop")
        pixels = torch.cat([source_pixels, target_pixels]).to(device)  # (2, 3, H, W)
        if resolution is not None and height * width > resolution**2 and self.config.get("image_size") is None:
            pixels = self._scaled_down(pixels, resolution)  # (a model that knows one size adapts at that size)
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

    def _scaled_down(self, pixels: torch.Tensor, resolution: int) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, h, w): the largest multiples of 16 with the same aspect and h * w <= resolution²
        (antialiased bilinear), for `AdaptationConfig.resolution`."""
        height, width = pixels.shape[-2:]
        multiple_of = self.vae_scale_factor * 2
        scale = (resolution**2 / (height * width)) ** 0.5
        size = [max(multiple_of, int(side * scale) // multiple_of * multiple_of) for side in (height, width)]
        return torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True).clamp(-1, 1)

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
