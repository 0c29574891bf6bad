"""A real Airflow (api-server, scheduler, dag-processor, triggerer) on PostgreSQL against a local stack.

Each deployment gets a database of its own on 127.0.0.1:5432 (dropped afterwards), a local stack of its
own (a quota of 16 training jobs, so only Airflow's pool limits concurrency) and the project's dags and
plugins. Runs are triggered through the REST API (local_stack/airflow_services.py). A cluster policy
(airflow_local_settings.py in AIRFLOW_HOME/config) shortens retry_delay to 2 s, so a retry happens
within the test, through Airflow's own retry machinery.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest
from conftest import Stack, free_port

from local_stack.airflow_services import AirflowServices, parse_time
from ml import synthetic, tiny_model

ROOT = Path(__file__).parents[2]
BUCKET, PREFIX = "sdxl-lora-sched", "sdxl-finetune-lora"
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS = "redis://127.0.0.1:6379"
POOL_SIZE = 3
TINY = {"resolution": 32, "train_batch_size": 2, "validation_split": 0.25, "checkpointing_steps": 2}
POLICY = '''
from datetime import timedelta


def task_policy(task):
    task.retry_delay = timedelta(seconds=2)  # tests/e2e/scheduler.py: retries within the test
'''


@contextmanager
def database():
    """A PostgreSQL database of its own; dropped (with any session left on it) afterwards."""
    name = f"sdxl_e2e_{secrets.token_hex(4)}"
    admin = psycopg2.connect(dbname="postgres", **POSTGRES)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def stage(stack: Stack, root: Path) -> dict:
    """The tiny SDXL as the base model and processed datasets `tiny` (10 captioned frames) and `empty`."""
    s3 = stack.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    folders = {"base_model": tiny_model.build(root / "base"),
               "proc_dataset/tiny": synthetic.write_dataset(root / "data", count=8)}
    for prefix, folder in folders.items():
        for path in folder.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"{PREFIX}/{prefix}/{path.relative_to(folder).as_posix()}")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/proc_dataset/empty/metadata.jsonl", Body=b"")
    return {"base_model_uri": f"s3://{BUCKET}/{PREFIX}/base_model/"}


@contextmanager
def deployment(tmp: Path, executor: str = "LocalExecutor", **settings: str):
    """Local stack + Airflow on its own database; everything stopped and dropped on the way out."""
    stack = Stack(tmp / "stack", free_port(), max_concurrent_jobs=16)  # only the pool limits
    try:
        staged = stage(stack, tmp / "staged")
        with database() as url:
            home = tmp / "airflow"
            (home / "config").mkdir(parents=True)
            (home / "config" / "airflow_local_settings.py").write_text(POLICY)
            env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW_CONFIG": str(ROOT / "airflow.cfg"),
                   "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
                   "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                   "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
                   "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # each test unpauses what it runs
                   "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",  # a dead worker is noticed
                   "AIRFLOW__CELERY__BROKER_URL": f"{REDIS}/0",
                   "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + url.replace("+psycopg2", ""),
                   "SDXL_LORA_BUCKET": BUCKET, "SDXL_LORA_PREFIX": PREFIX,
                   "SDXL_LORA_CHECK_INTERVAL_SECONDS": "1", "SDXL_LORA_TRAINING_POOL_SIZE": str(POOL_SIZE),
                   "SDXL_LORA_BASE_MODEL_URI": staged["base_model_uri"],
                   **{f"SDXL_LORA_{k.upper()}": v for k, v in settings.items()},
                   "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({
                       "conn_type": "aws", "login": "testing", "password": "testing",
                       "extra": {"endpoint_url": stack.url, "region_name": "us-east-1"}})}
            airflow = AirflowServices(env, executor=executor, parallelism=8)
            try:
                airflow.migrate()
                airflow.start()
                airflow.set_pool("sagemaker_training", POOL_SIZE, "SageMaker training jobs")
                airflow.stack = stack
                yield airflow
            finally:
                pids = airflow.all_pids()
                airflow.stop()
                leftover = [pid for pid in pids if _alive(pid)]
                assert not leftover, f"processes left after stopping Airflow: {leftover}"
    finally:
        if stack.process.poll() is None:
            stack.stop()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class JobSampler:
    """Counts the stack's InProgress training jobs every `interval` seconds, on a thread."""

    def __init__(self, sagemaker, interval: float = 0.25):
        self.sagemaker, self.interval = sagemaker, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self.sagemaker.list_training_jobs(StatusEquals="InProgress", MaxResults=100)
            self.samples.append(len(jobs["TrainingJobSummaries"]))
            self._stop.wait(self.interval)

    def __enter__(self) -> "JobSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def grid_conf(version: str, learning_rates: list[float], steps: list[int], **extra) -> dict:
    return {"dataset_version": version, "learning_rates": learning_rates, "max_train_steps": steps, "ranks": [4],
            "hyperparameters": TINY, **extra}


def slot_utilisation(instances: list[dict], slots: int) -> tuple[float, float]:
    """(busy share of the pool's slots, span in seconds) from queued to end of each task instance."""
    spans = [(parse_time(t["queued_when"] or t["start_date"]), parse_time(t["end_date"])) for t in instances]
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    total = (end - start).total_seconds()
    busy = sum((e - s).total_seconds() for s, e in spans)
    return busy / (slots * total), total


def wait_until(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def training_jobs(sagemaker, contains: str) -> list[str]:
    return sorted(j["TrainingJobName"] for j in sagemaker.list_training_jobs(
        NameContains=contains, MaxResults=100)["TrainingJobSummaries"])


def skip_without_services() -> None:
    """The scheduler tests need PostgreSQL (and Redis for Celery) on loopback: say so clearly."""
    try:
        psycopg2.connect(dbname="postgres", connect_timeout=3, **POSTGRES).close()
    except psycopg2.OperationalError as error:
        pytest.fail(f"tests marked `scheduler` need PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres): {error}")
