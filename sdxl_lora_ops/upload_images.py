"""`sdxl-lora-ops upload-images DIR --version V`: a folder of one's own images into raw_dataset/V/.

Every regular file under DIR goes to `<prefix>/raw_dataset/<V>/<its path under DIR>` of the target
(sdxl_lora_ops/target.py: the running local stack of `make airflow`, else S3 on AWS), as it is: images,
`.txt` caption sidecars, a `metadata.jsonl`. Nothing is judged here: sdxl_dataset_prepare checks every
image and reports the ones it rejects, and captions the uncaptioned ones. Refused before anything is
written: a missing or empty folder, a version the prepare DAG would refuse, and a version that already
has objects (unless --replace, which deletes them first so the version is exactly the folder).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sdxl_lora_ops import target as targets

# plugins/sdxl_lora/assets.py VERSION_PATTERN, which the prepare DAG's version parameter uses (a test holds them equal).
VERSION_PATTERN = r"^[A-Za-z0-9._-]+$"
# ml/dataset/imagefolder.py IMAGE_SUFFIXES: only to count what goes up, not to choose it.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
PREPARE_DAG = "sdxl_dataset_prepare"


class UploadError(Exception):
    """Refused before anything was written; the message says why."""


def check_version(version: str) -> str:
    if not re.fullmatch(VERSION_PATTERN, version) or version in (".", ".."):
        raise UploadError(f"version {version!r} is not a dataset version: use letters, digits, '.', '_' and '-' "
                          "(what sdxl_dataset_prepare accepts), e.g. 'storyboards-v1'")
    return version


def plan(folder: Path) -> tuple[list[Path], list[Path]]:
    """(regular files under folder, sorted; other entries skipped: broken links, sockets, pipes, devices)."""
    if not folder.exists():
        raise UploadError(f"{folder} does not exist")
    if not folder.is_dir():
        raise UploadError(f"{folder} is not a folder")
    files, skipped = [], []
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        (files if path.is_file() else skipped).append(path)
    if not files:
        raise UploadError(f"{folder} has no files to upload")
    return files, skipped


def counts(files: list[Path], folder: Path) -> dict[str, int]:
    found = {"images": 0, "caption files (.txt)": 0, "metadata.jsonl": 0, "other files": 0}
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found["images"] += 1
        elif path.suffix.lower() == ".txt":
            found["caption files (.txt)"] += 1
        elif path.relative_to(folder).as_posix() == "metadata.jsonl":
            found["metadata.jsonl"] += 1
        else:
            found["other files"] += 1
    return found


def existing_keys(s3, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def upload(target: targets.Target, folder: Path, version: str, replace: bool = False, out=None) -> dict:
    out = out or sys.stdout
    check_version(version)
    files, skipped = plan(folder)
    prefix = target.key("raw_dataset", version) + "/"
    uri = f"s3://{target.bucket}/{prefix}"
    existing = existing_keys(target.s3, target.bucket, prefix)
    if existing and not replace:
        raise UploadError(f"{uri} already has {len(existing)} object(s): choose a new version (a version is a "
                          "dataset as it was; prepare and the trained LoRAs name it), or give --replace to delete "
                          "them and upload this folder in their place")
    print(f"uploading {folder} to {uri} on {target.where}", file=out, flush=True)
    if existing:
        for start in range(0, len(existing), 1000):
            target.s3.delete_objects(Bucket=target.bucket, Delete={
                "Objects": [{"Key": key} for key in existing[start:start + 1000]], "Quiet": True})
        print(f"--replace: deleted the {len(existing)} object(s) that were there", file=out)
    for path in files:
        target.s3.upload_file(str(path), target.bucket, prefix + path.relative_to(folder).as_posix())
    found = counts(files, folder)
    print(f"uploaded {len(files)} file(s): " + ", ".join(f"{n} {kind}" for kind, n in found.items() if n), file=out)
    for path in skipped:
        print(f"skipped (not a file): {path}", file=out)
    if not found["caption files (.txt)"] and not found["metadata.jsonl"]:
        print("no captions: sdxl_dataset_prepare captions the images (InstructBLIP)", file=out)
    where = f" in the Airflow UI ({target.airflow_url})" if target.airflow_url else ""
    print(f"next: trigger {PREPARE_DAG}{where} with version '{version}'; it checks the images and reports the "
          "ones it rejects", file=out, flush=True)
    return {"uri": uri, "files": len(files), "skipped": [str(p) for p in skipped], "counts": found,
            "replaced": len(existing)}


def main(args) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        check_version(args.version)
        plan(Path(args.folder))  # refuse a bad folder before looking for a stack or credentials
        target = targets.resolve(args.workdir, args.aws)
        upload(target, Path(args.folder), args.version, replace=args.replace)
    except (UploadError, targets.TargetError) as error:
        print(f"upload-images: {error}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as error:
        print(f"upload-images: S3 refused: {error}", file=sys.stderr)
        return 1
    return 0
