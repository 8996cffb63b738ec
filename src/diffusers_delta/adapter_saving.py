"""`DeltaAdapterSavingMixin`: `save_delta_adapter`, the loaded (or adapted) adapter written as a folder."""

from __future__ import annotations

import os

from .adapter_files import write_adapter_folder
from .atomic_folder import check_save_directory
from .hub import push_folder, render_model_card


class DeltaAdapterSavingMixin:
    """Writes the loaded adapter, its LoRA, image encoder and empty prompt in the layout `load_delta_adapter` reads.
    Part of `DeltaAdapterMixin`."""

    def save_delta_adapter(
        self,
        save_directory: str | os.PathLike,
        save_image_encoder: bool = True,
        model_card=None,
        repo_id: str | None = None,
        base_model: str | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
    ) -> None:
        """Writes the adapter in the layout `load_delta_adapter` reads (safetensors only): its weights, its LoRA
        (with rank, alpha and targets), the image encoder and the empty prompt's embeddings, and a model card (the
        one given, or one rendered whose snippet loads this folder or `repo_id`; it says when the adapter was adapted
        at test time). The write is atomic: the folder then holds exactly what was saved, and a failed save leaves
        it exactly as it was.

        Args:
            save_directory: the folder to write (created if missing; other files in it are left alone).
            save_image_encoder: also write `image_encoder/` (with its preprocessing config), so the folder is
                self-contained.
            model_card: a `huggingface_hub.ModelCard` to write as `README.md` (see `hub.render_model_card`).
            repo_id: the Hub repo to push to and that the rendered card's snippet loads (defaults to the folder).
            base_model: the base checkpoint named in a rendered card (defaults to the pipeline's own).
            is_main_process: whether this process writes (pass `accelerator.is_main_process` under distributed runs).
            push_to_hub: also upload the folder to the Hub repo `repo_id` (created if needed).
            token: the Hub token for the upload (defaults to the logged-in one).
            private: create the repo private.
            commit_message: the upload's commit message.
        """
        adapter = self._require_delta_adapter()
        check_save_directory(save_directory)
        if model_card is None:  # every saved folder carries a card whose snippet loads it
            base_model = base_model or self.name_or_path or self.transformer.config.get("_name_or_path")
            if not base_model and (push_to_hub or repo_id is not None):
                raise ValueError("This pipeline was not loaded from a checkpoint: pass base_model= for the card.")
            model_card = render_model_card(
                adapter,
                repo_id=repo_id or os.fspath(save_directory),
                base_model=str(base_model) if base_model else None,
                image_encoder=str(self.image_encoder.name_or_path or "SigLIP"),
                adaptation=self._delta_adaptation,
            )
        if not is_main_process:
            return
        lora_state_dict = lora_metadata = None
        if self._delta_lora_name is not None:
            from peft.utils import get_peft_model_state_dict

            lora_state_dict = get_peft_model_state_dict(self.transformer, adapter_name=self._delta_lora_name)
            lora_metadata = self.transformer.peft_config[self._delta_lora_name].to_dict()
        write_adapter_folder(
            save_directory,
            adapter,
            image_encoder=self.image_encoder if save_image_encoder else None,
            feature_extractor=self.feature_extractor,
            empty_prompt_embeds=self._empty_prompt(),
            lora_state_dict=lora_state_dict,
            lora_metadata=lora_metadata,
            model_card=model_card,
        )
        if push_to_hub:
            push_folder(
                save_directory,
                repo_id or os.path.basename(os.path.normpath(os.fspath(save_directory))),
                token=token,
                private=private,
                commit_message=commit_message or "Upload Delta-Adapter",
            )
