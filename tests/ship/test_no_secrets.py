"""No account id, ARN with an account, or secret in the repository, except documented example values."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Documented, non-secret values allowed anywhere:
ALLOWED_ACCOUNTS = {
    "123456789012",  # AWS's documented example account; moto's default account (local stack, tests)
    "111122223333",  # AWS's other documented example account (docs/aws.md, containers/build_and_push.sh)
}
ACCOUNT = re.compile(r"(?<![\w.-])(\d{12})(?![\w])")
ARN_ACCOUNT = re.compile(r"arn:aws[\w-]*:[\w-]+:[\w-]*:(\d{12}):")
SECRETS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?(?!testing)[A-Za-z0-9/+]{40}"),
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH )?PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bghp_[A-Za-z0-9]{36}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
}


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def findings(text: str) -> list[str]:
    found = [f"account id {m}" for m in ACCOUNT.findall(text) + ARN_ACCOUNT.findall(text) if m not in ALLOWED_ACCOUNTS]
    found += [kind for kind, pattern in SECRETS.items() if pattern.search(text)]
    return found


def test_the_scanner_finds_what_it_looks_for():
    account = "2109876" + "54321"  # built here, so this file passes its own scan
    assert findings(f"role arn:aws:iam::{account}:role/x") == [f"account id {account}"] * 2
    assert findings("key AKIA" + "ABCDEFGHIJKLMNOP") == ["AWS access key id"]
    assert findings("arn:aws:iam::123456789012:role/sdxl-lora-local") == []
    assert findings("timestamp 1764201600000 is not an account") == []  # 13 digits


def test_repository_has_no_account_ids_arns_or_secrets():
    problems = []
    for path in tracked_files():
        if path.suffix in {".png", ".jpg", ".safetensors", ".whl"} or "/." in str(path.relative_to(ROOT)):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        problems += [f"{path.relative_to(ROOT)}: {what}" for what in findings(text)]
    assert not problems, problems
