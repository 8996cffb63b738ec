"""`DeltaLoraMixin`: the LoRA of the transformer an adapter folder may bring, put in beside the user's own and taken
out without a trace."""

from __future__ import annotations

from inspect import signature

from .adapter_files import LORA_WEIGHTS_NAME


#: The peft adapter name of an adapter folder's LoRA (a second one, loaded while the first is still in place, gets
#: a numbered name, so that a failed load can leave the first untouched).
LORA_ADAPTER_NAME = "delta_adapter"


class DeltaLoraMixin:
    """Injects and removes the adapter's LoRA (`_delta_lora_name` names it). Part of `DeltaAdapterMixin`."""

    #: The peft adapter name of the LoRA the loaded adapter brought, if any.
    _delta_lora_name: str | None = None

    def _inject_delta_lora(self, state_dict: dict, metadata: dict | None, source_name: str) -> str:
        """Adds the adapter's LoRA under a name of its own, beside any LoRA already there; -> that name."""
        taken = set(getattr(self.transformer, "peft_config", {}) or {})
        name = next(
            candidate
            for candidate in [LORA_ADAPTER_NAME] + [f"{LORA_ADAPTER_NAME}_{i}" for i in range(1, len(taken) + 2)]
            if candidate not in taken
        )
        # FLUX.1's loader (FluxLoraLoaderMixin) takes the kohya-style alphas too: none here, the metadata has them
        alphas = (
            {"network_alphas": None}
            if "network_alphas" in signature(self.load_lora_into_transformer).parameters
            else {}
        )
        try:
            self.load_lora_into_transformer(  # offloading is handled by the caller
                dict(state_dict), transformer=self.transformer, adapter_name=name, metadata=metadata, **alphas
            )
        except Exception as error:  # peft's own errors (IndexError, KeyError, ...) say little about the file
            raise ValueError(
                f"The LoRA ({LORA_WEIGHTS_NAME}) of {source_name!r} could not be loaded into this transformer "
                f"({type(error).__name__}: {error}). Save the adapter's LoRA again with save_delta_adapter."
            ) from None
        if name not in (getattr(self.transformer, "peft_config", {}) or {}):
            raise ValueError(f"The LoRA of {source_name!r} holds no weights for this transformer.")
        return name

    def _delete_delta_lora(self) -> None:
        """Removes the LoRA the loaded adapter brought (unless the user already removed it). When it is the only
        LoRA, peft's wrapper layers go too, so that the transformer's modules and state-dict names are those it had
        before (`save_pretrained` would otherwise write `to_q.base_layer.weight`, which `from_pretrained` ignores)."""
        loras = getattr(self.transformer, "peft_config", None) or {}
        if self._delta_lora_name not in loras:
            return
        if set(loras) == {self._delta_lora_name}:
            self.transformer.unload_lora()
        else:  # the user's own LoRA stays, in its wrappers
            self.delete_adapters(self._delta_lora_name)
