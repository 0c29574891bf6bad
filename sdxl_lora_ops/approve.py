"""`sdxl-lora-ops approve`: approve (or reject) a model package version, as the SageMaker console and
`aws sagemaker update-model-package` do (UpdateModelPackage), against the running local stack or AWS
(sdxl_lora_ops/target.py).

An Approved version is what `sdxl_lora_registry_watch` deploys (the group's latest Approved one); rejecting the
version that serves makes the watch deploy the latest Approved one before it. Prints the version's status after.
"""

from __future__ import annotations

import sys

from sdxl_lora_ops import target as targets


def update_request(version_arn: str, reject: bool = False, description: str | None = None) -> dict:
    """UpdateModelPackage's request: Approved, or Rejected with reject; the description is kept as
    ApprovalDescription."""
    request = {"ModelPackageArn": version_arn, "ModelApprovalStatus": "Rejected" if reject else "Approved"}
    if description:
        request["ApprovalDescription"] = description
    return request


def approve(sagemaker, version_arn: str, reject: bool = False, description: str | None = None) -> dict:
    """Update the version's approval; DescribeModelPackage after it."""
    sagemaker.update_model_package(**update_request(version_arn, reject, description))
    return sagemaker.describe_model_package(ModelPackageName=version_arn)


def main(args) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        place = targets.resolve(args.workdir, args.aws)
        described = approve(place.client("sagemaker"), args.version_arn, args.reject, args.description)
    except targets.TargetError as error:
        print(f"approve: {error}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as error:
        print(f"approve: SageMaker refused: {error}", file=sys.stderr)
        return 1
    print(f"{described['ModelPackageArn']}: {described['ModelApprovalStatus']} ({place.where})")
    if described["ModelApprovalStatus"] == "Approved":
        print("sdxl_lora_registry_watch deploys the group's latest Approved version at its next run")
    return 0
