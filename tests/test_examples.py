"""The examples run as a user runs them, on tiny models saved to local folders (the real loading code, offline)."""

import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_delta import compute_empty_prompt_embeds
from diffusers_delta.testing import TEXT_KWARGS, random_image, randomize_, tiny_klein_pipeline


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import edit_with_exemplar  # noqa: E402


@pytest.mark.parametrize("adapt_steps", [0, 2])
def test_edit_with_exemplar_cli_matches_the_pipeline(delta_pipe, tmp_path, adapt_steps):
    randomize_(delta_pipe.delta_adapter)
    delta_pipe.empty_prompt_embeds = compute_empty_prompt_embeds(delta_pipe, **TEXT_KWARGS)
    delta_pipe.save_delta_adapter(tmp_path / "adapter")
    tiny_klein_pipeline().save_pretrained(tmp_path / "base")
    paths = {}
    for name, seed in (("source", 1), ("target", 2), ("query", 0)):
        paths[name] = tmp_path / f"{name}.png"
        random_image(seed).save(paths[name])

    # fmt: off
    edit_with_exemplar.main([
        "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
        "--source", str(paths["source"]), "--target", str(paths["target"]), "--query", str(paths["query"]),
        "--output", str(tmp_path / "edited.png"), "--device", "cpu", "--seed", "3",
        "--adapt-steps", str(adapt_steps),
    ])
    # fmt: on
    if adapt_steps:  # the same adaptation, in memory, from the same loaded weights
        delta_pipe.load_delta_adapter(tmp_path / "adapter")
        source, target = PIL.Image.open(paths["source"]), PIL.Image.open(paths["target"])
        delta_pipe.adapt_to_exemplar(source, target, num_steps=adapt_steps, generator=torch.Generator().manual_seed(3))

    expected = delta_pipe(
        PIL.Image.open(paths["query"]),
        exemplar=(PIL.Image.open(paths["source"]), PIL.Image.open(paths["target"])),
        prompt_embeds=delta_pipe.empty_prompt_embeds,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "edited.png")), np.asarray(expected))


def test_errors_are_one_line_and_advise_only_what_the_script_offers(tmp_path, capsys):
    tiny_klein_pipeline().save_pretrained(tmp_path / "base")
    random_image(0).save(tmp_path / "image.png")
    images = ["--source", "--target", "--query"]
    common = [part for flag in images for part in (flag, str(tmp_path / "image.png"))]
    common += ["--output", str(tmp_path / "edited.png"), "--device", "cpu"]
    capsys.readouterr()
    for base, adapter in ((str(tmp_path / "base"), "org/my-adapter"), ("org/klein", "org/my-adapter")):
        with pytest.raises(SystemExit) as exit_info:
            edit_with_exemplar.main(["--base", base, "--adapter", adapter, *common])
        lines = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and "Traceback" not in "".join(lines)
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:]  # after library logs, if any
        assert "HF_HUB_OFFLINE is set" in lines[-1] and "local_files_only" not in lines[-1]
    assert not (tmp_path / "edited.png").exists()


def test_the_placeholder_adapter_and_a_bad_image_are_refused_before_the_base_loads(tmp_path, capsys, monkeypatch):
    random_image(0).save(tmp_path / "image.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    loads = []
    monkeypatch.setattr(edit_with_exemplar, "load_pipeline", lambda args: loads.append(args))
    images = {"--source": "image.png", "--target": "image.png", "--query": "image.png"}
    for adapter, broken in (("org/delta-adapter", None), (str(tmp_path), "--query")):
        argv = ["--base", "black-forest-labs/FLUX.2-klein-4B", "--adapter", adapter, "--output",
                str(tmp_path / "o.png")]
        for flag, name in images.items():
            argv += [flag, str(tmp_path / ("broken.png" if flag == broken else name))]
        with pytest.raises(SystemExit):
            edit_with_exemplar.main(argv)
        message = capsys.readouterr().err.splitlines()[-1]
        assert message.startswith("error: ") and ("placeholder" in message if broken is None else "broken" in message)
    assert loads == []  # the multi-GB base was never asked for
