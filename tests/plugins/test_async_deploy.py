"""Asynchronous endpoints in the deploy path: AsyncInferenceConfig, refused combinations, the S3 poll."""

from __future__ import annotations

import dataclasses

import pytest

from sdxl_lora import deploy, sagemaker_requests
from sdxl_lora.settings import Settings

ARTIFACTS = "s3://bucket/prefix/models/job-1/output/model.tar.gz"
OUT = "s3://bucket/prefix/async-out"


def test_an_async_config_writes_outputs_and_failures_under_the_path_with_the_output_key():
    config = sagemaker_requests.endpoint_config_request(dataclasses.replace(Settings(), output_kms_key_id="key-1"), "c",
                                              {"v": ("m", 1.0)}, OUT + "/", max_concurrent_invocations=4)
    assert config["AsyncInferenceConfig"] == {
        "OutputConfig": {"S3OutputPath": OUT, "S3FailurePath": OUT + "/failures", "KmsKeyId": "key-1"},
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4}}
    assert "KmsKeyId" not in sagemaker_requests.endpoint_config_request(Settings(), "c", {"v": ("m", 1.0)}, OUT)[
        "AsyncInferenceConfig"]["OutputConfig"]
    assert "AsyncInferenceConfig" not in sagemaker_requests.endpoint_config_request(Settings(), "c", {"v": ("m", 1.0)})


@pytest.mark.parametrize("path", ["bucket/prefix", "https://bucket/x", "s3://", "s3://Bad_Bucket/x", "s3://b/x y"])
def test_an_async_path_that_is_not_an_s3_uri_is_refused_naming_it(path):
    with pytest.raises(ValueError, match="s3://bucket/prefix") as caught:
        sagemaker_requests.endpoint_config_request(Settings(), "c", {"v": ("m", 1.0)}, path)
    assert repr(path) in str(caught.value)


@pytest.mark.parametrize("concurrency", [0, 1001, 2.5, True])
def test_async_concurrency_outside_1_to_1000_is_refused(concurrency):
    with pytest.raises(ValueError, match="1 to 1000"):
        sagemaker_requests.endpoint_config_request(Settings(), "c", {"v": ("m", 1.0)}, OUT, concurrency)


def test_an_async_config_takes_one_variant():
    with pytest.raises(ValueError, match="one production variant, got 2 .*TargetVariant"):
        sagemaker_requests.endpoint_config_request(Settings(), "c", {"a": ("m1", 0.5), "b": ("m2", 0.5)}, OUT)


def test_an_async_deployment_replaces_the_serving_variants_with_the_new_model_alone():
    current = {"config": "config-0", "variants": [{"VariantName": "blue", "ModelName": "m-blue", "CurrentWeight": 1.0}]}
    plan = deploy.plan_deployment(Settings(), ARTIFACTS, "ep", "run-1", current, async_output_path=OUT,
                                  max_concurrent_invocations=2)
    (variant,) = plan["endpoint_config"]["ProductionVariants"]
    assert variant["VariantName"] == plan["candidate"] and variant["InitialVariantWeight"] == 1.0
    assert plan["endpoint_config"]["AsyncInferenceConfig"]["ClientConfig"] == {"MaxConcurrentInvocationsPerInstance": 2}
    assert plan["weights"] == {plan["candidate"]: 1.0} and plan["previous_config"] == "config-0"
    assert plan["async_input"].startswith(Settings().uri("async-inputs", "ep")) and plan["async_input"].endswith(".json")
    assert deploy.plan_deployment(Settings(), ARTIFACTS, "ep", "run-1", current)["async_input"] is None


def test_an_ab_share_on_an_async_endpoint_is_refused():
    with pytest.raises(ValueError, match="candidate_weight 0.3 .*asynchronous"):
        deploy.plan_deployment(Settings(), ARTIFACTS, "ep", "run-1", None, candidate_weight=0.3, async_output_path=OUT)


def test_the_async_poll_returns_the_response_once_it_appears():
    reads = []

    def read(uri):
        reads.append(uri)
        return b"done" if len(reads) >= 5 and uri == "s3://b/out" else None

    assert deploy.wait_for_async_result(read, "s3://b/out", "s3://b/fail", 0, 60) == b"done"
    assert reads[:2] == ["s3://b/out", "s3://b/fail"]


def test_the_async_poll_raises_the_failure_and_times_out_naming_the_location():
    failed = {"s3://b/fail": b"Received client error (400): width must be a multiple of 8"}
    with pytest.raises(RuntimeError, match="s3://b/fail.*width"):
        deploy.wait_for_async_result(failed.get, "s3://b/out", "s3://b/fail", 0, 60)
    with pytest.raises(TimeoutError, match="s3://b/out"):
        deploy.wait_for_async_result(lambda uri: None, "s3://b/out", None, 0.01, 0.05)
