"""A finished grid run in (moto's) S3 and the SageMaker descriptions of its trials, for report tests."""

from __future__ import annotations

import io
import json
import tarfile

from botocore.exceptions import ClientError
from PIL import Image

from ml.train import reporting

BUCKET, PREFIX = "sdxl-lora-local", "sdxl-finetune-lora"
RUN_ID = "manual__2026-11-26T10:00:00+00:00"


class SageMakerRecords:
    """describe_training_job answered from recorded DescribeTrainingJob dicts, as AWS answers otherwise."""

    def __init__(self, descriptions: list[dict]):
        self.jobs = {d["TrainingJobName"]: d for d in descriptions}

    def describe_training_job(self, TrainingJobName):
        if TrainingJobName not in self.jobs:
            raise ClientError({"Error": {"Code": "ValidationException", "Message": "Requested resource not found"}},
                              "DescribeTrainingJob")
        return self.jobs[TrainingJobName]


def _png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, format="PNG")
    return out.getvalue()


def output_tar(job: str, val_loss: float, colour) -> bytes:
    summary = {"hyperparameters": {"validation_prompt": "a red circle"}, "sample_seeds": [1000], "val_loss": val_loss}
    curve = io.BytesIO()
    reporting.draw_loss_curve([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}],
                              [{"step": 0, "val_loss": 0.6}, {"step": 2, "val_loss": val_loss}], job).save(curve, "PNG")
    members = {"report/training_summary.json": json.dumps(summary).encode(), "report/loss_curve.png": curve.getvalue(),
               "report/samples/sample-0.png": _png(colour), "report/README.md": b"# card",
               "report/../../escape.png": b"x"}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def trial(s3, name: str, lr: float, steps: int, rank: int, status: str = "Completed", val_loss: float | None = None,
          colour=(200, 0, 0)) -> tuple[dict, dict]:
    """(the training request the DAG built, the job's description); a finished job's output.tar.gz goes to S3."""
    output = f"s3://{BUCKET}/{PREFIX}/models"
    config = {"TrainingJobName": name, "HyperParameters": {"learning_rate": str(lr), "max_train_steps": str(steps),
                                                            "rank": str(rank)}}
    description = {"TrainingJobName": name, "TrainingJobStatus": status,
                   "TrainingJobArn": f"arn:aws:sagemaker:eu-west-1:123456789012:training-job/{name}",
                   "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1},
                   "EnableManagedSpotTraining": True, "TrainingTimeInSeconds": 1000, "BillableTimeInSeconds": 400,
                   "OutputDataConfig": {"S3OutputPath": output},
                   "FinalMetricDataList": [] if val_loss is None else [{"MetricName": "val_loss", "Value": val_loss}]}
    if status == "Completed":
        description["ModelArtifacts"] = {"S3ModelArtifacts": f"{output}/{name}/output/model.tar.gz"}
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/models/{name}/output/output.tar.gz",
                      Body=output_tar(name, val_loss, colour))
    else:
        description["FailureReason"] = "AlgorithmError: out of memory"
    return config, description


def grid(s3) -> tuple[list[dict], SageMakerRecords]:
    """2 learning rates x 2 steps x 1 rank; one trial failed."""
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    made = [trial(s3, "g-lr-0-001-mts-20-r-4", 0.001, 20, 4, val_loss=0.30, colour=(255, 0, 0)),
            trial(s3, "g-lr-0-003-mts-20-r-4", 0.003, 20, 4, val_loss=0.20, colour=(0, 255, 0)),
            trial(s3, "g-lr-0-001-mts-40-r-4", 0.001, 40, 4, val_loss=0.25, colour=(0, 0, 255)),
            trial(s3, "g-lr-0-003-mts-40-r-4", 0.003, 40, 4, status="Failed")]
    return [c for c, _ in made], SageMakerRecords([d for _, d in made])
