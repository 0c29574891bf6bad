"""A real Airflow (api-server, scheduler, dag-processor, triggerer) on PostgreSQL against a local stack.

Each deployment gets a database of its own on 127.0.0.1:5432 (dropped afterwards), a local stack of its
own (a quota of 16 training jobs, so only Airflow's pool limits concurrency) and the project's dags and
plugins, parsed with the forms' local preset (SDXL_LORA_PRESET=local) as `make airflow` parses them.
Runs are triggered through the REST API (sdxl_lora_ops/airflow_services.py). A cluster policy
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

from conftest import Stack, free_port, processes_under
from ml.fixtures import synthetic, tiny_model
from sdxl_lora.naming import run_token
from sdxl_lora_ops.airflow_services import AirflowServices, parse_time

ROOT = Path(__file__).parents[2]
BUCKET, PREFIX = "sdxl-lora-sched", "sdxl-finetune-lora"
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS = "redis://127.0.0.1:6379"
POOL_SIZE = 3
POOL_STEPS = 200  # optimizer steps of each trial of the pool test
TRIALS = 6  # trials of the pool test, twice the pool
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
def deployment(tmp: Path, executor: str = "LocalExecutor", instance_quotas: dict[str, int] | None = None,
               **settings: str):
    """Local stack + Airflow on its own database; everything stopped and dropped on the way out. instance_quotas:
    smaller quotas of single instance types in the stack (AWS's "ml.g5.xlarge for training job usage")."""
    stack = Stack(tmp / "stack", free_port(), max_concurrent_jobs=16,  # only the pool limits
                  instance_quotas=instance_quotas)
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
                   "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + url,
                   "SDXL_LORA_BUCKET": BUCKET, "SDXL_LORA_PREFIX": PREFIX,
                   "SDXL_LORA_CHECK_INTERVAL_SECONDS": "1", "SDXL_LORA_TRAINING_POOL_SIZE": str(POOL_SIZE),
                   "SDXL_LORA_RETRY_DELAY_SECONDS": "2",
                   "SDXL_LORA_REGISTRY_WATCH_SCHEDULE": "none",  # no deployments of its own beside the tests' runs
                   "SDXL_LORA_BASE_MODEL_URI": staged["base_model_uri"], "SDXL_LORA_PRESET": "local",
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
                leftover = _still_alive(pids, within=10)
                assert not leftover, f"processes left after stopping Airflow: {leftover}"
    finally:
        if stack.process.poll() is None:
            stack.stop()


def _still_alive(pids: set[int], within: float) -> list[int]:
    """The pids alive after at most `within` seconds: what was SIGKILLed last may take a moment to go on a loaded
    machine."""
    deadline = time.monotonic() + within
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.25)
    return alive


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Sampler:
    """Every `interval` seconds, on a thread: the stack's InProgress training jobs and the pool's occupied
    slots (queued, running and deferred task instances, as Airflow counts them)."""

    def __init__(self, airflow: AirflowServices, sagemaker, pool: str = "sagemaker_training", interval: float = 0.5):
        self.airflow, self.sagemaker, self.pool, self.interval = airflow, sagemaker, pool, interval
        self.jobs: list[int] = []
        self.occupied: list[int] = []
        self.deferred: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self.sagemaker.list_training_jobs(StatusEquals="InProgress", MaxResults=100)
            self.jobs.append(len(jobs["TrainingJobSummaries"]))
            pool = self.airflow.request("GET", f"/pools/{self.pool}")
            self.occupied.append(pool["occupied_slots"])
            self.deferred.append(pool["deferred_slots"])
            self._stop.wait(self.interval)

    def utilisation(self, slots: int) -> float:
        """Mean share of the pool's slots occupied, from the first sample with a slot taken to the last."""
        taken = [i for i, n in enumerate(self.occupied) if n]
        window = self.occupied[taken[0]:taken[-1] + 1]
        return sum(window) / (slots * len(window))

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def grid_conf(version: str, learning_rates: list[float], steps: list[int], **extra) -> dict:
    return {"dataset_version": version, "learning_rates": learning_rates, "max_train_steps": steps, "ranks": [4],
            "hyperparameters": TINY, **extra}


def task_span(instances: list[dict]) -> float:
    """Seconds from the first task instance's start to the last one's end."""
    return (max(parse_time(t["end_date"]) for t in instances)
            - min(parse_time(t["start_date"]) for t in instances)).total_seconds()


def wait_until(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def held(stack: Stack, kind: str, find, timeout: float = 600):
    """A job of the stack held InProgress for as long as the block runs: its processes (under
    stack.workdir/<kind>/<name>: "training" or "processing") are SIGSTOPped as soon as they are seen, and SIGCONTed
    on the way out. What a test does while "the job is still running" then cannot lose a race with the job's end
    on a slow machine. find() -> the job's name once it exists, else None. Yields the name."""
    import psutil

    sagemaker = stack.client("sagemaker")
    describe, status = {"training": (lambda n: sagemaker.describe_training_job(TrainingJobName=n), "TrainingJobStatus"),
                        "processing": (lambda n: sagemaker.describe_processing_job(ProcessingJobName=n),
                                       "ProcessingJobStatus")}[kind]
    stopped: list[psutil.Process] = []

    def resume() -> None:
        while stopped:
            try:
                stopped.pop().resume()
            except psutil.NoSuchProcess:
                pass

    def freeze():
        name = find()
        if not name:
            return None
        for pid in processes_under(stack.workdir / kind / name):
            try:
                process = psutil.Process(pid)
                process.suspend()
                stopped.append(process)
            except psutil.NoSuchProcess:
                pass
        # Its processes stopped while it is InProgress: it cannot end until they go on.
        if stopped and describe(name)[status] == "InProgress":
            return name
        resume()
        if describe(name)[status] != "InProgress":
            raise AssertionError(f"{kind} job {name} ended before it could be held: make it longer")
        return None

    try:
        yield wait_until(freeze, timeout, f"the {kind} job's processes, to hold it InProgress", interval=0.05)
    finally:
        resume()


def training_jobs(sagemaker, contains: str) -> list[str]:
    return sorted(j["TrainingJobName"] for j in sagemaker.list_training_jobs(
        NameContains=contains, MaxResults=100)["TrainingJobSummaries"])


def skip_without_services(redis: bool = False) -> None:
    """The scheduler tests need PostgreSQL (and Redis for Celery) on loopback: fail saying so, clearly."""
    try:
        psycopg2.connect(dbname="postgres", connect_timeout=3, **POSTGRES).close()
    except psycopg2.OperationalError as error:
        pytest.fail(f"tests marked `scheduler` need PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres): {error}")
    if redis:
        import redis as client

        try:
            client.Redis.from_url(REDIS, socket_connect_timeout=3).ping()
        except client.RedisError as error:
            pytest.fail(f"the CeleryExecutor test needs Redis on 127.0.0.1:6379: {error}")


GRID = "sdxl_lora_grid_search"


def trials(airflow: AirflowServices, run_id: str) -> list[dict]:
    return [t for t in airflow.task_instances(GRID, run_id) if t["task_id"] == "train_trial"]


def check_the_pool_limit(airflow: AirflowServices, label: str, deferrable: bool = False) -> str:
    """6 trials of equal length in a pool of 3: never more than 3 jobs InProgress and 3 reached, all complete.
    Prints the figures, the slots' busy share among them (README: reliability); returns the run id."""
    sagemaker = airflow.stack.client("sagemaker")
    # Jobs of a few seconds (a warm-started tiny job of 2 steps is over in about 1 s, and then the scheduler's own
    # latency between one trial and the next is what would be measured), one checkpoint at the end.
    conf = grid_conf("tiny", [0.001, 0.002, 0.003], [POOL_STEPS],
                     hyperparameters={**TINY, "checkpointing_steps": POOL_STEPS})
    conf["ranks"] = [4, 8]  # 3 x 1 x 2 = 6 trials: twice the pool, so some wait for a slot
    with Sampler(airflow, sagemaker) as sampler:
        run_id = airflow.trigger(GRID, conf)
        run = airflow.wait_for_run(GRID, run_id, timeout=900)
    instances = trials(airflow, run_id)
    assert run["state"] == "success", [(t["map_index"], t["state"]) for t in instances]
    assert len(instances) == TRIALS and all(t["state"] == "success" for t in instances)
    names = [n for n in training_jobs(sagemaker, "gridsearch") if run_token(run_id) in n]
    statuses = {sagemaker.describe_training_job(TrainingJobName=n)["TrainingJobStatus"] for n in names}
    assert len(names) == TRIALS and statuses == {"Completed"}, (names, statuses)
    assert max(sampler.jobs) == POOL_SIZE, sampler.jobs  # reached, never exceeded
    assert max(sampler.occupied) == POOL_SIZE, sampler.occupied
    if deferrable:  # the waits happened in the triggerer, and the deferred trials kept their slots
        assert max(sampler.deferred) > 0, sampler.deferred
    # The cap in Airflow's own record too: no more than the pool's slots of trials started before the first one
    # ended. The share of time the slots were busy is a figure (printed, README: reliability), not asserted: it
    # falls with the scheduler's latency on a slow machine, whatever the code does.
    first_end = min(parse_time(t["end_date"]) for t in instances)
    assert sum(parse_time(t["start_date"]) >= first_end for t in instances) >= TRIALS - POOL_SIZE, instances
    busy = sampler.utilisation(POOL_SIZE)
    print(f"\n[{label}] {TRIALS} trials, pool {POOL_SIZE}: peak {max(sampler.jobs)} jobs InProgress "
          f"({len(sampler.jobs)} samples), slots busy {busy:.1%}, trials took {task_span(instances):.0f} s")
    return run_id
