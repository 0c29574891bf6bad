"""XY comparison sheets of a grid search: one per steps value, rows learning rate, columns rank.

Every cell holds the same validation image (same prompt, same fixed seed) of one trial, labelled
with its values and validation loss, so a person compares adapters by eye. `layout` is the
geometry (pure, tested for several grid shapes); `render` draws it with PIL, imported only when a
sheet is drawn (the DAG files never import it).
"""

from __future__ import annotations

from dataclasses import dataclass

TITLE_HEIGHT = 56
HEADER_HEIGHT = 28  # column labels (rank)
ROW_LABEL_WIDTH = 120  # row labels (learning rate)
CAPTION_HEIGHT = 34  # under each image: the trial's values and validation loss
GAP = 8


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    title: Box
    column_labels: tuple[Box, ...]
    row_labels: tuple[Box, ...]
    images: tuple[tuple[Box, ...], ...]  # [row][column]
    captions: tuple[tuple[Box, ...], ...]


def layout(rows: int, columns: int, cell: int) -> Layout:
    """Geometry of a rows x columns sheet of cell x cell images."""
    if rows < 1 or columns < 1:
        raise ValueError(f"a sheet needs at least one row and one column, got {rows}x{columns}")
    if cell < 16:
        raise ValueError(f"cell size {cell} px is too small to show an image (at least 16)")
    pitch_x, pitch_y = cell + GAP, cell + CAPTION_HEIGHT + GAP
    width = ROW_LABEL_WIDTH + columns * pitch_x + GAP
    height = TITLE_HEIGHT + HEADER_HEIGHT + rows * pitch_y + GAP
    top = TITLE_HEIGHT + HEADER_HEIGHT
    images = tuple(tuple(Box(ROW_LABEL_WIDTH + c * pitch_x, top + r * pitch_y, cell, cell) for c in range(columns))
                   for r in range(rows))
    captions = tuple(tuple(Box(b.x, b.y + cell, cell, CAPTION_HEIGHT) for b in row) for row in images)
    return Layout(
        width=width, height=height, title=Box(0, 0, width, TITLE_HEIGHT),
        column_labels=tuple(Box(ROW_LABEL_WIDTH + c * pitch_x, TITLE_HEIGHT, cell, HEADER_HEIGHT)
                            for c in range(columns)),
        row_labels=tuple(Box(0, top + r * pitch_y, ROW_LABEL_WIDTH, cell) for r in range(rows)),
        images=images, captions=captions)


@dataclass
class Cell:
    """One trial on a sheet: its sample (PNG bytes) or, when it has none, why."""

    learning_rate: float
    rank: int
    job_name: str
    val_loss: float | None = None
    image: bytes | None = None
    missing: str | None = None  # e.g. "Failed", "no sample"


@dataclass
class Sheet:
    max_train_steps: int
    learning_rates: list[float]  # rows, ascending
    ranks: list[int]  # columns, ascending
    cells: dict[tuple[float, int], Cell]
    prompt: str | None
    seed: int | None

    @property
    def name(self) -> str:
        return f"sheet-steps-{self.max_train_steps}.png"


def group(cells_by_steps: dict[int, list[Cell]], prompt: str | None, seed: int | None) -> list[Sheet]:
    """One sheet per steps value; its rows and columns are every learning rate and rank of the grid, so
    sheets line up even where a trial is missing."""
    learning_rates = sorted({c.learning_rate for cells in cells_by_steps.values() for c in cells})
    ranks = sorted({c.rank for cells in cells_by_steps.values() for c in cells})
    sheets = []
    for steps in sorted(cells_by_steps):
        cells = {}
        for cell in cells_by_steps[steps]:
            key = (cell.learning_rate, cell.rank)
            if key in cells:
                raise ValueError(f"two trials with steps {steps}, learning rate {cell.learning_rate:g} and rank "
                                 f"{cell.rank}: {cells[key].job_name} and {cell.job_name}")
            cells[key] = cell
        sheets.append(Sheet(steps, learning_rates, ranks, cells, prompt, seed))
    return sheets


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render(sheet: Sheet, cell: int = 256) -> bytes:
    """The sheet as PNG bytes."""
    import io

    from PIL import Image, ImageDraw, ImageOps

    geometry = layout(len(sheet.learning_rates), len(sheet.ranks), cell)
    image = Image.new("RGB", (geometry.width, geometry.height), "white")
    draw = ImageDraw.Draw(image)
    big, normal, small = _font(18), _font(14), _font(12)
    title = f"max_train_steps {sheet.max_train_steps}"
    subtitle = "rows: learning rate, columns: rank; " + (
        f"prompt {sheet.prompt!r}, seed {sheet.seed}" if sheet.prompt else "no validation_prompt, no images")
    draw.text((GAP, 10), _fit(draw, title, big, geometry.width - 2 * GAP), fill="black", font=big)
    draw.text((GAP, 34), _fit(draw, subtitle, small, geometry.width - 2 * GAP), fill=(80, 80, 80), font=small)
    for rank, box in zip(sheet.ranks, geometry.column_labels):
        draw.text((box.x + box.width / 2, box.y + box.height / 2), f"rank {rank}", fill="black", font=normal,
                  anchor="mm")
    for rate, box in zip(sheet.learning_rates, geometry.row_labels):
        draw.text((box.x + GAP, box.y + box.height / 2), f"lr {rate:g}", fill="black", font=normal, anchor="lm")
    for r, rate in enumerate(sheet.learning_rates):
        for c, rank in enumerate(sheet.ranks):
            box, caption = geometry.images[r][c], geometry.captions[r][c]
            entry = sheet.cells.get((rate, rank))
            if entry is not None and entry.image is not None:
                sample = ImageOps.contain(Image.open(io.BytesIO(entry.image)).convert("RGB"), (box.width, box.height))
                image.paste(sample, (box.x + (box.width - sample.width) // 2, box.y + (box.height - sample.height) // 2))
            else:
                draw.rectangle([box.x, box.y, box.x + box.width - 1, box.y + box.height - 1], fill=(236, 236, 236),
                               outline=(190, 190, 190))
                why = "not in this grid" if entry is None else (entry.missing or "no sample")
                draw.text((box.x + box.width / 2, box.y + box.height / 2), _fit(draw, why, normal, box.width - 8),
                          fill=(120, 120, 120), font=normal, anchor="mm")
            label = f"lr {rate:g} · rank {rank}"
            if entry is not None and entry.val_loss is not None:
                label += f" · val {entry.val_loss:.4f}"
            draw.text((caption.x + 2, caption.y + 4), _fit(draw, label, small, caption.width - 4), fill="black",
                      font=small)
            if entry is not None:
                draw.text((caption.x + 2, caption.y + 19), _fit(draw, entry.job_name, small, caption.width - 4),
                          fill=(110, 110, 110), font=small)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
