"""`sdxl-lora-ops iam-policies`: docs/iam/'s templates filled from flags (KMS statements only with a key), bad flags
refused with their fix, and `--apply` accepted by moto's IAM, twice and more without a second role or policy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from sdxl_lora_ops import cli, iam_policies

ROOT = Path(__file__).resolve().parents[2]
MOTO_ACCOUNT = "123456789012"  # the account moto answers as
KEY = f"arn:aws:kms:eu-west-1:{MOTO_ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
FLAGS = ["--account", MOTO_ACCOUNT, "--region", "eu-west-1", "--bucket", "my-sdxl-bucket", "--prefix", "team/sdxl"]


def run(capsys, *flags: str) -> tuple[int, str, str]:
    code = cli.main(["iam-policies", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def kms_statements(policy: dict) -> list[dict]:
    return [s for s in policy["Statement"] if any(a.startswith("kms:") for a in _actions(s))]


def _actions(statement: dict) -> list[str]:
    return statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]


def test_printed_policies_are_json_with_every_placeholder_filled(capsys):
    code, out, _ = run(capsys, *FLAGS)
    assert code == 0
    documents = json.loads(out)
    assert set(documents) == {p.name for p in (ROOT / "docs" / "iam").glob("*.json")}
    assert "${" not in out
    execution, airflow = documents["sagemaker-execution-policy.json"], documents["airflow-policy.json"]
    assert documents["sagemaker-trust-policy.json"]["Statement"][0]["Condition"] == {
        "StringEquals": {"aws:SourceAccount": MOTO_ACCOUNT}}
    resources = json.dumps(execution)
    assert "arn:aws:s3:::my-sdxl-bucket/team/sdxl/*" in resources
    assert f"arn:aws:ecr:eu-west-1:{MOTO_ACCOUNT}:repository/sdxl-lora/sdxl-lora-*" in resources
    passrole = next(s for s in airflow["Statement"] if s["Action"] == "iam:PassRole")
    assert passrole["Resource"] == f"arn:aws:iam::{MOTO_ACCOUNT}:role/sdxl-lora-sagemaker"


def test_kms_statements_only_with_a_key(capsys):
    without = json.loads(run(capsys, *FLAGS)[1])
    assert not any(kms_statements(policy) for policy in without.values())
    assert "kms" not in json.dumps(without).lower()
    with_key = json.loads(run(capsys, *FLAGS, "--kms-key-arn", KEY)[1])
    for name in ("sagemaker-execution-policy.json", "airflow-policy.json"):
        statements = kms_statements(with_key[name])
        assert statements and all(s["Resource"] == KEY for s in statements), name
    # the rest is the same with or without a key
    for name, policy in with_key.items():
        assert [s for s in policy["Statement"] if s not in kms_statements(policy)] == without[name]["Statement"]


def test_out_writes_the_printed_policies(capsys, tmp_path):
    printed = json.loads(run(capsys, *FLAGS)[1])
    code, out, _ = run(capsys, *FLAGS, "--out", str(tmp_path / "iam"))
    assert code == 0
    written = {path.name: json.loads(path.read_text()) for path in (tmp_path / "iam").iterdir()}
    assert written == printed
    assert all(str(tmp_path / "iam" / name) in out for name in printed)


def test_defaults_match_the_settings_and_the_image_script():
    from sdxl_lora.settings import Settings

    args = cli.build_parser().parse_args(["iam-policies", *FLAGS[:6]])
    assert args.prefix == Settings().prefix
    script = (ROOT / "containers" / "build_and_push.sh").read_text()
    assert f'prefix="{args.repository_prefix}"' in script  # the repositories `make images` creates


@pytest.mark.parametrize(("flag", "value", "fix"), [
    ("--account", "1234", "12 digits"),
    ("--account", "11112222333a", "aws sts get-caller-identity"),
    ("--region", "EU-WEST-1", "like eu-west-1"),
    ("--region", "europe", "describe-regions"),
    ("--region", "cn-north-1", "aws-cn partition"),
    ("--bucket", "My_Bucket", "upper-case"),
    ("--bucket", "ab", "3-63"),
    ("--bucket", "my_bucket", "lower-case letters, digits, '.' and '-'"),
    ("--bucket", "bucket-", "beginning and ending with a letter or digit"),
    ("--bucket", "my..bucket", "two adjacent periods"),
    ("--bucket", "192.168.1.10", "IP address"),
    ("--bucket", "xn--bucket", "reserves"),
    ("--prefix", "/sdxl", "leading or trailing '/'"),
    ("--prefix", "sdxl/*", "wildcards"),
    ("--role-name", "a role", "IAM names"),
    ("--repository-prefix", "SDXL", "ECR namespace"),
    ("--kms-key-arn", "alias/sdxl", "describe-key"),
    ("--kms-key-arn", KEY.replace("eu-west-1", "us-east-1"), "keys of their own region"),
])
def test_a_bad_flag_is_refused_naming_the_fix(capsys, flag, value, fix):
    flags = list(FLAGS)
    if flag in flags:
        flags[flags.index(flag) + 1] = value
    else:
        flags += [flag, value]
    code, out, err = run(capsys, *flags)
    assert code == 2 and out == ""
    assert f"iam-policies: {flag} {value!r}" in err and fix in err


def test_every_problem_is_reported_at_once(capsys):
    code, _, err = run(capsys, "--account", "1", "--region", "x", "--bucket", "B")
    assert code == 2 and [line.split()[1] for line in err.splitlines()] == ["--account", "--region", "--bucket"]


def test_a_placeholder_the_command_does_not_fill_is_an_error(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::${Bucket}/${Unknown}/*"}]}))
    with pytest.raises(iam_policies.PolicyError, match=r"names \$\{Unknown\}.*values\(\)"):
        iam_policies.render("p.json", {"Bucket": "b"}, tmp_path)
    assert iam_policies.render("p.json", {"Bucket": "b", "Unknown": "u"}, tmp_path)["Statement"][0]["Resource"] == \
        "arn:aws:s3:::b/u/*"


@pytest.fixture
def aws(monkeypatch):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield boto3.client("iam", region_name="eu-west-1")


def test_apply_creates_the_role_and_policies_moto_accepts(capsys, aws):
    code, out, err = run(capsys, *FLAGS, "--apply")
    assert code == 0, err
    documents = json.loads(run(capsys, *FLAGS)[1])
    role = aws.get_role(RoleName="sdxl-lora-sagemaker")["Role"]
    assert role["AssumeRolePolicyDocument"] == documents["sagemaker-trust-policy.json"]
    inline = aws.get_role_policy(RoleName="sdxl-lora-sagemaker", PolicyName="sdxl-lora")["PolicyDocument"]
    assert inline == documents["sagemaker-execution-policy.json"]
    arn = f"arn:aws:iam::{MOTO_ACCOUNT}:policy/sdxl-lora-airflow"
    version = aws.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    assert aws.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"] == \
        documents["airflow-policy.json"]
    # the ARNs and the settings that name them
    assert f"export SDXL_LORA_ROLE_ARN={role['Arn']}" in out.splitlines()
    assert "export SDXL_LORA_BUCKET=my-sdxl-bucket" in out.splitlines()
    assert "export SDXL_LORA_PREFIX=team/sdxl" in out.splitlines()
    assert arn in out and "OUTPUT_KMS_KEY_ID" not in out


def test_apply_again_updates_instead_of_failing(capsys, aws):
    assert run(capsys, *FLAGS, "--apply")[0] == 0
    code, out, err = run(capsys, *FLAGS, "--apply")
    assert code == 0, err
    assert "existed" in out and "unchanged" in out
    assert [r["RoleName"] for r in aws.list_roles()["Roles"]] == ["sdxl-lora-sagemaker"]
    assert [p["PolicyName"] for p in aws.list_policies(Scope="Local")["Policies"]] == ["sdxl-lora-airflow"]
    arn = f"arn:aws:iam::{MOTO_ACCOUNT}:policy/sdxl-lora-airflow"
    assert len(aws.list_policy_versions(PolicyArn=arn)["Versions"]) == 1

    code, out, _ = run(capsys, *FLAGS, "--kms-key-arn", KEY, "--apply")  # a changed document: a new default version
    assert code == 0 and "updated: v2" in out and f"export SDXL_LORA_OUTPUT_KMS_KEY_ID={KEY}" in out
    inline = aws.get_role_policy(RoleName="sdxl-lora-sagemaker", PolicyName="sdxl-lora")["PolicyDocument"]
    assert kms_statements(inline)
    for prefix in ("a", "b", "c", "d", "e"):  # beyond IAM's five versions: the oldest is deleted
        flags = [*FLAGS[:-1], prefix, "--apply"]
        assert run(capsys, *flags)[0] == 0
    versions = aws.list_policy_versions(PolicyArn=arn)["Versions"]
    assert len(versions) == iam_policies.MAX_POLICY_VERSIONS
    default = next(v for v in versions if v["IsDefaultVersion"])
    assert "my-sdxl-bucket/e/*" in json.dumps(aws.get_policy_version(
        PolicyArn=arn, VersionId=default["VersionId"])["PolicyVersion"]["Document"])


def test_apply_refuses_credentials_of_another_account(capsys, aws):
    flags = [*FLAGS]
    flags[1] = "111122223333"
    code, out, err = run(capsys, *flags, "--apply")
    assert code == 2 and re.search(r"--account 111122223333 but these credentials are of account 123456789012", err)
    assert aws.list_roles()["Roles"] == []
