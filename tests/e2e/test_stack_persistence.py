"""`local-stack --persist` keeps S3 across restarts on one work dir, and `make airflow` opens the last demo's
Airflow home, so the demo's runs and Grid reports are there after `make demo` (issue 13)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import free_port
from sdxl_lora_ops import cli, demo


class _Stack:
    def __init__(self, workdir: Path, *flags: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir.parent / f"stack-{time.monotonic_ns()}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sdxl_lora_ops.cli", "local-stack", "--port", self.url.rsplit(":", 1)[1],
                 "--workdir", str(workdir), *flags], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "\nready\n" not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                               aws_secret_access_key="testing", config=Config(retries={"max_attempts": 1}))

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=120) == 0, self.log.read_text()
        return self.log.read_text()


def _get(s3, bucket: str, key: str) -> tuple[bytes, str, dict]:
    response = s3.get_object(Bucket=bucket, Key=key)
    return response["Body"].read(), response["ContentType"], response["Metadata"]


def test_a_persisted_stack_restarted_on_its_workdir_still_serves_what_was_put(tmp_path):
    workdir = tmp_path / "stack"
    big = bytes(range(256)) * 8192  # 2 MiB: more than one read chunk
    first = _Stack(workdir, "--persist")
    try:
        first.s3.create_bucket(Bucket="reports")
        first.s3.create_bucket(Bucket="empty")
        first.s3.put_object(Bucket="reports", Key="grid_search/run-1/report/leaderboard.json", Body=b'{"rows": 4}',
                            ContentType="application/json", Metadata={"trial": "t-1"})
        first.s3.put_object(Bucket="reports", Key="grid_search/run-1", Body=b"an object and a prefix")
        first.s3.put_object(Bucket="reports", Key="models/model.tar.gz", Body=big)
        first.s3.put_object(Bucket="reports", Key="gone-next-time", Body=b"x")
    finally:
        log = first.stop()
    assert "saving S3" in log
    assert json.loads((workdir / "s3" / "manifest.json").read_text())["buckets"].keys() == {"reports", "empty"}

    second = _Stack(workdir, "--persist")
    try:
        assert "4 objects restored" in second.log.read_text()
        assert {b["Name"] for b in second.s3.list_buckets()["Buckets"]} == {"reports", "empty"}
        assert _get(second.s3, "reports", "grid_search/run-1/report/leaderboard.json") == (
            b'{"rows": 4}', "application/json", {"trial": "t-1"})
        assert _get(second.s3, "reports", "grid_search/run-1")[0] == b"an object and a prefix"
        assert _get(second.s3, "reports", "models/model.tar.gz")[0] == big
        second.s3.delete_object(Bucket="reports", Key="gone-next-time")
        second.s3.put_object(Bucket="reports", Key="new", Body=b"y")
    finally:
        second.stop()

    third = _Stack(workdir, "--persist")  # the snapshot is the last stop's, not a union of all of them
    try:
        keys = {o["Key"] for o in third.s3.list_objects_v2(Bucket="reports")["Contents"]}
        assert "gone-next-time" not in keys and "new" in keys
    finally:
        third.stop()
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith("s3")) == ["s3"]  # no staging left

    plain = _Stack(workdir)  # without --persist the stack starts empty and saves nothing
    try:
        with pytest.raises(ClientError, match="NoSuchBucket"):
            plain.s3.list_objects_v2(Bucket="reports")
        plain.s3.create_bucket(Bucket="scratch")
    finally:
        plain.stop()
    assert "scratch" not in (workdir / "s3" / "manifest.json").read_text()


def test_make_airflow_opens_the_last_demos_home_when_there_is_one(tmp_path):
    assert cli.build_parser().parse_args(["airflow"]).workdir is None  # the Makefile passes no --workdir
    assert demo.ui_workdir(None, cwd=tmp_path) == tmp_path / "outputs" / "airflow"
    (tmp_path / "outputs" / "demo" / "airflow").mkdir(parents=True)
    assert demo.ui_workdir(None, cwd=tmp_path) == tmp_path / "outputs" / "airflow"  # a demo that never migrated
    (tmp_path / "outputs" / "demo" / "airflow" / "airflow.db").write_bytes(b"")
    assert demo.ui_workdir(None, cwd=tmp_path) == tmp_path / "outputs" / "demo"
    assert demo.ui_workdir(str(tmp_path / "mine"), cwd=tmp_path) == tmp_path / "mine"


def test_a_demo_starts_without_the_previous_demos_runs_or_s3(tmp_path):
    home, snapshot = tmp_path / "airflow", tmp_path / "stack" / "s3"
    home.mkdir()
    snapshot.mkdir(parents=True)
    for name in ("airflow.db", "airflow.db-wal", "passwords.json"):
        (home / name).write_text("x")
    (snapshot / "manifest.json").write_text("{}")
    demo._forget_previous_demo(tmp_path)
    assert sorted(p.name for p in home.iterdir()) == ["passwords.json"] and not snapshot.exists()
