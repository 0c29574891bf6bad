"""Aspect-ratio buckets: SDXL's standard training sizes, scaled to a resolution.

SDXL was trained on a set of sizes of about one megapixel with different aspect ratios. Cropping a
16:9 storyboard frame to a square throws away 44% of it and teaches the model half-framed shots, so
each image goes to the bucket whose aspect ratio is nearest its own, is resized to cover it and is
cropped only by the few pixels the aspect ratios differ by. The UNet is told the original size and
the crop (SDXL's size and crop conditioning), as it was during SDXL's own training.

Pure Python: the prepare job, the training job and the tests share it, none of them needs torch here.
Sizes are (height, width), the order SDXL's time ids use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# SDXL's standard resolutions at 1024 (width x height in the SDXL report; stored here as (height, width)).
SDXL_BUCKETS_1024 = ((1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768),
                     (640, 1536), (1536, 640))
SDXL_RESOLUTION = 1024
# SDXL's VAE downsamples 8x and its UNet halves the latents twice more: sides must be multiples of 32.
DEFAULT_MULTIPLE = 32


def bucket_sizes(resolution: int, multiple: int = DEFAULT_MULTIPLE) -> list[tuple[int, int]]:
    """The standard buckets scaled from 1024 to resolution, each side rounded to a multiple of `multiple`
    (at least one multiple); duplicates that rounding creates at small resolutions are merged."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if multiple < 1:
        raise ValueError(f"bucket multiple must be positive, got {multiple}")
    scale = resolution / SDXL_RESOLUTION
    sizes = []
    for height, width in SDXL_BUCKETS_1024:
        size = tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))
        if size not in sizes:
            sizes.append(size)
    return sizes


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space, so 2:1 and 1:2 are equally far from 1:1);
    ties go to the larger area, then to the first listed."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[1] / b[0]) - aspect), 9), -b[0] * b[1]))


@dataclass(frozen=True)
class Placement:
    """How an image of original_size becomes a bucket: resized to `resized`, then cropped at `crop`."""

    original_size: tuple[int, int]  # (height, width) before any resizing
    resized: tuple[int, int]  # (height, width) after resizing to cover the bucket
    crop: tuple[int, int]  # (top, left) of the bucket inside the resized image
    bucket: tuple[int, int]  # (height, width) of the result

    def mirrored(self) -> "Placement":
        """The same placement for the horizontally flipped image: the crop's left edge mirrors."""
        top, left = self.crop
        return Placement(self.original_size, self.resized, (top, self.resized[1] - left - self.bucket[1]),
                         self.bucket)

    def time_ids(self) -> list[int]:
        """SDXL's added time ids: original size, crop top-left, target size."""
        return [*self.original_size, *self.crop, *self.bucket]


def place(original_size: tuple[int, int], bucket: tuple[int, int]) -> Placement:
    """Resize to cover the bucket keeping the aspect ratio, then crop the overhang evenly from both sides."""
    height, width = original_size
    scale = max(bucket[0] / height, bucket[1] / width)
    resized = (max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale)))
    crop = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    return Placement(tuple(original_size), resized, crop, tuple(bucket))


def rescale(placement: Placement, bucket: tuple[int, int]) -> Placement:
    """A placement recorded at one resolution, carried to another bucket of (nearly) the same shape.

    The stored image is placement.bucket pixels; it is placed again into `bucket`, and the crop is the
    recorded one scaled to the new size plus the new, minimal, crop: both are offsets into the image
    the original was resized to, which is what SDXL's crop conditioning describes."""
    again = place(placement.bucket, bucket)
    factor = again.resized[0] / placement.bucket[0]
    crop = (round(placement.crop[0] * factor) + again.crop[0], round(placement.crop[1] * factor) + again.crop[1])
    resized = (round(placement.resized[0] * factor), round(placement.resized[1] * factor))
    resized = (max(resized[0], crop[0] + bucket[0]), max(resized[1], crop[1] + bucket[1]))
    return Placement(placement.original_size, resized, crop, tuple(bucket))


def model_multiple(base: str) -> int:
    """The pixel multiple a diffusers SDXL directory needs: its VAE's downsampling times the UNet's."""
    import json
    from pathlib import Path

    vae = json.loads((Path(base) / "vae" / "config.json").read_text())
    unet = json.loads((Path(base) / "unet" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["block_out_channels"]) - 1)
