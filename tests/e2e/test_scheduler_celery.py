"""The grid under the CeleryExecutor (a worker on Redis), the setup for more than one machine, with `deferrable`
on: jobs are waited for in the triggerer (the provider's SageMakerTrigger, through aiobotocore), the deferred
trials keep their pool slots, and a failed job still fails its task with its FailureReason. One deployment (about
a minute to start) serves every test here; its stack also keeps a quota of one ml.g5.xlarge instance, so a grid on
that instance type meets ResourceLimitExceeded, which the trials wait out with backoff (deferred on a timer).
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import training_request, wait_for_training
from scheduler import (BUCKET, GRID, PREFIX, TINY, Sampler, check_the_pool_limit, deployment, grid_conf, held,
                       skip_without_services, task_span, training_jobs, trials, wait_until)
from sdxl_lora.naming import run_token

pytestmark = pytest.mark.scheduler
LIMITED = "ml.g5.xlarge"  # the stack's quota of this instance type: 1 instance for training jobs
INSTANCE_TYPE_VARIABLE = "sdxl_lora_training_instance_type"  # read by build_trials at run time (Settings.resolve)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    skip_without_services(redis=True)
    with deployment(tmp_path_factory.mktemp("sched-celery"), executor="CeleryExecutor", deferrable="true",
                    instance_quotas={LIMITED: 1}) as airflow:
        airflow.wait_for_dags(GRID)
        airflow.unpause(GRID)
        yield airflow


def test_deferrable_trials_keep_the_pool_limit_under_the_celery_executor(airflow):
    # A trial on an empty dataset runs beside the 12, in the same pool: in deferrable mode, too, its job's
    # failure fails the task with the job's FailureReason, at once: a failure on the job's input is not retried
    # (no second paid job; sdxl_lora.failures).
    failing = airflow.trigger(GRID, grid_conf("empty", [0.0009], [2]))
    run_id = check_the_pool_limit(airflow, "CeleryExecutor, deferrable", deferrable=True)
    # Each trial was resumed from its trigger with the job's success: the worker's half (execute_complete) wrote
    # its line, in the worker's own log of the try. The trigger's own lines ("Training job <name>: Completed", its
    # status checks) reach the task log from the triggerer only if it has flushed them by the time the log is
    # read: which process wins that race is no behaviour of ours, so they are not asserted on. The waits happened
    # in the triggerer (the pool's deferred slots, check_the_pool_limit) and every job Completed (describe).
    sagemaker = airflow.stack.client("sagemaker")
    logs = {t["rendered_map_index"]: airflow.log(GRID, run_id, "train_trial", 1, map_index=t["map_index"])
            for t in trials(airflow, run_id)}
    for name, log in logs.items():
        assert f"training job {name} completed" in log, log[-3000:]  # resumed from the trigger, with success
        assert sagemaker.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] == "Completed"

    airflow.wait_for_run(GRID, failing, timeout=600)
    (trial,) = trials(airflow, failing)
    assert trial["state"] == "failed" and trial["try_number"] == 1, trial
    # the job's FailureReason, as the worker's half (execute_complete, back from the trigger's failure event)
    # fails the task with it: the exception in the try's structured log (airflow.log keeps only the events'
    # text); the trigger's own line is not waited for (see above)
    raw = json.dumps(airflow.request("GET", f"/dags/{GRID}/dagRuns/{failing}/taskInstances/train_trial/logs/1",
                                     params={"map_index": 0, "full_content": True}))
    assert re.search(r"Training job \S+-r-4 Failed: Reason: train channel has no images", raw), raw[-3000:]
    names = training_jobs(sagemaker, run_token(failing))
    assert [n.rsplit("-", 1)[-1] for n in names] == ["4"], names  # one job: no retry paid for a second
    assert all(sagemaker.describe_training_job(TrainingJobName=n)["FailureReason"].startswith(
        "train channel has no images") for n in names), names


def test_resource_limit_exceeded_is_waited_out_and_a_retry_defers_to_its_running_job(airflow):
    """Three trials in a pool of 3 on an instance type the account may run one of: ResourceLimitExceeded answers
    them until capacity frees, and they wait (deferred on timers), spending no retry, until their job is created:
    one job a trial, none lost. The long trial is cleared (a new try) while its job runs: the new try finds the
    job InProgress and defers to wait for it in the triggerer.

    No step depends on which process is faster: the one instance is taken (by a job of the test's own) before the
    grid starts, so every trial meets ResourceLimitExceeded whatever order they start in, and it is freed only once
    all three wait on their timers; the long trial's job is held InProgress (its processes stopped, scheduler.held)
    from before the clear until the new try has deferred to it."""
    sagemaker = airflow.stack.client("sagemaker")
    holder = "sched-celery-capacity-holder"
    airflow.request("POST", "/variables", json={"key": INSTANCE_TYPE_VARIABLE, "value": LIMITED})
    try:
        with Sampler(airflow, sagemaker) as sampler:
            staged = {"data": f"s3://{BUCKET}/{PREFIX}/proc_dataset/tiny", "base": f"s3://{BUCKET}/{PREFIX}/base_model"}
            sagemaker.create_training_job(**training_request(
                holder, staged,
                {"max_train_steps": 100000, "checkpointing_steps": 100000},
                ResourceConfig={"InstanceType": LIMITED, "InstanceCount": 1, "VolumeSizeInGB": 50},
                OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/{PREFIX}/models"}))
            with held(airflow.stack, "training", lambda: holder):  # InProgress on the instance, using no CPU
                run_id = airflow.trigger(GRID, grid_conf("tiny", [0.0011], [40, 80, 400],
                                                         hyperparameters={**TINY, "checkpointing_steps": 1000}))
                wait_until(lambda: _all_waiting_for_capacity(airflow, sagemaker, run_id, sampler), 600,
                           "the three trials deferred on capacity timers, their pool slots kept")
            sagemaker.stop_training_job(TrainingJobName=holder)
            with held(airflow.stack, "training", lambda: next(
                    (n for n in training_jobs(sagemaker, run_token(run_id)) if "-mts-400-" in n), None)) as job:
                long_trial, _ = wait_until(lambda: _deferred_on_its_running_job(airflow, sagemaker, run_id,
                                                                                "mts-400"),
                                           600, "the long trial deferred while its job runs")
                airflow.request("POST", f"/dags/{GRID}/clearTaskInstances", json={
                    "dry_run": False, "only_failed": False, "reset_dag_runs": False, "dag_run_id": run_id,
                    "task_ids": [["train_trial", long_trial["map_index"]]]})
                wait_until(lambda: any(t["rendered_map_index"] == job and t["try_number"] == 2
                                       and t["state"] == "deferred" for t in trials(airflow, run_id)),
                           600, "the new try deferred to the held job")
            run = airflow.wait_for_run(GRID, run_id, timeout=600)
    finally:
        airflow.api.delete(f"/variables/{INSTANCE_TYPE_VARIABLE}").raise_for_status()
    assert wait_for_training(sagemaker, holder)["TrainingJobStatus"] == "Stopped"
    instances = trials(airflow, run_id)
    tries = {t["rendered_map_index"]: t["try_number"] for t in instances}
    assert run["state"] == "success" and all(t["state"] == "success" for t in instances), instances
    assert tries.pop(job) == 2 and set(tries.values()) == {1}, tries  # the cleared trial's new try; the others: 1
    names = training_jobs(sagemaker, run_token(run_id))
    descriptions = [sagemaker.describe_training_job(TrainingJobName=n) for n in names]
    assert sorted(names) == sorted(t["rendered_map_index"] for t in instances)  # one job a trial, no -a2
    assert {d["TrainingJobStatus"] for d in descriptions} == {"Completed"}
    assert {d["ResourceConfig"]["InstanceType"] for d in descriptions} == {LIMITED}
    assert max(sampler.jobs) == 1, sampler.jobs  # the quota held: one job at a time
    assert max(sampler.occupied) == 3  # while the trials waiting for capacity kept their pool slots

    retried = airflow.log(GRID, run_id, "train_trial", 2, map_index=long_trial["map_index"])
    assert f"training job {job} is already running (an earlier try started it): waiting for it" in retried, retried
    assert f"training job {job} completed" in retried  # resumed from the triggerer's wait, not polled in a worker
    logs = "".join(airflow.log(GRID, run_id, "train_trial", 1, map_index=t["map_index"]) for t in instances)
    refusals = logs.count("ResourceLimitExceeded: training job")
    waits = sorted(round(float(w), 1) for w in re.findall(r"trying again in ([\d.]+) s", logs))
    assert refusals >= 3 and len(waits) == refusals, (refusals, waits)  # each of the three waited for capacity
    print(f"\n[ResourceLimitExceeded] quota 1 {LIMITED}, pool 3, 3 trials: all Completed, one job each, no retry "
          f"spent; {refusals} refusals waited out, backoff {waits} s; peak {max(sampler.jobs)} InProgress; a cleared "
          f"try deferred to its running job; trials took {task_span(instances):.0f} s")


def _all_waiting_for_capacity(airflow, sagemaker, run_id: str, sampler: Sampler) -> bool:
    """All three trials deferred while no job of theirs exists (so each on a capacity timer), and the sampler has
    seen the pool's three slots taken by them."""
    instances = trials(airflow, run_id)
    return (len(instances) == 3 and all(t["state"] == "deferred" for t in instances)
            and not training_jobs(sagemaker, run_token(run_id)) and 3 in sampler.occupied)


def _deferred_on_its_running_job(airflow, sagemaker, run_id: str, marker: str):
    """The trial whose job name holds marker, once it is deferred while its job is InProgress (not on a timer)."""
    trial = next((t for t in trials(airflow, run_id) if marker in (t["rendered_map_index"] or "")), None)
    if trial is None or trial["state"] != "deferred":
        return None
    name = trial["rendered_map_index"]
    job = next(iter(training_jobs(sagemaker, name)), None)
    if job != name or sagemaker.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] != "InProgress":
        return None
    return trial, name
