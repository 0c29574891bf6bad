"""docs/iam/: the Airflow role's policy allows every API call the DAGs and the provider's operators make, as a
template and as `sdxl-lora-ops iam-policies` fills it in (with and without a KMS key)."""

import fnmatch
import json
import re
from pathlib import Path

import airflow.providers.amazon.aws as provider
import pytest

ROOT = Path(__file__).resolve().parents[2]
IAM = ROOT / "docs" / "iam"
PROVIDER = Path(provider.__file__).parent
CALL = re.compile(r"\b(?:client|conn|runtime|get_conn\(\))\.([a-z_]+)\(")
# S3Hook methods the DAGs use -> the S3 actions behind them; a new method fails the test until mapped.
# (S3Hook methods and, on its boto3 client, client methods and paginated operations.)
S3_HOOK_ACTIONS = {"load_string": ["s3:PutObject"], "read_key": ["s3:GetObject"],
                   "list_prefixes": ["s3:ListBucket"], "check_for_key": ["s3:GetObject"],
                   "list_keys": ["s3:ListBucket"], "load_file": ["s3:PutObject"], "get_object": ["s3:GetObject"],
                   "put_object": ["s3:PutObject"], "head_object": ["s3:GetObject"],
                   "list_objects_v2": ["s3:ListBucket"], "delete_objects": ["s3:DeleteObject"]}
# SageMakerHook features no DAG uses (AutoML, notebooks, pipelines, the hook's model registry calls, experiments,
# batch transform): their calls are left out of the policy on purpose. The model registry calls the DAGs make
# themselves (sdxl_lora.registry) are found in their sources like any other.
UNUSED_PROVIDER_FEATURES = ("auto_ml", "notebook_instance", "pipeline_execution", "model_package", "experiment",
                            "transform_job")


def action(method: str, service: str = "sagemaker") -> str:
    return f"{service}:" + "".join(part.title() for part in method.split("_"))


def sources(*folders: str):
    for folder in folders:
        yield from (ROOT / folder).rglob("*.py")


def required_actions() -> set[str]:
    actions = {"iam:PassRole", "logs:DescribeLogStreams", "logs:GetLogEvents"}  # job logs in task logs
    for path in sources("dags", "plugins"):
        text = path.read_text()
        for method in CALL.findall(text):
            if method in ("get_paginator", "get_waiter"):
                continue
            actions.add(action(method, "sagemaker-runtime" if method == "invoke_endpoint" else "sagemaker"))
        s3_calls = re.findall(r"\bs3\.([a-z_]+)\(", text) + re.findall(r"\bs3\.get_paginator\(\"([a-z_0-9]+)\"\)", text)
        for method in (m for m in s3_calls if m != "get_paginator"):
            assert method in S3_HOOK_ACTIONS, f"{path.name}: S3Hook.{method} is not mapped to S3 actions"
            actions.update(S3_HOOK_ACTIONS[method])
        for paginated in re.findall(r"(?<!s3\.)get_paginator\(\"([a-z_]+)\"\)", text):
            actions.add(action(paginated))
    provider_text = "".join((PROVIDER / part).read_text() for part in
                            ("hooks/sagemaker.py", "operators/sagemaker.py", "triggers/sagemaker.py"))
    for method in set(CALL.findall(provider_text)) - {"get_paginator", "get_waiter"}:
        if not any(feature in method for feature in UNUSED_PROVIDER_FEATURES):
            actions.add(action(method))
    # sagemaker-runtime's InvokeEndpoint is authorised as sagemaker:InvokeEndpoint
    return {a.replace("sagemaker-runtime:", "sagemaker:") for a in actions}


def allowed(policy: dict, wanted: str) -> bool:
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        listed = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        if any(fnmatch.fnmatchcase(wanted.lower(), pattern.lower()) for pattern in listed):
            return True
    return False


def load(name: str, version: str = "template") -> dict:
    """docs/iam/<name> as written, or filled in by `sdxl-lora-ops iam-policies` (version "filled" or "filled-kms")."""
    if version == "template":
        return json.loads((IAM / name).read_text())
    from sdxl_lora_ops import cli, iam_policies

    key = ["--kms-key-arn", "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"]
    args = cli.build_parser().parse_args(["iam-policies", "--account", "111122223333", "--region", "eu-west-1",
                                          "--bucket", "my-bucket", *(key if version == "filled-kms" else [])])
    return iam_policies.policies(args)[name]


VERSIONS = ("template", "filled", "filled-kms")


def test_the_dags_use_no_provider_feature_the_policy_leaves_out():
    text = "".join(p.read_text() for p in sources("dags", "plugins"))
    for name in ("AutoML", "Notebook", "Pipeline", "RegisterModelVersion", "CreateExperiment", "Transform"):
        assert f"SageMaker{name}" not in text


@pytest.mark.parametrize("version", VERSIONS)
def test_airflow_policy_allows_every_call_of_the_dags_and_the_operators(version):
    actions = required_actions()
    assert {"sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:CreateEndpoint",
            "sagemaker:InvokeEndpoint", "s3:PutObject", "iam:PassRole"} <= actions  # the scan found them
    policy = load("airflow-policy.json", version)
    missing = sorted(a for a in actions if not allowed(policy, a))
    assert not missing, f"docs/iam/airflow-policy.json ({version}) does not allow {missing}"


def test_the_check_fails_for_an_action_the_policy_lacks():
    policy = load("airflow-policy.json")
    assert not allowed(policy, "sagemaker:CreateAutoMLJob")
    assert not allowed(policy, "s3:DeleteBucket")


@pytest.mark.parametrize("version", VERSIONS)
def test_policies_are_least_privilege(version):
    for path in IAM.glob("*.json"):
        for statement in load(path.name, version)["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert not any(a == "*" or a.endswith(":*") for a in actions), f"{path.name}: a service wildcard"
    passrole = [s for s in load("airflow-policy.json", version)["Statement"] if s["Action"] == "iam:PassRole"]
    assert passrole[0]["Condition"]["StringEquals"]["iam:PassedToService"] == "sagemaker.amazonaws.com"
    assert "*" not in passrole[0]["Resource"]


@pytest.mark.parametrize("version", VERSIONS)
def test_execution_role_can_run_the_jobs(version):
    policy = load("sagemaker-execution-policy.json", version)
    for wanted in ("s3:GetObject", "s3:PutObject", "s3:ListBucket", "ecr:BatchGetImage", "ecr:GetAuthorizationToken",
                   "logs:PutLogEvents", "cloudwatch:PutMetricData", "ec2:CreateNetworkInterface"):
        assert allowed(policy, wanted), wanted
    assert allowed(policy, "kms:Decrypt") == (version != "filled"), "the key's statement: only with a key"
    trust = load("sagemaker-trust-policy.json", version)["Statement"][0]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"
