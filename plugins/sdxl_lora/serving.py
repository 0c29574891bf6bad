"""What an endpoint serves now: its serving record in S3.

A deployment writes `serving/<endpoint>.json` with the model it deployed (and the model package version
it came from, when it did), the training job that made it and that job's val_loss. A retraining run reads it to score the serving adapter on the new
version's held-out images; whether the new adapter beats it is selection.compare_with_serving's rule.
The tasks read and write the record with S3Hook.
"""

from __future__ import annotations

import json

from sdxl_lora.settings import Settings


def record_uri(settings: Settings, endpoint: str) -> str:
    return settings.uri("serving", f"{endpoint}.json")


def record(endpoint: str, deployment: dict, weights: dict) -> dict:
    """The serving record of a finished deployment (deploy.plan_deployment's dict)."""
    training = deployment.get("training") or {}
    package = deployment.get("package") or {}
    model_data_url = package.get("model_data_url") or deployment["model"]["PrimaryContainer"]["ModelDataUrl"]
    return {"endpoint": endpoint, "model_data_url": model_data_url, "model_package_arn": package.get("arn"),
            "training_job": training.get("training_job"), "val_loss": training.get("val_loss"),
            "endpoint_config": deployment["endpoint_config"]["EndpointConfigName"],
            "candidate_variant": deployment["candidate"], "weights": weights}


def training(job_name: str | None, val_loss: float | None) -> dict:
    """The training job behind a deployed model, as the serving record keeps it."""
    return {"training_job": job_name, "val_loss": val_loss}


def read_record(s3, settings: Settings, endpoint: str) -> dict | None:
    """The endpoint's serving record, or None when nothing is recorded as serving on it.

    :param s3: an S3Hook (check_for_key, read_key).
    :param settings: where the records live.
    :param endpoint: the endpoint's name.
    """
    uri = record_uri(settings, endpoint)
    return json.loads(s3.read_key(uri)) if s3.check_for_key(uri) else None
