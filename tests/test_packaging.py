"""The package as people install it: a wheel and an sdist that pass `twine check`, and the wheel, installed into a
fresh virtual environment, runs the demo on the embedded model it carries (not on this checkout)."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from diffusers_delta import toyworld
from diffusers_delta.toyworld import showcase


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], check=True, capture_output=True)
    return out


def test_wheel_and_sdist_pass_twine_check(dist):
    files = sorted(p.name for p in dist.iterdir())
    assert len(files) == 2 and files[0].endswith(".whl") and files[1].endswith(".tar.gz")
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_installed_wheel_runs_the_demo_from_its_own_files(dist, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The dependencies come from this environment's site-packages, as a plain path: its editable install of the
    # checkout (a .pth hook) is not carried over, so only the wheel can provide diffusers_delta.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [str(python), "-c", "import diffusers_delta; print(diffusers_delta.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env=env,
    ).stdout  # fmt: skip
    assert where.startswith(site)
    edit = showcase.APP_EXAMPLES[toyworld.model_world()][0][0]  # one the shipped model makes
    demo = subprocess.run(
        [str(venv / "bin" / "diffusers-delta"), "demo", "--out", "grid.png", "--edits", edit],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "grid.png").is_file() and edit in demo.stdout


def test_the_examples_requirements_install_outside_the_checkout(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--no-deps", "-r",
         str(ROOT / "examples" / "requirements.txt")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
