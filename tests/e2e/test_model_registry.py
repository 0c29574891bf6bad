"""The model registry on the local stack: groups, versions, approval, an endpoint served from a version, and the
endpoint following the group's latest Approved version (the registry watch's choice, the deployment from the
package, a rollback), through the plugin functions the DAGs' tasks call."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError
from conftest import BUCKET, ROLE, training_request, wait_for_endpoint, wait_for_training

from sdxl_lora import deploy, registry_versions, serving
from sdxl_lora.settings import Settings
from sdxl_lora_ops import approve

INFERENCE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdxl-lora-inference:latest"
GROUP = "e2e-registry"
ARN_PREFIX = "arn:aws:sagemaker:us-east-1:123456789012:model-package/e2e-registry/"


def _error(call, **kwargs) -> dict:
    with pytest.raises(ClientError) as raised:
        call(**kwargs)
    return raised.value.response["Error"]


@pytest.fixture(scope="module")
def artifacts(sagemaker, staged) -> str:
    sagemaker.create_training_job(**training_request("e2e-registry-train", staged))
    job = wait_for_training(sagemaker, "e2e-registry-train")
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    return job["ModelArtifacts"]["S3ModelArtifacts"]


def _version(sagemaker, artifacts: str, staged: dict, approval: str, **extra) -> str:
    extra = {"ModelPackageDescription": "a tiny LoRA", **extra}
    return sagemaker.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus=approval,
        InferenceSpecification={"Containers": [{"Image": INFERENCE_IMAGE, "ModelDataUrl": artifacts,
                                                "Environment": {"BASE_MODEL": staged["base"]}}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]},
        **extra)["ModelPackageArn"]


@pytest.fixture(scope="module")
def versions(sagemaker, s3, artifacts, staged) -> list[str]:
    """Three versions of one group: Approved with metrics and lineage, Rejected, PendingManualApproval."""
    sagemaker.create_model_package_group(ModelPackageGroupName=GROUP, ModelPackageGroupDescription="e2e")
    s3.put_object(Bucket=BUCKET, Key="registry/metrics.json", Body=json.dumps({"val_loss": 0.1}).encode())
    metrics = {"ModelQuality": {"Statistics": {"ContentType": "application/json",
                                               "S3Uri": f"s3://{BUCKET}/registry/metrics.json"}}}
    return [_version(sagemaker, artifacts, staged, "Approved", ModelMetrics=metrics,
                     CustomerMetadataProperties={"training_job": "e2e-registry-train", "dataset": "s3://b/v1/"}),
            _version(sagemaker, artifacts, staged, "Rejected"),
            _version(sagemaker, artifacts, staged, "PendingManualApproval")]


def test_versions_are_numbered_in_their_group(sagemaker, versions):
    assert versions == [f"{ARN_PREFIX}{n}" for n in (1, 2, 3)]
    described = sagemaker.describe_model_package(ModelPackageName=versions[0])
    assert (described["ModelPackageGroupName"], described["ModelPackageVersion"]) == (GROUP, 1)
    assert described["ModelPackageStatus"] == "Completed" and described["ModelApprovalStatus"] == "Approved"
    assert described["CustomerMetadataProperties"]["training_job"] == "e2e-registry-train"
    assert described["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"].endswith("registry/metrics.json")
    assert described["InferenceSpecification"]["Containers"][0]["Image"] == INFERENCE_IMAGE
    assert described["CreationTime"]
    group = sagemaker.describe_model_package_group(ModelPackageGroupName=GROUP)
    assert group["ModelPackageGroupStatus"] == "Completed"
    assert group["ModelPackageGroupArn"].endswith(":model-package-group/e2e-registry")
    names = [g["ModelPackageGroupName"] for g in
             sagemaker.list_model_package_groups(NameContains="registry")["ModelPackageGroupSummaryList"]]
    assert names == [GROUP]


def test_listing_filters_sorts_and_pages(sagemaker, versions):
    listed = sagemaker.list_model_packages(ModelPackageGroupName=GROUP)["ModelPackageSummaryList"]
    assert [p["ModelPackageArn"] for p in listed] == versions  # CreationTime, Ascending by default
    newest = sagemaker.list_model_packages(ModelPackageGroupName=GROUP, SortBy="CreationTime",
                                           SortOrder="Descending", MaxResults=1)
    assert [p["ModelPackageVersion"] for p in newest["ModelPackageSummaryList"]] == [3]
    rest = sagemaker.list_model_packages(ModelPackageGroupName=GROUP, SortOrder="Descending",
                                         NextToken=newest["NextToken"])
    assert [p["ModelPackageVersion"] for p in rest["ModelPackageSummaryList"]] == [2, 1]
    assert "NextToken" not in rest
    approved = sagemaker.list_model_packages(ModelPackageGroupName=GROUP, ModelApprovalStatus="Approved")
    assert [p["ModelPackageArn"] for p in approved["ModelPackageSummaryList"]] == versions[:1]
    paginated = sagemaker.get_paginator("list_model_packages").paginate(
        ModelPackageGroupName=GROUP, PaginationConfig={"PageSize": 2})
    assert [p["ModelPackageVersion"] for page in paginated for p in page["ModelPackageSummaryList"]] == [1, 2, 3]


def test_requests_are_checked_as_aws_does(sagemaker, versions, artifacts, staged):
    assert _error(sagemaker.create_model_package_group, ModelPackageGroupName=GROUP)["Message"].startswith(
        "Model Package Group already exists")  # what the Amazon provider's hook looks for
    missing = _error(sagemaker.create_model_package, ModelPackageGroupName="no-such-group",
                     InferenceSpecification={"Containers": [{"Image": INFERENCE_IMAGE}]})
    assert missing["Code"] == "ValidationException"
    assert "Model Package Group no-such-group does not exist" in missing["Message"]
    assert _error(sagemaker.create_model_package_group, ModelPackageGroupName="bad_name")["Code"] == \
        "ValidationException"
    for metadata in ({"k": "x" * 257}, {"k" * 129: "v"}, {"hyperparameters": '{"rank": 4}'},
                     {f"k{n}": "v" for n in range(51)}):
        error = _error(_version_call(sagemaker, artifacts, staged), CustomerMetadataProperties=metadata)
        assert error["Code"] == "ValidationException", metadata
    error = _error(_version_call(sagemaker, artifacts, staged), ModelPackageDescription="two\nlines")
    assert "modelPackageDescription" in error["Message"]
    error = _error(_version_call(sagemaker, artifacts, staged), ModelMetrics={"ModelQuality": {"Statistics": {
        "ContentType": "application/json", "S3Uri": "not-a-uri"}}})
    assert "s3Uri" in error["Message"]
    assert _error(sagemaker.describe_model_package, ModelPackageName=f"{ARN_PREFIX}9")["Code"] == \
        "ValidationException"
    assert _error(sagemaker.delete_model_package_group, ModelPackageGroupName=GROUP)["Code"] == "ConflictException"
    assert len(sagemaker.list_model_packages(ModelPackageGroupName=GROUP)["ModelPackageSummaryList"]) == 3


def _version_call(sagemaker, artifacts: str, staged: dict):
    def call(**extra):
        return _version(sagemaker, artifacts, staged, "Approved", **extra)
    return call


def test_approval_changes_either_way(sagemaker, versions):
    rejected = versions[1]
    sagemaker.update_model_package(ModelPackageArn=rejected, ModelApprovalStatus="Approved",
                                   ApprovalDescription="reviewed")
    described = sagemaker.describe_model_package(ModelPackageName=rejected)
    assert (described["ModelApprovalStatus"], described["ApprovalDescription"]) == ("Approved", "reviewed")
    sagemaker.update_model_package(ModelPackageArn=rejected, ModelApprovalStatus="Rejected")
    assert sagemaker.describe_model_package(ModelPackageName=rejected)["ModelApprovalStatus"] == "Rejected"


def test_an_endpoint_serves_an_approved_version(stack, sagemaker, versions):
    pending = _error(sagemaker.create_model, ModelName="e2e-registry-pending", ExecutionRoleArn=ROLE,
                     PrimaryContainer={"ModelPackageName": versions[2]})
    assert "not approved" in pending["Message"]
    sagemaker.create_model(ModelName="e2e-registry-model", ExecutionRoleArn=ROLE,
                           Containers=[{"ModelPackageName": versions[0]}])
    assert sagemaker.describe_model(ModelName="e2e-registry-model")["PrimaryContainer"]["ModelPackageName"] == \
        versions[0]
    sagemaker.create_endpoint_config(EndpointConfigName="e2e-registry-config", ProductionVariants=[
        {"VariantName": "lora", "ModelName": "e2e-registry-model", "InitialInstanceCount": 1,
         "InstanceType": "ml.g5.2xlarge"}])
    sagemaker.create_endpoint(EndpointName="e2e-registry-endpoint", EndpointConfigName="e2e-registry-config")
    try:
        described = wait_for_endpoint(sagemaker, "e2e-registry-endpoint")
        assert described["EndpointStatus"] == "InService", described.get("FailureReason")
        assert described["ProductionVariants"][0]["DeployedImages"][0]["SpecifiedImage"] == INFERENCE_IMAGE
        response = stack.client("sagemaker-runtime").invoke_endpoint(
            EndpointName="e2e-registry-endpoint", ContentType="application/json", Accept="application/json",
            Body=json.dumps({"prompt": "a red circle", "width": 32, "height": 32, "num_inference_steps": 2,
                             "seed": 1}))
        body = json.loads(response["Body"].read())
        assert len(body["images"]) == 1
        assert body["adapter"] == "default", body["adapter"]  # the version's model data: its trained LoRA
    finally:
        sagemaker.delete_endpoint(EndpointName="e2e-registry-endpoint")


def _deploy_version(stack, sagemaker, endpoint: str, version: dict, run_id: str) -> dict:
    """What sdxl_lora_deploy's tasks do with a chosen version (plan, model, config, endpoint, smoke test, traffic,
    serving record, a rollback's rejection), by the same plugin functions; the serving record."""
    settings = Settings(bucket=BUCKET, role_arn=ROLE, inference_image=INFERENCE_IMAGE)
    current = deploy.current_deployment(sagemaker, endpoint)
    plan = deploy.plan_deployment(settings, registry_versions.container(version)["ModelDataUrl"], endpoint, run_id,
                                  current, package={"arn": version["ModelPackageArn"],
                                                    "rollback_from": version["rollback_from"]})
    sagemaker.create_model(**plan["model"])
    sagemaker.create_endpoint_config(**plan["endpoint_config"])
    (sagemaker.create_endpoint if current is None else sagemaker.update_endpoint)(**plan["endpoint"]["Endpoint"])
    described = wait_for_endpoint(sagemaker, endpoint)
    assert described["EndpointStatus"] == "InService", described.get("FailureReason")
    response = stack.client("sagemaker-runtime").invoke_endpoint(
        EndpointName=endpoint, ContentType="application/json", Accept="application/json",
        TargetVariant=plan["candidate"], Body=json.dumps({"prompt": "a red circle", "width": 32, "height": 32,
                                                          "num_inference_steps": 2, "seed": 1}))
    deploy.check_image(endpoint, response)
    weights = deploy.set_weights(sagemaker, endpoint, plan["weights"], 0.2)
    registry_versions.reject_replaced(sagemaker, plan["package"], endpoint)
    model = sagemaker.describe_model(ModelName=plan["model"]["ModelName"])
    assert model["PrimaryContainer"] == {"ModelPackageName": version["ModelPackageArn"]}  # exactly that version
    return serving.record(endpoint, plan, weights)


def test_approving_a_version_deploys_it_once_and_a_rollback_goes_back(stack, sagemaker, versions):
    """v1 Approved, v2 Rejected, v3 PendingManualApproval (the module's versions)."""
    endpoint = "e2e-registry-follow"
    assert registry_versions.watch(sagemaker, None, endpoint, GROUP)["conf"]["model_package_arn"] == versions[0]
    described = approve.approve(sagemaker, versions[2], description="reviewed")
    assert (described["ModelApprovalStatus"], described["ApprovalDescription"]) == ("Approved", "reviewed")
    decision = registry_versions.watch(sagemaker, None, endpoint, GROUP)
    assert decision["deploy"] and decision["conf"]["model_package_arn"] == versions[2]
    chosen = registry_versions.choose(sagemaker, registry_versions.source(**{
        k: v for k, v in decision["conf"].items() if k != "endpoint_name"}), None)
    try:
        record = _deploy_version(stack, sagemaker, endpoint, chosen, "registry-run-1")
        assert record["model_package_arn"] == versions[2]
        assert not registry_versions.watch(sagemaker, record, endpoint, GROUP)["deploy"]  # serving: not again
        # A rejected version is never deployed: named by ARN it is refused, and the watch does not choose it.
        with pytest.raises(registry_versions.NotDeployable, match="Rejected, not Approved"):
            registry_versions.choose(sagemaker, {"kind": "version", "value": versions[1]}, None)
        approve.approve(sagemaker, versions[1], reject=True)
        assert not registry_versions.watch(sagemaker, record, endpoint, GROUP)["deploy"]
        # Rollback: the Approved version before the serving one (v2 is Rejected), and v3 rejected after it serves.
        back = registry_versions.choose(sagemaker, registry_versions.source(rollback=True, default_group=GROUP),
                                        record["model_package_arn"])
        assert (back["ModelPackageArn"], back["rollback_from"]) == (versions[0], versions[2])
        record = _deploy_version(stack, sagemaker, endpoint, back, "registry-run-2")
        assert record["model_package_arn"] == versions[0]
        assert sagemaker.describe_model_package(ModelPackageName=versions[2])["ModelApprovalStatus"] == "Rejected"
        assert not registry_versions.watch(sagemaker, record, endpoint, GROUP)["deploy"]  # the rollback stays
    finally:
        sagemaker.delete_endpoint(EndpointName=endpoint)
