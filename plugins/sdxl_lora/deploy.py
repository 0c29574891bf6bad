"""The deployment tasks, shared by sdxl_lora_deploy and the DAGs that deploy what they trained.

plan -> Model -> EndpointConfig -> Endpoint (create, or update when it exists) -> smoke test.
If anything after the plan fails, rollback removes what this run created and puts an existing
endpoint back on the config it served before, then fails the run.
"""

from __future__ import annotations

from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerEndpointConfigOperator,
    SageMakerEndpointOperator,
    SageMakerModelOperator,
)
from airflow.sdk import TaskGroup, TriggerRule, task

from sdxl_lora.settings import Settings

SMOKE_REQUEST = {"prompt": "storyboard frame, ink outline, a red circle on the left", "width": 512, "height": 512,
                 "num_inference_steps": 4, "seed": 0, "lora_scale": 0.8}


@task
def plan(model_data_url: str, endpoint_name: str | None, run_id: str) -> dict:
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
    from sdxl_lora import naming, requests

    settings = Settings.resolve()
    endpoint = endpoint_name or settings.endpoint_name
    client = SageMakerHook(aws_conn_id=settings.aws_conn_id).conn
    try:
        previous = client.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    except client.exceptions.ClientError:
        previous = None
    model_name = naming.job_name("sdxl-lora-model", run_id, naming.run_token(model_data_url))
    config_name = naming.job_name("sdxl-lora-config", run_id, naming.run_token(model_data_url))
    return {
        "model": requests.model_request(settings, model_name, model_data_url),
        "endpoint_config": requests.endpoint_config_request(settings, config_name, {"AllTraffic": (model_name, 1.0)}),
        "endpoint": {"Endpoint": {"EndpointName": endpoint, "EndpointConfigName": config_name}},
        "previous_config": previous,
    }


@task
def smoke_test(deployment: dict, request: dict) -> dict:
    """One real invocation: the endpoint must answer with a decodable image."""
    import base64
    import json

    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    settings = Settings.resolve()
    runtime = AwsBaseHook(aws_conn_id=settings.aws_conn_id, client_type="sagemaker-runtime").conn
    name = deployment["endpoint"]["Endpoint"]["EndpointName"]
    response = runtime.invoke_endpoint(EndpointName=name, ContentType="application/json", Accept="application/json",
                                       Body=json.dumps(request))
    body = json.loads(response["Body"].read())
    image = base64.b64decode(body["images"][0])
    if not image.startswith(b"\x89PNG"):
        raise ValueError(f"endpoint {name} answered without a PNG image")
    return {"endpoint": name, "variant": response["InvokedProductionVariant"], "seed": body["seed"],
            "inference_seconds": body.get("inference_seconds")}


def serving_record_uri(settings: Settings, endpoint: str) -> str:
    return settings.uri("serving", f"{endpoint}.json")


@task
def record_serving(deployment: dict, smoke: dict) -> None:
    """What the endpoint serves now, for later runs to compare their adapters against."""
    import json

    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    settings = Settings.resolve()
    record = {"endpoint": smoke["endpoint"], "model_data_url": deployment["model"]["PrimaryContainer"]["ModelDataUrl"],
              "endpoint_config": deployment["endpoint_config"]["EndpointConfigName"]}
    S3Hook(aws_conn_id=settings.aws_conn_id).load_string(json.dumps(record), serving_record_uri(settings, smoke["endpoint"]),
                                                         replace=True)


@task(trigger_rule=TriggerRule.ONE_FAILED)
def rollback(deployment: dict) -> None:
    """Undo this run: the previous config serves again (or the new endpoint goes), new resources go."""
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    settings = Settings.resolve()
    hook = SageMakerHook(aws_conn_id=settings.aws_conn_id)
    client = hook.conn
    endpoint = deployment["endpoint"]["Endpoint"]["EndpointName"]
    if deployment["previous_config"]:
        hook.update_endpoint({"EndpointName": endpoint, "EndpointConfigName": deployment["previous_config"]},
                             wait_for_completion=True, check_interval=settings.check_interval_seconds)
    else:
        _ignore_missing(client.delete_endpoint, EndpointName=endpoint)
    _ignore_missing(client.delete_endpoint_config,
                    EndpointConfigName=deployment["endpoint_config"]["EndpointConfigName"])
    _ignore_missing(client.delete_model, ModelName=deployment["model"]["ModelName"])
    raise RuntimeError(f"deployment to {endpoint} failed and was rolled back"
                       + (f" to {deployment['previous_config']}" if deployment["previous_config"] else ""))


def _ignore_missing(call, **kwargs) -> None:
    from botocore.exceptions import ClientError

    try:
        call(**kwargs)
    except ClientError as error:
        if error.response["Error"]["Code"] != "ValidationException":
            raise


def deploy_group(model_data_url, endpoint_name, smoke_request, group_id: str = "deploy") -> TaskGroup:
    """The deployment tasks as a group; arguments may be XComArgs or templated strings."""
    settings = Settings.from_environment()
    with TaskGroup(group_id=group_id) as group:
        deployment = plan(model_data_url, endpoint_name)
        model = SageMakerModelOperator(task_id="create_model", config=deployment["model"],
                                       aws_conn_id=settings.aws_conn_id)
        config = SageMakerEndpointConfigOperator(task_id="create_endpoint_config",
                                                 config=deployment["endpoint_config"],
                                                 aws_conn_id=settings.aws_conn_id)
        endpoint = SageMakerEndpointOperator(task_id="create_or_update_endpoint", config=deployment["endpoint"],
                                             operation="create", wait_for_completion=True,
                                             check_interval=settings.check_interval_seconds,
                                             aws_conn_id=settings.aws_conn_id)
        smoke = smoke_test(deployment, smoke_request)
        record = record_serving(deployment, smoke)
        undo = rollback(deployment)
        deployment >> model >> config >> endpoint >> smoke >> record >> undo
        [model, config, endpoint, smoke] >> undo
    return group
