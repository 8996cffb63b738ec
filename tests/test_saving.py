"""Saving never loses an adapter: writes are atomic, a saved folder holds exactly what was saved, the LoRA travels
with its metadata, and a whole pipeline round-trips bit-for-bit. Failures are simulated by making the write raise at
the first file, at the last file, and while swapping the new files in."""

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig

from diffusers_delta import DeltaAdapterModel, FluxDeltaEditPipeline, compute_empty_prompt_embeds
from diffusers_delta.testing import TEXT_KWARGS, random_image, randomize_, tiny_klein_components


QUERY, SOURCE, TARGET = random_image(0), random_image(1), random_image(2)


def edit(pipe, **kwargs):
    return pipe(
        QUERY, exemplar=(SOURCE, TARGET), generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    ).images


def tree(folder):
    """Every file under `folder` with a hash of its bytes: what a failed write must leave unchanged."""
    if not folder.exists():
        return None
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def bare_pipe():
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def trained_pipe(delta_pipe):
    """A pipeline with a trained-like adapter and stored empty-prompt embeddings."""
    randomize_(delta_pipe.delta_adapter)
    delta_pipe._remember_loaded_adapter(delta_pipe.delta_adapter, "trained")
    delta_pipe.empty_prompt_embeds = compute_empty_prompt_embeds(delta_pipe, **TEXT_KWARGS)
    return delta_pipe


def card():
    return ModelCard("---\nlibrary_name: diffusers\n---\n# adapter A\n")


def fail_at(monkeypatch, where):
    """Makes the save raise at its first file (the adapter's weights), its last file (the model card), or the
    first rename of the swap."""

    def raise_disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "first":
        monkeypatch.setattr(DeltaAdapterModel, "save_pretrained", raise_disk_full)
    elif where == "last":
        monkeypatch.setattr(ModelCard, "save", raise_disk_full)
    else:
        real_replace, calls = os.replace, []

        def replace(source, target):
            calls.append(target)
            if len(calls) == (1 if where == "swap-first" else 3):
                raise_disk_full()
            return real_replace(source, target)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where", ["first", "last", "swap-first", "swap-later"])
def test_a_failed_save_over_an_adapter_leaves_it_whole(trained_pipe, tmp_path, monkeypatch, where):
    folder = tmp_path / "adapter"
    trained_pipe.save_delta_adapter(folder, model_card=card())
    before, expected = tree(folder), edit(trained_pipe)
    randomize_(trained_pipe.delta_adapter, seed=7)  # adapter B
    trained_pipe.empty_prompt_embeds = None

    with monkeypatch.context() as patch:
        fail_at(patch, where)
        with pytest.raises(OSError, match="No space left"):
            trained_pipe.save_delta_adapter(folder, model_card=card())
    assert tree(folder) == before  # A's files, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or backup folder left
    reloaded = bare_pipe()
    reloaded.load_delta_adapter(folder)
    assert (edit(reloaded, **TEXT_KWARGS) == expected).all()


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_failed_save_into_a_new_folder_leaves_nothing(trained_pipe, tmp_path, monkeypatch, where):
    fail_at(monkeypatch, where)
    with pytest.raises(OSError, match="No space left"):
        trained_pipe.save_delta_adapter(tmp_path / "new" / "adapter", model_card=card())
    assert list(tmp_path.iterdir()) == []  # not even the parent folder it created


def test_a_saved_folder_holds_exactly_what_was_saved(trained_pipe, tmp_path):
    folder = tmp_path / "adapter"
    trained_pipe.save_delta_adapter(folder, model_card=card())
    (folder / "notes.txt").write_text("mine")  # not an adapter file: kept
    trained_pipe.empty_prompt_embeds = None
    trained_pipe.save_delta_adapter(folder, save_image_encoder=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",  # a card of its own, rendered
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "notes.txt",
    ]
    reloaded = bare_pipe()
    reloaded.register_modules(image_encoder=trained_pipe.image_encoder)
    reloaded.load_delta_adapter(folder)
    assert reloaded.empty_prompt_embeds is None  # the stale embeddings did not come back


def test_saving_onto_a_file_or_from_another_process_writes_nothing(trained_pipe, tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(ValueError, match="is a file: pass the path of a folder"):
        trained_pipe.save_delta_adapter(target)
    with pytest.raises(ValueError, match="adapter.safetensors is a file, not a folder"):
        trained_pipe.save_delta_adapter(target / "inside")
    assert target.read_bytes() == b"precious"
    trained_pipe.save_delta_adapter(tmp_path / "rank1", is_main_process=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_the_lora_is_saved_with_its_alpha_and_the_round_trip_is_exact(trained_pipe, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_out.0"])
    trained_pipe.transformer.add_adapter(lora, adapter_name="delta_adapter")
    trained_pipe._delta_lora_name = "delta_adapter"
    for name, parameter in trained_pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    expected = edit(trained_pipe)
    trained_pipe.save_delta_adapter(tmp_path / "adapter")

    reloaded = bare_pipe()
    reloaded.load_delta_adapter(tmp_path / "adapter")
    config = reloaded.transformer.peft_config["delta_adapter"]
    assert (config.r, config.lora_alpha) == (4, 16)
    assert (edit(reloaded, **TEXT_KWARGS) == expected).all()


def test_pipeline_round_trip_keeps_embeddings_and_block_scales(trained_pipe, tmp_path):
    text_free = FluxDeltaEditPipeline.from_pipe(trained_pipe, text_encoder=None, tokenizer=None)
    text_free.set_progress_bar_config(disable=True)
    text_free.empty_prompt_embeds = trained_pipe.empty_prompt_embeds
    text_free.set_delta_adapter_scale({"double": [0.5], "single": [1.0, -0.25]})
    expected = edit(text_free, **TEXT_KWARGS)
    text_free.save_pretrained(tmp_path / "pipe")

    reloaded = FluxDeltaEditPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.text_encoder is None
    assert reloaded.get_delta_adapter_scale() == {"double": [0.5], "single": [1.0, -0.25]}
    assert (edit(reloaded, **TEXT_KWARGS) == expected).all()


def test_a_pipeline_folder_with_bad_scales_says_so(trained_pipe, tmp_path):
    trained_pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "delta_adapter_scales.json").write_text('{"double": [1.0, 2.0]}')
    with pytest.raises(ValueError, match="delta_adapter_scales.json does not hold.*1 double-stream blocks.*Delete it"):
        FluxDeltaEditPipeline.from_pretrained(tmp_path / "pipe")


def test_pipeline_resave_is_atomic_and_drops_stale_files(trained_pipe, tmp_path, monkeypatch):
    folder = tmp_path / "pipe"
    trained_pipe.save_pretrained(folder)
    assert (folder / "empty_prompt_embeds.safetensors").is_file() and (folder / "text_encoder").is_dir()
    before = tree(folder)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # The adapter's weights, then the per-block scales: the last file a pipeline save writes.
    for owner, name in ((DeltaAdapterModel, "save_pretrained"), (FluxDeltaEditPipeline, "get_delta_adapter_scale")):
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, disk_full)
            with pytest.raises(OSError, match="No space left"):
                trained_pipe.save_pretrained(folder)
        assert tree(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]

    text_free = FluxDeltaEditPipeline.from_pipe(trained_pipe, text_encoder=None, tokenizer=None)
    text_free.empty_prompt_embeds = None
    text_free.save_pretrained(folder)
    assert not (folder / "empty_prompt_embeds.safetensors").exists()
    assert not (folder / "text_encoder").exists() and not (folder / "tokenizer").exists()
    assert FluxDeltaEditPipeline.from_pretrained(folder).empty_prompt_embeds is None


class _HubStandIn(BaseHTTPRequestHandler):
    """The Hub API calls an upload makes (create the repo, validate the card, ask how to upload, commit), answered
    locally."""

    commits: list = []
    validated: list = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        endpoint = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self._reply({"url": f"{endpoint}/{request['organization']}/{request['name']}"})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        elif "/commit/" in self.path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            self.commits.append((self.path, lines))
            repo_id = self.path.split("/api/models/")[1].split("/commit/")[0]
            commit = {"commitUrl": f"{endpoint}/{repo_id}/commit/{'1' * 40}", "commitOid": "1" * 40}
            self._reply({**commit, "pullRequestUrl": None})
        elif self.path == "/api/validate-yaml":  # the Hub checks a model card's metadata before the commit
            self.validated.append(json.loads(body)["content"])
            self._reply({"errors": [], "warnings": []})
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


def test_push_to_hub_uploads_the_saved_folder(trained_pipe, tmp_path, monkeypatch):
    import huggingface_hub

    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", f"http://127.0.0.1:{server.server_port}")
        _HubStandIn.commits.clear()
        _HubStandIn.validated.clear()
        trained_pipe.save_delta_adapter(
            tmp_path / "adapter", push_to_hub=True, repo_id="org/adapter", token="hf_x", base_model="org/base"
        )
    finally:
        server.shutdown()
    ((path, lines),) = _HubStandIn.commits
    assert path.startswith("/api/models/org/adapter/commit/")
    uploaded = {line["value"]["path"] for line in lines if line["key"] == "file"}
    saved = {str(p.relative_to(tmp_path / "adapter")) for p in (tmp_path / "adapter").rglob("*") if p.is_file()}
    assert uploaded == saved and "README.md" in saved  # the folder as saved, with its card
    assert _HubStandIn.validated[0].startswith("---\nbase_model: org/base\n")


def test_saved_folders_have_the_modes_of_a_plain_write_under_the_umask(trained_pipe, tmp_path):
    """Not the private modes of the temporary folder they were staged in: a folder saved for a shared server or
    a container volume is readable as the user's umask says."""
    previous = os.umask(0o022)
    try:
        trained_pipe.save_delta_adapter(tmp_path / "adapter")
        trained_pipe.save_pretrained(tmp_path / "pipeline")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "adapter", tmp_path / "pipeline"):
        entries = [folder, *folder.rglob("*")]
        assert {p.stat().st_mode & 0o777 for p in entries if p.is_dir()} == {0o755}
        assert {p.stat().st_mode & 0o777 for p in entries if p.is_file()} == {0o644}
