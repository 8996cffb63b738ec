"""Image grids that show edits at a glance: one row per example, one labelled column per role."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import PIL.ImageDraw


# PIL's default font draws these as empty boxes: titles get their ASCII spelling.
ASCII_SPELLING = str.maketrans({"→": "->", "×": "x", "−": "-", "–": "-", "±": "+/-"})


def make_edit_grid(
    rows: Sequence[Sequence[PIL.Image.Image]],
    labels: Sequence[str],
    cell_size: int = 256,
    label_height: int = 20,
    row_labels: Sequence[str] | None = None,
    row_label_width: int = 160,
) -> PIL.Image.Image:
    """Lays out images in a labelled grid, e.g. `exemplar source | exemplar target | query | output`.

    Args:
        rows: one sequence of images per row, each as long as `labels`.
        labels: the column titles.
        cell_size: side of each (square-resized) cell in pixels.
        label_height: height of the title strip.
        row_labels: one title per row (an edit's name and split), in a strip left of the cells; none by default.
        row_label_width: width of that strip.

    Returns:
        An RGB image of `len(labels)` × `len(rows)` cells under a title strip (and right of the row titles).
    """
    if any(len(row) != len(labels) for row in rows):
        raise ValueError(f"Every row needs {len(labels)} images, one per label {list(labels)}.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"Got {len(row_labels)} row labels for {len(rows)} rows; give one per row.")
    left = row_label_width if row_labels is not None else 0
    grid = PIL.Image.new("RGB", (left + cell_size * len(labels), label_height + cell_size * len(rows)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((left + column * cell_size + 4, 4), label.translate(ASCII_SPELLING), fill="black")
    for row_index, row in enumerate(rows):
        top = label_height + row_index * cell_size
        if row_labels is not None:
            draw.multiline_text((4, top + 4), row_labels[row_index].translate(ASCII_SPELLING), fill="black")
        for column, image in enumerate(row):
            cell = image.convert("RGB").resize((cell_size, cell_size), PIL.Image.Resampling.BICUBIC)
            grid.paste(cell, (left + column * cell_size, top))
    return grid
