"""`sdxl-lora-ops iam-policies`: docs/iam/'s three policies filled in for one account, printed, written or applied.

docs/iam/*.json are the templates and the only copy of the policies: this module fills every `${Name}` in them
from the command's flags and leaves out the statements that name the KMS key when no `--kms-key-arn` is given.
Every flag is checked first, and a value AWS would refuse (an account id that is not 12 digits, a bucket name
S3 refuses, a region name of no known form) is reported with how to fix it, before anything is printed or sent.

`--apply` creates the SageMaker execution role (trust policy), puts its inline policy and creates Airflow's managed
policy through boto3's default credentials, in the account `--account` names (the caller's account must be that
one). It can run again: an existing role gets the trust policy again, the inline policy is replaced, and an
existing managed policy gets a new default version when its document differs (the oldest other version is deleted
at IAM's limit of five). It prints the ARNs and the settings that name them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[1] / "docs" / "iam"
TRUST, EXECUTION, AIRFLOW = "sagemaker-trust-policy.json", "sagemaker-execution-policy.json", "airflow-policy.json"
NAMES = (TRUST, EXECUTION, AIRFLOW)
PLACEHOLDER = re.compile(r"\$\{([A-Za-z]+)\}")
# Placeholders a policy may do without: a statement naming one that has no value is left out.
OPTIONAL = ("KmsKeyArn",)
MAX_POLICY_VERSIONS = 5  # IAM keeps at most five versions of a managed policy
REGION = re.compile(r"[a-z]{2}-[a-z]+-\d{1,2}")
OTHER_PARTITIONS = {"cn-": "aws-cn", "us-gov-": "aws-us-gov", "us-iso": "aws-iso"}
IAM_NAME = re.compile(r"[\w+=,.@-]+")
ECR_PART = r"[a-z0-9]+(?:[._-][a-z0-9]+)*"
ECR_NAMESPACE = re.compile(rf"{ECR_PART}(?:/{ECR_PART})*")
KEY_ARN = re.compile(r"arn:aws:kms:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):key/[A-Za-z0-9-]+")
PREFIX = re.compile(r"[A-Za-z0-9!_.'()-]+(?:/[A-Za-z0-9!_.'()-]+)*")
# S3's bucket naming rules (docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html)
BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


class PolicyError(ValueError):
    """A flag or a template the policies cannot be made from; the message says what to change."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--account", required=True,
                        help="the 12-digit account id (aws sts get-caller-identity --query Account --output text)")
    parser.add_argument("--region", required=True, help="where the jobs run, e.g. eu-west-1")
    parser.add_argument("--bucket", required=True, help="the bucket of the settings' bucket (SDXL_LORA_BUCKET)")
    parser.add_argument("--prefix", default="sdxl-finetune-lora",
                        help="the key prefix of everything the project reads and writes (SDXL_LORA_PREFIX); "
                             "default: the settings' default, sdxl-finetune-lora")
    parser.add_argument("--role-name", default="sdxl-lora-sagemaker",
                        help="the SageMaker execution role (SDXL_LORA_ROLE_ARN names it); default sdxl-lora-sagemaker")
    parser.add_argument("--role-policy-name", default="sdxl-lora",
                        help="the execution role's inline policy; default sdxl-lora")
    parser.add_argument("--airflow-policy-name", default="sdxl-lora-airflow",
                        help="the managed policy for what Airflow runs as; default sdxl-lora-airflow")
    parser.add_argument("--repository-prefix", default="sdxl-lora",
                        help="the ECR namespace of the job images (`make images PREFIX=`, "
                             "containers/build_and_push.sh --prefix); default sdxl-lora")
    parser.add_argument("--kms-key-arn", metavar="ARN",
                        help="a customer managed KMS key for S3 outputs and volumes (SDXL_LORA_OUTPUT_KMS_KEY_ID): "
                             "the policies then allow its use; without it they name no key")
    parser.add_argument("--out", metavar="DIR", help="write the three policies into DIR, instead of printing them")
    parser.add_argument("--apply", action="store_true",
                        help="create or update the role, its inline policy and Airflow's policy with boto3's default "
                             "credentials (an administrator of the account), then print the ARNs and settings")


def check(args: argparse.Namespace) -> list[str]:
    """What is wrong with the flags, one message per flag, each saying what to use instead."""
    problems = []
    if not re.fullmatch(r"\d{12}", args.account):
        problems.append(f"--account {args.account!r}: an AWS account id is 12 digits; `aws sts get-caller-identity "
                        "--query Account --output text` prints yours")
    problems += filter(None, [region_problem(args.region), bucket_problem(args.bucket), prefix_problem(args.prefix)])
    names = (("--role-name", args.role_name, 64), ("--role-policy-name", args.role_policy_name, 128),
             ("--airflow-policy-name", args.airflow_policy_name, 128))
    for flag, value, longest in names:
        if not IAM_NAME.fullmatch(value) or len(value) > longest:
            problems.append(f"{flag} {value!r}: IAM names are 1-{longest} letters, digits and +=,.@_-")
    if not ECR_NAMESPACE.fullmatch(args.repository_prefix) or len(args.repository_prefix) > 200:
        problems.append(f"--repository-prefix {args.repository_prefix!r}: an ECR namespace is lower-case letters and "
                        "digits, separated by '.', '_', '-' or '/', e.g. sdxl-lora")
    if args.kms_key_arn is not None:
        problems += filter(None, [key_problem(args.kms_key_arn, args.region)])
    return problems


def region_problem(region: str) -> str | None:
    for start, partition in OTHER_PARTITIONS.items():
        if region.startswith(start):
            return (f"--region {region!r} is in the {partition} partition: these policies and "
                    "containers/build_and_push.sh name the aws partition's ARNs (arn:aws:) and registries")
    if not REGION.fullmatch(region):
        return (f"--region {region!r}: not a region name like eu-west-1 or us-east-1; `aws ec2 describe-regions "
                "--query 'Regions[].RegionName' --output text` lists them")
    return None


def bucket_problem(bucket: str) -> str | None:
    rules = ("S3 bucket names are 3-63 lower-case letters, digits, '.' and '-', beginning and ending with a letter "
             "or digit, e.g. my-sdxl-lora-111122223333")
    reason = None
    if not 3 <= len(bucket) <= 63:
        reason = f"{len(bucket)} characters"
    elif bucket != bucket.lower():
        reason = "upper-case letters"
    elif not re.fullmatch(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", bucket):
        reason = "a character S3 refuses, or a first or last one that is not a letter or digit"
    elif ".." in bucket:
        reason = "two adjacent periods"
    elif _is_ip_address(bucket):
        reason = "the form of an IP address"
    elif bucket.startswith(BUCKET_RESERVED_PREFIXES) or bucket.endswith(BUCKET_RESERVED_SUFFIXES):
        reason = f"a prefix or suffix S3 reserves ({', '.join(BUCKET_RESERVED_PREFIXES + BUCKET_RESERVED_SUFFIXES)})"
    return f"--bucket {bucket!r}: {reason}; {rules}" if reason else None


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def prefix_problem(prefix: str) -> str | None:
    if PREFIX.fullmatch(prefix):
        return None
    return (f"--prefix {prefix!r}: a key prefix without a leading or trailing '/' or an empty part, of letters, "
            "digits and !_.'()-/, e.g. sdxl-finetune-lora ('*', '?' and '$' would read as IAM wildcards or variables)")


def key_problem(arn: str, region: str) -> str | None:
    match = KEY_ARN.fullmatch(arn)
    if not match:
        return (f"--kms-key-arn {arn!r}: expected a key's ARN, arn:aws:kms:REGION:ACCOUNT:key/KEY-ID; `aws kms "
                "describe-key --key-id alias/NAME --query KeyMetadata.Arn --output text` prints it")
    if match["region"] != region:
        return (f"--kms-key-arn {arn!r}: the key is in {match['region']}, the jobs in {region}: SageMaker and S3 "
                f"use keys of their own region; create one there (aws kms create-key --region {region})")
    return None


def values(args: argparse.Namespace) -> dict[str, str]:
    """What each placeholder of docs/iam/ stands for (KmsKeyArn only with a key)."""
    filled = {"AccountId": args.account, "Region": args.region, "Bucket": args.bucket, "Prefix": args.prefix,
              "ExecutionRoleName": args.role_name, "RepositoryPrefix": args.repository_prefix}
    if args.kms_key_arn:
        filled["KmsKeyArn"] = args.kms_key_arn
    return filled


def render(name: str, filled: dict[str, str], templates: Path = TEMPLATES) -> dict:
    """docs/iam/<name> with every placeholder filled; statements naming an optional one without a value left out."""
    template = json.loads((templates / name).read_text())
    missing = {key for key in OPTIONAL if key not in filled}
    kept = [statement for statement in template["Statement"]
            if not set(PLACEHOLDER.findall(json.dumps(statement))) & missing]

    def fill(node):
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        if isinstance(node, str):
            return PLACEHOLDER.sub(lambda found: _value(name, filled, found[1]), node)
        return node

    return fill({**template, "Statement": kept})


def _value(name: str, filled: dict[str, str], key: str) -> str:
    if key not in filled:
        raise PolicyError(f"docs/iam/{name} names ${{{key}}}, which `sdxl-lora-ops iam-policies` does not fill: "
                          f"add it to sdxl_lora_ops/iam_policies.py values() (it fills {', '.join(sorted(filled))})")
    return filled[key]


def policies(args: argparse.Namespace, templates: Path = TEMPLATES) -> dict[str, dict]:
    filled = values(args)
    return {name: render(name, filled, templates) for name in NAMES}


def write(documents: dict[str, dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, document in documents.items():
        path = folder / name
        path.write_text(json.dumps(document, indent=2) + "\n")
        paths.append(path)
    return paths


def apply(documents: dict[str, dict], args: argparse.Namespace, iam, sts) -> dict[str, str]:
    """Creates or updates the role, its inline policy and Airflow's policy; returns their ARNs and what was done."""
    caller = sts.get_caller_identity()["Account"]
    if caller != args.account:
        raise PolicyError(f"--account {args.account} but these credentials are of account {caller}: use credentials "
                          f"of {args.account} (AWS_PROFILE), or --account {caller}")
    trust = json.dumps(documents[TRUST])
    try:
        role = iam.create_role(RoleName=args.role_name, AssumeRolePolicyDocument=trust,
                               Description="sdxl-lora: the SageMaker execution role of its jobs and endpoints")["Role"]
        role_done = "created"
    except iam.exceptions.EntityAlreadyExistsException:
        iam.update_assume_role_policy(RoleName=args.role_name, PolicyDocument=trust)
        role = iam.get_role(RoleName=args.role_name)["Role"]
        role_done = "existed: trust policy set again"
    iam.put_role_policy(RoleName=args.role_name, PolicyName=args.role_policy_name,
                        PolicyDocument=json.dumps(documents[EXECUTION]))
    policy_arn, policy_done = _managed_policy(iam, args.airflow_policy_name, documents[AIRFLOW])
    return {"role_arn": role["Arn"], "role": role_done, "policy_arn": policy_arn, "policy": policy_done}


def _managed_policy(iam, name: str, document: dict) -> tuple[str, str]:
    try:
        created = iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(document),
                                    Description="sdxl-lora: what its Airflow DAGs call (docs/iam/airflow-policy.json)")
        return created["Policy"]["Arn"], "created"
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    arn = next((policy["Arn"] for page in iam.get_paginator("list_policies").paginate(Scope="Local")
                for policy in page["Policies"] if policy["PolicyName"] == name), None)
    if arn is None:
        raise PolicyError(f"IAM says a policy named {name} exists but lists none of this account: use another "
                          "--airflow-policy-name")
    default = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    current = iam.get_policy_version(PolicyArn=arn, VersionId=default)["PolicyVersion"]["Document"]
    if (json.loads(current) if isinstance(current, str) else current) == document:
        return arn, f"existed, unchanged ({default})"
    versions = iam.list_policy_versions(PolicyArn=arn)["Versions"]
    if len(versions) >= MAX_POLICY_VERSIONS:
        oldest = min((v for v in versions if not v["IsDefaultVersion"]), key=lambda v: v["CreateDate"])
        iam.delete_policy_version(PolicyArn=arn, VersionId=oldest["VersionId"])
    version = iam.create_policy_version(PolicyArn=arn, PolicyDocument=json.dumps(document), SetAsDefault=True)
    return arn, f"existed, updated: {version['PolicyVersion']['VersionId']} is the default version"


def settings_lines(args: argparse.Namespace, role_arn: str) -> list[str]:
    """The settings (plugins/sdxl_lora/settings.py) and the connection that go with these policies."""
    connection = json.dumps({"conn_type": "aws", "extra": {"region_name": args.region}})
    lines = [f"export SDXL_LORA_ROLE_ARN={role_arn}", f"export SDXL_LORA_BUCKET={args.bucket}",
             f"export SDXL_LORA_PREFIX={args.prefix}",
             f"export AWS_REGION={args.region} AWS_DEFAULT_REGION={args.region}",
             f"export SDXL_LORA_AWS_CONNECTION='{connection}'"]
    if args.kms_key_arn:
        lines.append(f"export SDXL_LORA_OUTPUT_KMS_KEY_ID={args.kms_key_arn}")
    return lines


def main(args: argparse.Namespace) -> int:
    problems = check(args)
    if problems:
        for problem in problems:
            print(f"iam-policies: {problem}", file=sys.stderr)
        return 2
    try:
        documents = policies(args)
    except PolicyError as error:
        print(f"iam-policies: {error}", file=sys.stderr)
        return 2
    if args.out:
        for path in write(documents, Path(args.out)):
            print(f"wrote {path}")
    elif not args.apply:
        print(json.dumps(documents, indent=2))
    if not args.apply:
        return 0
    return _apply_and_report(documents, args)


def _apply_and_report(documents: dict[str, dict], args: argparse.Namespace) -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        done = apply(documents, args, boto3.client("iam", region_name=args.region),
                     boto3.client("sts", region_name=args.region))
    except PolicyError as error:
        print(f"iam-policies: {error}", file=sys.stderr)
        return 2
    except ClientError as error:
        print(f"iam-policies: IAM refused: {error}. The credentials need iam:CreateRole, iam:UpdateAssumeRolePolicy, "
              "iam:PutRolePolicy, iam:CreatePolicy and iam:CreatePolicyVersion (an administrator of the account); "
              "run it again once they have them: what was done is kept", file=sys.stderr)
        return 1
    except BotoCoreError as error:
        print(f"iam-policies: {error}: no usable AWS credentials (aws configure, aws sso login, AWS_PROFILE)",
              file=sys.stderr)
        return 1
    print(f"execution role {done['role_arn']}: {done['role']}; inline policy {args.role_policy_name} put")
    print(f"Airflow's policy {done['policy_arn']}: {done['policy']}")
    print("\nAttach Airflow's policy to what Airflow runs as (an EC2 instance role, an IRSA role or a user), e.g.\n"
          f"  aws iam attach-role-policy --role-name ROLE --policy-arn {done['policy_arn']}\n"
          "\nThe settings, in the environment of every Airflow component (docs/aws.md):")
    for line in settings_lines(args, done["role_arn"]):
        print(line)
    return 0
