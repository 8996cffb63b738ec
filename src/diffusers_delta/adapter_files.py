"""The Delta-Adapter folder, on disk and on the Hub: where each file is, reading and checking it, writing the folder.

    ADAPTER/                              (a local folder, or the `subfolder` of a Hub repo or folder)
      config.json                         DeltaAdapterModel's config
      diffusion_pytorch_model.safetensors its weights (`weight_name` picks another .safetensors name)
      empty_prompt_embeds.safetensors     optional: the empty prompt's (1, L, D_txt) embeddings
      pytorch_lora_weights.safetensors    optional: a LoRA for the transformer, diffusers' format with its metadata
      image_encoder/                      optional: the SigLIP encoder and its preprocessor_config.json
      README.md                           optional: the model card

Every reader checks what it reads (keys, shapes, finite values) and says what is wrong with which file; the
writer stages the whole folder and swaps it in (`atomic_folder`), so a failed save changes nothing. Only
safetensors files are ever read.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import _CACHED_NO_EXIST
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from .atomic_folder import atomic_folder
from .checks import non_finite_keys
from .models.delta_adapter import DeltaAdapterModel


logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
ADAPTER_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
EMPTY_PROMPT_EMBEDS_NAME = "empty_prompt_embeds.safetensors"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
IMAGE_ENCODER_FOLDER = "image_encoder"
MODEL_CARD_NAME = "README.md"
#: What a saved adapter folder may hold (the training script adds its validation grid and exemplar): saving replaces
#: these and leaves anything else in the folder (checkpoints, logs, a user's files) alone.
ADAPTER_FOLDER_ENTRIES = (
    CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    EMPTY_PROMPT_EMBEDS_NAME,
    LORA_WEIGHTS_NAME,
    IMAGE_ENCODER_FOLDER,
    MODEL_CARD_NAME,
    "validation.png",
    "examples",
)
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_filesystem_path(path: str | os.PathLike) -> bool:
    """Whether a user's string names a place on disk rather than a path inside a repo: a `Path`, an absolute path,
    or one starting with `.`, `..` or `~`."""
    if not isinstance(path, str):
        return True
    return os.path.isabs(path) or path.startswith(("./", "../", "~", ".\\", "..\\")) or path in (".", "..")


# ----------------------------------------------------------------------------------------------- locating files


def hub_unreachable_error(repo_id: str, what: str, local_files_only: bool = False) -> OSError:
    """The error for a Hub download that could not even be tried: offline, or no connection."""
    if hub_constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif local_files_only:
        why = "local_files_only=True"
    else:
        why = "the Hub could not be reached"
    return OSError(
        f"Could not download {what} from {repo_id!r}: {why}, and it is not in the local cache. Pass a local folder "
        "that holds it, or allow downloads (unset HF_HUB_OFFLINE, check the network) and try again."
    )


def is_hub_unreachable(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) says that the Hub was offline or could not be reached."""
    while error is not None:
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        if type(error).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
            return True
        error = error.__cause__ or error.__context__
    return False


def _hub_error(repo_id: str, filename: str, error: Exception, local_files_only: bool = False) -> OSError:
    """What went wrong fetching `filename` from the Hub, in words a user can act on."""
    if isinstance(error, GatedRepoError):
        return OSError(f"{repo_id!r} is a gated repo: accept its terms on the Hub and pass token= (or log in).")
    if isinstance(error, RepositoryNotFoundError):
        return OSError(
            f"{repo_id!r} is neither a local folder nor a repo on the Hub (a private repo needs token=). "
            "Check the name, or pass the path of a folder written by save_delta_adapter."
        )
    if isinstance(error, RevisionNotFoundError):
        return OSError(f"{repo_id!r} has no such revision: pass an existing branch, tag or commit as revision=.")
    if is_hub_unreachable(error):
        return hub_unreachable_error(repo_id, filename, local_files_only)
    if isinstance(error, EntryNotFoundError):
        return OSError(f"The Hub repo {repo_id!r} has no {filename}: it does not hold a Delta-Adapter there.")
    return OSError(f"Could not download {filename} of {repo_id!r}: {error}")


#: The adapter id the documentation's commands and snippets use: a placeholder, since no trained FLUX.2 [klein]
#: Delta-Adapter is published yet.
PLACEHOLDER_ADAPTER_ID = "org/delta-adapter"


def _inside_the_adapter(name: str, what: str) -> str:
    """`name` (a file or subfolder name, '/'-separated) when it stays inside the adapter's folder or repo."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise ValueError(f"{what}={name!r} leaves the adapter's folder: name a path inside it.")
    return name


@dataclass(frozen=True)
class AdapterLocation:
    """Where an adapter lies: a local folder, or a Hub repo (and subfolder) fetched file by file into the cache.

    Build it with `AdapterLocation.resolve`. `fetch` gives a local path for each file.
    """

    source: str
    subfolder: str
    local_root: Path | None  # the source folder when it is local; None for a Hub repo
    hub_kwargs: dict

    @classmethod
    def resolve(cls, source: str | os.PathLike, subfolder: str | None, hub_kwargs: dict) -> "AdapterLocation":
        """Checks that `source` can name an adapter and says how to fix it when not.

        Args:
            source: a local folder or a Hub repo id.
            subfolder: the adapter's folder inside it, if any.
            hub_kwargs: `HUB_KWARGS` for downloads.
        """
        subfolder = _inside_the_adapter((subfolder or "").strip("/"), "subfolder")
        hub_kwargs = {key: value for key, value in hub_kwargs.items() if key != "proxies"}  # set through the env
        path = Path(source).expanduser()
        if path.is_file():
            hint = "weight_name= names its weights file" if path.suffix == ".safetensors" else "not a file in it"
            raise ValueError(f"{str(source)!r} is a file: pass the folder that holds the adapter ({hint}).")
        if path.is_dir():
            location = cls(str(source), subfolder, path, hub_kwargs)
            if not location.folder.is_dir():
                raise FileNotFoundError(f"{str(source)!r} has no subfolder {subfolder!r}.")
            return location
        if str(source) == PLACEHOLDER_ADAPTER_ID:
            raise FileNotFoundError(
                f"{PLACEHOLDER_ADAPTER_ID!r} is the documentation's placeholder, not a published adapter: no trained "
                "FLUX.2 [klein] Delta-Adapter is published yet. Train one with examples/train_delta_adapter.py (or "
                "use one you have), and pass its folder or Hub id."
            )
        try:
            if isinstance(source, os.PathLike) or is_filesystem_path(str(source)):
                raise HFValidationError("a path")
            validate_repo_id(str(source))
        except HFValidationError:
            raise FileNotFoundError(
                f"No folder {str(source)!r}, and it is not a Hub repo id ('org/name'): pass an existing folder."
            ) from None
        return cls(str(source), subfolder, None, hub_kwargs)

    @property
    def folder(self) -> Path:
        """The adapter's local folder (local sources only)."""
        return self.local_root / self.subfolder if self.subfolder else self.local_root

    def describe(self) -> str:
        """Where the adapter is, as an error message names it: the repo or folder, and its subfolder."""
        return f"{self.source!r}" + (f" (subfolder {self.subfolder!r})" if self.subfolder else "")

    def fetch(self, filename: str, required: bool) -> str | None:
        """The local path of one file of the adapter; `None` when an optional file is absent.

        A required file that is missing raises `FileNotFoundError` (local) or `OSError` (Hub) naming it; a file
        that could not be looked at because the Hub is unreachable is never reported as missing.
        """
        filename = _inside_the_adapter(filename, "weight_name" if filename.endswith(".safetensors") else "file")
        if self.local_root is not None:
            path = self.folder / filename
            if path.is_file():
                return str(path)
            if path.is_symlink() and not path.exists():
                raise FileNotFoundError(f"{path} is a broken link (to {os.readlink(path)}): its target is missing.")
            if path.is_dir():
                raise FileNotFoundError(f"{path} is a folder, not a file: {filename} must be the file itself.")
            if path.exists():  # a FIFO, a socket, a device: reading it could block or never end
                raise FileNotFoundError(
                    f"{path} is not a regular file (it is a {_file_kind(path)}): {filename} must be the file itself."
                )
            if required:
                self._refuse_pickles(filename)
                held = sorted(p.name for p in self.folder.iterdir())
                held = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "") or "nothing"
                raise FileNotFoundError(
                    f"No Delta-Adapter at {self.describe()}: it has no {filename} (it holds {held}). Pass the folder "
                    "written by save_delta_adapter or the training script."
                )
            return None
        try:
            return hf_hub_download(self.source, filename, subfolder=self.subfolder or None, **self.hub_kwargs)
        except LocalEntryNotFoundError as error:
            if required:
                raise _hub_error(self.source, filename, error, self.hub_kwargs.get("local_files_only")) from None
            cached = try_to_load_from_cache(
                self.source,
                filename if not self.subfolder else f"{self.subfolder}/{filename}",
                cache_dir=self.hub_kwargs.get("cache_dir"),
                revision=self.hub_kwargs.get("revision"),
            )
            if cached is not _CACHED_NO_EXIST:
                logger.warning(
                    f"Could not check whether {self.describe()} has {filename}: the Hub is unreachable and the file "
                    "is not in the cache. Loading without it."
                )
            return None
        except EntryNotFoundError as error:
            if required:
                raise _hub_error(self.source, filename, error) from None
            return None
        except (RepositoryNotFoundError, RevisionNotFoundError, OSError) as error:
            raise _hub_error(self.source, filename, error) from None

    def _refuse_pickles(self, filename: str) -> None:
        if not filename.endswith(".safetensors"):
            return
        pickles = sorted(p.name for p in self.folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"{self.describe()} holds {', '.join(pickles)} but no {filename}. Delta-Adapter loads only "
                "safetensors weights: convert the file with safetensors.torch.save_file and save it under that name."
            )

    def fetch_image_encoder(self, image_encoder_folder: str | os.PathLike) -> Path:
        """The local folder of the SigLIP encoder, by diffusers' rule for `image_encoder_folder`: a plain name is a
        subfolder of the adapter's folder, a relative path with `/` a folder inside the repo, and a `Path`, an
        absolute path or one starting with `.`, `..` or `~` a folder on disk. The working directory is never read
        for a name that is not explicitly a path."""
        if is_filesystem_path(image_encoder_folder):
            folder = Path(image_encoder_folder).expanduser()
            where = f"{str(image_encoder_folder)!r}"
        else:
            inside = (
                image_encoder_folder if "/" in image_encoder_folder else f"{self.subfolder}/{image_encoder_folder}"
            )
            inside = inside.strip("/")
            where = f"{self.source!r}, folder {inside!r}"
            if self.local_root is not None:
                folder = self.local_root / inside
            else:
                try:
                    snapshot = snapshot_download(self.source, allow_patterns=[f"{inside}/*"], **self.hub_kwargs)
                except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, OSError) as error:
                    local_only = self.hub_kwargs.get("local_files_only")
                    raise _hub_error(self.source, f"the image encoder ({inside}/)", error, local_only) from None
                folder = Path(snapshot) / inside
        if not (folder / CONFIG_NAME).is_file():
            raise OSError(
                f"No SigLIP image encoder at {where} (no {CONFIG_NAME} there). Pass image_encoder_folder= where it "
                "lies, or register an image_encoder on the pipeline first."
            )
        return folder


# ----------------------------------------------------------------------------------------------- reading files


def read_adapter_config(path: str) -> dict:
    """The adapter's config from its `config.json`, checked to be one."""
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON config ({error}). Save the adapter again.") from None
    except RecursionError:  # JSON nested thousands deep: no config is
        raise ValueError(f"{path} is not a Delta-Adapter config (its JSON is nested too deep). Save the adapter "
                         "again.") from None  # fmt: skip
    if not isinstance(config, dict) or config.get("_class_name") != DeltaAdapterModel.__name__:
        raise ValueError(
            f"{path} is not a Delta-Adapter config (its _class_name is "
            f"{config.get('_class_name') if isinstance(config, dict) else None!r}, expected "
            f"{DeltaAdapterModel.__name__!r}). Pass the folder written by save_delta_adapter."
        )
    for name, parameter in inspect.signature(DeltaAdapterModel.__init__).parameters.items():
        value = config.get(name, parameter.default)
        if isinstance(parameter.default, int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{path}: {name} must be a positive integer, got {value!r}. Save the adapter again.")
        if isinstance(parameter.default, str) and not isinstance(value, str):
            raise ValueError(
                f"{path}: {name} must be a string (such as {parameter.default!r}), got {_short(value)}. Save the "
                "adapter again."
            )
    return config


def _file_kind(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is, in words."""
    mode = path.stat().st_mode
    kinds = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "special file")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_safetensors(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file and its metadata; a corrupt file raises a `ValueError` naming it."""
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            return {key: file.get_tensor(key) for key in file.keys()}, metadata
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(
            f"{what} {path} is corrupt or not a safetensors file ({error}). Save it again, or download it again "
            "with force_download=True."
        ) from None


def _check_config_counts(config: dict, keys, where: str) -> None:
    """Refuses a config whose block and layer counts are not those of its weights, before a model is built from it
    (a hostile count of millions would take minutes to build even on the `meta` device)."""
    counts = {"num_double_blocks": "double_blocks.", "num_single_blocks": "single_blocks."}
    if config.get("projection_type", "perceiver") == "perceiver":
        counts["resampler_depth"] = "resampler.layers."
    for name, prefix in counts.items():
        held = len({key[len(prefix) :].split(".", 1)[0] for key in keys if key.startswith(prefix)})
        if config.get(name) is not None and config[name] != held:
            raise ValueError(
                f"The Delta-Adapter config of {where} says {name}={config[name]}, but its weights hold {held}. Save "
                "the adapter again, or pass the config these weights were made with."
            )


def check_adapter_state_dict(config: dict, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Refuses weights that do not fit the adapter `config` exactly (names, shapes) or that hold NaN/infinity.

    The config's shapes come from a model built on the `meta` device (no memory, whatever sizes the config claims;
    a thread-local device context, where accelerate's `init_empty_weights` would patch torch for every thread)."""
    _check_config_counts(config, state_dict.keys(), where)
    try:
        with torch.device("meta"):
            expected = DeltaAdapterModel.from_config(config).state_dict()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"The Delta-Adapter config of {where} is invalid ({error}). Save the adapter again."
        ) from None
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The Delta-Adapter weights of {where} do not match its config: "
            + "; ".join(
                f"{label} {len(keys)} tensors ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                for label, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            )
            + ". Save the adapter again, or pass the config these weights were made with."
        )
    wrong = [
        f"{key}: {tuple(state_dict[key].shape)} in the weights, {tuple(tensor.shape)} in the config"
        for key, tensor in expected.items()
        if state_dict[key].shape != tensor.shape
    ]
    if wrong:
        raise ValueError(
            f"The Delta-Adapter weights of {where} do not match its config ({'; '.join(wrong[:3])}). Save the "
            "adapter again, or pass the config these weights were made with."
        )
    not_float = [f"{key} ({state_dict[key].dtype})" for key in expected if not state_dict[key].is_floating_point()]
    if not_float:  # every parameter of the adapter is a float: an integer copy has lost its values
        raise ValueError(
            f"The Delta-Adapter weights of {where} are corrupt: {', '.join(not_float[:4])} "
            f"{'is' if len(not_float) == 1 else 'are'} stored as integers, where every weight is a float. Save the "
            "adapter again."
        )
    bad = non_finite_keys(state_dict)
    if bad:
        raise ValueError(
            f"The Delta-Adapter weights of {where} hold NaN or infinite values (in {', '.join(bad[:4])}): "
            "the adapter diverged in training. Load an earlier checkpoint."
        )


def build_adapter(config: dict, state_dict: dict[str, torch.Tensor], low_cpu_mem_usage: bool = True):
    """A `DeltaAdapterModel` holding exactly `state_dict` (checked with `check_adapter_state_dict` first).

    Args:
        config: the adapter's config.
        state_dict: its weights.
        low_cpu_mem_usage: build the model on the `meta` device and take the loaded tensors as its weights, instead
            of initialising weights that are overwritten at once.
    """
    if low_cpu_mem_usage:
        with torch.device("meta"):  # thread-local, unlike accelerate's init_empty_weights
            adapter = DeltaAdapterModel.from_config(config)
        if len({tensor.dtype for tensor in state_dict.values()}) > 1:  # as the copying path casts them: one dtype
            state_dict = {key: tensor.float() for key, tensor in state_dict.items()}
        adapter.load_state_dict(state_dict, strict=True, assign=True)
    else:
        adapter = DeltaAdapterModel.from_config(config)
        adapter.load_state_dict(state_dict, strict=True)
    return adapter.eval()


def read_adapter(config: dict, weights_path: str, where: str, low_cpu_mem_usage: bool = True):
    """The adapter of a folder: its weights read, checked against its `config` and built."""
    state_dict, _ = _read_safetensors(weights_path, "The Delta-Adapter weights file")
    check_adapter_state_dict(config, state_dict, where)
    return build_adapter(config, state_dict, low_cpu_mem_usage)


def read_image_encoder(folder: Path) -> tuple[SiglipVisionModel, SiglipImageProcessorPil]:
    """The SigLIP encoder of a folder and its preprocessing (SigLIP's default when the folder has none), checked:
    every weight present with its shape and finite, square preprocessing."""
    fix = "Pass image_encoder_folder= where a SigLIP encoder saved with save_pretrained lies."
    try:
        image_encoder, info = SiglipVisionModel.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"The SigLIP image encoder in {folder} could not be loaded ({error}). {fix}") from None
    missing = list(info.get("missing_keys", [])) + [str(key) for key in info.get("mismatched_keys", [])]
    if missing:
        raise ValueError(
            f"The SigLIP image encoder in {folder} lacks weights or has weights of other shapes "
            f"({', '.join(missing[:3])}): it would run with random weights. {fix}"
        )
    bad = non_finite_keys(image_encoder.state_dict())
    if bad:
        raise ValueError(f"The SigLIP image encoder in {folder} holds NaN or infinite weights (in {bad[0]}). {fix}")
    if (folder / "preprocessor_config.json").is_file():
        feature_extractor = SiglipImageProcessorPil.from_pretrained(folder)
        size = feature_extractor.size
        if size.get("height") is None or size.get("height") != size.get("width"):
            raise ValueError(
                f"The SigLIP preprocessing in {folder} asks for {size}: it must be square (height = width)."
            )
    else:
        feature_extractor = default_feature_extractor(image_encoder)
    return image_encoder.eval(), feature_extractor


def read_empty_prompt_embeds(path: str, text_dim: int, pooled_dim: int | None = None) -> dict[str, torch.Tensor]:
    """The empty prompt's embeddings from `empty_prompt_embeds.safetensors`, checked: `prompt_embeds`
    (1, L, text_dim), and `pooled_prompt_embeds` (1, pooled_dim) for a backbone that takes pooled text embeddings
    too (FLUX.1: CLIP's, beside T5's)."""
    tensors, _ = _read_safetensors(path, "The empty-prompt embeddings file")
    fix = "Recompute it with diffusers_delta.compute_empty_prompt_embeds and save the adapter again."
    expected = {"prompt_embeds": (1, None, text_dim)}
    if pooled_dim is not None:
        expected["pooled_prompt_embeds"] = (1, pooled_dim)
    embeds = {}
    for name, shape in expected.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.ndim != len(shape) or any(n not in (None, m) for n, m in zip(shape, tensor.shape)):
            found = f"no {name}" if tensor is None else f"{name} of shape {tuple(tensor.shape)}"
            wanted = ", ".join("L" if n is None else str(n) for n in shape)
            raise ValueError(f"{path} holds {found}, expected shape ({wanted}) for this transformer. {fix}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path} holds NaN or infinite values. {fix}")
        embeds[name] = tensor
    return embeds


def read_lora(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A LoRA file in diffusers' format: its state dict and its adapter metadata (rank, alpha, targets)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    state_dict, metadata = _read_safetensors(path, "The LoRA weights file")
    lora_metadata = metadata.get(LORA_ADAPTER_METADATA_KEY)
    try:
        return state_dict, json.loads(lora_metadata) if lora_metadata else None
    except json.JSONDecodeError:
        raise ValueError(f"The LoRA metadata in {path} is not valid JSON. Save the LoRA again.") from None


def check_lora_fits(state_dict: dict[str, torch.Tensor], transformer, where: str) -> None:
    """Refuses a LoRA state dict (diffusers' `transformer.` keys) that does not fit `transformer`'s linear layers:
    unknown layers, wrong shapes, keys that are not LoRA weights, or NaN."""
    modules = dict(transformer.named_modules())
    problems = []
    for key, tensor in state_dict.items():
        name = key.removeprefix("transformer.")
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"):
            if name.endswith(suffix):
                layer_name, part = name[: -len(suffix)], suffix[1:]
                break
        else:
            problems.append(f"{key} is not a LoRA weight")
            continue
        layer = modules.get(layer_name)
        layer = getattr(layer, "base_layer", layer)  # a layer that already carries a LoRA
        if not isinstance(layer, torch.nn.Linear):
            problems.append(f"{key}: the transformer has no linear layer {layer_name}")
        elif part == "lora_A.weight" and (tensor.ndim != 2 or tensor.shape[1] != layer.in_features):
            problems.append(f"{key}: shape {tuple(tensor.shape)}, the layer takes {layer.in_features} inputs")
        elif part.startswith("lora_B") and tensor.shape[0] != layer.out_features:
            problems.append(f"{key}: shape {tuple(tensor.shape)}, the layer has {layer.out_features} outputs")
    if not state_dict:
        problems.append("it holds no tensors")
    problems += [f"{key} holds NaN or infinite values" for key in non_finite_keys(state_dict)]
    if problems:
        raise ValueError(
            f"The LoRA of {where} does not fit this transformer ({'; '.join(problems[:3])}). Load the adapter made "
            "for this base model, or save its LoRA again."
        )


# ----------------------------------------------------------------------------------------------- writing the folder


def write_adapter_folder(
    save_directory: str | os.PathLike,
    adapter: DeltaAdapterModel,
    image_encoder: SiglipVisionModel | None = None,
    feature_extractor: SiglipImageProcessorPil | None = None,
    empty_prompt_embeds: dict[str, torch.Tensor] | None = None,
    lora_state_dict: dict[str, torch.Tensor] | None = None,
    lora_metadata: dict | None = None,
    model_card=None,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
) -> None:
    """Writes an adapter folder atomically: a complete folder is staged beside `save_directory`, then swapped in.
    The folder then holds exactly what was written (stale adapter files of an earlier save are removed; files that
    are not an adapter's stay); if anything fails, `save_directory` is left exactly as it was.

    Args:
        save_directory: the folder (created if missing).
        adapter: the adapter.
        image_encoder: the SigLIP encoder to store in `image_encoder/`.
        feature_extractor: its preprocessing config (SigLIP's default at the encoder's size if `None`).
        empty_prompt_embeds: the empty prompt's embeddings by name (`prompt_embeds` (1, L, D_txt), and for FLUX.1
            `pooled_prompt_embeds` (1, D_pooled)).
        lora_state_dict: a LoRA of the transformer, as peft's `get_peft_model_state_dict` gives it.
        lora_metadata: its peft `LoraConfig` as a dict (rank, alpha, targets), stored in the file's metadata.
        model_card: a `huggingface_hub.ModelCard` to save as `README.md`.
        extra_files: more entries of the folder (name -> a function writing that path), e.g. a validation grid.
    """
    from diffusers import Flux2KleinPipeline

    with atomic_folder(save_directory, owned=ADAPTER_FOLDER_ENTRIES) as staging:
        adapter.save_pretrained(staging, safe_serialization=True)
        if image_encoder is not None:
            encoder_dir = staging / IMAGE_ENCODER_FOLDER
            image_encoder.save_pretrained(encoder_dir, safe_serialization=True)
            (feature_extractor or default_feature_extractor(image_encoder)).save_pretrained(encoder_dir)
        if empty_prompt_embeds is not None:
            write_empty_prompt_embeds(empty_prompt_embeds, staging / EMPTY_PROMPT_EMBEDS_NAME)
        if lora_state_dict is not None:
            Flux2KleinPipeline.save_lora_weights(
                staging,
                transformer_lora_layers=lora_state_dict,
                transformer_lora_adapter_metadata=lora_metadata,
            )
        if model_card is not None:
            model_card.save(staging / MODEL_CARD_NAME)
        for name, write in (extra_files or {}).items():
            write(staging / name)


def write_empty_prompt_embeds(embeds: dict[str, torch.Tensor], path: Path) -> None:
    """Writes the empty prompt's embeddings by name (as `read_empty_prompt_embeds` reads them) to `path`."""
    safetensors.torch.save_file(
        {name: tensor.detach().to("cpu").contiguous() for name, tensor in embeds.items()}, path
    )


def default_feature_extractor(image_encoder: SiglipVisionModel) -> SiglipImageProcessorPil:
    """SigLIP's standard preprocessing at the encoder's resolution, for encoders saved without one."""
    size = image_encoder.config.image_size
    return SiglipImageProcessorPil(size={"height": size, "width": size})
