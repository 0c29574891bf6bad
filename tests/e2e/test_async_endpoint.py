"""An asynchronous endpoint (AsyncInferenceConfig): InvokeEndpointAsync reads the request from S3 and the
answer lands in S3, polled the way the deploy DAG's smoke test polls it."""

from __future__ import annotations

import base64
import io
import json

import pytest
from botocore.exceptions import ClientError
from PIL import Image

from conftest import BUCKET, ROLE, wait_for_endpoint
from sdxl_lora import deploy, sagemaker_requests
from sdxl_lora.settings import Settings

INFERENCE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdxl-lora-inference:latest"
REQUEST = {"prompt": "storyboard frame, a red circle", "width": 32, "height": 32, "num_inference_steps": 2, "seed": 3}
OUT = f"s3://{BUCKET}/async-out"


@pytest.fixture(scope="module")
def runtime(stack):
    return stack.client("sagemaker-runtime")


@pytest.fixture(scope="module")
def async_endpoint(sagemaker, staged):
    """The tiny base model behind an endpoint config built by the deploy path's request builder."""
    sagemaker.create_model(ModelName="e2e-async-model", ExecutionRoleArn=ROLE, PrimaryContainer={
        "Image": INFERENCE_IMAGE, "Environment": {"BASE_MODEL": str(staged["base_dir"])}})
    sagemaker.create_endpoint_config(**sagemaker_requests.endpoint_config_request(
        Settings(), "e2e-async-config", {"solo": ("e2e-async-model", 1.0)}, OUT, max_concurrent_invocations=2))
    sagemaker.create_endpoint(EndpointName="e2e-async", EndpointConfigName="e2e-async-config")
    described = wait_for_endpoint(sagemaker, "e2e-async")
    assert described["EndpointStatus"] == "InService", described.get("FailureReason")
    yield "e2e-async"
    sagemaker.delete_endpoint(EndpointName="e2e-async")
    sagemaker.delete_endpoint_config(EndpointConfigName="e2e-async-config")
    sagemaker.delete_model(ModelName="e2e-async-model")


def test_an_async_invocation_writes_the_png_answer_to_the_output_path(async_endpoint, runtime, s3, sagemaker):
    described = sagemaker.describe_endpoint(EndpointName=async_endpoint)
    assert described["AsyncInferenceConfig"]["OutputConfig"]["S3OutputPath"] == OUT
    raw, output = deploy.invoke_async_and_wait(runtime, s3, async_endpoint, REQUEST,
                                               f"s3://{BUCKET}/async-in/first.json", "first-id", 0.2, timeout=240)
    assert output == f"{OUT}/first-id.out"
    body = deploy.check_body(async_endpoint, raw)
    assert body["seed"] == 3
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.format == "PNG" and image.size == (32, 32)
    stored = s3.get_object(Bucket=BUCKET, Key="async-out/first-id.out")
    assert stored["Body"].read() == raw and stored["ContentType"] == "application/json"


def test_a_bad_async_request_lands_in_the_failure_path_naming_the_field(async_endpoint, runtime, s3):
    with pytest.raises(RuntimeError, match=r"async-out/failures/bad-id-error.out.*width"):
        deploy.invoke_async_and_wait(runtime, s3, async_endpoint, {**REQUEST, "width": 33},
                                     f"s3://{BUCKET}/async-in/bad.json", "bad-id", 0.2, timeout=120)
    # the endpoint still serves: an answer without an InferenceId gets one generated
    s3.put_object(Bucket=BUCKET, Key="async-in/again.json", Body=json.dumps(REQUEST).encode())
    response = runtime.invoke_endpoint_async(EndpointName=async_endpoint, ContentType="application/json",
                                             InputLocation=f"s3://{BUCKET}/async-in/again.json")
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 202 and response["InferenceId"]
    assert response["OutputLocation"] == f"{OUT}/{response['InferenceId']}.out"
    deploy.check_body(async_endpoint, deploy.wait_for_async_result(
        lambda uri: deploy.read_s3_object(s3, uri), response["OutputLocation"], response["FailureLocation"], 0.2, 120))


def test_a_real_time_endpoint_refuses_invoke_endpoint_async(sagemaker, runtime, staged):
    sagemaker.create_model(ModelName="e2e-realtime-model", ExecutionRoleArn=ROLE, PrimaryContainer={
        "Image": INFERENCE_IMAGE, "Environment": {"BASE_MODEL": "/nowhere/sdxl"}})
    sagemaker.create_endpoint_config(**sagemaker_requests.endpoint_config_request(
        Settings(), "e2e-realtime-config", {"solo": ("e2e-realtime-model", 1.0)}))
    sagemaker.create_endpoint(EndpointName="e2e-realtime", EndpointConfigName="e2e-realtime-config")
    wait_for_endpoint(sagemaker, "e2e-realtime")  # fails to load (no base model): still a real-time endpoint
    with pytest.raises(ClientError) as caught:
        runtime.invoke_endpoint_async(EndpointName="e2e-realtime", InputLocation=f"s3://{BUCKET}/async-in/x.json")
    assert caught.value.response["Error"]["Code"] == "ValidationError"
    assert "not an asynchronous inference endpoint" in caught.value.response["Error"]["Message"]
    sagemaker.delete_endpoint(EndpointName="e2e-realtime")


def test_an_async_config_without_a_valid_output_path_is_refused(sagemaker, async_endpoint):
    for config, named in (({"OutputConfig": {}}, "S3OutputPath"),
                          ({"OutputConfig": {"S3OutputPath": "sdxl-lora-e2e/out"}}, "not an s3://bucket/prefix URI")):
        with pytest.raises(ClientError) as caught:
            sagemaker.create_endpoint_config(EndpointConfigName="e2e-async-bad", AsyncInferenceConfig=config,
                                             ProductionVariants=[{"VariantName": "v", "ModelName": "e2e-async-model",
                                                                  "InitialInstanceCount": 1,
                                                                  "InstanceType": "ml.g5.2xlarge"}])
        assert caught.value.response["Error"]["Code"] == "ValidationException"
        assert named in caught.value.response["Error"]["Message"]
