"""Synthetic storyboard-style datasets: 16:9 frames with captions, in imagefolder layout.

Every frame shares one distinct style (paper-white panel, thick ink border, flat shapes
with hard shadows), so a LoRA trained on them has something to learn; the shapes,
colours and positions vary and the caption says which.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 190), "green": (40, 150, 70), "orange": (230, 140, 30),
           "purple": (120, 50, 160), "teal": (30, 140, 140)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("left", "centre", "right")


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], fill, outline) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=2)
    else:
        left, top, right, bottom = box
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill, outline=outline)


def make_frame(rng: random.Random, width: int, height: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (246, 242, 230))
    draw = ImageDraw.Draw(image)
    border = max(2, width // 40)
    draw.rectangle((0, 0, width - 1, height - 1), outline=(20, 20, 20), width=border)
    draw.line((border, int(height * 0.78), width - border, int(height * 0.78)), fill=(60, 60, 60), width=1)
    colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(PLACES)
    size = int(height * rng.uniform(0.35, 0.5))
    centre_x = {"left": width // 4, "centre": width // 2, "right": 3 * width // 4}[place] + rng.randint(-4, 4)
    centre_y = int(height * 0.45) + rng.randint(-3, 3)
    box = (centre_x - size // 2, centre_y - size // 2, centre_x + size // 2, centre_y + size // 2)
    shadow = tuple(v + 4 for v in box)
    _draw_shape(draw, shape, shadow, (90, 90, 90), None)
    _draw_shape(draw, shape, box, COLOURS[colour], (20, 20, 20))
    caption = f"storyboard frame, ink outline, a {colour} {shape} on the {place}, flat colours, hard shadow"
    return image, caption


def write_dataset(out_dir: str | Path, count: int = 12, width: int = 128, height: int = 72, seed: int = 0,
                  sidecar_captions: bool = False) -> Path:
    """Write count frames and metadata.jsonl (or .txt sidecar captions) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        image, caption = make_frame(rng, width, height)
        name = f"frame-{index:04d}.png"
        image.save(out / name)
        if sidecar_captions:
            (out / name).with_suffix(".txt").write_text(caption + "\n")
        rows.append({"file_name": name, "text": caption})
    if not sidecar_captions:
        (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out
