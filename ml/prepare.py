"""`sdxl-lora prepare`: the processing job that turns raw images into the training imagefolder.

It reads every image under the input directory, takes each one's caption from a sidecar
.txt (same stem) or else from the input's metadata.jsonl, applies EXIF orientation,
converts to RGB, downscales so the short side is at most the resolution, and writes PNGs
plus metadata.jsonl ({file_name, text}) and prepare_summary.json to the output directory.

A file that cannot be used (unreadable, uncaptioned, or clashing with another file's
output name) is skipped with a warning and counted in the summary; the job fails only
when the input is missing or nothing usable remains. Output is deterministic: the same
input gives byte-identical files.

Every image is re-encoded as PNG, JPEGs included: the pixels change anyway (orientation,
RGB, resizing), and saving them as JPEG again would add a second round of compression
artefacts that the LoRA would learn; PNG is lossless, so training sees exactly what this
job decided, in one format. The cost is larger files, which at LoRA dataset sizes (tens
to hundreds of images) is a few hundred megabytes at most.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ml.contract import ContainerPaths, JobError
from ml.data import IMAGE_SUFFIXES, metadata_rows

log = logging.getLogger("sdxl_lora.prepare")

CONTAINER_ROOT = PurePosixPath("/opt/ml")
METADATA = "metadata.jsonl"
SUMMARY = "prepare_summary.json"
OUTPUT_CAPTION_COLUMN = "text"  # what the training job reads by default (its caption_column hyperparameter)

# Reasons a file is skipped, as they appear in the log and in prepare_summary.json.
UNREADABLE, NO_CAPTION, DUPLICATE_NAME = "unreadable", "no_caption", "duplicate_name"


@dataclass(frozen=True)
class RawImage:
    path: Path
    name: str  # POSIX path relative to the input directory, as metadata.jsonl names it


@dataclass
class Report:
    """What happened to every image found; becomes prepare_summary.json and the final log line."""

    found: int = 0
    resized: int = 0
    caption_sources: Counter = field(default_factory=Counter)
    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, name: str, reason: str, detail: str) -> None:
        log.warning("skipped %s: %s (%s)", name, reason, detail)
        self.skipped.setdefault(reason, []).append(name)

    def skipped_counts(self) -> str:
        return ", ".join(f"{len(names)} {reason}" for reason, names in sorted(self.skipped.items())) or "none"

    def as_dict(self, resolution: int) -> dict:
        return {
            "resolution": resolution,
            "images_found": self.found,
            "images_written": len(self.rows),
            "images_resized": self.resized,
            "images_skipped": sum(len(names) for names in self.skipped.values()),
            "captions_from": dict(sorted(self.caption_sources.items())),
            "skipped": {reason: sorted(names) for reason, names in sorted(self.skipped.items())},
        }


def container_path(paths: ContainerPaths, path: str) -> Path:
    """/opt/ml/... resolves under the job's base directory ($SAGEMAKER_BASE_DIR), like every other
    contract path; anything else is used as given."""
    given = PurePosixPath(path)
    if given.is_relative_to(CONTAINER_ROOT):
        return paths.base.joinpath(*given.relative_to(CONTAINER_ROOT).parts)
    return Path(path)


def find_images(input_dir: Path) -> list[RawImage]:
    """Every image file under input_dir, sorted by name so the output does not depend on the file system."""
    images = [RawImage(p, p.relative_to(input_dir).as_posix())
              for p in input_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(images, key=lambda image: image.name)


def metadata_captions(input_dir: Path, caption_column: str, names: set[str]) -> dict[str, str]:
    """Captions from the input's metadata.jsonl, by file name. A malformed line fails the job: guessing
    past it could silently drop or mislabel images."""
    metadata = input_dir / METADATA
    if not metadata.is_file():
        return {}
    captions = {}
    for number, row in metadata_rows(metadata, METADATA, where=f" in {input_dir}"):
        name = PurePosixPath(str(row["file_name"])).as_posix()  # "./a.png" names a.png
        if name not in names:
            log.warning("%s line %d names %s, which is not an image in the input", METADATA, number, name)
        elif str(row.get(caption_column) or "").strip():
            captions[name] = str(row[caption_column]).strip()
    return captions


def read_sidecar(image: RawImage) -> str:
    """The caption in <stem>.txt next to the image, or "" when there is none. utf-8-sig accepts the
    byte-order mark some Windows editors write."""
    sidecar = image.path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8-sig").strip() if sidecar.is_file() else ""


def load_rgb(path: Path):
    """The image upright (EXIF orientation applied) in RGB, transparency flattened onto white:
    a plain RGB conversion would show whatever colour transparent pixels hold, often black."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        return image.convert("RGB")


def downscale(image, resolution: int):
    """Shrink so the short side is resolution, keeping the aspect ratio; never upscale, which would
    only add interpolated pixels for training to learn."""
    from PIL import Image

    short = min(image.size)
    if short <= resolution:
        return image
    scale = resolution / short
    size = tuple(resolution if side == short else max(1, round(side * scale)) for side in image.size)
    return image.resize(size, Image.Resampling.LANCZOS)


def prepare(input_dir: Path, output_dir: Path, resolution: int, caption_column: str) -> dict:
    """Write the imagefolder and its summary; returns the summary."""
    from PIL import Image

    if resolution < 1:
        raise JobError(f"resolution must be a positive number of pixels, got {resolution}")
    if not input_dir.is_dir():
        raise JobError(f"input directory {input_dir} is missing")
    images = find_images(input_dir)
    metadata = metadata_captions(input_dir, caption_column, {image.name for image in images})
    report = Report(found=len(images))
    written_by: dict[str, str] = {}  # output name -> the input file written under it
    for image in images:
        try:
            sidecar = read_sidecar(image)
        except UnicodeDecodeError:
            report.skip(image.name, UNREADABLE, f"{image.path.with_suffix('.txt').name} is not UTF-8 text")
            continue
        caption = sidecar or metadata.get(image.name)
        if not caption:
            report.skip(image.name, NO_CAPTION, f"no {image.path.with_suffix('.txt').name} and no {METADATA} row "
                                                f"with {caption_column!r}")
            continue
        # x.jpg and x.png share x.txt, so they are most likely one picture saved twice.
        output_name = PurePosixPath(image.name).with_suffix(".png").as_posix()
        if output_name in written_by:
            report.skip(image.name, DUPLICATE_NAME, f"{written_by[output_name]} is already written as {output_name}")
            continue
        try:
            pixels = load_rgb(image.path)
        except (OSError, Image.DecompressionBombError) as error:
            report.skip(image.name, UNREADABLE, str(error))
            continue
        resized = downscale(pixels, resolution)
        if resized is not pixels:
            report.resized += 1
        target = output_dir / output_name
        target.parent.mkdir(parents=True, exist_ok=True)
        # No ICC profile: training reads the pixel values as they are, so viewers should too, and a
        # CMYK source's profile would be wrong for RGB pixels.
        resized.save(target, format="PNG", icc_profile=None)
        written_by[output_name] = image.name
        report.caption_sources["sidecar" if sidecar else METADATA] += 1
        report.rows.append({"file_name": output_name, OUTPUT_CAPTION_COLUMN: caption})
    if not report.rows:
        raise JobError(f"no captioned images in {input_dir}: {report.found} image files found, "
                       f"skipped: {report.skipped_counts()}")
    # ASCII JSON: the training job reads this file in whatever locale its container has.
    (output_dir / METADATA).write_text("".join(json.dumps(row) + "\n" for row in report.rows))
    summary = report.as_dict(resolution)
    (output_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("prepared %d of %d images into %s (%d downscaled to short side %d; skipped: %s)", len(report.rows),
             report.found, output_dir, report.resized, resolution, report.skipped_counts())
    return summary


def main(input_dir: str, output_dir: str, resolution: int, caption_column: str) -> int:
    """Entrypoint of `sdxl-lora prepare`; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    paths = ContainerPaths.from_env()
    try:
        prepare(container_path(paths, input_dir), container_path(paths, output_dir), resolution, caption_column)
        return 0
    except Exception as error:  # every failure must leave output/failure behind
        reason = paths.write_failure(error, job="processing")
        log.error("%s", reason)
        if not isinstance(error, JobError):
            log.exception("traceback")
        return 1
