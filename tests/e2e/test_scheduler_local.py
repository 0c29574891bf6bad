"""The DAGs under a real scheduler (LocalExecutor, PostgreSQL): the pool limit, retries after a killed task
or worker without a second job, failures with their reason, and a spot interruption through a DAG."""

from __future__ import annotations

import psutil
import pytest
from scheduler import GRID, check_the_pool_limit, grid_conf, held, training_jobs, trials, wait_until
from sdxl_lora.naming import run_token

pytestmark = pytest.mark.scheduler
TINY_LONG = {"resolution": 32, "train_batch_size": 2, "validation_split": 0.25, "checkpointing_steps": 10}


@pytest.fixture
def airflow(scheduled):
    return scheduled


def test_the_pool_caps_running_jobs_and_keeps_its_slots_busy(airflow):
    check_the_pool_limit(airflow, "LocalExecutor")


def _running_trial(airflow, run_id: str) -> dict:
    """The trial's task instance while it runs and its training job is InProgress: the job held so (its processes
    stopped, scheduler.held) from the moment it is seen, so that however slow the polling, the task cannot finish
    first and the wait cannot miss its window. Call inside the hold; yields nothing itself."""
    def ready():
        trial = next(iter(trials(airflow, run_id)), None)
        return trial if trial is not None and trial["state"] == "running" and trial.get("pid") else None

    return wait_until(ready, 600, "a running trial with its job InProgress")


@pytest.mark.parametrize("victim", ["task", "worker"])
def test_a_killed_task_or_worker_is_retried_without_a_second_job(airflow, victim):
    sagemaker = airflow.stack.client("sagemaker")
    before = set(training_jobs(sagemaker, "gridsearch"))
    run_id = airflow.trigger(GRID, grid_conf("tiny", [0.0007], [40], hyperparameters={**TINY_LONG}))
    with held(airflow.stack, "training", lambda: next(iter(training_jobs(sagemaker, run_token(run_id))), None)) as job:
        trial = _running_trial(airflow, run_id)
        task = psutil.Process(trial["pid"])
        if victim == "worker":  # the supervising worker and its task: as if their machine went away
            worker = task.parent()
            worker.kill()
        task.kill()
    run = airflow.wait_for_run(GRID, run_id, timeout=600)
    (trial,) = trials(airflow, run_id)
    assert run["state"] == "success" and trial["state"] == "success", trial
    assert trial["try_number"] >= 2  # Airflow's retry, not the first try, finished it
    new = sorted(set(training_jobs(sagemaker, "gridsearch")) - before)
    assert new == [job], f"after the {victim} was killed: {new}"  # one job, the one the first try started
    log = airflow.log(GRID, run_id, "train_trial", trial["try_number"], map_index=0)
    assert "already running (an earlier try started it)" in log or "already completed" in log


def test_a_failing_trial_fails_its_task_with_the_jobs_failure_reason(airflow):
    sagemaker = airflow.stack.client("sagemaker")
    run_id = airflow.trigger(GRID, grid_conf("empty", [0.0009], [2]))
    run = airflow.wait_for_run(GRID, run_id, timeout=600)
    instances = {t["task_id"]: t for t in airflow.task_instances(GRID, run_id)}
    trial = instances["train_trial"]
    assert trial["state"] == "failed" and trial["try_number"] == 1  # a failure on its input: not retried
    log = airflow.log(GRID, run_id, "train_trial", 1, map_index=0)
    assert "Reason: train channel has no images" in log, log[-3000:]  # the job's FailureReason, in the task log
    assert instances["select_winner"]["state"] == "failed"
    # No trial succeeded: the run is red, though publish_report and the deploy group's last task succeed or skip
    # after the failure; the watcher (ONE_FAILED) failed it, naming select_winner.
    assert instances["publish_report"]["state"] == "success"
    assert instances["watcher"]["state"] == "failed" and run["state"] == "failed", {
        name: t["state"] for name, t in instances.items()}
    assert "failed: select_winner" in airflow.log(GRID, run_id, "watcher", 1)
    names = training_jobs(sagemaker, run_token(run_id))
    assert len(names) == 1, names  # a failure on its input is not retried: no second, paid job
    assert sagemaker.describe_training_job(TrainingJobName=names[0])["TrainingJobStatus"] == "Failed"
