"""Packaging for diffusers-delta: exemplar-based image editing (Delta-Adapter) for FLUX.2 [klein]."""

from setuptools import find_packages, setup


# Floors are the versions this package is tested against (see README.md, "Compatibility").
install_requires = [
    "torch>=2.13.0",
    "diffusers>=0.42.1",
    "transformers>=5.23.0",
    "huggingface_hub>=2.4.0",
    "safetensors>=0.8.0",
    "accelerate>=1.15.0",
    "peft>=0.21.0",
    "numpy>=1.26",
    "Pillow>=10.0",
    "Jinja2>=3.1",  # huggingface_hub renders model cards with it
]

extras_require = {
    "training": ["datasets>=5.2.0", "tensorboard>=2.21.0", "prodigyopt>=1.0"],
    # `diffusers-delta app`: Gradio and its dependencies, about 100 MB, so not installed by default.
    "app": ["gradio>=6.31.0"],
    # The documentation site (mkdocs.yml): `mkdocs serve`, or `mkdocs build --strict` as the suite runs it.
    "docs": ["mkdocs>=1.6.1", "mkdocs-material>=9.8.2", "mkdocstrings-python>=2.0.11"],
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.6",
        "datasets>=5.2.0",
        "tensorboard>=2.21.0",
        "prodigyopt>=1.0",
        "build>=1.2",
        "twine>=6.0",
        "gradio>=6.31.0",
        "gradio_client>=2.7.2",
        "gguf>=0.17",  # the GGUF-quantised base test
        "selenium>=4.51.0",  # the opt-in browser test (-m browser), with Debian's chromium and chromium-driver
        "mkdocs>=1.6.1",  # the documentation's strict build (tests/test_docs.py)
        "mkdocs-material>=9.8.2",
        "mkdocstrings-python>=2.0.11",
    ],
}

setup(
    name="diffusers-delta",
    version="0.1.0.dev0",
    description="Delta-Adapter for diffusers: edit images by example on FLUX.2 [klein] or FLUX.1 Kontext, no text.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The card templates live at the top level (hub_cards/) and install as diffusers_delta.hub_cards.
    package_dir={"": "src", "diffusers_delta.hub_cards": "hub_cards"},
    packages=find_packages("src") + ["diffusers_delta.hub_cards"],
    package_data={
        "diffusers_delta": ["judge_prompts.json"],  # the VLM judge's prompts (evaluation.py)
        "diffusers_delta.hub_cards": ["*.md"],
        # The embedded toy-world model (examples/toyworld/build_default_model.py writes it).
        "diffusers_delta.toyworld": ["default_model/**/*"],
    },
    entry_points={"console_scripts": ["diffusers-delta = diffusers_delta.cli:main"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
