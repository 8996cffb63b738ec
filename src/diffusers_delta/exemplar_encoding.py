"""`ExemplarEncodingMixin`: an exemplar pair (or several) -> the edit tokens the adapter's processors attend to."""

from __future__ import annotations

import torch

from .checks import as_tensor
from .image_inputs import ImageInput
from .semantic_delta import SiglipPreprocessor, images_to_siglip_pixels, semantic_delta


ExemplarPair = tuple[ImageInput, ImageInput]
#: How `encode_exemplar` combines several pairs' semantic deltas.
EXEMPLAR_COMBINATIONS = ("mean", "sum")


def as_exemplar_pairs(exemplar) -> list[ExemplarPair]:
    """A (source, target) pair or a non-empty list of pairs -> list of pairs; anything else raises."""
    fix = "pass exemplar=(source, target), or a list of such pairs to average their edits"
    if isinstance(exemplar, list) and any(isinstance(pair, (tuple, list)) for pair in exemplar):  # several pairs
        for number, pair in enumerate(exemplar, start=1):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                got = f"{len(pair)} images" if isinstance(pair, (tuple, list)) else f"a {type(pair).__name__}"
                raise ValueError(
                    f"exemplar {number} of {len(exemplar)} is not a (source, target) pair (it is {got}): {fix}."
                )
        return [tuple(pair) for pair in exemplar]
    if not isinstance(exemplar, (tuple, list)):
        raise ValueError(f"exemplar must be a (source, target) pair, got {type(exemplar).__name__}: {fix}.")
    if len(exemplar) != 2:
        raise ValueError(f"An exemplar is a (source, target) pair of 2 images, got {len(exemplar)}: {fix}.")
    return [tuple(exemplar)]


class ExemplarEncodingMixin:
    """`encode_exemplar` with the loaded adapter's image encoder and feature extractor. Part of `DeltaAdapterMixin`."""

    @torch.no_grad()
    def encode_exemplar(
        self,
        exemplar: ExemplarPair | list[ExemplarPair],
        device: torch.device | None = None,
        combine: str = "mean",
    ) -> torch.Tensor:
        """Edit tokens of an exemplar pair, or of several pairs whose semantic deltas are combined.

        Encode once and pass the result as `delta_embeds=` to edit many queries without re-encoding.

        Args:
            exemplar: `(source, target)` images (PIL, numpy or torch), or a list of such pairs.
            device: where to compute; defaults to the pipeline's execution device.
            combine: how several pairs' semantic deltas make one: `"mean"` (several exemplars of one edit: a steadier
                delta) or `"sum"` (exemplars of different edits: edit arithmetic, whose sum stands for the edits
                composed). One pair is the same either way.

        Returns:
            (1, N, D_edit) edit tokens, in the adapter's dtype.
        """
        self._require_delta_adapter()
        if combine not in EXEMPLAR_COMBINATIONS:
            raise ValueError(f"combine must be one of {EXEMPLAR_COMBINATIONS}, got {combine!r}.")
        pairs = as_exemplar_pairs(exemplar)
        device = device or self._execution_device
        preprocessor = SiglipPreprocessor.from_feature_extractor(self.feature_extractor)
        sources = images_to_siglip_pixels([pair[0] for pair in pairs], preprocessor, "exemplar source")
        targets = images_to_siglip_pixels([pair[1] for pair in pairs], preprocessor, "exemplar target")
        encoder_dtype = self.image_encoder.dtype
        deltas = semantic_delta(
            self.image_encoder, sources.to(device, encoder_dtype), targets.to(device, encoder_dtype)
        )  # (K, P, D_enc)
        combined = deltas.sum(dim=0, keepdim=True) if combine == "sum" else deltas.mean(dim=0, keepdim=True)
        return self.delta_adapter(combined.to(self.delta_adapter.dtype))  # (1, P, D_enc) -> (1, N, D_edit)

    def _edit_tokens(
        self, exemplar, delta_embeds: torch.Tensor | None, batch_size: int, device: torch.device, combine: str = "mean"
    ) -> torch.Tensor:
        """Edit tokens for every sample of the batch: -> (batch_size, N, D_edit)."""
        self._check_not_tensor_parallel()
        if delta_embeds is None:
            delta_embeds = self.encode_exemplar(exemplar, device=device, combine=combine)
        else:
            delta_embeds = as_tensor(delta_embeds, "delta_embeds", "pass the edit tokens encode_exemplar returns")
        expected = (self.delta_adapter.config.num_edit_tokens, self.delta_adapter.config.edit_token_dim)
        if delta_embeds.ndim != 3 or tuple(delta_embeds.shape[1:]) != expected:
            raise ValueError(
                f"delta_embeds must have shape (1 or batch, {expected[0]}, {expected[1]}) as returned by "
                f"encode_exemplar, got {tuple(delta_embeds.shape)}."
            )
        if delta_embeds.shape[0] == 1:
            delta_embeds = delta_embeds.expand(batch_size, -1, -1)
        elif delta_embeds.shape[0] != batch_size:
            raise ValueError(f"delta_embeds has batch {delta_embeds.shape[0]}, expected 1 or {batch_size}.")
        return delta_embeds.to(device=device, dtype=self.delta_adapter.dtype)
