"""The processed dataset's report: parts written by each prepare instance, merged into one manifest.

A prepare job on one instance writes `parts/part-00000-of-00001.json` and merges it at once; on
several instances each writes its own part, and the merge (`sdxl-lora prepare --merge DIR`, or the
prepare DAG's merge task on S3) turns them into `metadata.jsonl` and `manifest.json`. Pure Python, so
the DAGs' tasks can merge and summarise without the payload's torch stack.
"""

from __future__ import annotations

import json
from collections import Counter

MANIFEST = "manifest.json"
METADATA = "metadata.jsonl"
PARTS = "parts"
FORMAT_VERSION = 1


class MergeError(ValueError):
    """The parts do not make one dataset (missing, from different runs, or too few images)."""


def part_name(index: int, count: int) -> str:
    return f"{PARTS}/part-{index:05d}-of-{count:05d}.json"


def merge(parts: list[dict]) -> tuple[list[dict], dict]:
    """metadata.jsonl rows and the manifest from every part of one run; fails naming what is wrong."""
    if not parts:
        raise MergeError("no parts to merge: the prepare job wrote nothing")
    count = parts[0]["shards"]
    keys = {(p["shards"], p["run_key"]) for p in parts}
    if len(keys) != 1:
        raise MergeError(f"parts come from different prepare runs: {sorted(keys)}")
    found = sorted(p["shard"] for p in parts)
    if found != list(range(count)):
        missing = sorted(set(range(count)) - set(found))
        raise MergeError(f"expected {count} parts, found shards {found}; missing {missing}")
    parts = sorted(parts, key=lambda p: p["shard"])
    images = sorted((image for p in parts for image in p["images"]), key=lambda image: image["order"])
    rejected = sorted((r for p in parts for r in p["rejected"]), key=lambda r: r["file"])
    first = parts[0]
    rows = [image["row"] for image in images]
    long_captions = [p["long_captions"] for p in parts]
    manifest = {
        "format": FORMAT_VERSION,
        "version": first["version"],
        "input_key": first["input_key"],
        "settings": first["settings"],
        "shards": count,
        "counts": {
            "files_found": first["files_found"],
            "images_written": len(rows),
            "rejected": len(rejected),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "captions_from": dict(sorted(Counter(image["caption_source"] for image in images).items())),
            "captions_over_77_tokens": None if None in long_captions else sum(long_captions),
            "buckets": dict(sorted(Counter("x".join(map(str, image["row"]["bucket"])) for image in images
                                           if "bucket" in image["row"]).items())),
            "latents_cached": sum(1 for row in rows if "latents" in row),
        },
        "latent_cache": first["latent_cache"],
        "images": [{key: image[key] for key in ("file_name", "source", "sha256", "caption_source")}
                   for image in images],
        "rejected": rejected,
    }
    min_images = first["settings"]["min_images"]
    if len(rows) < min_images:
        raise MergeError(f"only {len(rows)} usable image(s) of {first['files_found']} file(s), fewer than min_images "
                         f"{min_images}; rejected: {describe_rejections(manifest)}")
    return rows, manifest


def describe_rejections(manifest: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in manifest["counts"]["rejected_by_reason"].items()) or "none"


def metadata_text(rows: list[dict]) -> str:
    # ASCII JSON: the training job reads this file in whatever locale its container has.
    return "".join(json.dumps(row) + "\n" for row in rows)


def summary(manifest: dict) -> str:
    """The lines the prepare DAG prints in its task log."""
    counts = manifest["counts"]
    long = counts["captions_over_77_tokens"]
    lines = [
        f"dataset version {manifest['version'] or '(none given)'}: {counts['images_written']} images from {counts['files_found']} files "
        f"({manifest['shards']} shard(s))",
        f"rejected {counts['rejected']}: {describe_rejections(manifest)}",
        "captions from: " + (", ".join(f"{n} {source}" for source, n in counts["captions_from"].items()) or "none"),
        "captions over CLIP's 77 tokens: " + ("not counted (no base model tokenizer)" if long is None else str(long)),
        "buckets (height x width): " + (", ".join(f"{n} at {b}" for b, n in counts["buckets"].items()) or "none"),
        f"latents cached: {counts['latents_cached']}",
    ]
    lines += [f"  rejected {r['file']}: {r['reason']} ({r['detail']})" for r in manifest["rejected"]]
    return "\n".join(lines)
