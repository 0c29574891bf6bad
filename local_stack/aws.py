"""The stack's own AWS clients (pointed at itself) and the S3 transfers jobs need."""

from __future__ import annotations

import tarfile
from pathlib import Path

import boto3
from botocore.config import Config

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


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


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
