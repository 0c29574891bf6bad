"""What a run would deploy, registered: a version in the SageMaker model package group `model_package_group`.

Each version holds the inference container a deployment would run (image, model data, environment), its
metrics as a JSON document in S3 beside the model (ModelMetrics.ModelQuality.Statistics: val_loss, and the
serving adapter's score on the same held-out images when the run measured it), its lineage in
CustomerMetadataProperties (dataset version and manifest, training job, image URIs, DAG and run, one
`hp.<name>` entry per hyperparameter) and an approval status:

- approval `auto`: Approved when the run deploys it (the train DAG's deploy-if-better rule, the grid's and
  tuning's deploy_winner), else PendingManualApproval: a person may still approve it; Rejected is left to
  people, since "not deployed" also means "could not be compared" or "not asked to deploy".
- approval `manual`: PendingManualApproval, and nothing is deployed; approve it later (UpdateModelPackage).

Pure functions, plus `register`, which takes the boto3 SageMaker client and an S3 writer; the task is
sdxl_lora.deploy.register_model. A retried task finds the version its earlier try created (its description names
the training job and the run) instead of adding a second one.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Callable

from ml.contract.manifest import MANIFEST
from sdxl_lora.settings import Settings

APPROVALS = ("auto", "manual")
DISABLED = "none"  # setting model_package_group=none registers nothing
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
METRICS_FILE = "model_metrics.json"
MAX_ENTRIES, MAX_KEY, MAX_VALUE, MAX_DESCRIPTION = 50, 128, 256, 1024  # SageMaker's limits
METADATA_PUNCTUATION = set("_.:/=+-@")
# What a model package container keeps of the deployment's PrimaryContainer (the base model's channel with
# network isolation included).
PACKAGED = ("Image", "ModelDataUrl", "Environment", "AdditionalModelDataSources")
ALREADY_EXISTS = "Model Package Group already exists"  # the Amazon provider's hook tests for it the same way
log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """A registration that cannot be made as asked; the message says why."""


def group_name(settings: Settings) -> str | None:
    """The group versions go to; None when registration is off (setting model_package_group=none)."""
    name = settings.model_package_group.strip()
    if name.lower() == DISABLED:
        return None
    if not NAME_PATTERN.match(name):
        raise RegistryError(f"setting model_package_group {name!r}: a model package group name is 1 to 63 "
                            "letters, digits and hyphens, starting and ending with a letter or digit (none: off)")
    return name


def approval_status(approval: str, deploy: bool) -> str:
    """The version's ModelApprovalStatus: see the module's docstring."""
    if approval not in APPROVALS:
        raise RegistryError(f"approval must be one of {', '.join(APPROVALS)}, got {approval!r}")
    return "Approved" if approval == "auto" and deploy else "PendingManualApproval"


def metadata_text(value, limit: int) -> str:
    """value as CustomerMetadataProperties allows it: letters, digits, spaces and _.:/=+-@ (others become _;
    JSON quotes around a string hyperparameter are dropped), at most limit characters, never empty."""
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    text = "".join(c if unicodedata.category(c)[0] in "LZN" or c in METADATA_PUNCTUATION else "_" for c in text)
    return text[:limit] or "-"


def dataset_version(training: dict) -> str | None:
    """The processed dataset version a training job read: its train channel's `proc_dataset/<version>/`."""
    for channel in training.get("InputDataConfig", []):
        if channel.get("ChannelName") == "train":
            match = re.search(r"/proc_dataset/([^/]+)/?$", channel["DataSource"]["S3DataSource"]["S3Uri"])
            return match.group(1) if match else None
    return None


def lineage(training: dict, settings: Settings, dag_id: str, run_id: str) -> dict[str, str]:
    """Where the model comes from, from DescribeTrainingJob: the full record (the metrics document keeps it)."""
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in training.get("InputDataConfig", [])}
    version = dataset_version(training)
    return {
        "dag_id": dag_id, "run_id": run_id, "training_job": training["TrainingJobName"],
        "dataset_version": version or "", "dataset": channels.get("train", ""),
        "dataset_manifest": channels["train"].rstrip("/") + f"/{MANIFEST}" if "train" in channels else "",
        "training_image": training.get("AlgorithmSpecification", {}).get("TrainingImage", ""),
        "inference_image": settings.inference_image, "model_data_url": training["ModelArtifacts"]["S3ModelArtifacts"],
        "hyperparameters": dict(training.get("HyperParameters", {})),
    }


def customer_metadata(record: dict) -> dict[str, str]:
    """CustomerMetadataProperties within SageMaker's limits: the lineage's fields, then `hp.<name>` per
    hyperparameter while fewer than 50 entries (all of them are in the metrics document either way)."""
    fields = {key: metadata_text(value, MAX_VALUE) for key, value in record.items()
              if key != "hyperparameters" and value not in ("", None)}
    for name, value in sorted(record.get("hyperparameters", {}).items()):
        if len(fields) >= MAX_ENTRIES:
            log.info("model package metadata: %d entries is SageMaker's limit; the remaining hyperparameters are in "
                     "the metrics document only", MAX_ENTRIES)
            break
        fields[metadata_text(f"hp.{name}", MAX_KEY)] = metadata_text(value, MAX_VALUE)
    return fields


def metrics_uri(model_data_url: str) -> str:
    """The metrics document's place: beside the model's model.tar.gz."""
    return model_data_url.rsplit("/", 1)[0] + f"/{METRICS_FILE}"


def metrics_document(val_loss: float | None, serving_val_loss: float | None, record: dict) -> dict:
    """ModelQuality statistics: the adapter's val_loss, the serving adapter's on the same images (None: not
    measured), and the full lineage."""
    return {"val_loss": val_loss, "serving_val_loss": serving_val_loss, "lineage": record}


def identity(record: dict) -> str:
    """The start of every version's description: which training job and run made it (a retry's key)."""
    return f"SDXL LoRA from {record['training_job']} of {record['dag_id']} {record['run_id']}"


def description(record: dict, val_loss: float | None, reason: str) -> str:
    """ModelPackageDescription: one line (SageMaker refuses control characters), at most 1024 characters."""
    loss = f"val_loss {val_loss:.6g}" if isinstance(val_loss, (int, float)) else "no val_loss"
    text = f"{identity(record)}; dataset version {record['dataset_version'] or '?'}, {loss}; {reason}"
    return " ".join(text.split())[:MAX_DESCRIPTION]


def package_request(group: str, container: dict, statistics_uri: str, metadata: dict[str, str], status: str,
                    text: str) -> dict:
    """CreateModelPackage for one version. container: the deployment's PrimaryContainer (Image, ModelDataUrl,
    Environment; sagemaker_requests.model_request), so a model made from the version serves what a direct
    deployment would."""
    return {
        "ModelPackageGroupName": group, "ModelPackageDescription": text, "ModelApprovalStatus": status,
        "InferenceSpecification": {
            "Containers": [{key: container[key] for key in PACKAGED if key in container}],
            "SupportedContentTypes": ["application/json"],
            "SupportedResponseMIMETypes": ["application/json", "image/png", "image/jpeg"],
        },
        "ModelMetrics": {"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": statistics_uri}}},
        "CustomerMetadataProperties": metadata,
    }


def ensure_group(client, group: str) -> None:
    """CreateModelPackageGroup unless it exists (the provider hook's test of the error, without its rollback)."""
    from botocore.exceptions import ClientError

    try:
        client.create_model_package_group(ModelPackageGroupName=group,
                                          ModelPackageGroupDescription="SDXL LoRA adapters (sdxl-lora DAGs)")
    except ClientError as error:
        if not error.response["Error"].get("Message", "").startswith(ALREADY_EXISTS):
            raise


def existing_version(client, group: str, head: str) -> dict | None:
    """The version an earlier try of this task registered (its description starts with head, the identity), if
    any: ListModelPackages summaries carry descriptions, so no version is described."""
    for page in client.get_paginator("list_model_packages").paginate(ModelPackageGroupName=group,
                                                                     SortOrder="Descending"):
        for summary in page["ModelPackageSummaryList"]:
            if summary.get("ModelPackageDescription", "").startswith(head + ";"):
                return summary
    return None


def register(client, write: Callable[[str, str], None], settings: Settings, training: dict, container: dict,
             serving_val_loss: float | None, val_loss: float | None, deploy: bool, reason: str, approval: str,
             dag_id: str, run_id: str) -> dict:
    """Register the model a training job made; what the deploy step reads back.

    :param client: boto3 SageMaker client.
    :param write: ``write(text, uri)`` stores the metrics document (selection.s3_writer).
    :param training: DescribeTrainingJob of the job that made the model.
    :param container: the deployment's PrimaryContainer.
    :param serving_val_loss: the serving adapter's score on the same held-out images; None: not measured.
    :param val_loss: the new adapter's val_loss.
    :param deploy: whether the run's rule would deploy it.
    :param reason: that rule's reason, kept in the description.
    :param approval: the run's approval Param, ``auto`` or ``manual``.
    :return: ``{package_arn, approval_status, deploy}``; package_arn None when registration is off. deploy is
        False under manual approval.
    """
    status = approval_status(approval, deploy)
    deploy = deploy and approval == "auto"
    group = group_name(settings)
    if group is None:
        log.info("setting model_package_group is none: nothing registered")
        return {"package_arn": None, "approval_status": None, "deploy": deploy}
    record = lineage(training, settings, dag_id, run_id)
    metadata = customer_metadata(record)
    ensure_group(client, group)
    found = existing_version(client, group, identity(record))
    if found is not None:
        log.info("model package %s: registered by an earlier try of this task", found["ModelPackageArn"])
        return {"package_arn": found["ModelPackageArn"], "approval_status": found["ModelApprovalStatus"],
                "deploy": deploy}
    statistics = metrics_uri(record["model_data_url"])
    write(json.dumps(metrics_document(val_loss, serving_val_loss, record), indent=2), statistics)
    request = package_request(group, container, statistics, metadata, status, description(record, val_loss, reason))
    arn = client.create_model_package(**request)["ModelPackageArn"]
    log.info("registered %s (%s) from %s; metrics at %s", arn, status, record["training_job"], statistics)
    return {"package_arn": arn, "approval_status": status, "deploy": deploy}
