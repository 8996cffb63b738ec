"""Threads: loading touches no process-wide state, adapter changes never land inside an edit, one call per pipeline
at a time, and diffusers' recipe (one `from_pipe` per thread) gives exactly the serial results."""

import threading

import pytest
import torch

from diffusers_delta import Flux2DeltaAttnProcessor, FluxDeltaEditPipeline, compute_empty_prompt_embeds
from diffusers_delta.testing import TEXT_KWARGS, random_image, randomize_, tiny_klein_components


QUERIES = [random_image(i) for i in range(4)]
SOURCE, TARGET = random_image(10), random_image(11)


def edit(pipe, query=QUERIES[0], seed=0, **kwargs):
    return pipe(query, exemplar=(SOURCE, TARGET), generator=torch.Generator().manual_seed(seed), output_type="np",
                **TEXT_KWARGS, **kwargs).images  # fmt: skip


@pytest.fixture
def adapter_folders(delta_pipe, tmp_path):
    """Two different adapters, saved."""
    delta_pipe.empty_prompt_embeds = compute_empty_prompt_embeds(delta_pipe, **TEXT_KWARGS)
    folders = []
    for seed in (1, 2):
        randomize_(delta_pipe.delta_adapter, seed=seed, std=0.3)
        folders.append(tmp_path / f"adapter{seed}")
        delta_pipe.save_delta_adapter(folders[-1])
    return folders


def fresh_pipe():
    pipe = FluxDeltaEditPipeline(**tiny_klein_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_threads(*targets):
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001  (reported in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors


def test_loading_in_threads_patches_nothing_process_wide(adapter_folders):
    """Loads build the adapter on the meta device of their own thread only: layers built elsewhere meanwhile, and
    every load afterwards, are real."""
    pipes = [fresh_pipe() for _ in range(3)]
    stop = threading.Event()

    def load_and_unload(pipe, folder):
        def run():
            for _ in range(4):
                pipe.load_delta_adapter(folder)
                pipe.unload_delta_adapter()
            pipe.load_delta_adapter(folder)

        return run

    def build_layers():
        while not stop.is_set():
            assert torch.nn.Linear(4, 4).weight.device.type == "cpu"

    watcher = threading.Thread(target=build_layers)
    watcher.start()
    try:
        run_threads(*(load_and_unload(pipe, adapter_folders[i % 2]) for i, pipe in enumerate(pipes)))
    finally:
        stop.set()
        watcher.join()
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"
    reference = fresh_pipe()
    for index, pipe in enumerate(pipes):
        reference.load_delta_adapter(adapter_folders[index % 2])
        assert (edit(pipe) == edit(reference)).all()


def test_loads_beside_an_edit_never_land_inside_it(adapter_folders):
    """One thread swaps adapters while another edits with the same pipeline: every edit is exactly one adapter's."""
    pipe = fresh_pipe()
    expected = []
    for folder in adapter_folders:
        pipe.load_delta_adapter(folder)
        expected.append(edit(pipe))
    outputs = []

    def swap():
        for round_ in range(6):
            pipe.load_delta_adapter(adapter_folders[round_ % 2])

    def edit_many():
        for _ in range(6):
            outputs.append(edit(pipe))

    run_threads(swap, edit_many)
    assert len(outputs) == 6
    assert all((output == expected[0]).all() or (output == expected[1]).all() for output in outputs)


def test_a_second_call_from_another_thread_is_refused_with_the_recipe(adapter_folders):
    pipe = fresh_pipe()
    pipe.load_delta_adapter(adapter_folders[0])
    inside, release = threading.Event(), threading.Event()

    def wait_inside(pipeline, step, timestep, callback_kwargs):
        inside.set()
        release.wait(60)
        return callback_kwargs

    first = threading.Thread(target=lambda: edit(pipe, callback_on_step_end=wait_inside))
    first.start()
    try:
        assert inside.wait(60)
        with pytest.raises(RuntimeError, match=r"already editing in another thread.*FluxDeltaEditPipeline.from_pipe"):
            edit(pipe)
    finally:
        release.set()
        first.join()
    assert (edit(pipe) == edit(pipe)).all()  # the refusal changed nothing


def test_one_pipeline_per_thread_from_pipe_gives_the_serial_results(adapter_folders):
    pipe = fresh_pipe()
    pipe.load_delta_adapter(adapter_folders[0])
    pipe.set_delta_adapter_scale({"double": 0.5, "single": 1.5})
    serial = [edit(pipe, query, seed) for seed, query in enumerate(QUERIES)]
    copies = [FluxDeltaEditPipeline.from_pipe(pipe) for _ in range(2)]
    assert all(c.transformer is pipe.transformer and c.scheduler is not pipe.scheduler for c in copies)
    assert all(c.get_delta_adapter_scale() == pipe.get_delta_adapter_scale() for c in copies)  # the same processors
    results = {}

    def edit_share(copy, indices):
        def run():
            for index in indices:
                results[index] = edit(copy, QUERIES[index], index)

        return run

    run_threads(edit_share(copies[0], [0, 2]), edit_share(copies[1], [1, 3]))
    assert all((results[index] == serial[index]).all() for index in range(len(QUERIES)))
    copies[0].unload_delta_adapter()  # the copy restores the base's processors, as the original would
    assert not any(isinstance(p, Flux2DeltaAttnProcessor) for p in pipe.transformer.attn_processors.values())
