"""Registering what a run would deploy (plugins/sdxl_lora/registry.py), against the local stack's registry in process
(moto has no model packages): the same checks of names, metadata and descriptions that the stack's server applies."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from local_stack.errors import ApiError
from local_stack.registry import RegistryService
from sdxl_lora import registry, sagemaker_requests
from sdxl_lora.settings import Settings

ARTIFACTS = "s3://bucket/prefix/models/sdxl-lora-train-run-v1/output/model.tar.gz"
RUN = "manual__2026-03-01T10:00:00.123456+00:00"


class Client:
    """boto3's SageMaker client over RegistryService: snake_case methods, ClientError for ApiError, a paginator."""

    def __init__(self):
        self.service = RegistryService()
        self.calls: list[str] = []
        operations = {"create_model_package_group": self.service.create_group,
                      "create_model_package": self.service.create_package,
                      "list_model_packages": self.service.list_packages,
                      "describe_model_package": self.service.describe_package,
                      "update_model_package": self.service.update_package}
        for name, handler in operations.items():
            setattr(self, name, self._call(name, handler))

    def _call(self, name, handler):
        def call(**request):
            self.calls.append(name)
            try:
                return handler(request)
            except ApiError as error:
                raise ClientError({"Error": {"Code": error.code, "Message": error.message}}, name) from None
        return call

    def get_paginator(self, name):
        client = self

        class Paginator:
            def paginate(self, **request):
                while True:
                    page = getattr(client, name)(**request)
                    yield page
                    if not page.get("NextToken"):
                        return
                    request = {**request, "NextToken": page["NextToken"]}
        return Paginator()


def training_job(hyperparameters: dict | None = None) -> dict:
    return {"TrainingJobName": "sdxl-lora-train-run-v1",
            "AlgorithmSpecification": {"TrainingImage": "123.dkr.ecr.us-east-1.amazonaws.com/sdxl-lora-training:1"},
            "InputDataConfig": [{"ChannelName": "train", "DataSource": {"S3DataSource": {
                "S3Uri": "s3://bucket/prefix/proc_dataset/2026-03-01/"}}}],
            "HyperParameters": hyperparameters or {"learning_rate": "0.0002", "rank": "4",
                                                   "mixed_precision": '"fp16"'},
            "ModelArtifacts": {"S3ModelArtifacts": ARTIFACTS}}


def register(client, written: dict, settings: Settings = Settings(), deploy: bool = True, approval: str = "auto",
             job: dict | None = None) -> dict:
    container = sagemaker_requests.model_request(settings, "m", ARTIFACTS)["PrimaryContainer"]
    return registry.register(client, lambda text, uri: written.__setitem__(uri, text), settings,
                             job or training_job(), container, 0.25, 0.2, deploy, "better than serving", approval,
                             "sdxl_lora_train", RUN)


def test_a_version_holds_the_container_metrics_and_lineage_and_is_approved_when_deployed():
    client, written = Client(), {}
    registered = register(client, written)
    assert registered == {"package_arn": "arn:aws:sagemaker:us-east-1:123456789012:model-package/sdxl-lora/1",
                          "approval_status": "Approved", "deploy": True}
    version = client.describe_model_package(ModelPackageName=registered["package_arn"])
    (container,) = version["InferenceSpecification"]["Containers"]
    assert container["Image"] == Settings().inference_image and container["ModelDataUrl"] == ARTIFACTS
    statistics = version["ModelMetrics"]["ModelQuality"]["Statistics"]
    assert statistics["S3Uri"] == "s3://bucket/prefix/models/sdxl-lora-train-run-v1/output/model_metrics.json"
    document = json.loads(written[statistics["S3Uri"]])
    assert (document["val_loss"], document["serving_val_loss"]) == (0.2, 0.25)
    assert document["lineage"]["hyperparameters"]["mixed_precision"] == '"fp16"'  # all of it, as the job got it
    metadata = version["CustomerMetadataProperties"]
    assert metadata["training_job"] == "sdxl-lora-train-run-v1" and metadata["dataset_version"] == "2026-03-01"
    assert metadata["dataset_manifest"] == "s3://bucket/prefix/proc_dataset/2026-03-01/manifest.json"
    assert metadata["run_id"] == RUN and metadata["dag_id"] == "sdxl_lora_train"
    assert metadata["training_image"].endswith("sdxl-lora-training:1")
    assert (metadata["hp.learning_rate"], metadata["hp.mixed_precision"]) == ("0.0002", "fp16")
    assert version["ModelPackageDescription"].startswith(
        f"SDXL LoRA from sdxl-lora-train-run-v1 of sdxl_lora_train {RUN}; dataset version 2026-03-01, val_loss 0.2")


@pytest.mark.parametrize(("approval", "deploy", "status", "deploys"), [
    ("auto", True, "Approved", True), ("auto", False, "PendingManualApproval", False),
    ("manual", True, "PendingManualApproval", False), ("manual", False, "PendingManualApproval", False)])
def test_approval(approval, deploy, status, deploys):
    registered = register(Client(), {}, deploy=deploy, approval=approval)
    assert (registered["approval_status"], registered["deploy"]) == (status, deploys)


def test_an_unknown_approval_is_refused():
    with pytest.raises(registry.RegistryError, match="approval must be one of auto, manual"):
        register(Client(), {}, approval="yes")


def test_a_retried_task_finds_its_version_and_another_run_adds_one():
    client, written = Client(), {}
    first = register(client, written)
    assert register(client, written) == first  # the group exists and the version too: nothing new
    assert client.calls.count("create_model_package") == 1
    other = training_job()
    other["TrainingJobName"] = "sdxl-lora-train-run-v2"
    assert register(client, written, job=other)["package_arn"].endswith("/sdxl-lora/2")


def test_metadata_stays_within_sagemakers_limits():
    many = {f"option_{n:02d}": "x" * 300 for n in range(60)}
    client = Client()
    package = client.describe_model_package(
        ModelPackageName=register(client, {}, job=training_job({**many, "prompt": '{"a": [1, 2]}'}))["package_arn"])
    metadata = package["CustomerMetadataProperties"]
    assert len(metadata) == 50 and all(len(value) <= 256 for value in metadata.values())
    assert registry.metadata_text('{"a": [1, 2]}', 256) == "__a_: _1_ 2__"
    assert registry.metadata_text("", 256) == "-"


def test_the_group_setting_names_the_group_or_turns_registration_off():
    client = Client()
    settings = Settings(model_package_group="my-adapters")
    assert register(client, {}, settings)["package_arn"].endswith(":model-package/my-adapters/1")
    off = register(client, {}, Settings(model_package_group="none"), deploy=True)
    assert off == {"package_arn": None, "approval_status": None, "deploy": True}
    with pytest.raises(registry.RegistryError, match="setting model_package_group 'bad_name'"):
        register(client, {}, Settings(model_package_group="bad_name"))
    assert Settings.load({"sdxl_lora_model_package_group": "none"}.get).model_package_group == "none"
    assert Settings().model_package_group == "sdxl-lora"


def test_with_network_isolation_the_version_keeps_the_base_models_channel():
    client = Client()
    settings = Settings(network_isolation=True, base_model_uri="s3://bucket/prefix/base_model/")
    version = client.describe_model_package(ModelPackageName=register(client, {}, settings)["package_arn"])
    (container,) = version["InferenceSpecification"]["Containers"]
    assert container["AdditionalModelDataSources"][0]["S3DataSource"]["S3Uri"] == "s3://bucket/prefix/base_model/"
    assert container["Environment"]["BASE_MODEL"].startswith("/opt/ml/additional-model-data-sources/")


def test_a_description_is_one_line_within_1024_characters():
    record = registry.lineage(training_job(), Settings(), "dag", "run")
    text = registry.description(record, None, "a reason\nover two lines " + "x" * 2000)
    assert "\n" not in text and len(text) == 1024 and "no val_loss" in text


@pytest.mark.parametrize(("deploy_winner", "approval", "status", "deploys"), [
    (True, "auto", "Approved", True), (False, "auto", "PendingManualApproval", False),
    (True, "manual", "PendingManualApproval", False)])
def test_the_task_registers_the_grids_winner_as_deploy_winner_and_approval_decide(deploy_winner, approval, status,
                                                                                   deploys):
    from unittest import mock

    from sdxl_lora import deploy

    client, written = Client(), {}
    client.describe_training_job = lambda TrainingJobName: {**training_job(), "TrainingJobName": TrainingJobName}
    with mock.patch("airflow.providers.amazon.aws.hooks.sagemaker.SageMakerHook") as hook, \
            mock.patch("airflow.providers.amazon.aws.hooks.s3.S3Hook") as s3, \
            mock.patch.object(Settings, "resolve", return_value=Settings()):
        hook.return_value.conn = client
        s3.return_value.load_string.side_effect = lambda text, uri, replace: written.__setitem__(uri, text)
        registered = deploy.register_model.function(
            ARTIFACTS, {"training_job": "sdxl-lora-gridsearch-run-lr-0-001", "val_loss": 0.3}, None,
            params={"deploy_winner": deploy_winner, "approval": approval}, run_id=RUN,
            dag=mock.Mock(dag_id="sdxl_lora_grid_search"))
    assert (registered["approval_status"], registered["deploy"]) == (status, deploys)
    assert registered["reason"] == f"deploy_winner is {'on' if deploy_winner else 'off'}"
    version = client.describe_model_package(ModelPackageName=registered["package_arn"])
    assert version["CustomerMetadataProperties"]["training_job"] == "sdxl-lora-gridsearch-run-lr-0-001"
    assert json.loads(written[version["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]])["val_loss"] == 0.3
