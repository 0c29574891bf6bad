"""Schedules under a real scheduler (LocalExecutor, PostgreSQL; tests/e2e/scheduler.py): a prepared version's
Asset event retrains on that version, through a spot interruption; `airflow backfill create` over three dates
prepares and trains three versions, each compared with the serving adapter rescored on its own held-out
images; a scheduled run with no dataset version skips, saying why.

The retraining runs here are started by the scheduler, never by the test, so they take the Param defaults:
their tiny recipe is the Airflow Variable sdxl_lora_retrain_hyperparameters (see dags/sdxl_lora_train.py)."""

from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from ml.fixtures import synthetic
from scheduler import BUCKET, PREFIX, wait_until
from sdxl_lora import sagemaker_requests, serving
from sdxl_lora.naming import job_name, slug
from sdxl_lora.settings import Settings

pytestmark = pytest.mark.scheduler
PREPARE, TRAIN = "sdxl_dataset_prepare", "sdxl_lora_train"
RECIPE_VARIABLE = "sdxl_lora_retrain_hyperparameters"
CHECKPOINT_INTERVAL = 2
# Steps of the spot test's job: enough that the stack's SIGTERM (sent once it sees `step=3 `) lands mid-training;
# a warm-started tiny step takes about 15 ms, and the stack looks at the log every 0.2 s.
SPOT_STEPS = 60
# Over the shared Airflow's local preset (tests/e2e/scheduler.py), everything these tests rely on, whatever that preset
# holds: a CPU, resolution 32, a step per log line (the stack's spot pattern is `step=3 `), a learning rate at which
# a retrain of a few steps keeps the serving adapter (no deployment), and no validation images (nothing looks at them).
RECIPE = {"resolution": 32, "train_batch_size": 2, "validation_split": 0.25, "checkpointing_steps": CHECKPOINT_INTERVAL,
          "logging_steps": 1, "gradient_accumulation_steps": 1, "mixed_precision": "no", "use_8bit_adam": False,
          "enable_xformers_memory_efficient_attention": False, "gradient_checkpointing": False,
          "train_text_encoder": False, "learning_rate": 2e-4, "rank": 4, "random_flip": False,
          "validation_prompt": None}
PREPARE_CONF = {"resolution": 32, "min_size": 0}  # the synthetic frames are 64x36
SETTINGS = Settings(bucket=BUCKET, prefix=PREFIX, base_model_uri=f"s3://{BUCKET}/{PREFIX}/base_model/", use_spot=False)
TIMEOUT = 1800  # seconds; on a loaded 2-core machine a run with a deployment takes many minutes


@pytest.fixture(scope="module")
def airflow(scheduled):
    """The DAGs on, and an adapter serving on the endpoint the retrains compare with (see _serve_an_adapter)."""
    s3 = scheduled.stack.client("s3")
    bucket, _, key = serving.record_uri(SETTINGS, SETTINGS.endpoint_name).removeprefix("s3://").partition("/")
    try:
        previous = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        previous = None
    _serve_an_adapter(scheduled, bucket, key)
    scheduled.unpause(PREPARE)
    scheduled.unpause(TRAIN)
    yield scheduled
    scheduled.request("PATCH", f"/dags/{TRAIN}", json={"is_paused": True})
    scheduled.request("PATCH", f"/dags/{PREPARE}", json={"is_paused": True})
    scheduled.api.delete(f"/variables/{RECIPE_VARIABLE}")
    if previous is None:
        s3.delete_object(Bucket=bucket, Key=key)
    else:
        s3.put_object(Bucket=bucket, Key=key, Body=previous)


def _serve_an_adapter(airflow, bucket: str, key: str) -> None:
    """An adapter trained well on the same style (the staged `tiny` dataset, 30 steps), recorded as serving on the
    endpoint: each retrain here rescores it on its own version and, a few steps in, keeps it (no deployment, whose
    endpoint would only slow these tests; tests/e2e/test_dags_pipeline.py deploys what a retrain wins with)."""
    sagemaker = airflow.stack.client("sagemaker")
    name = "sdxl-lora-train-serving-adapter"
    sagemaker.create_training_job(**sagemaker_requests.training_request(
        SETTINGS, name, SETTINGS.processed_dataset("tiny"),
        {**RECIPE, "max_train_steps": 30, "learning_rate": 2e-3, "rank": 8, "train_batch_size": 4}))
    job = wait_until(lambda: (d := sagemaker.describe_training_job(TrainingJobName=name))["TrainingJobStatus"]
                     in ("Completed", "Failed") and d, TIMEOUT, f"training job {name}", interval=2)
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    model = job["ModelArtifacts"]["S3ModelArtifacts"]
    deployment = {"model": {"PrimaryContainer": {"ModelDataUrl": model}}, "candidate": "staged",
                  "training": serving.training(name, _metric(job, "val_loss")),
                  "endpoint_config": {"EndpointConfigName": "staged"}}
    record = serving.record(SETTINGS.endpoint_name, deployment, {"staged": 1.0})
    airflow.stack.client("s3").put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode())


def _api(call, *args, **kwargs):
    """One REST call, asked again when it times out: on a loaded machine the single api-server worker sometimes
    answers after the client's 60 s."""
    for attempt in range(5):
        try:
            return call(*args, **kwargs)
        except httpx.TimeoutException:
            if attempt == 4:
                raise


def _wait_for_run(airflow, dag_id: str, run_id: str) -> dict:
    return wait_until(lambda: (run := _api(airflow.run, dag_id, run_id))["state"] in ("success", "failed") and run,
                      TIMEOUT, f"{dag_id} {run_id}", interval=3)


def _set_recipe(airflow, max_train_steps: int) -> None:
    body = {"key": RECIPE_VARIABLE, "value": json.dumps({**RECIPE, "max_train_steps": max_train_steps})}
    if airflow.api.patch(f"/variables/{RECIPE_VARIABLE}", json=body).status_code == 404:
        airflow.request("POST", "/variables", json=body)


def _stage_raw(airflow, version: str, seed: int) -> None:
    """Eight small frames with sidecar captions (so prepare captions nothing) at raw_dataset/<version>/."""
    s3 = airflow.stack.client("s3")
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic.write_dataset(Path(tmp), count=8, width=64, height=36, seed=seed, sidecar_captions=True)
        for path in folder.iterdir():
            s3.upload_file(str(path), BUCKET, f"{PREFIX}/raw_dataset/{version}/{path.name}")


def _uri(*parts: str) -> str:
    return f"s3://{BUCKET}/{PREFIX}/" + "/".join(parts) + "/"


def _train_job(airflow, run_id: str, version: str) -> dict | None:
    sagemaker = airflow.stack.client("sagemaker")
    try:
        return sagemaker.describe_training_job(TrainingJobName=job_name("sdxl-lora-train", run_id, slug(version)))
    except sagemaker.exceptions.ClientError:
        return None


def _finished_train_run(airflow, version: str) -> dict:
    """The train run queued for `version`'s Asset event (its id names the version), once it has finished."""
    def found():
        runs = [r for r in _api(airflow.runs, TRAIN) if r["dag_run_id"].startswith(f"dataset_{version}__")]
        return runs[0] if runs and runs[0]["state"] in ("success", "failed") else None

    return wait_until(found, TIMEOUT, f"a finished {TRAIN} run training version {version}", interval=3)


def _event(airflow, prepare_run_id: str) -> dict:
    """The processed-dataset Asset event a prepare run's publish task emitted."""
    (event,) = _api(airflow.request, "GET", "/assets/events", params={"source_dag_id": PREPARE,
                                                                "source_run_id": prepare_run_id})["asset_events"]
    return event


def _run_id_of(event: dict) -> str:
    """The run the train DAG queues for an Asset event (plugins/sdxl_lora/assets.py: version_runs)."""
    when = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).astimezone(timezone.utc)
    return f"dataset_{event['extra']['version']}__{when.strftime('%Y-%m-%dT%H:%M:%S.%f')}"


def _dispatcher(airflow, event: dict) -> dict:
    """The Asset-triggered run that was handed the event, or saw it after its own, and queued its run."""
    for run in _api(airflow.runs, TRAIN):
        if run["run_type"] != "asset_triggered":
            continue
        queued = [t for t in _api(airflow.task_instances, TRAIN, run["dag_run_id"]) if t["task_id"] == "queue_version_runs"]
        log = "".join(_api(airflow.log, TRAIN, run["dag_run_id"], "version_runs", t["try_number"])
                      for t in _api(airflow.task_instances, TRAIN, run["dag_run_id"]) if t["task_id"] == "version_runs")
        if _run_id_of(event) in log and any(t["state"] == "success" for t in queued):
            return run
    raise AssertionError(f"no Asset-triggered run of {TRAIN} queued {_run_id_of(event)}")


def _channels(description: dict) -> dict[str, str]:
    return {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in description["InputDataConfig"]}


def _metric(description: dict, name: str) -> float | None:
    return {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList", [])}.get(name)


def _job_log(airflow, job: str) -> list[str]:
    """Every CloudWatch line of a training job, all attempts, in order."""
    logs = airflow.stack.client("logs")
    group = "/aws/sagemaker/TrainingJobs"
    events = []
    for stream in logs.describe_log_streams(logGroupName=group, logStreamNamePrefix=f"{job}/")["logStreams"]:
        events += logs.get_log_events(logGroupName=group, logStreamName=stream["logStreamName"],
                                      startFromHead=True)["events"]
    return [e["message"] for e in sorted(events, key=lambda e: e["timestamp"])]


def _lora(airflow, model_artifacts: str) -> dict:
    from safetensors.torch import load

    bucket, _, key = model_artifacts.removeprefix("s3://").partition("/")
    body = airflow.stack.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        member = next(m for m in archive if m.name.lstrip("./") == "pytorch_lora_weights.safetensors")
        return load(archive.extractfile(member).read())


def _uninterrupted_copy(airflow, description: dict) -> dict:
    """The same training job (request, seed, hyperparameters, data) without spot, so nothing interrupts it."""
    sagemaker = airflow.stack.client("sagemaker")
    name = f"{description['TrainingJobName'][:50]}-nospot"
    stopping = {k: v for k, v in description["StoppingCondition"].items() if k != "MaxWaitTimeInSeconds"}
    sagemaker.create_training_job(
        TrainingJobName=name, RoleArn=description["RoleArn"], HyperParameters=description["HyperParameters"],
        AlgorithmSpecification={k: description["AlgorithmSpecification"][k]
                                for k in ("TrainingImage", "TrainingInputMode", "MetricDefinitions")},
        InputDataConfig=description["InputDataConfig"], OutputDataConfig=description["OutputDataConfig"],
        ResourceConfig=description["ResourceConfig"], StoppingCondition=stopping)
    return wait_until(lambda: (d := sagemaker.describe_training_job(TrainingJobName=name))["TrainingJobStatus"]
                      in ("Completed", "Failed") and d, TIMEOUT, f"training job {name}", interval=1)


def test_a_prepared_version_retrains_on_its_asset_event_through_a_spot_interruption(airflow):
    version = "asset-v1"
    _stage_raw(airflow, version, seed=11)
    _set_recipe(airflow, max_train_steps=SPOT_STEPS)  # interrupted at step 3, so the job resumes mid-training
    prepare_id = airflow.trigger(PREPARE, {"version": version, **PREPARE_CONF})
    assert _wait_for_run(airflow, PREPARE, prepare_id)["state"] == "success"

    event = _event(airflow, prepare_id)
    assert event["extra"] == {"version": version}
    run = _finished_train_run(airflow, version)
    assert run["state"] == "success", run
    # Made by the scheduler, not by us: the Asset-triggered run the event started queued this run for it.
    assert run["dag_run_id"] == _run_id_of(event) and run["conf"] == {"dataset_version": version}
    dispatcher = _dispatcher(airflow, event)
    handed = _api(airflow.request, "GET", f"/dags/{TRAIN}/dagRuns/{dispatcher['dag_run_id']}/upstreamAssetEvents")
    assert dispatcher["triggered_by"] == "asset" and handed["asset_events"], handed
    job = _train_job(airflow, run["dag_run_id"], version)
    assert job["TrainingJobStatus"] == "Completed" and _channels(job)["train"] == _uri("proc_dataset", version)
    compared = _compared_on_its_version(airflow, run["dag_run_id"], version, job)

    # The spot interruption: Interrupted -> Restarting, resumed from the last checkpoint, at most an interval redone.
    transitions = [t["Status"] for t in job["SecondaryStatusTransitions"]]
    assert transitions.count("Interrupted") == 1 and "Restarting" in transitions, transitions
    lines = _job_log(airflow, job["TrainingJobName"])
    (resume,) = [i for i, line in enumerate(lines) if "resumed from checkpoint-" in line]
    resumed_at = int(re.search(r"resumed from checkpoint-\d+ at step (\d+)", lines[resume]).group(1))
    steps = [(i, int(m.group(1))) for i, line in enumerate(lines) if (m := re.search(r"\bstep=(\d+) loss=", line))]
    reached = max(step for i, step in steps if i < resume)  # the last step logged before the interruption
    redone = [step for i, step in steps if i > resume]
    assert redone == list(range(resumed_at + 1, SPOT_STEPS + 1)), redone  # the resumed attempt went on to the end
    lost = reached - resumed_at
    assert 0 <= lost <= CHECKPOINT_INTERVAL and 3 <= reached < SPOT_STEPS, (reached, resumed_at)

    reference = _uninterrupted_copy(airflow, job)
    assert reference["TrainingJobStatus"] == "Completed", reference.get("FailureReason")
    interrupted, whole = (_lora(airflow, d["ModelArtifacts"]["S3ModelArtifacts"]) for d in (job, reference))
    assert interrupted.keys() == whole.keys() and interrupted
    difference = max(float((interrupted[k] - whole[k]).abs().max()) for k in whole)
    print(f"\n[spot through {TRAIN}] interrupted after step {reached}, resumed from checkpoint-{resumed_at}: "
          f"{lost} step(s) redone (checkpoint interval {CHECKPOINT_INTERVAL}); final LoRA against an uninterrupted "
          f"job: {len(whole)} tensors, max |difference| {difference:.2e}; compared with what serves: {compared}")
    assert difference <= 1e-6


def _compared_on_its_version(airflow, run_id: str, version: str, job: dict) -> str:
    """The run scored the serving adapter on `version`'s held-out images and compared the two numbers; the figures."""
    score = airflow.stack.client("sagemaker").describe_training_job(
        TrainingJobName=job_name("sdxl-lora-score", run_id, slug(version)))
    assert score["TrainingJobStatus"] == "Completed"
    channels = _channels(score)
    assert channels["train"] == _uri("proc_dataset", version)  # the serving adapter, on this version's images
    assert channels["score_adapter"].endswith("/output/model.tar.gz")
    assert channels["score_adapter"] != job["ModelArtifacts"]["S3ModelArtifacts"]
    assert score["HyperParameters"] == job["HyperParameters"]  # the same split, resolution and precision
    new, served = _metric(job, "val_loss"), _metric(score, "val_loss")
    log = _api(airflow.log, TRAIN, run_id, "better_than_serving", 1)
    assert f"both adapters scored on version {version}'s held-out images: new val_loss {new:.6g} " \
           f"({job['TrainingJobName']}) against {served:.6g} of the serving adapter" in log, log[-3000:]
    return f"{version}: new {new:.6g}, serving {served:.6g} ({'deploy' if new < served else 'keep'})"


def _backfill_dates() -> list[str]:
    """Three consecutive past days, clear of the scheduled runs' dates (yesterday, the last Monday)."""
    first = date.today() - timedelta(days=20)
    assert first > date(2026, 1, 1), "the DAGs start on 2026-01-01: this test needs a later clock"
    return [(first + timedelta(days=n)).isoformat() for n in range(3)]


def test_a_backfill_over_three_dates_prepares_and_trains_three_versions_each_compared_on_its_own_images(airflow):
    versions = _backfill_dates()
    for seed, version in enumerate(versions):
        _stage_raw(airflow, version, seed=seed)
    _set_recipe(airflow, max_train_steps=2)  # under the spot pattern's step 3: no interruption here
    before = datetime.now(timezone.utc)
    airflow.cli("backfill", "create", "--dag-id", PREPARE, "--from-date", versions[0], "--to-date", versions[-1],
                "--max-active-runs", "1", "--dag-run-conf", json.dumps(PREPARE_CONF))

    def prepared():
        runs = [r for r in _api(airflow.runs, PREPARE) if r["run_type"] == "backfill"
                and r["logical_date"][:10] in versions]
        return runs if len(runs) == 3 and all(r["state"] in ("success", "failed") for r in runs) else None

    prepares = wait_until(prepared, TIMEOUT, "three backfill runs of sdxl_dataset_prepare", interval=3)
    assert {r["logical_date"][:10]: r["state"] for r in prepares} == dict.fromkeys(versions, "success")
    s3 = airflow.stack.client("s3")
    for version in versions:  # each date's version, prepared from its own raw files
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/proc_dataset/{version}/manifest.json")
                              ["Body"].read())
        assert manifest["version"] == version and manifest["counts"]["images_written"] == 8, manifest["counts"]

    runs = {version: _finished_train_run(airflow, version) for version in versions}
    assert {v: r["state"] for v, r in runs.items()} == dict.fromkeys(versions, "success")
    for prepare in prepares:  # each version in the run queued for its own event, by an Asset-triggered run
        event = _event(airflow, prepare["dag_run_id"])
        version = event["extra"]["version"]
        assert runs[version]["dag_run_id"] == _run_id_of(event) and _dispatcher(airflow, event)
    jobs = {version: _train_job(airflow, runs[version]["dag_run_id"], version) for version in versions}
    assert {v: _channels(j)["train"] for v, j in jobs.items()} == {v: _uri("proc_dataset", v) for v in versions}
    outputs = {j["ModelArtifacts"]["S3ModelArtifacts"] for j in jobs.values()}
    assert len(outputs) == 3 and all(j["TrainingJobStatus"] == "Completed" for j in jobs.values())
    sagemaker = airflow.stack.client("sagemaker")
    for version in versions:  # one training job per version: no version trained twice
        names = [j["TrainingJobName"] for j in sagemaker.list_training_jobs(
            NameContains=f"-{slug(version)}", MaxResults=100)["TrainingJobSummaries"]]
        assert [n for n in names if n.startswith("sdxl-lora-train-")] == [jobs[version]["TrainingJobName"]]
    order = sorted(versions, key=lambda v: runs[v]["start_date"])
    assert order == versions  # trained one at a time, in the order the versions were prepared

    figures = [_compared_on_its_version(airflow, runs[v]["dag_run_id"], v, jobs[v]) for v in versions]
    took = (max(datetime.fromisoformat(r["end_date"].replace("Z", "+00:00")) for r in runs.values()) - before)
    print(f"\n[backfill of {PREPARE}, {versions[0]} to {versions[-1]}] 3 versions prepared, 3 training jobs, one per "
          f"version, in {took.total_seconds():.0f} s; on each version's held-out images: " + "; ".join(figures))


def test_a_scheduled_retrain_with_no_dataset_version_skips_saying_why(airflow):
    """Unpausing the DAGs made the scheduler start a run for each one's latest schedule point (catchup off)."""
    def scheduled(dag_id):
        runs = [r for r in _api(airflow.runs, dag_id) if r["run_type"] == "scheduled"]
        return runs[0] if runs and runs[0]["state"] in ("success", "failed") else None

    for dag_id, task_id, reason in (
            (TRAIN, "dataset_version", "no processed dataset version {date} (from the scheduled run's logical date)"),
            (PREPARE, "plan", "no raw dataset version {date} landed for this scheduled run's date")):
        run = wait_until(lambda: scheduled(dag_id), TIMEOUT, f"the scheduled run of {dag_id}", interval=3)
        instances = {t["task_id"]: t for t in _api(airflow.task_instances, dag_id, run["dag_run_id"])}
        assert run["state"] == "success" and instances[task_id]["state"] == "skipped", instances[task_id]
        assert all(t["state"] == "skipped" for t in instances.values() if t["task_id"] == "train")
        log = _api(airflow.log, dag_id, run["dag_run_id"], task_id, instances[task_id]["try_number"])
        assert reason.format(date=run["logical_date"][:10]) in log and "this run is skipped" in log, log[-2000:]
