"""`sdxl-lora prepare`: the processing job that turns raw images into a training dataset version.

Every file under the input directory is checked, and each one that cannot be used is reported with
its own reason (an empty file, not an image, an unsupported format, too large to decode safely,
truncated or corrupt, too small, an exact duplicate of another file, an unreadable caption). An
image is decoded fully, by its real format rather than its extension, turned upright (EXIF
orientation) and converted to 8-bit RGB (CMYK, palette, grayscale and 16-bit converted; transparency
composited on white). Its caption comes from a sidecar `<stem>.txt`, else from the input's
metadata.jsonl, else InstructBLIP writes one (always with `--recaption`). Each image is then resized
and minimally cropped to its nearest SDXL aspect-ratio bucket (`ml.dataset.buckets`), its original size and
crop recorded for SDXL's size conditioning, and saved as PNG: lossless, so training sees exactly
what this job decided, with no second round of JPEG artefacts for the LoRA to learn. With
`--latent-cache` the base model's VAE encodes each image (and its mirror image) once, so the trials
of a grid do not each encode the dataset again.

Output: an imagefolder with metadata.jsonl rows {file_name, text, original_size, crop, bucket[,
latents]} and manifest.json (`ml.contract.manifest`). The job fails only when fewer than `min_images` usable
images remain, and says why.

Several instances: each takes a deterministic share of the work (`--num-shards`/`--shard-index`,
by default from the processing job's resourceconfig.json) and writes its part; the parts merge into
one manifest. Every instance sees the whole (small) raw input: sidecars and metadata.jsonl must
travel with their images, and duplicates are found across shards. What is split is the expensive
part, captioning and encoding, and it is split by caption batch, so a sharded run writes exactly
what a single instance would.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ml.contract import manifest
from ml.contract.container import ContainerPaths, JobError, configure_logging
from ml.contract.model_files import load_options
from ml.dataset import buckets
from ml.dataset.imagefolder import metadata_rows

log = logging.getLogger(__name__)

CONTAINER_ROOT = PurePosixPath("/opt/ml")
OUTPUT_CAPTION_COLUMN = "text"  # what the training job reads by default (its caption_column hyperparameter)
# Formats PIL decodes that cameras, editors and storyboard tools write; MPO is a multi-picture JPEG.
ACCEPTED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "TIFF", "BMP"}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (a 0.25 GiB RGBA image)
PROCESSING_RESOURCE_CONFIG = "config/resourceconfig.json"  # under /opt/ml, written by SageMaker Processing

# Why a file is rejected, as they appear in the log and in manifest.json.
EMPTY, NOT_AN_IMAGE, UNSUPPORTED_FORMAT = "empty_file", "not_an_image", "unsupported_format"
TOO_LARGE, CORRUPT, TOO_SMALL, DUPLICATE = "too_large", "corrupt", "too_small", "duplicate"
UNREADABLE_CAPTION, NO_CAPTION, ORPHAN_CAPTION = "unreadable_caption", "no_caption", "caption_without_image"

SIDECAR, METADATA_SOURCE, CAPTIONER_SOURCE = "sidecar", "metadata.jsonl", "instructblip"


@dataclass(frozen=True)
class Options:
    input_dir: Path
    output_dir: Path
    resolution: int = 1024
    buckets: bool = True
    bucket_multiple: int | None = None  # None: from --base-model's VAE and UNet, else SDXL's 32
    min_size: int = 256
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_images: int = 1
    caption_column: str = "text"
    captioner: str = "Salesforce/instructblip-vicuna-7b"  # "none": no captioning, uncaptioned images are rejected
    recaption: bool = False
    caption_prefix: str = ""
    caption: dict = field(default_factory=dict)  # ml.prepare.captioning.CaptionSettings fields
    base_model: str | None = None  # diffusers SDXL directory: VAE for the latent cache, tokenizer, bucket multiple
    latent_cache: bool = False
    version: str = ""
    input_key: str = ""  # the orchestrator's key for this input (the prepare DAG: S3 ETags and settings)
    num_shards: int = 1
    shard_index: int = 0

    def settings(self) -> dict:
        """What the manifest records: everything but where the files are."""
        values = asdict(self)
        for key in ("input_dir", "output_dir", "num_shards", "shard_index", "version", "input_key"):
            values.pop(key)
        return values


@dataclass
class Candidate:
    """A usable image of the input, as every shard plans it."""

    order: int  # position among all input files, sorted by name
    name: str  # POSIX path relative to the input directory
    sha256: str
    original_size: tuple[int, int]  # (height, width), upright
    caption: str  # "" until the captioner writes one
    caption_source: str
    file_name: str = ""  # output name, set once every candidate is known


def container_path(paths: ContainerPaths, path: str) -> Path:
    """/opt/ml/... resolves under the job's base directory ($SAGEMAKER_BASE_DIR), like every other
    contract path; anything else is used as given."""
    given = PurePosixPath(path)
    if given.is_relative_to(CONTAINER_ROOT):
        return paths.base.joinpath(*given.relative_to(CONTAINER_ROOT).parts)
    return Path(path)


# ---------------------------------------------------------------------------------------
# Checking one file


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode(data: bytes, max_pixels: int):
    """The image in data, decoded fully (first frame of an animation); Rejected names why it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Rejected(EMPTY, "the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind, (width, height) = probe.format, probe.size
            probe.verify()  # checksums and structure, without decoding pixels
    except UnidentifiedImageError:
        raise Rejected(NOT_AN_IMAGE, "not an image format PIL recognises") from None
    except Image.DecompressionBombError as error:
        raise Rejected(TOO_LARGE, str(error)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise Rejected(CORRUPT, f"{type(error).__name__}: {error}") from None
    if kind not in ACCEPTED_FORMATS:
        raise Rejected(UNSUPPORTED_FORMAT, f"{kind} (accepted: {', '.join(sorted(ACCEPTED_FORMATS))})")
    if width * height > max_pixels:
        raise Rejected(TOO_LARGE, f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    try:
        image = Image.open(io.BytesIO(data))
        image.seek(0)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise Rejected(CORRUPT, f"{type(error).__name__}: {error}") from None
    return image


def to_rgb(image):
    """Upright 8-bit RGB: EXIF orientation applied, 16-bit and float channels scaled (not clipped) to 8
    bits, transparency composited on white (a plain conversion shows whatever colour transparent pixels
    hold, often black)."""
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else (
            255.0 if values.max(initial=0) <= 255 and not image.mode.startswith("I;16") else 65535.0)
        image = Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_bucket(image, placement: buckets.Placement):
    from PIL import Image

    height, width = placement.resized
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    top, left = placement.crop
    return image.crop((left, top, left + placement.bucket[1], top + placement.bucket[0]))


def downscale(image, resolution: int):
    """Without buckets: shrink so the short side is resolution (never upscale); training crops squares."""
    from PIL import Image

    short = min(image.size)
    if short <= resolution:
        return image
    scale = resolution / short
    return image.resize(tuple(max(1, round(side * scale)) for side in image.size), Image.Resampling.LANCZOS)


def pixels(image):
    """[3, h, w] float tensor in [-1, 1], as the training job feeds the VAE."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------
# Planning: every shard makes the same plan


def list_files(input_dir: Path) -> tuple[list[str], list[str]]:
    """(candidate image files, sidecar captions) by POSIX name relative to input_dir, sorted."""
    files = sorted(p.relative_to(input_dir).as_posix() for p in input_dir.rglob("*") if p.is_file())
    files = [f for f in files if f != manifest.METADATA]
    stems = {PurePosixPath(f).with_suffix("").as_posix() for f in files if not f.lower().endswith(".txt")}
    sidecars = [f for f in files if f.lower().endswith(".txt")]
    others = [f for f in files if not f.lower().endswith(".txt")]
    orphans = [f for f in sidecars if PurePosixPath(f).with_suffix("").as_posix() not in stems]
    return others, orphans


def metadata_captions(input_dir: Path, caption_column: str) -> dict[str, str]:
    """Captions from the input's metadata.jsonl, by file name. A malformed line fails the job: guessing
    past it could silently drop or mislabel images."""
    path = input_dir / manifest.METADATA
    if not path.is_file():
        return {}
    captions = {}
    for _, row in metadata_rows(path, manifest.METADATA, where=f" in {input_dir}"):
        text = str(row.get(caption_column) or "").strip()
        if text:
            captions[PurePosixPath(str(row["file_name"])).as_posix()] = text  # "./a.png" names a.png
    return captions


def existing_caption(input_dir: Path, name: str, metadata: dict[str, str]) -> tuple[str, str]:
    """(caption, source) from a sidecar <stem>.txt (utf-8-sig accepts the byte-order mark some Windows
    editors write) or the metadata row; ("", "") when there is none."""
    sidecar = (input_dir / name).with_suffix(".txt")
    if sidecar.is_file():
        try:
            text = " ".join(sidecar.read_text(encoding="utf-8-sig").split())
        except UnicodeDecodeError:
            raise Rejected(UNREADABLE_CAPTION, f"{sidecar.name} is not UTF-8 text") from None
        if text:
            return text, SIDECAR
    if metadata.get(name):
        return " ".join(metadata[name].split()), METADATA_SOURCE
    return "", ""


def output_names(candidates: list[Candidate]) -> None:
    """<stem>.png beside where the input was; when x.jpg and x.png are different pictures, the later
    one keeps its extension in its name (x-jpg.png) rather than being dropped."""
    taken: set[str] = set()
    for candidate in candidates:
        path = PurePosixPath(candidate.name)
        name = path.with_suffix(".png").as_posix()
        if name in taken:
            name = path.with_name(f"{path.stem}-{path.suffix.lstrip('.').lower()}.png").as_posix()
        taken.add(name)
        candidate.file_name = name


def plan(options: Options, report: list[dict]) -> tuple[list[Candidate], int]:
    """Every usable image and every rejection (into report), identical on every shard."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = options.max_pixels  # PIL's own guard agrees with ours
    files, orphans = list_files(options.input_dir)
    for name in orphans:
        report.append({"file": name, "reason": ORPHAN_CAPTION, "detail": "a caption file with no image beside it",
                       "order": -1})
    metadata = metadata_captions(options.input_dir, options.caption_column)
    seen: dict[str, str] = {}
    candidates = []
    for order, name in enumerate(files):
        try:
            data = (options.input_dir / name).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen and data:
                raise Rejected(DUPLICATE, f"same content as {seen[digest]}")
            seen.setdefault(digest, name)
            image = to_rgb(decode(data, options.max_pixels))
            height, width = image.height, image.width
            if min(height, width) < options.min_size:
                raise Rejected(TOO_SMALL, f"{width}x{height}, the short side is under min_size {options.min_size}")
            caption, source = ("", "") if options.recaption else existing_caption(options.input_dir, name, metadata)
            if not caption and options.captioner == "none":
                raise Rejected(NO_CAPTION, f"no sidecar .txt, no {manifest.METADATA} row with "
                                           f"{options.caption_column!r}, and captioning is off")
        except Rejected as rejected:
            report.append({"file": name, "reason": rejected.reason, "detail": rejected.detail, "order": order})
            continue
        candidates.append(Candidate(order, name, digest, (height, width), caption, source))
    output_names(candidates)
    for index, rejection in enumerate(report):
        # Every shard finds every rejection; each is reported once, by the shard a round-robin gives it to.
        rejection["shard"] = index % options.num_shards
        if rejection["shard"] == options.shard_index:
            log.warning("rejected %s: %s (%s)", rejection["file"], rejection["reason"], rejection["detail"])
    return candidates, len(files) + len(orphans)


def shares(candidates: list[Candidate], options: Options, batch_size: int) -> list[Candidate]:
    """This shard's candidates. Uncaptioned images are split by caption batch (batch b to shard
    b mod N), so each batch, and its seeded sampling, is the same whatever the number of shards."""
    uncaptioned = [c for c in candidates if not c.caption]
    captioned = [c for c in candidates if c.caption]
    mine = [c for i, c in enumerate(captioned) if i % options.num_shards == options.shard_index]
    mine += [c for i, c in enumerate(uncaptioned) if (i // batch_size) % options.num_shards == options.shard_index]
    return sorted(mine, key=lambda c: c.order)


# ---------------------------------------------------------------------------------------
# The job


def prepare(options: Options) -> dict:
    """Write this shard's images and part; with one shard also metadata.jsonl and manifest.json.
    Returns the part."""
    from PIL import Image

    validate(options)
    caption_settings = _caption_settings(options)
    rejected: list[dict] = []
    candidates, files_found = plan(options, rejected)
    mine = shares(candidates, options, caption_settings.batch_size)
    base = options.base_model
    multiple = options.bucket_multiple or (buckets.model_multiple(base) if base else buckets.DEFAULT_MULTIPLE)
    sizes = buckets.bucket_sizes(options.resolution, multiple)
    log.info("%d usable images of %d files; this shard (%d of %d) takes %d, %d of them need captions",
             len(candidates), files_found, options.shard_index + 1, options.num_shards, len(mine),
             sum(1 for c in mine if not c.caption))

    rows: dict[int, dict] = {}
    for candidate in mine:
        with Image.open(options.input_dir / candidate.name) as opened:
            image = to_rgb(opened)
        row = {"file_name": candidate.file_name, OUTPUT_CAPTION_COLUMN: "",
               "original_size": list(candidate.original_size)}
        if options.buckets:
            placement = buckets.place(candidate.original_size,
                                      buckets.nearest_bucket(*candidate.original_size, sizes))
            image = fit_to_bucket(image, placement)
            row.update(crop=list(placement.crop), bucket=list(placement.bucket))
        else:
            image = downscale(image, options.resolution)
        target = options.output_dir / candidate.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        # No ICC profile: training reads the pixel values as they are, so viewers should too, and a
        # CMYK source's profile would be wrong for RGB pixels.
        image.save(target, format="PNG", icc_profile=None)
        rows[candidate.order] = row

    for candidate in write_captions(options, caption_settings, [c for c in candidates if not c.caption]):
        (options.output_dir / candidate.file_name).unlink()
        del rows[candidate.order]
        rejected.append({"file": candidate.name, "reason": NO_CAPTION, "detail": "the captioner wrote nothing",
                         "order": candidate.order})
    mine = [c for c in mine if c.order in rows]
    prefix = options.caption_prefix.strip()
    for candidate in mine:
        rows[candidate.order][OUTPUT_CAPTION_COLUMN] = f"{prefix}, {candidate.caption}" if prefix else candidate.caption
    long_captions = count_long_captions(base, [rows[c.order][OUTPUT_CAPTION_COLUMN] for c in mine])
    cache = None
    if options.latent_cache:
        cache = {"vae_fingerprint": cache_latents(options, mine, rows), "resolution": options.resolution,
                 "bucket_multiple": multiple, "flips": 2}

    part = {
        "shard": options.shard_index, "shards": options.num_shards, "run_key": run_key(options, candidates),
        "version": options.version, "input_key": options.input_key, "settings": options.settings(),
        "files_found": files_found, "long_captions": long_captions, "latent_cache": cache,
        "images": [{"order": c.order, "file_name": c.file_name, "source": c.name, "sha256": c.sha256,
                    "caption_source": c.caption_source, "row": rows[c.order]} for c in mine],
        "rejected": [{k: r[k] for k in ("file", "reason", "detail")} for r in rejected
                     if r.get("shard", options.shard_index) == options.shard_index],
    }
    part_path = options.output_dir / manifest.part_name(options.shard_index, options.num_shards)
    part_path.parent.mkdir(parents=True, exist_ok=True)
    part_path.write_text(json.dumps(part, indent=1) + "\n")
    if options.num_shards == 1:
        merge_directory(options.output_dir)
    else:
        log.info("part %d of %d written to %s; the parts merge into one manifest once every shard is done",
                 options.shard_index + 1, options.num_shards, part_path)
    return part


def merge_directory(output_dir: Path) -> dict:
    """Merge the parts under output_dir into metadata.jsonl and manifest.json; returns the manifest."""
    parts = [json.loads(p.read_text()) for p in sorted((output_dir / manifest.PARTS).glob("part-*.json"))]
    try:
        rows, merged = manifest.merge(parts)
    except manifest.MergeError as error:
        raise JobError(str(error)) from None
    (output_dir / manifest.METADATA).write_text(manifest.metadata_text(rows))
    (output_dir / manifest.MANIFEST).write_text(json.dumps(merged, indent=2) + "\n")
    log.info("%s", manifest.summary(merged))
    return merged


def write_exit_message(paths: ContainerPaths, text: str) -> None:
    """/opt/ml/output/message: SageMaker shows its first KB as the processing job's ExitMessage."""
    paths.output.mkdir(parents=True, exist_ok=True)
    (paths.output / "message").write_text(text[:1024])


def validate(options: Options) -> None:
    if not options.input_dir.is_dir():
        raise JobError(f"input directory {options.input_dir} is missing")
    for name in ("resolution", "min_images", "max_pixels"):
        if getattr(options, name) < 1:
            raise JobError(f"{name} must be at least 1, got {getattr(options, name)}")
    if options.min_size < 0:
        raise JobError(f"min_size must not be negative, got {options.min_size}")
    if not 0 <= options.shard_index < options.num_shards:
        raise JobError(f"shard index {options.shard_index} is outside 0..{options.num_shards - 1}")
    if options.latent_cache and not options.base_model:
        raise JobError("--latent-cache needs --base-model: the VAE to encode the images with")
    if options.base_model and not (Path(options.base_model) / "model_index.json").is_file():
        raise JobError(f"base model {options.base_model} is not a diffusers pipeline directory (no model_index.json)")


def run_key(options: Options, candidates: list[Candidate]) -> str:
    """Identifies one run's plan, so parts of different runs never merge."""
    content = json.dumps([options.settings(), options.version, [(c.name, c.sha256) for c in candidates]])
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _caption_settings(options: Options):
    from ml.prepare.captioning import CaptionSettings

    try:
        return CaptionSettings(**options.caption)
    except TypeError as error:
        raise JobError(f"caption settings: {error}") from None


def write_captions(options: Options, settings, uncaptioned: list[Candidate]) -> list[Candidate]:
    """InstructBLIP captions, from the written PNGs, for this shard's batches of all the uncaptioned
    images (batch b is this shard's when b mod N is its index, as `shares` decided); returns the images
    it could not caption (an empty caption)."""
    size = settings.batch_size
    batches = [(b, uncaptioned[start:start + size]) for b, start in enumerate(range(0, len(uncaptioned), size))
               if b % options.num_shards == options.shard_index]
    if not batches:
        return []
    from PIL import Image

    from ml.prepare.captioning import Captioner

    mine = [c for _, batch in batches for c in batch]
    log.info("captioning %d images with %s in batches of %d", len(mine), options.captioner, size)
    captioner = Captioner(options.captioner, settings)
    for number, batch in batches:
        images = []
        for candidate in batch:
            with Image.open(options.output_dir / candidate.file_name) as opened:
                images.append(opened.convert("RGB"))
        # Seeded by its number among all batches, so the captions do not depend on the number of shards.
        for candidate, caption in zip(batch, captioner.caption(images, first_batch=number)):
            candidate.caption, candidate.caption_source = caption, CAPTIONER_SOURCE
            log.info("caption %s: %s", candidate.file_name, caption)
    return [c for c in mine if not c.caption]


def count_long_captions(base: str | None, captions: list[str]) -> int | None:
    """Captions over CLIP's 77 tokens (SDXL truncates them there), counted with the base model's first
    tokenizer; None without a base model, rather than a guess."""
    if not base:
        return None
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    return sum(1 for caption in captions if len(tokenizer(caption).input_ids) > tokenizer.model_max_length)


def cache_latents(options: Options, mine: list[Candidate], rows: dict[int, dict]) -> str:
    """Encode each written image and its mirror with the base model's VAE, one file per image;
    returns the VAE's fingerprint."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from ml.dataset import latents

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fingerprint = latents.vae_fingerprint(options.base_model)
    # fp32: SDXL's VAE overflows in fp16; the training job encodes in fp32 too, so the latents are its own.
    vae = AutoencoderKL.from_pretrained(options.base_model, subfolder="vae", dtype=torch.float32,
                                        **load_options(options.base_model, "vae")).to(device)
    vae.requires_grad_(False)
    for candidate in mine:
        row = rows[candidate.order]
        with Image.open(options.output_dir / candidate.file_name) as opened:
            image = pixels(opened.convert("RGB"))
        mean, std = latents.encode(vae, torch.stack([image, image.flip(-1)]))
        relative = f"{latents.LATENTS_DIR}/{PurePosixPath(candidate.file_name).with_suffix('.safetensors')}"
        latents.save(options.output_dir / relative, mean, std, fingerprint, tuple(row["bucket"]))
        row["latents"] = relative
    log.info("cached the latents of %d images (VAE %s)", len(mine), fingerprint[:12])
    return fingerprint


def shard_from_resource_config(paths: ContainerPaths) -> tuple[int, int]:
    """(index, count) of this instance among the processing job's hosts; (0, 1) when run alone."""
    config = paths.base / PROCESSING_RESOURCE_CONFIG
    if not config.is_file():
        return 0, 1
    values = json.loads(config.read_text())
    hosts = sorted(values.get("hosts") or [values.get("current_host", "algo-1")])
    return hosts.index(values.get("current_host", hosts[0])), len(hosts)


def main(args) -> int:
    """Entrypoint of `sdxl-lora prepare` (args from ml.cli); returns the process exit status."""
    configure_logging()
    paths = ContainerPaths.from_env()
    try:
        if args.merge:
            merged = merge_directory(container_path(paths, args.merge))
            write_exit_message(paths, manifest.summary(merged))
            return 0
        index, count = shard_from_resource_config(paths)
        caption = {key: getattr(args, key) for key in (
            "prompt", "max_length", "min_length", "num_beams", "temperature", "top_p", "repetition_penalty",
            "length_penalty") if getattr(args, key) is not None}
        if args.caption_batch_size is not None:
            caption["batch_size"] = args.caption_batch_size
        if args.no_sample:
            caption["do_sample"] = False
        base = args.base_model and str(container_path(paths, args.base_model))
        captioner = args.captioner
        if container_path(paths, captioner).exists():  # a staged model directory, not a Hub id
            captioner = str(container_path(paths, captioner))
        options = Options(
            input_dir=container_path(paths, args.input), output_dir=container_path(paths, args.output),
            resolution=args.resolution, buckets=not args.no_buckets, bucket_multiple=args.bucket_multiple,
            min_size=args.min_size, max_pixels=args.max_pixels, min_images=args.min_images,
            caption_column=args.caption_column, captioner=captioner, recaption=args.recaption,
            caption_prefix=args.caption_prefix, caption=caption, base_model=base, latent_cache=args.latent_cache,
            version=args.version, input_key=args.input_key,
            num_shards=args.num_shards if args.num_shards is not None else count,
            shard_index=args.shard_index if args.shard_index is not None else index)
        part = prepare(options)
        if options.num_shards == 1:
            write_exit_message(paths, manifest.summary(json.loads((options.output_dir / manifest.MANIFEST).read_text())))
        else:
            write_exit_message(paths, f"part {part['shard'] + 1} of {part['shards']}: {len(part['images'])} images, "
                                      f"{len(part['rejected'])} rejected")
        return 0
    except Exception as error:  # every failure must leave output/failure behind
        reason = paths.write_failure(error, job="processing")
        write_exit_message(paths, reason)
        log.error("%s", reason)
        if not isinstance(error, JobError):
            log.exception("traceback")
        return 1
