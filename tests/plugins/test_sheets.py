"""XY comparison sheets: geometry for several grid shapes, and what a rendered sheet shows."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from sdxl_lora.report import sheets


@pytest.mark.parametrize("rows, columns", [(1, 1), (2, 3), (3, 5)])
def test_layout_places_every_cell_once_in_row_and_column_order(rows, columns):
    cell = 64
    layout = sheets.layout(rows, columns, cell)
    assert len(layout.images) == rows and all(len(row) == columns for row in layout.images)
    assert len(layout.row_labels) == rows and len(layout.column_labels) == columns
    boxes = [box for row in layout.images for box in row]
    for box in boxes:  # inside the sheet, below the title and headers, right of the row labels
        assert box.width == box.height == cell
        assert box.x >= sheets.ROW_LABEL_WIDTH and box.y >= sheets.TITLE_HEIGHT + sheets.HEADER_HEIGHT
        assert box.x + box.width <= layout.width and box.y + box.height + sheets.CAPTION_HEIGHT <= layout.height
    for a in boxes:  # no two cells (with their captions) overlap
        for b in boxes:
            if a is not b:
                assert (a.x + a.width <= b.x or b.x + b.width <= a.x
                        or a.y + a.height + sheets.CAPTION_HEIGHT <= b.y or b.y + b.height + sheets.CAPTION_HEIGHT <= a.y)
    for r in range(rows):  # a row shares its y with its label; columns go left to right
        assert {box.y for box in layout.images[r]} == {layout.row_labels[r].y}
        assert [box.x for box in layout.images[r]] == sorted(box.x for box in layout.images[r])
        assert [box.x for box in layout.images[r]] == [label.x for label in layout.column_labels]
    for r in range(rows):
        for c in range(columns):
            caption = layout.captions[r][c]
            assert (caption.x, caption.y) == (layout.images[r][c].x, layout.images[r][c].y + cell)
    assert layout.width == sheets.ROW_LABEL_WIDTH + columns * (cell + sheets.GAP) + sheets.GAP
    assert layout.height == (sheets.TITLE_HEIGHT + sheets.HEADER_HEIGHT
                             + rows * (cell + sheets.CAPTION_HEIGHT + sheets.GAP) + sheets.GAP)


def test_layout_refuses_an_empty_grid_or_tiny_cells():
    with pytest.raises(ValueError, match="at least one row"):
        sheets.layout(0, 3, 64)
    with pytest.raises(ValueError, match="too small"):
        sheets.layout(1, 1, 4)


def _png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, format="PNG")
    return out.getvalue()


def test_rendered_sheet_puts_each_trials_sample_in_its_cell_and_marks_missing_ones():
    colours = {(0.001, 4): (255, 0, 0), (0.001, 8): (0, 255, 0), (0.003, 4): (0, 0, 255)}
    cells = [sheets.Cell(lr, rank, f"job-{lr}-{rank}", 0.1, _png(colour)) for (lr, rank), colour in colours.items()]
    cells.append(sheets.Cell(0.003, 8, "job-failed", None, None, "Failed"))
    [sheet] = sheets.group({20: cells}, "a red circle", 1000)
    assert sheet.name == "sheet-steps-20.png" and sheet.learning_rates == [0.001, 0.003] and sheet.ranks == [4, 8]
    image = Image.open(io.BytesIO(sheets.render(sheet, cell=64))).convert("RGB")
    layout = sheets.layout(2, 2, 64)
    assert image.size == (layout.width, layout.height)
    for (r, c), colour in {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255)}.items():
        box = layout.images[r][c]
        assert image.getpixel((box.x + 32, box.y + 32)) == colour
    failed = layout.images[1][1]
    assert image.getpixel((failed.x + 2, failed.y + 2)) == (236, 236, 236)  # the grey placeholder
    caption = layout.captions[0][0]
    text = image.crop((caption.x, caption.y, caption.x + caption.width, caption.y + caption.height))
    assert min(text.getdata()) < (100, 100, 100)  # the cell is labelled


def test_sheets_line_up_across_steps_and_refuse_duplicate_trials():
    a = sheets.Cell(0.001, 4, "a", image=_png((1, 2, 3)))
    b = sheets.Cell(0.003, 8, "b", image=_png((1, 2, 3)))
    first, second = sheets.group({40: [b], 20: [a]}, None, None)
    assert (first.max_train_steps, second.max_train_steps) == (20, 40)
    assert first.learning_rates == second.learning_rates == [0.001, 0.003] and first.ranks == [4, 8]
    with pytest.raises(ValueError, match="two trials with steps 20"):
        sheets.group({20: [a, sheets.Cell(0.001, 4, "again")]}, None, None)
