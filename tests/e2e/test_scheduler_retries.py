"""Retries under the shared real scheduler (LocalExecutor, tests/e2e/scheduler.py): a killed dataset-prepare task
is retried without a second processing job; the retry finds the job its first try started by its deterministic
name and waits for it (plugins/sdxl_lora/operators/jobs.py), and the run ends green."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from ml.fixtures import synthetic
from scheduler import BUCKET, PREFIX, held, wait_until
from sdxl_lora.naming import run_token

pytestmark = pytest.mark.scheduler
PREPARE = "sdxl_dataset_prepare"
IMAGES = 24  # sidecar-captioned frames: no captioner runs; enough that the job is still running when killed


@pytest.fixture
def airflow(scheduled):
    scheduled.wait_for_dags(PREPARE)
    scheduled.unpause(PREPARE)
    yield scheduled
    scheduled.request("PATCH", f"/dags/{PREPARE}", json={"is_paused": True})  # the shared Airflow as it was


def _stage_raw(s3, version: str, folder) -> None:
    """Raw frames with sidecar captions at raw_dataset/<version>/, as the prepare DAG reads them."""
    raw = synthetic.write_dataset(folder, count=IMAGES, sidecar_captions=True)
    for path in sorted(raw.iterdir()):
        s3.upload_file(str(path), BUCKET, f"{PREFIX}/raw_dataset/{version}/{path.name}")


def _processing_jobs(sagemaker, token: str) -> list[str]:
    return sorted(j["ProcessingJobName"] for j in sagemaker.list_processing_jobs(
        NameContains=token, MaxResults=100)["ProcessingJobSummaries"])


def test_a_killed_prepare_task_is_retried_without_a_second_processing_job(airflow, tmp_path):
    s3, sagemaker = airflow.stack.client("s3"), airflow.stack.client("sagemaker")
    version = f"killed-{int(time.time())}"
    _stage_raw(s3, version, tmp_path / "raw")
    run_id = airflow.trigger(PREPARE, {"version": version, "resolution": 32, "min_size": 32})
    token = run_token(run_id)

    def running():  # the prepare task's process, while its processing job is held InProgress
        task = next((t for t in airflow.task_instances(PREPARE, run_id) if t["task_id"] == "prepare"), None)
        return task if task is not None and task["state"] == "running" and task.get("pid") else None

    # The job held (its processes stopped, scheduler.held) from the moment it is seen: the task cannot finish
    # before it is killed, however slow the polling.
    with held(airflow.stack, "processing", lambda: next(iter(_processing_jobs(sagemaker, token)), None)) as job:
        task = wait_until(running, 600, "the prepare task running with its processing job InProgress")
        psutil.Process(task["pid"]).kill()
        killed = time.monotonic()
    run = airflow.wait_for_run(PREPARE, run_id, timeout=600)
    instances = {t["task_id"]: t for t in airflow.task_instances(PREPARE, run_id)}
    prepare = instances["prepare"]
    assert run["state"] == "success" and prepare["state"] == "success", {k: t["state"] for k, t in instances.items()}
    assert prepare["try_number"] >= 2  # Airflow's retry, not the first try, finished it
    assert _processing_jobs(sagemaker, token) == [job]  # one job, the one the first try started
    log = airflow.log(PREPARE, run_id, "prepare", prepare["try_number"])
    assert f"processing job {job} is already running (an earlier try started it)" in log or (
        f"processing job {job} already completed" in log), log[-3000:]
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/proc_dataset/{version}/manifest.json")["Body"]
                          .read())
    assert manifest["counts"]["images_written"] == IMAGES and manifest["input_key"]
    description = sagemaker.describe_processing_job(ProcessingJobName=job)
    print(f"\n[prepare killed] task SIGKILLed while {job} ran ({IMAGES} images, job "
          f"{(description['ProcessingEndTime'] - description['CreationTime']).total_seconds():.1f} s): retried (try "
          f"{prepare['try_number']}), 1 processing job for the run, run green {time.monotonic() - killed:.0f} s "
          "after the kill")
