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


# The one rule (selection.compare_with_serving): both adapters scored on the new version's images, lower wins, a tie
# keeps what serves; the record's own val_loss is reported, never compared.
@pytest.mark.parametrize("new, record, rescored, deploy_it, words", [
    (0.2, {"training_job": "old", "val_loss": 0.3}, 0.3, True, "new val_loss 0.2 (new) against 0.3"),
    (0.3, {"training_job": "old", "val_loss": 0.2}, 0.2, False, "keeping what serves"),
    (0.3, {"training_job": "old", "val_loss": 0.3}, 0.3, False, "keeping what serves"),
    (0.3, None, None, True, "nothing recorded as serving on ep"),
    # A record without a val_loss (deployed by sdxl_lora_deploy) is rescored and compared like any other...
    (0.3, {"model_data_url": ARTIFACTS}, 0.35, True, f"0.35 of the serving adapter ({ARTIFACTS}, rescored by score)"),
    (0.3, {"model_data_url": ARTIFACTS}, 0.25, False, "keeping what serves"),
    # ...and without a score on the new version's images, nothing is deployed automatically.
    (0.3, {"model_data_url": ARTIFACTS}, None, False, "cannot be compared"),
    (None, {"training_job": "old", "val_loss": 0.3}, 0.3, False, "no validation loss"),
    (math.nan, None, None, False, "no validation loss"),
])
def test_deploy_only_what_beats_the_serving_val_loss(new, record, rescored, deploy_it, words):
    from sdxl_lora.selection import compare_with_serving

    score = None if rescored is None else {"training_job": "score", "val_loss": rescored}
    verdict, reason = compare_with_serving({"training_job": "new", "val_loss": new}, score, record, "ep", "v2")
    assert verdict is deploy_it and words in reason
    if record is not None and record.get("val_loss") is None and score is not None:
        assert "on its own training version" not in reason  # nothing recorded, nothing reported


def test_the_serving_record_is_read_from_its_uri_or_is_none():
    settings = Settings(bucket="b", prefix="p")

    class S3:
        objects = {"s3://b/p/serving/ep.json": '{"training_job": "old", "val_loss": 0.2}'}

        def check_for_key(self, uri):
            return uri in self.objects

        def read_key(self, uri):
            return self.objects[uri]

    assert serving.read_record(S3(), settings, "ep") == {"training_job": "old", "val_loss": 0.2}
    assert serving.read_record(S3(), settings, "other") is None
