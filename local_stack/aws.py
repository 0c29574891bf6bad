"""The stack's own AWS clients (pointed at itself) and the S3 transfers jobs need."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import boto3
from botocore.config import Config

from ml.contract.container import split_s3_uri

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account: the stack's ARNs use it
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def client_environment(endpoint_url: str) -> dict[str, str]:
    """What a client (or a job the stack runs) needs to talk to the stack."""
    return {"AWS_ENDPOINT_URL": endpoint_url, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, **CREDENTIALS}


class Clients:
    def __init__(self, endpoint_url: str):
        session = boto3.session.Session(aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                        region_name=REGION)
        config = Config(retries={"max_attempts": 3}, max_pool_connections=32)
        self.s3 = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.logs = session.client("logs", endpoint_url=endpoint_url, config=config)
        self.cloudwatch = session.client("cloudwatch", endpoint_url=endpoint_url, config=config)


def download_prefix(s3, uri: str, destination: Path) -> int:
    """Copy every object under an S3 prefix (or one object) into destination; returns the count."""
    bucket, prefix = split_s3_uri(uri)
    destination.mkdir(parents=True, exist_ok=True)
    count = 0
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith("/"):
                continue
            relative = key[len(prefix):].lstrip("/") if key != prefix else Path(key).name
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
            count += 1
    return count


def upload_directory(s3, source: Path, uri: str) -> int:
    bucket, prefix = split_s3_uri(uri)
    count = 0
    for path in sorted(source.rglob("*")):
        if path.is_file():
            key = f"{prefix.rstrip('/')}/{path.relative_to(source).as_posix()}" if prefix else \
                path.relative_to(source).as_posix()
            s3.upload_file(str(path), bucket, key)
            count += 1
    return count


def tar_directory(source: Path, archive: Path) -> None:
    """model.tar.gz as SageMaker writes it: the directory's contents at the archive's root."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=path.name)


def untar(archive: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(destination, filter="data")


# -- S3 kept across restarts (`local-stack --persist`) ----------------------------------------------
# moto keeps S3 in memory; a stack started with --persist writes every object under <workdir>/s3/ when it
# stops and puts them back when it starts on the same workdir. One file per object (named by its index, so
# keys that are both an object and a "folder" never clash) and a manifest with each object's key, content
# type and user metadata. The snapshot is written beside the old one and swapped in, so a stop that is cut
# short leaves the previous snapshot whole.

SNAPSHOT_DIR = "s3"
MANIFEST = "manifest.json"


def save_s3(s3, directory: Path) -> int:
    """Write every bucket's objects into directory (replacing what was there); returns the count."""
    staging = directory.with_name(directory.name + ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "objects").mkdir(parents=True)
    buckets: dict[str, list[dict]] = {}
    count = 0
    for bucket in s3.list_buckets().get("Buckets", []):
        name = bucket["Name"]
        entries = buckets.setdefault(name, [])
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                response = s3.get_object(Bucket=name, Key=item["Key"])
                blob = f"objects/{count:08d}"
                with (staging / blob).open("wb") as out:
                    for chunk in response["Body"].iter_chunks(1 << 20):
                        out.write(chunk)
                entries.append({"key": item["Key"], "file": blob,
                                "content_type": response.get("ContentType", "binary/octet-stream"),
                                "metadata": response.get("Metadata", {})})
                count += 1
    (staging / MANIFEST).write_text(json.dumps({"buckets": buckets}))
    previous = directory.with_name(directory.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        directory.rename(previous)
    staging.rename(directory)
    shutil.rmtree(previous, ignore_errors=True)
    return count


def restore_s3(s3, directory: Path) -> int:
    """Put back what save_s3 wrote (buckets first); returns the count, 0 when there is no snapshot."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return 0
    count = 0
    for name, entries in json.loads(manifest.read_text())["buckets"].items():
        s3.create_bucket(Bucket=name)  # idempotent in us-east-1
        for entry in entries:
            s3.upload_file(str(directory / entry["file"]), name, entry["key"],
                           ExtraArgs={"ContentType": entry["content_type"], "Metadata": entry["metadata"]})
            count += 1
    return count
