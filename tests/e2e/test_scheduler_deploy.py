"""Endpoint deployments (sdxl_lora_deploy) under a real scheduler: a killed endpoint task is retried without a
second model, config, endpoint or update; a deployment whose endpoint fails leaves nothing orphaned, and an
existing endpoint keeps serving its previous config (SageMaker's rollback of a failed update).

The failing deployments deploy model artifacts that are not a valid LoRA: the serving container starts, cannot
load them and never passes its /ping health check, as on AWS. To keep the module short its runs go side by
side, in two phases (the `deployments` fixture); each run's resources carry its run id's token.
"""

from __future__ import annotations

import io
import json
import tarfile
import time

import httpx
import psutil
import pytest
from botocore.exceptions import ClientError

from conftest import ROLE, processes_under, training_request, wait_for_endpoint, wait_for_training
from scheduler import BUCKET, PREFIX, wait_until
from sdxl_lora.naming import run_token
from sdxl_lora_ops.airflow_services import parse_time

pytestmark = pytest.mark.scheduler
DEPLOY = "sdxl_lora_deploy"
ENDPOINT_TASK = "deploy.create_or_update_endpoint"
INFERENCE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdxl-lora-inference:latest"
SMOKE = {"prompt": "storyboard frame, a red circle", "width": 32, "height": 32, "num_inference_steps": 2, "seed": 0,
         "lora_scale": 0.8}
SERVING = "sched-deploy-ep"  # created, then updated, by killed runs
UPDATED = "sched-deploy-ep-old"  # serving before a failing update
FAILING = "sched-deploy-ep-new"  # a new endpoint that fails


@pytest.fixture(scope="module")
def training_job(scheduled) -> str:
    """A 2-step training job for the LoRA the deployments deploy, started at once so it trains while Airflow's
    execution API warms up and the first deployment (of broken artifacts, which needs no LoRA) runs."""
    staged = {"data": f"s3://{BUCKET}/{PREFIX}/proc_dataset/tiny", "base": f"s3://{BUCKET}/{PREFIX}/base_model"}
    scheduled.stack.client("sagemaker").create_training_job(**training_request(
        "sched-deploy-lora", staged, {"max_train_steps": 2, "validation_split": 0.25},
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/{PREFIX}/models"}))
    return "sched-deploy-lora"


@pytest.fixture(scope="module")
def airflow(scheduled, training_job):
    # The execution API builds its versioned routes on its first request (25-60 s on these loaded cores), and the
    # api-server answers nothing else meanwhile: pay that here rather than in the first task's start.
    httpx.get(f"{scheduled.url}/execution/health", timeout=300).raise_for_status()
    scheduled.wait_for_dags(DEPLOY)
    scheduled.unpause(DEPLOY)
    return scheduled


@pytest.fixture(scope="module")
def sagemaker(airflow):
    return airflow.stack.client("sagemaker")


@pytest.fixture(scope="module")
def broken(airflow) -> str:
    """Model artifacts that are not a LoRA: a model.tar.gz whose pytorch_lora_weights.safetensors is not a
    safetensors file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        junk = b"this is not a LoRA" * 64
        info = tarfile.TarInfo("pytorch_lora_weights.safetensors")
        info.size = len(junk)
        archive.addfile(info, io.BytesIO(junk))
    key = f"{PREFIX}/models/sched-deploy-broken/output/model.tar.gz"
    airflow.stack.client("s3").put_object(Bucket=BUCKET, Key=key, Body=buffer.getvalue())
    return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="module")
def failing_new(airflow, broken) -> str:
    """The run id of a deployment of the broken artifacts to a new endpoint, triggered before the LoRA is trained:
    it needs none."""
    return trigger(airflow, broken, FAILING)


@pytest.fixture(scope="module")
def lora(sagemaker, training_job, failing_new) -> str:
    """The trained LoRA: the training job's model.tar.gz."""
    job = wait_for_training(sagemaker, training_job)
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    return job["ModelArtifacts"]["S3ModelArtifacts"]


@pytest.fixture(scope="module")
def deployments(airflow, sagemaker, lora, broken) -> dict:
    """Two phases, their runs side by side. 1: a new endpoint (SERVING) whose endpoint task is killed while it is
    Creating; beside it an endpoint (UPDATED) made directly through the API, serving the LoRA. 2: an update of
    SERVING killed while Updating, and an update of UPDATED to the broken artifacts."""
    started = time.monotonic()
    sagemaker.create_model(ModelName="sched-deploy-old-model", ExecutionRoleArn=ROLE, PrimaryContainer={
        "Image": INFERENCE_IMAGE, "ModelDataUrl": lora,
        "Environment": {"BASE_MODEL": f"s3://{BUCKET}/{PREFIX}/base_model/"}})
    sagemaker.create_endpoint_config(EndpointConfigName="sched-deploy-old-config", ProductionVariants=[
        {"VariantName": "old", "ModelName": "sched-deploy-old-model", "InitialInstanceCount": 1,
         "InstanceType": "ml.g5.2xlarge", "InitialVariantWeight": 1.0}])
    sagemaker.create_endpoint(EndpointName=UPDATED, EndpointConfigName="sched-deploy-old-config")
    created = trigger(airflow, lora, SERVING)
    created_config = kill_while_deploying(airflow, sagemaker, created, SERVING)
    assert wait_for_endpoint(sagemaker, UPDATED)["EndpointStatus"] == "InService"
    answer_before = invoke(airflow, UPDATED)
    airflow.wait_for_run(DEPLOY, created, timeout=600)
    created_result = deployed(airflow, sagemaker, created, created_config)  # before the update starts it anew
    phase_1, started = time.monotonic() - started, time.monotonic()

    failing_update = trigger(airflow, broken, UPDATED)
    updated = trigger(airflow, lora, SERVING)
    updated_config = kill_while_deploying(airflow, sagemaker, updated, SERVING)
    for run_id in (updated, failing_update):
        airflow.wait_for_run(DEPLOY, run_id, timeout=600)
    print(f"[deploy] phase 1 (create killed, direct endpoint) {phase_1:.0f} s, phase 2 (update killed, failing "
          f"update) {time.monotonic() - started:.0f} s")
    return {"created": created_result, "updated": deployed(airflow, sagemaker, updated, updated_config),
            "failing_update": failing_update, "answer_before": answer_before}


def deployed(airflow, sagemaker, run_id: str, config: str) -> dict:
    """What a finished deployment to SERVING left: the endpoint, the run's variant and how often its serving
    container started (one CloudWatch log stream per start; an update later starts every variant anew)."""
    described = sagemaker.describe_endpoint(EndpointName=SERVING)
    candidates = [v["VariantName"] for v in described["ProductionVariants"] if run_token(run_id) in v["VariantName"]]
    return {"run_id": run_id, "config": config, "endpoint": described, "candidates": candidates,
            "starts": [variant_starts(airflow, SERVING, name) for name in candidates]}


def trigger(airflow, model_data_url: str, endpoint: str) -> str:
    return airflow.trigger(DEPLOY, {"model_data_url": model_data_url, "endpoint_name": endpoint,
                                    "smoke_request": SMOKE})


def instances(airflow, run_id: str) -> dict[str, dict]:
    return {t["task_id"]: t for t in airflow.task_instances(DEPLOY, run_id)}


def created_by(sagemaker, run_id: str) -> tuple[list[str], list[str]]:
    """The models and endpoint configs whose names carry the run's token: what that run created and left."""
    token = run_token(run_id)
    return (sorted(m["ModelName"] for m in sagemaker.list_models(NameContains=token)["Models"]),
            sorted(c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs(NameContains=token)[
                "EndpointConfigs"]))


def variant_starts(airflow, endpoint: str, variant: str) -> int:
    """How many times a variant's serving container was started: one CloudWatch log stream per start."""
    return len(airflow.stack.client("logs").describe_log_streams(
        logGroupName=f"/aws/sagemaker/Endpoints/{endpoint}", logStreamNamePrefix=f"{variant}/")["logStreams"])


def kill_while_deploying(airflow, sagemaker, run_id: str, endpoint: str) -> str:
    """SIGKILL the endpoint task's process once its endpoint is Creating or Updating; the config it deploys."""
    def deploying():
        task = instances(airflow, run_id).get(ENDPOINT_TASK)
        if not task or task["state"] != "running" or not task.get("pid"):
            return None
        try:
            described = sagemaker.describe_endpoint(EndpointName=endpoint)
        except ClientError:
            return None
        pending = described.get("PendingDeploymentSummary")
        return (task, described["EndpointStatus"], pending["EndpointConfigName"]) if pending else None

    task, status, config = wait_until(deploying, 600, f"{ENDPOINT_TASK} running while {endpoint} deploys", 0.5)
    psutil.Process(task["pid"]).kill()
    print(f"\n[deploy] killed {ENDPOINT_TASK} (pid {task['pid']}) while {endpoint} was {status}")
    return config


def run_seconds(airflow, run_id: str) -> float:
    run = airflow.run(DEPLOY, run_id)
    return (parse_time(run["end_date"]) - parse_time(run["start_date"])).total_seconds()


def invoke(airflow, endpoint: str) -> tuple[str, str]:
    """(variant, first image as base64) of one InvokeEndpoint of SMOKE."""
    response = airflow.stack.client("sagemaker-runtime").invoke_endpoint(
        EndpointName=endpoint, ContentType="application/json", Accept="application/json", Body=json.dumps(SMOKE))
    return response["InvokedProductionVariant"], json.loads(response["Body"].read())["images"][0]


@pytest.mark.parametrize("phase", ["created", "updated"])
def test_a_killed_endpoint_task_is_retried_without_a_second_model_config_or_deployment(
        airflow, sagemaker, deployments, phase):
    """The run is green, its endpoint task finished on try 2 with the deployment try 1 started, and the run made
    exactly one model, one config and one start of its variant."""
    result = deployments[phase]
    run_id, config = result["run_id"], result["config"]
    tasks = instances(airflow, run_id)
    assert airflow.run(DEPLOY, run_id)["state"] == "success", {k: t["state"] for k, t in tasks.items()}
    assert tasks[ENDPOINT_TASK]["try_number"] == 2, tasks[ENDPOINT_TASK]
    log = airflow.log(DEPLOY, run_id, ENDPOINT_TASK, 2)
    # Try 2 found the deployment try 1 started: still under way (waited for) or just done (used).
    assert (f"with config {config} (an earlier try started it): waiting for it" in log
            or f"InService with config {config} (an earlier try deployed it)" in log), log[-3000:]
    models, configs = created_by(sagemaker, run_id)
    assert len(models) == 1 and configs == [config], (models, configs)
    (candidate,) = result["candidates"]
    (starts,) = result["starts"]
    assert starts == 1, f"variant {candidate} was started {starts} times"
    described = result["endpoint"]
    assert described["EndpointStatus"] == "InService" and described["EndpointConfigName"] == config
    if phase == "updated":  # the last deployment: all traffic on its variant
        assert invoke(airflow, SERVING)[0] == candidate
    print(f"[deploy] killed while {'Creating' if phase == 'created' else 'Updating'}: try 2 green, run "
          f"{run_seconds(airflow, run_id):.0f} s; {len(models)} model, {len(configs)} config, variant started "
          f"{starts} time(s)")


def test_a_failed_update_leaves_the_endpoint_serving_its_previous_config_and_removes_the_new_model_and_config(
        airflow, sagemaker, deployments):
    run_id = deployments["failing_update"]
    tasks = instances(airflow, run_id)
    assert airflow.run(DEPLOY, run_id)["state"] == "failed"
    assert tasks[ENDPOINT_TASK]["state"] == "failed" and tasks[ENDPOINT_TASK]["try_number"] == 1  # not retried
    log = airflow.log(DEPLOY, run_id, ENDPOINT_TASK, 1)
    assert ("failed and SageMaker rolled it back: the endpoint serves its previous config sched-deploy-old-config. "
            "FailureReason: The primary container for production variant") in log, log[-3000:]
    assert "did not pass the ping health check" in log and "is not a safetensors file" in log
    rollback = airflow.log(DEPLOY, run_id, "deploy.rollback", 1)
    token = run_token(run_id)
    for line in (f"endpoint {UPDATED} left as it is: InService with config sched-deploy-old-config",
                 f"deleted endpoint config sdxl-lora-config-{token}", f"deleted model sdxl-lora-model-{token}"):
        assert line in rollback, rollback[-3000:]
    # Nothing of the failed run is left; the endpoint, its config and model are as they were, and it answers
    # from the old adapter exactly as before.
    assert created_by(sagemaker, run_id) == ([], [])
    described = sagemaker.describe_endpoint(EndpointName=UPDATED)
    assert described["EndpointStatus"] == "InService" and described["EndpointConfigName"] == "sched-deploy-old-config"
    assert "did not pass the ping health check" in described["FailureReason"]
    sagemaker.describe_model(ModelName="sched-deploy-old-model")
    sagemaker.describe_endpoint_config(EndpointConfigName="sched-deploy-old-config")
    assert invoke(airflow, UPDATED) == deployments["answer_before"]
    print(f"[deploy] failed update: run red in {run_seconds(airflow, run_id):.0f} s, endpoint task not retried; "
          "endpoint InService on its previous config, same answer; the new model and config deleted")


def test_a_failed_new_endpoint_is_deleted_with_its_config_and_model(airflow, sagemaker, failing_new):
    run_id = failing_new
    run = airflow.wait_for_run(DEPLOY, run_id, timeout=600)
    tasks = instances(airflow, run_id)
    assert run["state"] == "failed" and tasks[ENDPOINT_TASK]["try_number"] == 1
    token = run_token(run_id)
    log = airflow.log(DEPLOY, run_id, ENDPOINT_TASK, 1)
    assert f"endpoint {FAILING} failed with config sdxl-lora-config-{token}-" in log, log[-3000:]
    assert "The primary container for production variant" in log and "is not a safetensors file" in log
    rollback = airflow.log(DEPLOY, run_id, "deploy.rollback", 1)
    for line in (f"deleted endpoint {FAILING} (Failed: The primary container for production variant",
                 f"deleted endpoint config sdxl-lora-config-{token}", f"deleted model sdxl-lora-model-{token}"):
        assert line in rollback, rollback[-3000:]
    with pytest.raises(ClientError, match="Could not find endpoint"):
        sagemaker.describe_endpoint(EndpointName=FAILING)
    assert created_by(sagemaker, run_id) == ([], [])
    assert processes_under(airflow.stack.workdir / "endpoints" / FAILING) == []
    print(f"[deploy] failed new endpoint: run red in {run_seconds(airflow, run_id):.0f} s, endpoint task not "
          "retried; endpoint, config and model deleted, no serving process left")
