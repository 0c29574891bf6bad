"""Where `stage-models`, `upload-images`, `fetch-results` and `approve` read and write: the running local stack, or S3 on AWS.

`make airflow` and `make demo` write `<workdir>/local-stack.json` once their stack answers (its endpoint URL,
test credentials, bucket and prefix, the stack's process id) and delete it when the stack stops. The commands
use the record of `--workdir`, else the newest live record of the default work dirs (outputs/airflow,
outputs/demo, relative to where they run). Without a live record, or with `--aws`, they use S3 on AWS: the
settings' bucket and prefix (SDXL_LORA_BUCKET / SDXL_LORA_PREFIX) and boto3's default credential chain.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

RECORD = "local-stack.json"
DEFAULT_WORKDIRS = (Path("outputs/airflow"), Path("outputs/demo"))  # `make airflow`'s and `make demo`'s
PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


class TargetError(Exception):
    """No usable place to read or write; the message says what to do."""


@dataclass
class Target:
    s3: object  # a boto3 S3 client
    bucket: str
    prefix: str
    where: str  # for people: "the local stack at http://... (outputs/airflow)" or "AWS S3"
    local: bool
    airflow_url: str | None = None
    client_kwargs: dict = field(default_factory=dict)  # boto3.client's endpoint and credentials; empty on AWS

    def client(self, service: str):
        """A boto3 client of another service at the same place (the local stack answers them all)."""
        import boto3

        return boto3.client(service, **self.client_kwargs)

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"


def write_record(workdir: Path, endpoint_url: str, credentials: dict[str, str], region: str, bucket: str,
                 prefix: str, pid: int, airflow_url: str | None = None) -> Path:
    """`<workdir>/local-stack.json`, readable by its owner only (the stack's credentials are test ones, but still)."""
    path = Path(workdir) / RECORD
    record = {"endpoint_url": endpoint_url, "region": region, "bucket": bucket, "prefix": prefix, "pid": pid,
              "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
              "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"], "airflow_url": airflow_url}
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.chmod(temporary, 0o600)
    temporary.replace(path)
    return path


def update_record(workdir: Path, **values) -> None:
    path = Path(workdir) / RECORD
    if path.exists():
        record = json.loads(path.read_text())
        record.update(values)
        path.write_text(json.dumps(record, indent=2) + "\n")


def remove_record(workdir: Path) -> None:
    (Path(workdir) / RECORD).unlink(missing_ok=True)


def read_record(workdir: Path) -> dict | None:
    try:
        return json.loads((Path(workdir) / RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_live(record: dict) -> bool:
    """The recorded stack's process exists and its port accepts a connection."""
    try:
        os.kill(int(record["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return False
    except PermissionError:
        pass  # someone else's process of that id: the port decides
    address = urlsplit(record.get("endpoint_url", ""))
    try:
        with socket.create_connection((address.hostname, address.port), timeout=2):
            return True
    except (OSError, TypeError, ValueError):
        return False


def _live_default(cwd: Path) -> tuple[Path, dict] | None:
    found = []
    for workdir in DEFAULT_WORKDIRS:
        path = cwd / workdir
        record = read_record(path)
        if record is not None and is_live(record):
            found.append(((path / RECORD).stat().st_mtime, path, record))
    if not found:
        return None
    _, path, record = max(found, key=lambda item: item[0])
    return path, record


def _settings():
    """The DAGs' settings (plugins/sdxl_lora/settings.py): SDXL_LORA_* environment, else their defaults."""
    if str(PLUGINS) not in sys.path:
        sys.path.insert(0, str(PLUGINS))
    from sdxl_lora.settings import Settings

    return Settings.from_environment()


def resolve(workdir: str | None = None, aws: bool = False, cwd: Path | None = None) -> Target:
    import boto3

    if aws and workdir:
        raise TargetError("--aws and --workdir name different places: give one")
    if not aws:
        if workdir is not None:
            record = read_record(Path(workdir))
            if record is None:
                raise TargetError(f"no local stack recorded in {workdir} ({RECORD} is written by `make airflow` "
                                  "and `make demo` while their stack runs); give --aws for S3 on AWS")
            if not is_live(record):
                raise TargetError(f"the local stack recorded in {Path(workdir) / RECORD} ({record.get('endpoint_url')})"
                                  " is not running: start `make airflow` again, or give --aws for S3 on AWS")
            found = (Path(workdir), record)
        else:
            found = _live_default(cwd or Path.cwd())
        if found is not None:
            path, record = found
            kwargs = {"endpoint_url": record["endpoint_url"], "region_name": record["region"],
                      "aws_access_key_id": record["aws_access_key_id"],
                      "aws_secret_access_key": record["aws_secret_access_key"]}
            return Target(boto3.client("s3", **kwargs), record["bucket"], record["prefix"],
                          f"the local stack at {record['endpoint_url']} (recorded in {path / RECORD})", True,
                          record.get("airflow_url"), kwargs)
    settings = _settings()
    return Target(boto3.client("s3"), settings.bucket, settings.prefix,
                  "AWS S3 (SDXL_LORA_BUCKET/SDXL_LORA_PREFIX, boto3's default credentials)"
                  + ("" if aws else "; no local stack is running (`make airflow` records one)"), False)
