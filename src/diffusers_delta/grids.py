"""Image grids that show edits at a glance: one row per example, one labelled column per role."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import PIL.ImageDraw


def make_edit_grid(
    rows: Sequence[Sequence[PIL.Image.Image]], labels: Sequence[str], cell_size: int = 256, label_height: int = 20
) -> PIL.Image.Image:
    """Lays out images in a labelled grid, e.g. `exemplar source | exemplar target | query | output`.

    Args:
        rows: one sequence of images per row, each as long as `labels`.
        labels: the column titles.
        cell_size: side of each (square-resized) cell in pixels.
        label_height: height of the title strip.

    Returns:
        An RGB image of `len(labels)` × `len(rows)` cells under a title strip.
    """
    if any(len(row) != len(labels) for row in rows):
        raise ValueError(f"Every row needs {len(labels)} images, one per label {list(labels)}.")
    grid = PIL.Image.new("RGB", (cell_size * len(labels), label_height + cell_size * len(rows)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((column * cell_size + 4, 4), label, fill="black")
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            cell = image.convert("RGB").resize((cell_size, cell_size), PIL.Image.Resampling.BICUBIC)
            grid.paste(cell, (column * cell_size, label_height + row_index * cell_size))
    return grid
