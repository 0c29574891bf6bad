"""Which model package version a deployment, the registry watch and a rollback choose (sdxl_lora.registry_versions),
against the local stack's registry in process; and a deployment planned from a version."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from test_registry import Client

from sdxl_lora import deploy, registry_versions, serving
from sdxl_lora.registry_versions import NotDeployable
from sdxl_lora.settings import Settings

GROUP = "sdxl-lora"
ARN = "arn:aws:sagemaker:us-east-1:123456789012:model-package/sdxl-lora/{}"


def artifacts(n: int) -> str:
    return f"s3://bucket/prefix/models/job-{n}/output/model.tar.gz"


@pytest.fixture
def client() -> Client:
    """Versions 1 Approved, 2 Rejected, 3 Approved, 4 PendingManualApproval; endpoints: the `endpoints` dict."""
    client = Client()
    client.endpoints = {}

    def describe_endpoint(EndpointName):
        if EndpointName not in client.endpoints:
            raise ClientError({"Error": {"Code": "ValidationException",
                                         "Message": f'Could not find endpoint "{EndpointName}".'}}, "DescribeEndpoint")
        return {"EndpointName": EndpointName, "EndpointStatus": client.endpoints[EndpointName]}

    client.describe_endpoint = describe_endpoint
    client.create_model_package_group(ModelPackageGroupName=GROUP)
    for n, status in enumerate(("Approved", "Rejected", "Approved", "PendingManualApproval"), 1):
        client.create_model_package(ModelPackageGroupName=GROUP, ModelApprovalStatus=status,
                                    InferenceSpecification={"Containers": [{"Image": "inference:1",
                                                                            "ModelDataUrl": artifacts(n)}]})
    return client


def test_a_deployment_names_exactly_one_source():
    assert registry_versions.source(artifacts(1)) == {"kind": "model_data_url", "value": artifacts(1)}
    assert registry_versions.source("", ARN.format(3)) == {"kind": "version", "value": ARN.format(3)}
    assert registry_versions.source(model_package_group=GROUP) == {"kind": "latest", "value": GROUP}
    assert registry_versions.source(rollback=True, default_group=GROUP) == {"kind": "rollback", "value": GROUP}
    assert registry_versions.source(model_package_group="other", rollback=True, default_group=GROUP)["value"] == \
        "other"
    for bad in ({}, {"model_data_url": artifacts(1), "model_package_arn": ARN.format(1)},
                {"model_package_arn": "arn:aws:sagemaker:us-east-1:123456789012:model/x"},
                {"model_package_arn": ARN.format(1), "rollback": True, "default_group": GROUP},
                {"rollback": True}):
        with pytest.raises(NotDeployable):
            registry_versions.source(**bad)


def test_only_approved_versions_are_chosen(client):
    assert [v["ModelPackageVersion"] for v in registry_versions.approved_versions(client, GROUP)] == [1, 3]
    latest = registry_versions.choose(client, {"kind": "latest", "value": GROUP}, None)
    assert (latest["ModelPackageArn"], latest["rollback_from"]) == (ARN.format(3), None)
    for refused, status in ((2, "Rejected"), (4, "PendingManualApproval")):
        with pytest.raises(NotDeployable, match=f"{status}, not Approved"):
            registry_versions.choose(client, {"kind": "version", "value": ARN.format(refused)}, None)
    with pytest.raises(NotDeployable, match="does not exist"):
        registry_versions.choose(client, {"kind": "version", "value": ARN.format(9)}, None)


def test_a_rollback_goes_to_the_approved_version_before_the_serving_one(client):
    back = registry_versions.choose(client, {"kind": "rollback", "value": GROUP}, ARN.format(3))
    assert (back["ModelPackageArn"], back["rollback_from"]) == (ARN.format(1), ARN.format(3))  # 2 is Rejected
    with pytest.raises(NotDeployable, match="nothing to roll back to"):
        registry_versions.choose(client, {"kind": "rollback", "value": GROUP}, ARN.format(1))
    with pytest.raises(NotDeployable, match="nothing from group"):
        registry_versions.choose(client, {"kind": "rollback", "value": GROUP}, None)


def test_the_watch_deploys_the_latest_approved_version_once(client):
    nothing = registry_versions.watch(client, None, "ep", GROUP)
    assert nothing["deploy"] and nothing["conf"]["model_package_arn"] == ARN.format(3)
    assert nothing["conf"]["endpoint_name"] == "ep" and nothing["run_id"].startswith("registry__ep__sdxl-lora-v3__")
    assert not registry_versions.watch(client, {"model_package_arn": ARN.format(3)}, "ep", GROUP)["deploy"]
    # a training run deployed the version's model data directly: it serves already
    assert not registry_versions.watch(client, {"model_data_url": artifacts(3)}, "ep", GROUP)["deploy"]
    assert registry_versions.watch(client, {"model_package_arn": ARN.format(1)}, "ep", GROUP)["deploy"]
    # the same approval: the same run id, so a second trigger is skipped
    assert registry_versions.watch(client, None, "ep", GROUP)["run_id"] == nothing["run_id"]


def test_the_watch_waits_while_the_endpoint_changes(client):
    client.endpoints["ep"] = "Updating"  # a deployment under way, perhaps of the run that registered the version
    decision = registry_versions.watch(client, None, "ep", GROUP)
    assert not decision["deploy"] and "Updating" in decision["reason"]
    client.endpoints["ep"] = "InService"
    assert registry_versions.watch(client, None, "ep", GROUP)["deploy"]


def test_the_watch_never_deploys_a_rejected_or_pending_version_and_follows_a_rejection(client):
    client.update_model_package(ModelPackageArn=ARN.format(3), ModelApprovalStatus="Rejected")
    decision = registry_versions.watch(client, {"model_package_arn": ARN.format(3)}, "ep", GROUP)
    assert decision["deploy"] and decision["conf"]["model_package_arn"] == ARN.format(1)
    client.update_model_package(ModelPackageArn=ARN.format(1), ModelApprovalStatus="Rejected")
    decision = registry_versions.watch(client, {"model_package_arn": ARN.format(3)}, "ep", GROUP)
    assert not decision["deploy"] and "no Approved version" in decision["reason"]


def test_a_deployment_from_a_version_makes_its_model_from_the_package_and_records_it():
    package = {"arn": ARN.format(3), "rollback_from": ARN.format(4)}
    plan = deploy.plan_deployment(Settings(), artifacts(3), "ep", "run-1", None, package=package)
    assert plan["model"]["PrimaryContainer"] == {"ModelPackageName": ARN.format(3)}
    assert plan["model"]["ExecutionRoleArn"] == Settings().role_arn
    other = deploy.plan_deployment(Settings(), artifacts(3), "ep", "run-1", None,
                                   package={"arn": ARN.format(5), "rollback_from": None})
    assert other["model"]["ModelName"] != plan["model"]["ModelName"]  # one model per version
    record = serving.record("ep", plan, {plan["candidate"]: 1.0})
    assert (record["model_package_arn"], record["model_data_url"]) == (ARN.format(3), artifacts(3))
    assert serving.record("ep", deploy.plan_deployment(Settings(), artifacts(3), "ep", "run-1", None),
                          {})["model_package_arn"] is None


def test_a_served_rollback_rejects_the_version_it_replaced(client):
    assert registry_versions.reject_replaced(client, {"arn": ARN.format(3), "rollback_from": None}, "ep") is None
    assert registry_versions.reject_replaced(client, {"arn": ARN.format(1), "rollback_from": ARN.format(3)},
                                             "ep") == ARN.format(3)
    described = client.describe_model_package(ModelPackageName=ARN.format(3))
    assert described["ModelApprovalStatus"] == "Rejected"
    assert described["ApprovalDescription"] == f"rolled back on ep to {ARN.format(1)}"


class S3:
    """S3Hook's check_for_key and read_key over a dict of URIs."""

    def __init__(self, objects: dict[str, str]):
        self.objects = objects

    def check_for_key(self, uri: str) -> bool:
        return uri in self.objects

    def read_key(self, uri: str) -> str:
        return self.objects[uri]


def test_the_plan_reads_what_serves_and_the_versions_training_job_and_val_loss(client):
    import json

    settings = Settings(bucket="b", prefix="p")
    client.update_model_package(ModelPackageArn=ARN.format(1), CustomerMetadataProperties={"training_job": "job-1"})
    client.service.packages[GROUP][0]["ModelMetrics"] = {"ModelQuality": {"Statistics": {
        "ContentType": "application/json", "S3Uri": "s3://b/p/models/job-1/output/model_metrics.json"}}}
    s3 = S3({serving.record_uri(settings, "ep"): json.dumps({"model_package_arn": ARN.format(3)}),
             "s3://b/p/models/job-1/output/model_metrics.json": json.dumps({"val_loss": 0.125})})
    version, model_data_url, training = deploy.package_version(client, s3, settings, "ep",
                                                               {"kind": "rollback", "value": GROUP})
    assert (version["ModelPackageArn"], version["rollback_from"]) == (ARN.format(1), ARN.format(3))
    assert model_data_url == artifacts(1) and training == serving.training("job-1", 0.125)


def test_sdxl_lora_ops_approve_updates_the_approval():
    from sdxl_lora_ops import approve, cli

    args = cli.build_parser().parse_args(["approve", "--version-arn", ARN.format(2), "--reject",
                                          "--description", "blurry samples", "--aws"])
    assert (args.version_arn, args.reject, args.aws) == (ARN.format(2), True, True)
    assert approve.update_request(args.version_arn, args.reject, args.description) == {
        "ModelPackageArn": ARN.format(2), "ModelApprovalStatus": "Rejected", "ApprovalDescription": "blurry samples"}
    assert approve.update_request(ARN.format(2))["ModelApprovalStatus"] == "Approved"
