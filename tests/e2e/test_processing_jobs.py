"""Processing jobs: inputs downloaded, the named entrypoint run, outputs uploaded."""

from __future__ import annotations

from conftest import BUCKET, ROLE, wait_for_processing

PROCESSING_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdxl-lora-processing:latest"


def _request(name: str, entrypoint: list[str], arguments: list[str], staged: dict) -> dict:
    return {
        "ProcessingJobName": name,
        "RoleArn": ROLE,
        "AppSpecification": {"ImageUri": PROCESSING_IMAGE, "ContainerEntrypoint": entrypoint,
                             **({"ContainerArguments": arguments} if arguments else {})},
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.xlarge",
                                                  "VolumeSizeInGB": 30}},
        "ProcessingInputs": [{"InputName": "raw", "S3Input": {
            "S3Uri": staged["data"], "LocalPath": "/opt/ml/processing/input/raw", "S3DataType": "S3Prefix",
            "S3InputMode": "File"}}],
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "frames", "S3Output": {
            "S3Uri": f"s3://{BUCKET}/processed/{name}", "LocalPath": "/opt/ml/processing/output/frames",
            "S3UploadMode": "EndOfJob"}}]},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
    }


def test_processing_job_downloads_runs_and_uploads(stack, sagemaker, s3, staged):
    name = "e2e-processing-ok"
    sagemaker.create_processing_job(**_request(
        name, ["sdxl-lora", "synthetic-data"], ["/opt/ml/processing/output/frames", "--count", "3"], staged))
    # InProgress right after the create, or Completed already where the job beat the describe
    assert sagemaker.describe_processing_job(ProcessingJobName=name)["ProcessingJobStatus"] in ("InProgress",
                                                                                               "Completed")
    job = wait_for_processing(sagemaker, name)
    assert job["ProcessingJobStatus"] == "Completed", job.get("FailureReason")
    assert job["ProcessingEndTime"] >= job["CreationTime"]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"processed/{name}/")["Contents"])
    assert keys == [f"processed/{name}/{f}" for f in
                    ("frame-0000.png", "frame-0001.png", "frame-0002.png", "metadata.jsonl")]
    local_input = stack.workdir / "processing" / name / "processing" / "input" / "raw"
    assert (local_input / "metadata.jsonl").exists()  # the input was downloaded where the container sees it
    logs = stack.client("logs")
    streams = logs.describe_log_streams(logGroupName="/aws/sagemaker/ProcessingJobs",
                                        logStreamNamePrefix=f"{name}/")["logStreams"]
    assert streams and streams[0]["logStreamName"].startswith(f"{name}/algo-1-")
    assert sagemaker.list_processing_jobs(NameContains=name)["ProcessingJobSummaries"][0]["ProcessingJobStatus"] == \
        "Completed"


def test_a_process_that_dies_without_a_failure_file_gets_a_generic_reason(sagemaker, staged):
    name = "e2e-processing-crash"
    sagemaker.create_processing_job(**_request(name, ["python3", "-c", "import sys; sys.exit(3)"], [], staged))
    job = wait_for_processing(sagemaker, name)
    assert job["ProcessingJobStatus"] == "Failed"
    assert "exited with status 3" in job["FailureReason"]


def test_stopping_a_processing_job(sagemaker, staged):
    name = "e2e-processing-stop"
    sagemaker.create_processing_job(**_request(name, ["python3", "-c", "import time; time.sleep(600)"], [], staged))
    sagemaker.stop_processing_job(ProcessingJobName=name)
    job = wait_for_processing(sagemaker, name, timeout=150)
    assert job["ProcessingJobStatus"] == "Stopped"


def test_a_failed_prepare_job_names_its_reason_in_failure_reason_and_exit_message(sagemaker, staged):
    name = "e2e-processing-prepare-fails"
    sagemaker.create_processing_job(**_request(
        name, ["sdxl-lora", "prepare"], ["--output", "/opt/ml/processing/output/frames", "--captioner", "none",
                                         "--min-size", "32", "--min-images", "100"], staged))
    job = wait_for_processing(sagemaker, name)
    assert job["ProcessingJobStatus"] == "Failed"
    assert job["FailureReason"].startswith("only 10 usable image(s) of 10 file(s), fewer than min_images 100")
    assert job["ExitMessage"] == job["FailureReason"]
