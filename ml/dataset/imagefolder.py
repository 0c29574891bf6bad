"""The train channel: an imagefolder (images plus metadata.jsonl), split and preprocessed.

Preprocessing follows SDXL training: resize the short side to the resolution, crop to a
square, remember the original size and crop corner (the UNet is conditioned on both).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ml.contract.container import JobError
from ml.dataset import buckets
from ml.dataset.buckets import Placement

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    # Recorded by `sdxl-lora prepare` when it fitted the image to an aspect-ratio bucket; None for a
    # plain imagefolder, whose images training crops to squares.
    placement: Placement | None = None
    latents: Path | None = None  # the prepare job's cached VAE latents of this image


def _pair(row: dict, key: str, number: int, name: str) -> tuple[int, int]:
    value = row[key]
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value)):
        raise JobError(f"{name} channel metadata.jsonl line {number}: {key} must be [height, width] or [top, left] "
                       f"in pixels, got {value!r}")
    return tuple(value)


def _placement(row: dict, number: int, name: str) -> Placement | None:
    if "bucket" not in row:
        return None
    original, bucket = _pair(row, "original_size", number, name), _pair(row, "bucket", number, name)
    if min(original) < 1 or min(bucket) < 1:
        raise JobError(f"{name} channel metadata.jsonl line {number}: original_size and bucket must be positive")
    placement = buckets.place(original, bucket)  # how prepare placed it, which the crop recorded confirms
    crop = _pair(row, "crop", number, name) if "crop" in row else placement.crop
    if crop != placement.crop:
        resized = (max(placement.resized[0], crop[0] + bucket[0]), max(placement.resized[1], crop[1] + bucket[1]))
        placement = Placement(original, resized, crop, bucket)
    return placement


def load_imagefolder(channel: Path, caption_column: str = "text", name: str = "train") -> list[Example]:
    """Read metadata.jsonl rows {file_name, <caption_column>} whose images exist."""
    if not channel.is_dir():
        raise JobError(f"{name} channel is missing (expected a directory at {channel})")
    images = [p for p in channel.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not images:
        raise JobError(f"{name} channel has no images (looked in {channel} for {', '.join(sorted(IMAGE_SUFFIXES))})")
    metadata = channel / "metadata.jsonl"
    if not metadata.exists():
        raise JobError(f"{name} channel has no metadata.jsonl with file_name and {caption_column} for its images")
    examples = []
    for number, row in metadata_rows(metadata, f"{name} channel metadata.jsonl"):
        if caption_column not in row:
            raise JobError(f"{name} channel metadata.jsonl line {number} has no caption column {caption_column!r}")
        path = channel / row["file_name"]
        if not path.is_file():
            raise JobError(f"{name} channel metadata.jsonl line {number} names {row['file_name']}, which is missing")
        latents = channel / row["latents"] if row.get("latents") else None
        examples.append(Example(path, str(row[caption_column]), _placement(row, number, name), latents))
    if not examples:
        raise JobError(f"{name} channel metadata.jsonl lists no images")
    return examples


def metadata_rows(path: Path, label: str, where: str = "") -> Iterator[tuple[int, dict]]:
    """The rows of a metadata.jsonl with their line numbers. A malformed line fails the job naming it
    (`<label> line N<where> ...`): guessing past it could drop or mislabel images."""
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise JobError(f"{label} line {number}{where} is not valid JSON") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise JobError(f"{label} line {number}{where} has no file_name")
        yield number, row


def split_validation(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Hold out a fraction of images chosen by file-name hash, so every trial holds out the same ones."""
    if fraction <= 0:
        return list(examples), []
    ranked = sorted(examples, key=lambda e: hashlib.sha1(e.path.name.encode()).hexdigest())
    held = max(1, round(len(examples) * fraction))
    if held >= len(examples):
        raise JobError(f"validation_split {fraction} leaves no training images out of {len(examples)}")
    validation = set(ranked[:held])
    return [e for e in examples if e not in validation], [e for e in examples if e in validation]


@dataclass
class Prepared:
    pixels: "object"  # float tensor [3, R, R] in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    resized_width: int


def preprocess(path: Path, resolution: int, center_crop: bool, generator) -> Prepared:
    """Load, resize the short side, crop a square; the crop corner is random unless center_crop."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except OSError as error:
        raise JobError(f"cannot read image {path.name}: {error}") from None
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    if center_crop:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return Prepared(pixels, original_size, (top, left), width)


def flipped(prepared: Prepared, resolution: int) -> Prepared:
    """The horizontal mirror: the crop corner becomes the mirrored crop's left edge."""
    top, left = prepared.crop_top_left
    mirrored_left = prepared.resized_width - left - resolution
    return Prepared(prepared.pixels.flip(-1), prepared.original_size, (top, mirrored_left), prepared.resized_width)


def preprocess_bucketed(example: Example, target: tuple[int, int]) -> tuple["object", Placement]:
    """A prepared image at the training resolution's bucket `target`: as stored when prepare wrote it at
    this size, else placed into it again (resized, minimally cropped) with the crop composed."""
    import numpy as np
    import torch
    from PIL import Image

    recorded = example.placement
    try:
        with Image.open(example.path) as opened:
            image = opened.convert("RGB")
    except OSError as error:
        raise JobError(f"cannot read image {example.path.name}: {error}") from None
    if (image.height, image.width) != recorded.bucket:
        raise JobError(f"image {example.path.name} is {image.height}x{image.width} but metadata.jsonl records its "
                       f"bucket as {recorded.bucket[0]}x{recorded.bucket[1]}")
    placement = recorded
    if target != recorded.bucket:
        placement = buckets.rescale(recorded, target)
        again = buckets.place(recorded.bucket, target)
        image = image.resize((again.resized[1], again.resized[0]), Image.Resampling.BILINEAR)
        top, left = again.crop
        image = image.crop((left, top, left + target[1], top + target[0]))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), placement
