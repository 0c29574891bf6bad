"""The model registry: model package groups and the versioned model packages in them.

A version is what CreateModelPackage makes in a group (version 1, 2, ... in order of creation), with its
inference containers, metrics, customer metadata and approval status. CreateModel names one by its ARN
(ModelPackageName) and then serves its container: `serving_container` resolves that, and refuses a version
that is not Approved, as SageMaker does. Only versioned packages are kept (the DAGs make no other kind), so
ListModelPackages without a group lists them only when asked for ModelPackageType Versioned or Both (its
default is Unversioned).
"""

from __future__ import annotations

import re
import threading
import time
import unicodedata

from local_stack.aws import ACCOUNT, REGION
from local_stack.errors import ApiError, check_name, require, validation

APPROVAL_STATUSES = ("Approved", "Rejected", "PendingManualApproval")
ARN_OR_NAME = re.compile(r"^(arn:aws[a-z\-]*:sagemaker:[a-z0-9\-]*:[0-9]{12}:[a-z\-]*/)?"
                         r"([a-zA-Z0-9]([a-zA-Z0-9-]){0,62})(?<!-)$")
PACKAGE_ARN = re.compile(r"^arn:aws[a-z\-]*:sagemaker:[a-z0-9\-]*:[0-9]{12}:model-package/"
                         r"([a-zA-Z0-9](?:-*[a-zA-Z0-9]){0,62})/([0-9]{1,9})$")
URL = re.compile(r"^(https|s3)://([^/]+)/?(.*)$")
METADATA_PUNCTUATION = set("_.:/=+-@")
METRIC_KINDS = {"ModelQuality": ("Statistics", "Constraints"),
                "ModelDataQuality": ("Statistics", "Constraints"),
                "Bias": ("Report", "PreTrainingReport", "PostTrainingReport"),
                "Explainability": ("Report",)}
MAX_RESULTS = 100


def group_arn(name: str) -> str:
    return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package-group/{name.lower()}"


def package_arn(group: str, version: int) -> str:
    return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{group.lower()}/{version}"


def _constraint(value, field: str, constraint: str) -> ApiError:
    return validation(f"1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: "
                      f"Member must {constraint}")


def _check_enum(value, field: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _constraint(value, field, f"satisfy enum value set: [{', '.join(allowed)}]")


def _check_description(value, field: str, limit: int = 1024) -> None:
    """EntityDescription: letters, marks, separators, symbols, numbers and punctuation (no control characters,
    so no newlines), at most 1024."""
    if not isinstance(value, str) or len(value) > limit:
        raise _constraint(value, field, f"have length less than or equal to {limit}")
    if any(unicodedata.category(c)[0] not in "LMZSNP" for c in value):
        raise _constraint(value, field, r"satisfy regular expression pattern: [\p{L}\p{M}\p{Z}\p{S}\p{N}\p{P}]*")


def _metadata_text(text: str) -> bool:
    """CustomerMetadataKey/Value's pattern: [\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*."""
    return all(unicodedata.category(c)[0] in "LZN" or c in METADATA_PUNCTUATION for c in text)


def check_customer_metadata(properties) -> None:
    if not isinstance(properties, dict) or not 1 <= len(properties) <= 50:
        raise _constraint(properties, "customerMetadataProperties", "have length between 1 and 50")
    for key, value in properties.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 128 or not _metadata_text(key):
            raise _constraint(key, "customerMetadataProperties", "have keys of length between 1 and 128 satisfying "
                              r"regular expression pattern: ([\p{L}\p{Z}\p{N}_.:\/=+\-@]*)${1,128}")
        if not isinstance(value, str) or not 1 <= len(value) <= 256 or not _metadata_text(value):
            raise _constraint(value, f"customerMetadataProperties.{key}", "have length between 1 and 256 and "
                              r"satisfy regular expression pattern: ([\p{L}\p{Z}\p{N}_.:\/=+\-@]*)${1,256}")


def _check_url(value, field: str) -> None:
    if not isinstance(value, str) or len(value) > 1024 or not URL.match(value):
        raise _constraint(value, field, "satisfy regular expression pattern: (https|s3)://([^/]+)/?(.*)")


def _check_inference(spec) -> None:
    if not isinstance(spec, dict):
        raise validation("1 validation error detected: Value null at 'inferenceSpecification' failed to satisfy "
                         "constraint: Member must not be null")
    containers = spec.get("Containers")
    if not isinstance(containers, list) or not 1 <= len(containers) <= 15:
        raise _constraint(containers, "inferenceSpecification.containers", "have length between 1 and 15")
    for index, container in enumerate(containers, 1):
        field = f"inferenceSpecification.containers.{index}.member"
        image = container.get("Image") if isinstance(container, dict) else None
        if not isinstance(image, str) or not image or len(image) > 255 or re.search(r"\s", image):
            raise _constraint(image, f"{field}.image", r"satisfy regular expression pattern: [\S]+ and have "
                              "length between 1 and 255")
        if "ModelDataUrl" in container:
            _check_url(container["ModelDataUrl"], f"{field}.modelDataUrl")
        environment = container.get("Environment", {})
        if not isinstance(environment, dict) or len(environment) > 100 or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in environment.items()):
            raise _constraint(environment, f"{field}.environment", "be a map of at most 100 strings to strings")
    for key in ("SupportedContentTypes", "SupportedResponseMIMETypes"):
        values = spec.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and len(v) <= 256 for v in values):
            raise _constraint(values, f"inferenceSpecification.{key[0].lower() + key[1:]}",
                              "be a list of strings of length at most 256")


def _check_metrics(metrics) -> None:
    if not isinstance(metrics, dict):
        raise _constraint(metrics, "modelMetrics", "be a structure")
    for kind, reports in metrics.items():
        if kind not in METRIC_KINDS or not isinstance(reports, dict):
            raise validation(f"Unknown parameter in ModelMetrics: {kind!r}, must be one of: "
                             f"{', '.join(METRIC_KINDS)}")
        for report, source in reports.items():
            if report not in METRIC_KINDS[kind]:
                raise validation(f"Unknown parameter in ModelMetrics.{kind}: {report!r}, must be one of: "
                                 f"{', '.join(METRIC_KINDS[kind])}")
            field = f"modelMetrics.{kind[0].lower() + kind[1:]}.{report[0].lower() + report[1:]}"
            require(source, "ContentType", "S3Uri")
            _check_url(source["S3Uri"], f"{field}.s3Uri")


def _page(items: list[dict], request: dict) -> tuple[list[dict], str | None]:
    """MaxResults/NextToken: the token is the offset of the next page."""
    limit = request.get("MaxResults", MAX_RESULTS)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RESULTS:
        raise _constraint(limit, "maxResults", f"have value between 1 and {MAX_RESULTS}")
    token = request.get("NextToken") or "0"
    if not token.isdigit():
        raise validation(f"Invalid pagination token: {token}")
    start = int(token)
    end = start + limit
    return items[start:end], (str(end) if end < len(items) else None)


def _sorted(items: list[dict], request: dict, name_key: str) -> list[dict]:
    sort_by, order = request.get("SortBy", "CreationTime"), request.get("SortOrder", "Ascending")
    _check_enum(sort_by, "sortBy", ("Name", "CreationTime"))
    _check_enum(order, "sortOrder", ("Ascending", "Descending"))
    key = (lambda item: item[name_key]) if sort_by == "Name" else (lambda item: (item["CreationTime"],
                                                                                 item.get("ModelPackageVersion", 0)))
    return sorted(items, key=key, reverse=order == "Descending")


class RegistryService:
    def __init__(self):
        self.groups: dict[str, dict] = {}
        self.packages: dict[str, list[dict]] = {}  # group name -> its versions, version 1 first
        self.lock = threading.RLock()

    # -- groups ----------------------------------------------------------------------------------

    def create_group(self, request: dict) -> dict:
        require(request, "ModelPackageGroupName")
        name = check_name(request["ModelPackageGroupName"], "modelPackageGroupName")
        description = request.get("ModelPackageGroupDescription", "")
        _check_description(description, "modelPackageGroupDescription")
        with self.lock:
            if name in self.groups:
                # The Amazon provider's hook tells "already exists" apart from other errors by this prefix.
                raise validation(f"Model Package Group already exists: {group_arn(name)}")
            self.groups[name] = {"ModelPackageGroupName": name, "ModelPackageGroupArn": group_arn(name),
                                 "ModelPackageGroupDescription": description, "CreationTime": time.time(),
                                 "CreatedBy": {}, "ModelPackageGroupStatus": "Completed"}
            self.packages[name] = []
        return {"ModelPackageGroupArn": group_arn(name)}

    def describe_group(self, request: dict) -> dict:
        require(request, "ModelPackageGroupName")
        with self.lock:
            return dict(self.groups[self._group_name(request["ModelPackageGroupName"])])

    def list_groups(self, request: dict) -> dict:
        contains = request.get("NameContains", "")
        with self.lock:
            found = [{k: v for k, v in group.items() if k != "CreatedBy"} for group in self.groups.values()
                     if contains in group["ModelPackageGroupName"]]
        page, token = _page(_sorted(found, request, "ModelPackageGroupName"), request)
        return {"ModelPackageGroupSummaryList": page, **({"NextToken": token} if token else {})}

    def delete_group(self, request: dict) -> dict:
        require(request, "ModelPackageGroupName")
        with self.lock:
            name = self._group_name(request["ModelPackageGroupName"])
            if self.packages[name]:
                raise ApiError("ConflictException", f"Model Package Group {group_arn(name)} cannot be deleted: it "
                               f"holds {len(self.packages[name])} model package version(s)")
            del self.groups[name], self.packages[name]
        return {}

    # -- versions --------------------------------------------------------------------------------

    def create_package(self, request: dict) -> dict:
        if "ModelPackageName" in request:
            raise validation("ModelPackageName is for unversioned model packages, which the local stack does not "
                             "keep: give ModelPackageGroupName")
        require(request, "ModelPackageGroupName")
        _check_inference(request.get("InferenceSpecification"))
        approval = request.get("ModelApprovalStatus", "PendingManualApproval")
        _check_enum(approval, "modelApprovalStatus", APPROVAL_STATUSES)
        if "ModelPackageDescription" in request:
            _check_description(request["ModelPackageDescription"], "modelPackageDescription")
        if "ModelMetrics" in request:
            _check_metrics(request["ModelMetrics"])
        if "CustomerMetadataProperties" in request:
            check_customer_metadata(request["CustomerMetadataProperties"])
        now = time.time()
        with self.lock:
            group = self._group_name(request["ModelPackageGroupName"])
            version = len(self.packages[group]) + 1
            package = {
                "ModelPackageName": group, "ModelPackageGroupName": group, "ModelPackageVersion": version,
                "ModelPackageArn": package_arn(group, version), "CreationTime": now,
                "ModelPackageRegistrationType": request.get("ModelPackageRegistrationType", "Registered"),
                "InferenceSpecification": request["InferenceSpecification"], "ModelPackageStatus": "Completed",
                "ModelPackageStatusDetails": {"ValidationStatuses": [], "ImageScanStatuses": []},
                "CertifyForMarketplace": bool(request.get("CertifyForMarketplace", False)),
                "ModelApprovalStatus": approval, "CreatedBy": {}, "LastModifiedTime": now,
                **{key: request[key] for key in ("ModelPackageDescription", "ModelMetrics", "MetadataProperties",
                                                 "CustomerMetadataProperties", "Domain", "Task",
                                                 "SamplePayloadUrl", "SourceUri") if key in request},
            }
            self.packages[group].append(package)
        return {"ModelPackageArn": package["ModelPackageArn"]}

    def describe_package(self, request: dict) -> dict:
        require(request, "ModelPackageName")
        with self.lock:
            return dict(self._package(request["ModelPackageName"]))

    def list_packages(self, request: dict) -> dict:
        approval = request.get("ModelApprovalStatus")
        if approval is not None:
            _check_enum(approval, "modelApprovalStatus", APPROVAL_STATUSES)
        kind = request.get("ModelPackageType", "Unversioned")
        _check_enum(kind, "modelPackageType", ("Versioned", "Unversioned", "Both"))
        contains = request.get("NameContains", "")
        with self.lock:
            if request.get("ModelPackageGroupName"):
                name = self._group_name(request["ModelPackageGroupName"], missing_ok=True)
                versions = list(self.packages.get(name, []))
            else:
                versions = [] if kind == "Unversioned" else [p for ps in self.packages.values() for p in ps]
            found = [{k: p[k] for k in ("ModelPackageName", "ModelPackageGroupName", "ModelPackageVersion",
                                        "ModelPackageArn", "ModelPackageDescription", "CreationTime",
                                        "ModelPackageStatus", "ModelApprovalStatus", "ModelPackageRegistrationType")
                      if k in p}
                     for p in versions if (approval is None or p["ModelApprovalStatus"] == approval)
                     and contains in p["ModelPackageName"]]
        page, token = _page(_sorted(found, request, "ModelPackageName"), request)
        return {"ModelPackageSummaryList": page, **({"NextToken": token} if token else {})}

    def update_package(self, request: dict) -> dict:
        """Approval changes (any to any: a Rejected version may be approved later, as on AWS) and customer
        metadata added or removed."""
        require(request, "ModelPackageArn")
        approval = request.get("ModelApprovalStatus")
        if approval is not None:
            _check_enum(approval, "modelApprovalStatus", APPROVAL_STATUSES)
        if "ApprovalDescription" in request:
            description = request["ApprovalDescription"]
            if not isinstance(description, str) or len(description) > 1024:
                raise _constraint(description, "approvalDescription", "have length less than or equal to 1024")
        if "CustomerMetadataProperties" in request:
            check_customer_metadata(request["CustomerMetadataProperties"])
        with self.lock:
            package = self._package(request["ModelPackageArn"], by_arn_only=True)
            if approval is not None:
                package["ModelApprovalStatus"] = approval
            if "ApprovalDescription" in request:
                package["ApprovalDescription"] = request["ApprovalDescription"]
            metadata = {**package.get("CustomerMetadataProperties", {}),
                        **request.get("CustomerMetadataProperties", {})}
            for key in request.get("CustomerMetadataPropertiesToRemove", []):
                metadata.pop(key, None)
            if metadata:
                check_customer_metadata(metadata)  # at most 50 after the merge
                package["CustomerMetadataProperties"] = metadata
            else:
                package.pop("CustomerMetadataProperties", None)
            package["LastModifiedTime"] = time.time()
            package["LastModifiedBy"] = {}
        return {"ModelPackageArn": package["ModelPackageArn"]}

    # -- serving ---------------------------------------------------------------------------------

    def serving_container(self, reference: str, overrides: dict) -> dict:
        """The container a model made from a package version runs: the version's first inference container,
        the Environment of CreateModel's container definition added over the package's."""
        with self.lock:
            package = self._package(reference)
            if package["ModelApprovalStatus"] != "Approved":
                raise validation(f"Model Package {package['ModelPackageArn']} is not approved for deployment "
                                 f"(ModelApprovalStatus {package['ModelApprovalStatus']}): approve it first "
                                 "(UpdateModelPackage)")
            container = dict(package["InferenceSpecification"]["Containers"][0])
        container["Environment"] = {**container.get("Environment", {}), **overrides.get("Environment", {})}
        return container

    # -- internals -------------------------------------------------------------------------------

    def _group_name(self, reference, missing_ok: bool = False) -> str:
        match = ARN_OR_NAME.match(reference) if isinstance(reference, str) else None
        if match is None:
            raise _constraint(reference, "modelPackageGroupName", "satisfy regular expression pattern: "
                              r"(arn:aws[a-z\-]*:sagemaker:[a-z0-9\-]*:[0-9]{12}:[a-z\-]*\/)?([a-zA-Z0-9]"
                              r"([a-zA-Z0-9-]){0,62})(?<!-)")
        name = match.group(2)
        if match.group(1):  # ARNs are lower case; the group keeps the case it was created with
            name = next((g for g in self.groups if g.lower() == name.lower()), name)
        if name not in self.groups and not missing_ok:
            raise validation(f"Model Package Group {name} does not exist.")
        return name

    def _package(self, reference, by_arn_only: bool = False) -> dict:
        """A version by its ARN, or (DescribeModelPackage) by `group/version`."""
        match = PACKAGE_ARN.match(reference) if isinstance(reference, str) else None
        if match is None and not by_arn_only and isinstance(reference, str):
            match = re.match(r"^([a-zA-Z0-9](?:-*[a-zA-Z0-9]){0,62})/([0-9]{1,9})$", reference)
        if match is None:
            raise validation(f"Model package {reference} does not exist: name a versioned model package by its "
                             "ARN (arn:aws:sagemaker:REGION:ACCOUNT:model-package/GROUP/VERSION)")
        group, version = match.group(1), int(match.group(2))
        name = next((g for g in self.groups if g.lower() == group.lower()), None)
        versions = self.packages.get(name, []) if name else []
        if not 1 <= version <= len(versions):
            raise validation(f"Model package {package_arn(group, version)} does not exist.")
        return versions[version - 1]
