"""Models, endpoint configs and endpoints: real `sdxl-lora serve` processes behind InvokeEndpoint."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections import Counter

import pytest
from botocore.exceptions import ClientError
from conftest import ROLE, processes_under, training_request, wait_for_endpoint, wait_for_training
from PIL import Image

INFERENCE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdxl-lora-inference:latest"
REQUEST = {"prompt": "storyboard frame, a red circle", "width": 32, "height": 32, "num_inference_steps": 2,
           "seed": 1, "lora_scale": 0.8}


@pytest.fixture(scope="module")
def artifacts(sagemaker, staged) -> str:
    sagemaker.create_training_job(**training_request("e2e-endpoint-train", staged))
    job = wait_for_training(sagemaker, "e2e-endpoint-train")
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    return job["ModelArtifacts"]["S3ModelArtifacts"]


@pytest.fixture(scope="module")
def runtime(stack):
    return stack.client("sagemaker-runtime")


def _model(sagemaker, name: str, artifacts: str | None, base: str) -> None:
    container = {"Image": INFERENCE_IMAGE, "Environment": {"BASE_MODEL": base}}
    if artifacts:
        container["ModelDataUrl"] = artifacts
    sagemaker.create_model(ModelName=name, PrimaryContainer=container, ExecutionRoleArn=ROLE)


def _config(sagemaker, name: str, weights: dict[str, tuple[str, float]]) -> None:
    sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[
        {"VariantName": variant, "ModelName": model, "InitialInstanceCount": 1, "InstanceType": "ml.g5.2xlarge",
         "InitialVariantWeight": weight} for variant, (model, weight) in weights.items()])


def _invoke(runtime, endpoint: str, **extra) -> tuple[dict, str]:
    response = runtime.invoke_endpoint(EndpointName=endpoint, ContentType="application/json",
                                       Accept="application/json", Body=json.dumps({**REQUEST, **extra}))
    return json.loads(response["Body"].read()), response["InvokedProductionVariant"]


@pytest.fixture(scope="module")
def endpoint(stack, sagemaker, artifacts, staged):
    _model(sagemaker, "e2e-model-lora", artifacts, staged["base"])  # base model read from S3 by the container
    _model(sagemaker, "e2e-model-base", None, str(staged["base_dir"]))  # base model only, from a local path
    _config(sagemaker, "e2e-config-ab", {"lora": ("e2e-model-lora", 3.0), "base": ("e2e-model-base", 1.0)})
    sagemaker.create_endpoint(EndpointName="e2e-endpoint", EndpointConfigName="e2e-config-ab")
    assert sagemaker.describe_endpoint(EndpointName="e2e-endpoint")["EndpointStatus"] == "Creating"
    described = wait_for_endpoint(sagemaker, "e2e-endpoint")
    assert described["EndpointStatus"] == "InService", described.get("FailureReason")
    return "e2e-endpoint"


def test_an_invocation_returns_images(endpoint, runtime, sagemaker):
    body, variant = _invoke(runtime, endpoint, num_images_per_prompt=2)
    assert variant in ("lora", "base")
    assert len(body["images"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.format == "PNG" and image.size == (32, 32)
    variants = sagemaker.describe_endpoint(EndpointName=endpoint)["ProductionVariants"]
    assert {v["VariantName"]: v["CurrentWeight"] for v in variants} == {"lora": 3.0, "base": 1.0}


def test_traffic_follows_variant_weights(endpoint, runtime):
    counts = Counter(_invoke(runtime, endpoint)[1] for _ in range(40))
    assert counts["lora"] > counts["base"] > 0


def test_target_variant_routes_every_request(endpoint, runtime):
    def call(variant: str) -> tuple[str, dict]:
        response = runtime.invoke_endpoint(EndpointName=endpoint, ContentType="application/json",
                                           TargetVariant=variant, Body=json.dumps(REQUEST))
        return response["InvokedProductionVariant"], json.loads(response["Body"].read())

    routed = [call("base") for _ in range(5)]
    assert {variant for variant, _ in routed} == {"base"}
    _, lora = call("lora")
    assert lora["images"][0] != routed[0][1]["images"][0]  # same seed, the LoRA variant renders differently
    with pytest.raises(ClientError) as caught:
        call("nobody")
    assert caught.value.response["Error"]["Code"] == "ValidationError"
    assert "nobody" in caught.value.response["Error"]["Message"]


def test_weights_move_traffic_without_restarts_and_target_variant_still_reaches_a_weight_0_variant(
        endpoint, runtime, sagemaker):
    def weights(**values: float) -> None:
        sagemaker.update_endpoint_weights_and_capacities(EndpointName=endpoint, DesiredWeightsAndCapacities=[
            {"VariantName": name, "DesiredWeight": weight} for name, weight in values.items()])
        described = wait_for_endpoint(sagemaker, endpoint)
        assert {v["VariantName"]: v["CurrentWeight"] for v in described["ProductionVariants"]} == values

    weights(lora=0.0, base=1.0)  # roll the A/B test back: everything to base
    try:
        assert {_invoke(runtime, endpoint)[1] for _ in range(15)} == {"base"}
        response = runtime.invoke_endpoint(EndpointName=endpoint, ContentType="application/json",
                                           TargetVariant="lora", Body=json.dumps(REQUEST))
        assert response["InvokedProductionVariant"] == "lora"
        weights(lora=1.0, base=0.0)  # promote
        assert {_invoke(runtime, endpoint)[1] for _ in range(15)} == {"lora"}
        with pytest.raises(ClientError) as refused:
            weights(lora=0.0, base=0.0)
        assert refused.value.response["Error"]["Code"] == "ValidationException"
    finally:
        weights(lora=3.0, base=1.0)


def test_a_jpeg_answer_and_its_custom_attributes_come_back_through_invoke_endpoint(endpoint, runtime):
    response = runtime.invoke_endpoint(EndpointName=endpoint, ContentType="application/json", Accept="image/jpeg",
                                       TargetVariant="lora", Body=json.dumps({**REQUEST, "adapter": "default"}))
    assert response["ContentType"] == "image/jpeg"
    assert Image.open(io.BytesIO(response["Body"].read())).format == "JPEG"
    assert "seed=1,adapter=default,lora_scale=0.8" in response["CustomAttributes"]


def test_a_bad_request_is_a_model_error_naming_the_field(endpoint, runtime):
    with pytest.raises(ClientError) as caught:
        _invoke(runtime, endpoint, width=33)
    assert caught.value.response["Error"]["Code"] == "ModelError"
    assert "width" in caught.value.response["Error"]["Message"]


def test_update_switches_config_without_dropping_requests(endpoint, sagemaker, runtime):
    _config(sagemaker, "e2e-config-base-only", {"solo": ("e2e-model-base", 1.0)})
    failures, served = [], Counter()
    stop = threading.Event()

    def keep_invoking():
        while not stop.is_set():
            try:
                served[_invoke(runtime, endpoint)[1]] += 1
            except Exception as error:  # noqa: BLE001 - any failure is what this test looks for
                failures.append(error)

    invoker = threading.Thread(target=keep_invoking)
    invoker.start()
    try:
        sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName="e2e-config-base-only")
        assert sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointStatus"] == "Updating"
        described = wait_for_endpoint(sagemaker, endpoint)
        assert described["EndpointStatus"] == "InService" and described["EndpointConfigName"] == \
            "e2e-config-base-only"
        after = [_invoke(runtime, endpoint)[1] for _ in range(3)]
    finally:
        stop.set()
        invoker.join()
    assert failures == []
    assert after == ["solo"] * 3
    assert sum(served.values()) > 0


def test_a_failed_deployment_says_why(sagemaker, staged):
    _model(sagemaker, "e2e-model-missing-base", None, "/nowhere/sdxl")
    _config(sagemaker, "e2e-config-missing-base", {"only": ("e2e-model-missing-base", 1.0)})
    sagemaker.create_endpoint(EndpointName="e2e-endpoint-broken", EndpointConfigName="e2e-config-missing-base")
    described = wait_for_endpoint(sagemaker, "e2e-endpoint-broken")
    assert described["EndpointStatus"] == "Failed"
    assert "/nowhere/sdxl" in described["FailureReason"]


def test_delete_stops_the_serving_processes(stack, endpoint, sagemaker):
    sagemaker.delete_endpoint(EndpointName=endpoint)
    with pytest.raises(ClientError):
        sagemaker.describe_endpoint(EndpointName=endpoint)
    assert processes_under(stack.workdir / "endpoints" / endpoint) == []
    for name in ("e2e-config-ab", "e2e-config-base-only"):
        sagemaker.delete_endpoint_config(EndpointConfigName=name)
    sagemaker.delete_model(ModelName="e2e-model-lora")
    with pytest.raises(ClientError):
        sagemaker.describe_model(ModelName="e2e-model-lora")
