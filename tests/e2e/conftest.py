"""A real `sdxl-lora-ops local-stack` process for the session, and boto3 clients speaking to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from ml.fixtures import synthetic, tiny_model

BUCKET = "sdxl-lora-e2e"
SPOT_PATTERN = r"step=3 "  # the stack interrupts each managed-spot job once, at this log line
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdxl-lora-training:latest"
ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Stack:
    def __init__(self, workdir: Path, port: int, cwd: Path | None = None, max_concurrent_jobs: int = 3,
                 instance_quotas: dict[str, int] | None = None):
        self.workdir, self.port = workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir.parent / "local-stack.log"  # a file: an unread pipe would fill and stall the stack
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sdxl_lora_ops.cli", "local-stack", "--port", str(port), "--workdir", str(workdir),
                 "--max-concurrent-jobs", str(max_concurrent_jobs), "--spot-interruption-at", SPOT_PATTERN,
                 *(f"--instance-quota={t}={n}" for t, n in (instance_quotas or {}).items())],
                stdout=out, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        deadline = time.monotonic() + 120
        while "\nready\n" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local stack did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def client(self, service: str, **config):
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing", config=Config(retries={"max_attempts": 1}, **config))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=180)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"), free_port())
    yield stack
    if stack.process.poll() is None:
        stack.stop()


@pytest.fixture(scope="session")
def s3(stack):
    return stack.client("s3")


@pytest.fixture(scope="session")
def sagemaker(stack):
    return stack.client("sagemaker")


@pytest.fixture(scope="session")
def staged(stack, s3, tmp_path_factory):
    """The tiny SDXL and a synthetic dataset in S3, where the DAGs would put them."""
    root = tmp_path_factory.mktemp("staged")
    s3.create_bucket(Bucket=BUCKET)
    sources = {"base": tiny_model.build(root / "base"), "data": synthetic.write_dataset(root / "data", count=10)}
    for prefix, folder in sources.items():
        for path in folder.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return {"base": f"s3://{BUCKET}/base", "data": f"s3://{BUCKET}/data", "base_dir": sources["base"]}


def training_request(name: str, staged: dict, hyperparameters: dict | None = None, **extra) -> dict:
    from ml.contract.hyperparameters import to_sagemaker
    from ml.contract.metrics import METRIC_DEFINITIONS

    values = {"resolution": 32, "train_batch_size": 2, "max_train_steps": 6, "validation_split": 0.2,
              "checkpointing_steps": 2, **(hyperparameters or {})}
    return {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": IMAGE, "TrainingInputMode": "File",
                                   "MetricDefinitions": METRIC_DEFINITIONS},
        "RoleArn": ROLE,
        "HyperParameters": to_sagemaker(values),
        "InputDataConfig": [
            {"ChannelName": channel, "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": staged[source], "S3DataDistributionType": "FullyReplicated"}}}
            for channel, source in (("train", "data"), ("base_model", "base"))
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/models"},
        "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        **extra,
    }


def stack_environment(monkeypatch, stack) -> None:
    """boto3's own environment pointing at the stack, for operators built with aws_conn_id=None."""
    for name, value in {"AWS_ENDPOINT_URL": stack.url, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def wait_for(describe, key: str, done=("Completed", "Failed", "Stopped"), timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        description = describe()
        if description[key] in done:
            return description
        time.sleep(0.5)
    raise AssertionError(f"{key} still {description[key]} after {timeout} s")


def wait_for_training(sagemaker, name: str, **kw) -> dict:
    return wait_for(lambda: sagemaker.describe_training_job(TrainingJobName=name), "TrainingJobStatus", **kw)


def wait_for_processing(sagemaker, name: str, **kw) -> dict:
    return wait_for(lambda: sagemaker.describe_processing_job(ProcessingJobName=name), "ProcessingJobStatus", **kw)


def wait_for_endpoint(sagemaker, name: str, **kw) -> dict:
    return wait_for(lambda: sagemaker.describe_endpoint(EndpointName=name), "EndpointStatus",
                    done=("InService", "Failed"), **kw)


def processes_under(path: Path) -> list[int]:
    """PIDs of live processes whose environment, command line or working directory names path."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline", "environ", "cwd"]):
        try:  # a warm-started container (local_stack/warm.py) shows only its working directory, its job's
            text = " ".join([*(process.info["cmdline"] or []), str((process.info["environ"] or {}).get(
                "SAGEMAKER_BASE_DIR", "")), process.info["cwd"] or ""])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(path) in text and process.pid != os.getpid():
            found.append(process.pid)
    return found


@pytest.fixture(scope="session")
def scheduled(tmp_path_factory):
    """One real Airflow (LocalExecutor on PostgreSQL; tests/e2e/scheduler.py) against a local stack of its own,
    shared by every scheduler test that needs no settings of its own: starting one costs about a minute.
    Each test unpauses the DAGs it runs and tells its runs and jobs apart from the others' by run id."""
    from scheduler import GRID, deployment, skip_without_services

    skip_without_services()
    with deployment(tmp_path_factory.mktemp("sched-local")) as airflow:
        airflow.wait_for_dags(GRID)
        airflow.unpause(GRID)
        yield airflow
