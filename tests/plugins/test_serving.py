"""The serving record and the retraining comparison (plugins/sdxl_lora/serving.py)."""

import math

import pytest

from sdxl_lora import deploy, serving
from sdxl_lora.settings import Settings

ARTIFACTS = "s3://bucket/prefix/models/job-1/output/model.tar.gz"


def test_the_record_keeps_the_training_job_and_its_val_loss():
    plan = deploy.plan_deployment(Settings(), ARTIFACTS, "ep", "run-1", None,
                                  training=serving.training("sdxl-lora-train-1", 0.25))
    record = serving.record("ep", plan, {plan["candidate"]: 1.0})
    assert record["training_job"] == "sdxl-lora-train-1" and record["val_loss"] == 0.25
    assert record["model_data_url"] == ARTIFACTS and record["endpoint_config"] == plan["endpoint_config"][
        "EndpointConfigName"]
    assert serving.record_uri(Settings(bucket="b", prefix="p"), "ep") == "s3://b/p/serving/ep.json"


def test_a_deployment_without_a_training_job_records_none():
    plan = deploy.plan_deployment(Settings(), ARTIFACTS, "ep", "run-1", None)
    assert serving.record("ep", plan, {})["training_job"] is None


@pytest.mark.parametrize("new, record, deploy_it, words", [
    (0.2, {"training_job": "old", "val_loss": 0.3}, True, "new val_loss 0.2 against 0.3 of old"),
    (0.3, {"training_job": "old", "val_loss": 0.2}, False, "keeping what serves"),
    (0.3, {"training_job": "old", "val_loss": 0.3}, False, "keeping what serves"),
    (0.3, None, True, "nothing recorded as serving on ep"),
    (0.3, {"model_data_url": ARTIFACTS}, True, "has no val_loss to compare with"),
    (None, {"training_job": "old", "val_loss": 0.3}, False, "no validation loss"),
    (math.nan, None, False, "no validation loss"),
])
def test_deploy_only_what_beats_the_serving_val_loss(new, record, deploy_it, words):
    verdict, reason = serving.better_than_serving(new, record, "ep")
    assert verdict is deploy_it and words in reason
