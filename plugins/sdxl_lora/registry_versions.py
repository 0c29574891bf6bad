"""Which model package version to deploy: from the registry to the endpoint.

The endpoint follows its group's latest Approved version. `sdxl_lora_deploy` deploys a version named by ARN, the
group's latest Approved one, or, on a rollback, the Approved version before the one serving (the serving record
names it); `sdxl_lora_registry_watch` compares the latest Approved version with the serving record and triggers
that deployment when they differ (watch_decision). Only Approved versions are ever chosen: a Rejected or
PendingManualApproval one is refused by name (NotDeployable), as CreateModel would refuse it.

Pure functions over ListModelPackages summaries and DescribeModelPackage answers, plus thin calls on the boto3
SageMaker client (approved_versions, describe_version); the tasks are in sdxl_lora.deploy and the watch DAG.
"""

from __future__ import annotations

import logging
import re

from sdxl_lora.registry import RegistryError

APPROVED = "Approved"
VERSION_ARN = re.compile(r"^arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:[0-9]{12}:model-package/"
                         r"([a-zA-Z0-9](?:-*[a-zA-Z0-9]){0,62})/([0-9]{1,9})$")
log = logging.getLogger(__name__)


class NotDeployable(RegistryError):
    """A version that must not be deployed (not Approved, not a version, none to roll back to); the message says why."""


def parse_arn(arn: str) -> tuple[str, int]:
    """(group, version) of a model package version's ARN."""
    match = VERSION_ARN.match((arn or "").strip())
    if match is None:
        raise NotDeployable(f"{arn!r} is not a model package version ARN "
                            "(arn:aws:sagemaker:REGION:ACCOUNT:model-package/GROUP/VERSION)")
    return match.group(1), int(match.group(2))


def source(model_data_url: str = "", model_package_arn: str = "", model_package_group: str = "",
           rollback: bool = False, default_group: str | None = None) -> dict:
    """What a sdxl_lora_deploy run deploys, from its Params: ``{kind, value}`` with kind ``model_data_url`` (a
    model.tar.gz), ``version`` (an ARN), ``latest`` (a group's latest Approved) or ``rollback`` (a group's Approved
    version before the serving one). Exactly one of the three sources; rollback takes a group (default_group, the
    setting, when none is given) and nothing else."""
    given = {name: value.strip() for name, value in (("model_data_url", model_data_url or ""),
                                                     ("model_package_arn", model_package_arn or ""),
                                                     ("model_package_group", model_package_group or "")) if value.strip()}
    if rollback:
        if set(given) - {"model_package_group"}:
            raise NotDeployable(f"rollback deploys the group's Approved version before the serving one: give "
                                f"model_package_group (or none: the setting's), not {', '.join(sorted(given))}")
        group = given.get("model_package_group") or default_group
        if not group:
            raise NotDeployable("rollback needs a model package group: give model_package_group (the setting "
                                "model_package_group is none)")
        return {"kind": "rollback", "value": group}
    if len(given) != 1:
        raise NotDeployable("give exactly one of model_data_url (a model.tar.gz), model_package_arn (a version) and "
                            "model_package_group (its latest Approved version)"
                            + (f"; got {', '.join(sorted(given))}" if given else "; got none"))
    name, value = next(iter(given.items()))
    if name == "model_package_arn":
        parse_arn(value)
    return {"kind": {"model_data_url": "model_data_url", "model_package_arn": "version",
                     "model_package_group": "latest"}[name], "value": value}


def approved_versions(client, group: str) -> list[dict]:
    """The group's Approved versions (ListModelPackages summaries), oldest first."""
    found = [summary for page in client.get_paginator("list_model_packages").paginate(
        ModelPackageGroupName=group, ModelApprovalStatus=APPROVED, SortBy="CreationTime", SortOrder="Ascending")
        for summary in page["ModelPackageSummaryList"]]
    return sorted(found, key=lambda summary: summary["ModelPackageVersion"])


def latest(approved: list[dict]) -> dict | None:
    """The newest of the Approved summaries (by version number); None when there is none."""
    return max(approved, key=lambda summary: summary["ModelPackageVersion"], default=None)


def previous(approved: list[dict], serving_arn: str | None, group: str) -> dict:
    """The Approved version before the serving one (by version number): what a rollback deploys. The serving
    version need not be Approved any more (it may have been rejected since)."""
    if not serving_arn:
        raise NotDeployable(f"nothing from group {group} is recorded as serving on the endpoint: no version to roll "
                            "back from (deploy one by model_package_arn)")
    serving_group, serving_version = parse_arn(serving_arn)
    if serving_group.lower() != group.lower():
        raise NotDeployable(f"the endpoint serves {serving_arn}, of another group than {group}")
    before = [summary for summary in approved if summary["ModelPackageVersion"] < serving_version]
    if not before:
        raise NotDeployable(f"group {group} has no Approved version before the serving {serving_arn}: nothing to "
                            "roll back to")
    return before[-1]


def check_approved(described: dict) -> dict:
    """DescribeModelPackage's answer when the version is Approved; else NotDeployable naming its status."""
    status = described.get("ModelApprovalStatus")
    if status != APPROVED:
        raise NotDeployable(f"model package {described['ModelPackageArn']} is {status}, not Approved: it is not "
                            "deployed (approve it first: sdxl-lora-ops approve --version-arn ARN)")
    return described


def container(described: dict) -> dict:
    """The version's inference container (its first, the one the DAGs register)."""
    return described["InferenceSpecification"]["Containers"][0]


def describe_version(client, arn: str) -> dict:
    """DescribeModelPackage; a version that does not exist is NotDeployable."""
    from botocore.exceptions import ClientError

    try:
        return client.describe_model_package(ModelPackageName=arn)
    except ClientError as error:
        if error.response["Error"]["Code"] == "ValidationException":
            raise NotDeployable(f"model package {arn}: {error.response['Error'].get('Message', '')}") from None
        raise


def choose(client, chosen: dict, serving_arn: str | None) -> dict:
    """The Approved version (DescribeModelPackage) a deployment source (``source``) names, and on a rollback the
    serving version it replaces as ``rollback_from``."""
    kind, value = chosen["kind"], chosen["value"]
    if kind == "version":
        return {**check_approved(describe_version(client, value)), "rollback_from": None}
    approved = approved_versions(client, value)
    if kind == "rollback":
        return {**check_approved(describe_version(client, previous(approved, serving_arn, value)["ModelPackageArn"])),
                "rollback_from": serving_arn}
    newest = latest(approved)
    if newest is None:
        raise NotDeployable(f"group {value} has no Approved version to deploy")
    return {**check_approved(describe_version(client, newest["ModelPackageArn"])), "rollback_from": None}


def reject_replaced(client, package: dict | None, endpoint: str) -> str | None:
    """After a rollback has served (package: plan_deployment's ``{arn, rollback_from}``): the version rolled back
    from becomes Rejected, so that the registry watch, which follows the latest Approved version, leaves the
    rollback in place. Its ARN, or None when the deployment was no rollback."""
    replaced = (package or {}).get("rollback_from")
    if not replaced:
        return None
    client.update_model_package(ModelPackageArn=replaced, ModelApprovalStatus="Rejected",
                                ApprovalDescription=f"rolled back on {endpoint} to {package['arn']}")
    log.info("rolled back on %s from %s (now Rejected) to %s", endpoint, replaced, package["arn"])
    return replaced


def trigger_run_id(endpoint: str, described: dict) -> str:
    """The sdxl_lora_deploy run id for one approval of a version on an endpoint: the same on every watch run
    (a second trigger is skipped while or after it runs), a new one when the version is approved again."""
    changed = described.get("LastModifiedTime") or described.get("CreationTime")
    stamp = changed.strftime("%Y%m%dT%H%M%S") if hasattr(changed, "strftime") else str(changed)
    group, version = parse_arn(described["ModelPackageArn"])
    return re.sub(r"[^A-Za-z0-9_.:+-]", "-", f"registry__{endpoint}__{group}-v{version}__{stamp}")


def watch_decision(newest: dict | None, serving: dict | None, endpoint: str, group: str) -> dict:
    """Whether the watch deploys: ``{deploy, reason, run_id, conf}``. newest: DescribeModelPackage of the group's
    latest Approved version, or None; serving: the endpoint's serving record, or None. It deploys when the latest
    Approved version is not what serves: a newer one was approved, or the serving one was rejected (then the
    latest Approved before it comes back). A version already serving, or whose model data serves (deployed by a
    training run before it was registered as serving), is not deployed again."""
    if newest is None:
        return {"deploy": False, "reason": f"group {group} has no Approved version", "run_id": None, "conf": None}
    arn = newest["ModelPackageArn"]
    serving = serving or {}
    if serving.get("model_package_arn") == arn:
        return {"deploy": False, "reason": f"{arn} already serves on {endpoint}", "run_id": None, "conf": None}
    if not serving.get("model_package_arn") and serving.get("model_data_url") == container(newest).get("ModelDataUrl"):
        return {"deploy": False, "reason": f"{endpoint} already serves the model data of {arn} "
                                           f"({serving['model_data_url']})", "run_id": None, "conf": None}
    was = serving.get("model_package_arn") or serving.get("model_data_url") or "nothing recorded"
    return {"deploy": True, "reason": f"{arn} is the latest Approved version of {group}; {endpoint} serves {was}",
            "run_id": trigger_run_id(endpoint, newest),
            "conf": {"model_package_arn": arn, "model_data_url": "", "model_package_group": "", "rollback": False,
                     "endpoint_name": endpoint}}


def watch(client, serving: dict | None, endpoint: str, group: str) -> dict:
    """One look of the registry watch: the group's latest Approved version against the endpoint's serving record
    (watch_decision); none while the endpoint changes (a deployment under way, perhaps the one of the training run
    that registered the version: its serving record comes when it is done)."""
    from sdxl_lora.missing import describe_or_none
    from sdxl_lora.operators.endpoints import CHANGING

    described_endpoint = describe_or_none(client.describe_endpoint, EndpointName=endpoint)
    if described_endpoint and described_endpoint["EndpointStatus"] in CHANGING:
        return {"deploy": False, "reason": f"endpoint {endpoint} is {described_endpoint['EndpointStatus']}: a change "
                                           "is under way, the next look decides", "run_id": None, "conf": None}
    newest = latest(approved_versions(client, group))
    described = describe_version(client, newest["ModelPackageArn"]) if newest else None
    return watch_decision(described, serving, endpoint, group)
