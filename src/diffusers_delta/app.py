"""The Gradio app: drop in an exemplar pair and queries, get the queries edited the same way.

    diffusers-delta app                                   # the embedded toy model, offline
    diffusers-delta app --base black-forest-labs/FLUX.2-klein-4B --adapter org/delta-adapter --port 7860

The same `build_app` serves a Hugging Face Space (`space/app.py`). Edits run one at a time (the pipeline is one
model in memory); the exemplar's encoding is cached, so that editing more queries with the same pair encodes it
once. A mask (painted over an image, or uploaded: white edits, black keeps) limits the edit to its area on FLUX.2
[klein] (`FluxDeltaInpaintPipeline`). Input mistakes show as the library's one-line messages in the page, never as a
traceback.
"""

from __future__ import annotations

import getpass
import hashlib
import inspect
import tempfile
from collections import OrderedDict
from pathlib import Path

import PIL.Image
import PIL.ImageChops
import torch

from .atomic_folder import atomic_folder
from .backbones import backbone_of
from .editing import edited_images
from .image_inputs import fit_to_model_size


try:
    import gradio as gr
except ImportError as error:  # an optional extra: the library works without it
    raise ImportError("The app needs Gradio: pip install 'diffusers-delta[app]'.") from error


CACHED_EXEMPLARS = 8
#: What an upload that is no image raises when Gradio opens it (PIL's errors, and PIL's guard against huge images).
_UNREADABLE_UPLOAD = (OSError, ValueError, PIL.Image.DecompressionBombError)


def _upload_name(payload) -> str:
    return getattr(payload, "orig_name", None) or Path(getattr(payload, "path", None) or "the upload").name


def checked_uploads(component: gr.Image | gr.Gallery) -> gr.Image | gr.Gallery:
    """`component` with uploads that are no readable image (a text file renamed `.png`) shown on the page as one line
    naming the input and the file, instead of Gradio's bare "Error": Gradio opens uploads before the app's function
    runs. (The instance's `preprocess` is wrapped: a subclass of a Gradio component would make Gradio write a `.pyi`
    file beside this module.)"""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except _UNREADABLE_UPLOAD as error:
            what = "an upload" if isinstance(component, gr.Gallery) else _upload_name(payload)
            raise gr.Error(f"{component.label}: {what} is not a readable image ({error}). Upload PNG, JPEG or WebP "
                           "images.") from None  # fmt: skip

    component.preprocess = checked
    return component


def _image_key(image: PIL.Image.Image) -> str:
    """A digest of an image's size, mode and pixels, to recognise an exemplar uploaded again."""
    digest = hashlib.sha256(f"{image.size}{image.mode}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ExemplarEditor:
    """Edits queries with an exemplar pair on one pipeline, caching the exemplar's edit tokens.

    Args:
        pipe: a `FluxDeltaEditPipeline` with its Delta-Adapter loaded.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self._masked_pipe = None  # a FluxDeltaInpaintPipeline sharing pipe's models, made for the first mask
        self._delta_embeds: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.encodings = 0  # exemplar encodings computed (not taken from the cache)

    def encode(self, source: PIL.Image.Image, target: PIL.Image.Image) -> torch.Tensor:
        """(1, N, D_edit) edit tokens of the pair, from the cache when the same pair came before."""
        key = (_image_key(source), _image_key(target))
        if key in self._delta_embeds:
            self._delta_embeds.move_to_end(key)
            return self._delta_embeds[key]
        delta_embeds = self.pipe.encode_exemplar((source, target))
        self.encodings += 1
        self._delta_embeds[key] = delta_embeds
        if len(self._delta_embeds) > CACHED_EXEMPLARS:
            self._delta_embeds.popitem(last=False)
        return delta_embeds

    def edit(
        self,
        source: PIL.Image.Image,
        target: PIL.Image.Image,
        queries: list[PIL.Image.Image],
        strength: float = 1.0,
        steps: int = 4,
        seed: int = 0,
        adapt_steps: int = 0,
        mask: PIL.Image.Image | None = None,
    ) -> list[PIL.Image.Image]:
        """The queries edited as the exemplar shows, each at its own size, with noise seeded by `seed`.

        Args:
            source: the exemplar before its edit.
            target: the exemplar after it.
            queries: images to edit.
            strength: the edit's strength (`delta_scale`).
            steps: denoising steps.
            seed: seeds every query's noise (the same query and seed give the same output).
            adapt_steps: test-time adaptation steps on the exemplar first (0: none); the adapter is restored after.
            mask: edit only inside it (white edits, black keeps; resized to each query): FLUX.2 [klein] only.
        """
        image_size = self.pipe.config.get("image_size")
        source, target = fit_to_model_size(image_size, [source, target], ["exemplar source", "exemplar target"])
        if adapt_steps:
            generator = torch.Generator().manual_seed(seed)
            with self.pipe.adapted_to_exemplar(source, target, num_steps=int(adapt_steps), generator=generator):
                delta_embeds = self.pipe.encode_exemplar((source, target))  # of the adapted adapter: not cached
                return self._edit_queries(delta_embeds, queries, strength, steps, seed, mask)
        return self._edit_queries(self.encode(source, target), queries, strength, steps, seed, mask)

    def _masked(self):
        """The pipeline of masked edits, sharing the pipeline's models and adapter (made once; `from_pipe` refuses
        another backbone's pipeline)."""
        from .pipelines import FluxDeltaInpaintPipeline

        if self._masked_pipe is None:
            self._masked_pipe = FluxDeltaInpaintPipeline.from_pipe(self.pipe)
            self._masked_pipe.set_progress_bar_config(disable=True)
        return self._masked_pipe

    def _edit_queries(self, delta_embeds, queries, strength, steps, seed, mask=None) -> list[PIL.Image.Image]:
        outputs = []
        for query in queries:
            (fitted,) = fit_to_model_size(self.pipe.config.get("image_size"), [query], ["query"])
            call = {
                "delta_embeds": delta_embeds,
                "delta_scale": strength,
                "num_inference_steps": int(steps),
                "generator": torch.Generator().manual_seed(int(seed)),
            }
            if mask is None:
                output = edited_images(self.pipe, fitted, **call)[0]
            else:
                fitted_mask = mask.convert("L").resize(fitted.size, PIL.Image.Resampling.NEAREST)
                output = self._masked()(fitted, mask_image=fitted_mask, **call).images[0]
            outputs.append(output if output.size == query.size else output.resize(query.size))
        return outputs


def _toy_examples(world: str) -> list[list]:
    """The toy-world examples of a world (`showcase.APP_EXAMPLES`): rows of (source, target, query paths, strength,
    steps, seed, adaptation steps).

    Their images are drawn once into one folder of the temporary directory (where Gradio serves files from), per user
    and set of examples, and reused by every later launch: a launch leaves nothing new behind, however it ends.
    """
    from .toyworld import showcase

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a process whose user id has no name (some containers)
        user = "anonymous"
    examples = showcase.APP_EXAMPLES[world]
    version = hashlib.sha256(repr((world, examples)).encode()).hexdigest()[:8]  # other examples: another folder
    folder = Path(tempfile.gettempdir()) / f"diffusers-delta-examples-{user}-{version}"
    drawings, rows = {}, []  # file name -> (example, seed, 0 for a pair's source or 1 for its target)
    for index, (name, exemplar_seed, query_seeds, adapt_steps) in enumerate(examples):
        example = showcase.find_example(world, name)
        exemplar_names = [f"{index}-source.png", f"{index}-target.png"]
        query_names = [f"{index}-query-{seed}.png" for seed in query_seeds]
        drawings.update((file, (example, exemplar_seed, side)) for side, file in enumerate(exemplar_names))
        drawings.update((file, (example, seed, 0)) for file, seed in zip(query_names, query_seeds))
        rows.append([*(str(folder / file) for file in exemplar_names), [str(folder / file) for file in query_names],
                     1.0, 4, 0, adapt_steps])  # fmt: skip
    if not all((folder / file).is_file() for file in drawings):  # drawn whole or not at all (two launches may race)
        with atomic_folder(folder) as staging:
            for file, (example, seed, side) in drawings.items():
                example.pair(seed)[side].save(staging / file)
    return rows


def default_steps(pipe) -> int:
    """The pipeline's own default number of denoising steps (klein: 4, Kontext: 28)."""
    return inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default


def describe_model(base: str | None, adapter: str | None, pipe=None) -> str:
    """What the page says of the model it serves: which one, what it knows, the sizes it takes (markdown).

    Args:
        base: the base model's Hub id or folder, or None for the embedded toy model.
        adapter: the adapter's Hub id or folder (with the toy model: None for its own).
        pipe: the pipeline serving it (its backbone names the family and how queries are sized; FLUX.2 [klein]'s
            when not given).
    """
    if base is None:
        from . import toyworld

        served = "the embedded toy-world model" + (f", with the adapter `{adapter}`" if adapter else "")
        world = toyworld.model_world()
        if world == toyworld.showcase.WORLD_1:
            knows = (
                f"Its adapter trained on the edits {', '.join(toyworld.SEEN_EDITS)}; "
                f"{', '.join(toyworld.UNSEEN_EDITS)} it never saw"
            )
        elif world == toyworld.showcase.WORLD_3:
            knows = (
                "Its adapter trained on edits drawn from a continuous space (colour matrices, tone curves, blurs, "
                "sharpens and frames, acting everywhere or through a ramp, a disc, the shapes or the background), no "
                "two pairs sharing an edit; the examples are photo edits it never trained on "
                f"({', '.join(toyworld.edit_space.HELD_OUT_EDITS)})"
            )
        else:
            knows = (
                f"Its adapter trained on some values of the edits {', '.join(toyworld.SEEN_FAMILIES)}; other values "
                f"of these, and the edits {', '.join(toyworld.HELD_OUT_FAMILIES)}, it never saw"
            )
        return (
            f"**Model: {served}** (offline, on the CPU). It knows only {toyworld.IMAGE_SIZE}x{toyworld.IMAGE_SIZE} "
            "synthetic scenes of flat shapes: other images are resized to that size and back, and photos come out "
            f"as noise. {knows} (docs/toyworld.md measures each). Try the examples below."
        )
    if pipe is not None and backbone_of(pipe.transformer).NAME == "flux1":
        return (
            f"**Model:** FLUX.1 Kontext [dev] `{base}` with the Delta-Adapter `{adapter}`. Queries are edited at "
            "Kontext's preferred resolution nearest their aspect ratio (about 1024x1024 pixels), 28 steps by default."
        )
    return (
        f"**Model:** FLUX.2 [klein] `{base}` with the Delta-Adapter `{adapter}`. Queries from 64x64 pixels up, edited "
        "at their own size (areas over 1024x1024 are scaled down; sides are rounded down to multiples of 16)."
    )


def mask_of(editor_value: dict | None) -> PIL.Image.Image | None:
    """The mask of the app's mask editor: what was painted (any stroke edits), or else the uploaded image itself
    as a black-and-white mask; None when it is empty.

    Args:
        editor_value: `gr.ImageMask`'s value, `{"background", "layers", "composite"}` of PIL images, or None.
    """
    if not editor_value:
        return None
    painted = None
    for layer in editor_value.get("layers") or []:
        alpha = layer.convert("RGBA").getchannel("A").point(lambda value: 255 if value else 0)
        painted = alpha if painted is None else PIL.ImageChops.lighter(painted, alpha)
    if painted is not None and painted.getbbox() is not None:
        return painted
    background = editor_value.get("background")
    return None if background is None else background.convert("L")


def build_app(
    pipe, title: str = "Delta-Adapter: edit by example", toy_examples: bool = False, about: str | None = None
) -> gr.Blocks:
    """The app's page for one pipeline.

    Args:
        pipe: a `FluxDeltaEditPipeline` with its Delta-Adapter loaded.
        title: the page's heading.
        toy_examples: show ready-made toy-world examples (for the toy model).
        about: what the page says of the model (`describe_model`), under the heading.

    Returns:
        The `gr.Blocks`; its edit event is the API endpoint `/edit`.
    """
    editor = ExemplarEditor(pipe)

    def edit(
        source, target, queries, strength, steps, seed, adapt_steps, mask=None, progress=gr.Progress(track_tqdm=True)
    ):
        if source is None or target is None:
            raise gr.Error("Give the exemplar pair: the source image and the same image edited (target).")
        if not queries:
            raise gr.Error("Give at least one query image to edit.")
        images = [image for image, _ in queries]
        try:
            outputs = editor.edit(
                source, target, images, float(strength), int(steps), int(seed), int(adapt_steps), mask_of(mask)
            )
        except (ValueError, OSError) as error:  # the library's messages name the fix
            raise gr.Error(str(error)) from None
        exemplar = [(source, "exemplar source"), (target, "exemplar target")]
        return exemplar + [(output, f"edited query {index + 1}") for index, output in enumerate(outputs)]

    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"# {title}\nUpload a pair of images that shows an edit (before, after) and the images to edit the same "
            "way. No text: the exemplar says what to do."
        )
        if about:
            gr.Markdown(about, elem_id="about")
        with gr.Row():
            source = checked_uploads(gr.Image(label="Exemplar source (before)", type="pil", image_mode="RGB",
                                              height=300, elem_id="source"))  # fmt: skip
            target = checked_uploads(gr.Image(label="Exemplar target (after)", type="pil", image_mode="RGB",
                                              height=300, elem_id="target"))  # fmt: skip
            queries = checked_uploads(gr.Gallery(label="Queries", type="pil", format="png", interactive=True,
                                                 height=300, elem_id="queries"))  # fmt: skip
        with gr.Row():
            strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Edit strength")
            steps = gr.Slider(1, 50, value=default_steps(pipe), step=1, label="Denoising steps")
            seed = gr.Number(value=0, precision=0, label="Seed")
            adapt_steps = gr.Slider(0, 100, value=0, step=1, label="Adaptation steps (0: none)")
        with gr.Accordion("Mask (optional): edit only part of the queries", open=False):
            mask = gr.ImageMask(label="Upload a query and paint where to edit, or upload a black-and-white mask "
                                "(white: edit). Resized to each query.", type="pil", format="png",
                                elem_id="mask")  # fmt: skip
        button = gr.Button("Edit", variant="primary", elem_id="edit")
        results = gr.Gallery(label="Exemplar and edited queries", format="png", columns=4, height=320,
                             elem_id="results")  # fmt: skip
        inputs = [source, target, queries, strength, steps, seed, adapt_steps]
        button.click(edit, inputs=[*inputs, mask], outputs=results, api_name="edit", concurrency_limit=1)
        if toy_examples:
            from . import toyworld

            gr.Examples(_toy_examples(toyworld.model_world()), inputs=inputs)
    app.editor = editor  # for tests and callers that want the cache
    return app
