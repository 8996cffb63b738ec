"""The documentation site builds with `mkdocs build --strict`: every page of the nav exists, every link and
cross-reference resolves, and the API reference renders every public name from its docstring."""

import ast
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_the_documentation_builds_strictly_with_an_api_page_for_every_module(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (site / "index.html").is_file() and (site / "toyworld" / "index.html").is_file()
    documented = "".join(path.read_text() for path in (ROOT / "docs" / "api").glob("*.md"))
    modules = {  # every module that defines something (a package that only gathers its modules' names does not)
        ".".join(path.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "src" / "diffusers_delta").rglob("*.py")
        if any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in ast.parse(path.read_text()).body)
    }
    missing = sorted(module for module in modules if f"::: {module}\n" not in documented + "\n")
    assert missing == []  # a new module gets its place in the API reference
    pipeline_page = (site / "api" / "pipelines" / "index.html").read_text()
    assert "FluxDeltaEditPipeline" in pipeline_page and "compute_empty_prompt_embeds" in pipeline_page
