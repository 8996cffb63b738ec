"""Delta-Adapter as a Hugging Face Space: the app of `diffusers-delta app`, on the embedded toy model by default (CPU
basic hardware is enough), or on FLUX.2 [klein] with an adapter when the Space's variables name them:

    BASE_MODEL=black-forest-labs/FLUX.2-klein-4B   DELTA_ADAPTER=org/delta-adapter   (a GPU of 24 GB: L4 or A10G)
"""

import os

import torch

from diffusers_delta.app import build_app, describe_model, load_space_pipeline


BASE_MODEL, DELTA_ADAPTER = os.environ.get("BASE_MODEL") or None, os.environ.get("DELTA_ADAPTER") or None

pipe = load_space_pipeline(BASE_MODEL, DELTA_ADAPTER, device="cuda" if torch.cuda.is_available() else None)
demo = build_app(pipe, toy_examples=BASE_MODEL is None, about=describe_model(BASE_MODEL, DELTA_ADAPTER))

if __name__ == "__main__":
    demo.queue().launch()
