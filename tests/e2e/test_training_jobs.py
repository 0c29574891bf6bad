"""Training jobs through plain boto3 against the local stack, on the tiny SDXL."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time

import pytest
from conftest import BUCKET, processes_under, training_request, wait_for_training


def _model_files(s3, uri: str) -> dict[str, bytes]:
    bucket, key = uri[len("s3://"):].split("/", 1)
    archive = tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()), mode="r:gz")
    return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def test_training_job_runs_and_reports_like_sagemaker(stack, sagemaker, s3, staged):
    sagemaker.create_training_job(**training_request("e2e-train-ok", staged))
    # Right after the create a describe says InProgress, or Completed where the job was faster than the describe:
    # that it ran through InProgress is its secondary statuses' record below, not the first describe's luck.
    first = sagemaker.describe_training_job(TrainingJobName="e2e-train-ok")["TrainingJobStatus"]
    job = wait_for_training(sagemaker, "e2e-train-ok")
    assert first in ("InProgress", "Completed") and job["TrainingJobStatus"] == "Completed", (first, job)
    assert [t["Status"] for t in job["SecondaryStatusTransitions"]] == \
        ["Starting", "Downloading", "Training", "Uploading", "Completed"]
    assert all(t["StartTime"] <= t["EndTime"] for t in job["SecondaryStatusTransitions"])
    assert job["TrainingStartTime"] <= job["TrainingEndTime"]
    assert job["TrainingTimeInSeconds"] >= 1 and job["BillableTimeInSeconds"] >= 1

    artifacts = job["ModelArtifacts"]["S3ModelArtifacts"]
    assert artifacts == f"s3://{BUCKET}/models/e2e-train-ok/output/model.tar.gz"
    files = _model_files(s3, artifacts)
    assert {"pytorch_lora_weights.safetensors", "training_summary.json", "README.md"} <= set(files)
    summary = json.loads(files["training_summary.json"])
    assert summary["global_step"] == 6

    metrics = {m["MetricName"]: m["Value"] for m in job["FinalMetricDataList"]}
    assert metrics["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert metrics["step"] == 6

    logs = stack.client("logs")
    streams = logs.describe_log_streams(logGroupName="/aws/sagemaker/TrainingJobs",
                                        logStreamNamePrefix="e2e-train-ok/")["logStreams"]
    assert len(streams) == 1 and streams[0]["logStreamName"].startswith("e2e-train-ok/algo-1-")
    events = logs.get_log_events(logGroupName="/aws/sagemaker/TrainingJobs",
                                 logStreamName=streams[0]["logStreamName"])["events"]
    assert sum(" step=" in e["message"] for e in events) == 6


def test_listing_filters_by_name_and_status(sagemaker, staged):
    wait_for_training(sagemaker, "e2e-train-ok")
    names = [s["TrainingJobName"] for s in
             sagemaker.list_training_jobs(NameContains="e2e-train-ok", StatusEquals="Completed")["TrainingJobSummaries"]]
    assert names == ["e2e-train-ok"]
    assert sagemaker.list_training_jobs(NameContains="e2e-train-ok", StatusEquals="Failed")["TrainingJobSummaries"] == []


def test_failing_job_reports_the_payloads_reason(sagemaker, staged):
    request = training_request("e2e-train-bad-hp", staged)
    request["HyperParameters"]["learning_rate"] = "fast"
    sagemaker.create_training_job(**request)
    job = wait_for_training(sagemaker, "e2e-train-bad-hp")
    assert job["TrainingJobStatus"] == "Failed"
    assert job["FailureReason"] == "learning_rate: expected a number, got 'fast'"
    assert job["SecondaryStatus"] == "Failed"


def test_stop_sends_sigterm_and_the_job_ends_stopped(stack, sagemaker, staged):
    sagemaker.create_training_job(**training_request("e2e-train-stop", staged, {"max_train_steps": 100000,
                                                                                "checkpointing_steps": 100000}))
    # Stopped once it trains: its first step logged (rather than a pause that assumes the process got that far).
    logs = stack.client("logs")

    def stepped() -> bool:
        try:
            streams = logs.describe_log_streams(logGroupName="/aws/sagemaker/TrainingJobs",
                                                logStreamNamePrefix="e2e-train-stop/")["logStreams"]
        except logs.exceptions.ResourceNotFoundException:  # no job has logged yet
            return False
        return any(" step=" in e["message"] for s in streams for e in logs.get_log_events(
            logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=s["logStreamName"])["events"])

    deadline = time.monotonic() + 600
    while not stepped():
        assert time.monotonic() < deadline, "e2e-train-stop logged no step in 600 s"
        time.sleep(0.5)
    sagemaker.stop_training_job(TrainingJobName="e2e-train-stop")
    assert sagemaker.describe_training_job(TrainingJobName="e2e-train-stop")["TrainingJobStatus"] in (
        "Stopping", "Stopped")
    job = wait_for_training(sagemaker, "e2e-train-stop", timeout=150)
    assert job["TrainingJobStatus"] == "Stopped"
    assert "Stopping" in [t["Status"] for t in job["SecondaryStatusTransitions"]]
    assert processes_under(stack.workdir / "training" / "e2e-train-stop") == []


def test_spot_interruption_restarts_from_the_synced_checkpoints(stack, sagemaker, s3, staged):
    name = "e2e-train-spot"
    request = training_request(name, staged, {"max_train_steps": 8, "checkpointing_steps": 2,
                                               "checkpoints_total_limit": 10},
                               EnableManagedSpotTraining=True,
                               StoppingCondition={"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200},
                               CheckpointConfig={"S3Uri": f"s3://{BUCKET}/checkpoints/{name}"})
    sagemaker.create_training_job(**request)
    job = wait_for_training(sagemaker, name)
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    statuses = [t["Status"] for t in job["SecondaryStatusTransitions"]]
    assert statuses.index("Interrupted") < statuses.index("Restarting") < statuses.index("Completed")
    summary = json.loads(_model_files(s3, job["ModelArtifacts"]["S3ModelArtifacts"])["training_summary.json"])
    assert summary["global_step"] == 8
    assert summary["resumed_from_step"] >= 2  # the restart continued from a checkpoint, not from scratch
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"checkpoints/{name}/")["Contents"]]
    assert any("/checkpoint-" in key and key.endswith("progress.json") for key in keys)


def test_concurrent_job_quota(stack, sagemaker, staged):
    names = [f"e2e-quota-{i}" for i in range(4)]
    long = {"max_train_steps": 100000, "checkpointing_steps": 100000}
    started, refused = [], []

    for name in names:
        try:
            sagemaker.create_training_job(**training_request(name, staged, long))
            started.append(name)
        except sagemaker.exceptions.ClientError as error:
            refused.append(error.response["Error"])
    try:
        assert len(started) == 3  # the stack runs with --max-concurrent-jobs 3
        assert refused[0]["Code"] == "ResourceLimitExceeded"
        assert "account-level service limit" in refused[0]["Message"]
    finally:
        threads = [threading.Thread(target=sagemaker.stop_training_job, kwargs={"TrainingJobName": n})
                   for n in started]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name in started:
            wait_for_training(sagemaker, name, timeout=150)
