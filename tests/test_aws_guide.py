"""docs/aws.md runs as written: every ```bash block is valid shell with no placeholder outside shell variables, and
all of them, in order, in one `bash -eu`, against stand-ins for aws, docker, make, curl, openssl and sleep that
record what they are asked. The records are then checked against the real thing: every `sdxl-lora-ops` command
line against its parser (and iam-policies' flags against its checks), the environment `docker compose up` gets
against docker-compose.aws.yaml, the DAG runs it triggers against the DAGs' Params, and the first grid's size
against `max_runtime_seconds`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sdxl_lora.settings import PARSE_TIME, Settings

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "aws.md"
BASH = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
FENCES = re.compile(r"^```(\S*)", re.M)
ACCOUNT, KEY_ID = "111122223333", "1234abcd-12ab-34cd-56ef-1234567890ab"
COMPOSE = shutil.which("docker-compose")
# The guide's planning figure for the first grid: docs/benchmarks.md's 7.5 s per optimizer step of the production
# preset on an H100, times the 8 it allows for the A10G of ml.g5.2xlarge, plus its start-up allowance.
SECONDS_PER_STEP, START_UP_SECONDS = 7.5 * 8, 15 * 60

# What each stand-in answers, by a word of its command line; each records its arguments, one file per call.
STAND_INS = {
    "aws": {"get-caller-identity": ACCOUNT, "create-key": f"arn:aws:kms:$AWS_REGION:{ACCOUNT}:key/{KEY_ID}",
            "list-service-quotas": "L-12345678"},
    "docker": {"state": 'success, {"version": "x"}'},
    "curl": {"api/token": "token", "instance-id": "i-0123456789abcdef0"},
    "openssl": {"rand": "0123456789abcdef"},
    "make": {}, "sleep": {},
}
STAND_IN = """#!/usr/bin/env bash
calls=$(ls "$GUIDE_CALLS" | wc -l)
printf '%s\\0' "$(basename "$0")" "$@" > "$GUIDE_CALLS/$(printf %05d "$calls")"
if [ "$(basename "$0") $1 $2" = "docker compose up" ]; then env -0 > "$GUIDE_ENV"; fi
case " $* " in
{cases}
esac
"""


def blocks() -> list[str]:
    return BASH.findall(GUIDE.read_text())


def test_the_guide_is_shell_blocks_and_text():
    assert len(blocks()) >= 10
    assert set(FENCES.findall(GUIDE.read_text())[::2]) <= {"bash", "text", "json"}  # opening fences only


@pytest.mark.parametrize("index", range(len(blocks())))
def test_each_bash_block_is_valid_shell(index):
    block = blocks()[index]
    done = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert done.returncode == 0, f"block {index} of docs/aws.md:\n{block}\n{done.stderr}"
    code = "\n".join(line.split(" # ")[0] for line in block.splitlines() if not line.lstrip().startswith("#"))
    assert "..." not in code, f"block {index}: '...' is no value; define a variable in block 0 instead"
    assert not re.search(r"<[A-Za-z][\w -]*>", code), f"block {index}: a <placeholder>; use a shell variable"
    for names in re.findall(r"^\s*export\s+(.*)$", code, re.M):
        for assignment in re.findall(r"(?:^|\s)([^\s=]+)=", names):
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", assignment), f"block {index}: export {assignment}="


def test_the_guide_says_which_settings_only_the_environment_reaches():
    text = " ".join(GUIDE.read_text().split())
    assert all(f"`{name}`" in text for name in PARSE_TIME)
    assert "Only environment variables `SDXL_LORA_<NAME>` of every Airflow component reach them" in text
    assert "7.5 s per optimizer step" in text and "benchmarks.md" in text


def _quoted(answer: str) -> str:
    """A stand-in's answer as shell: $AWS_REGION expanded when it runs, the rest as it is."""
    return f'"{answer}"' if "$" in answer else shlex.quote(answer)


def run_guide(tmp_path: Path, airflow_role: str = "") -> tuple[list[list[str]], dict[str, str]]:
    """Runs every bash block of the guide, in order, in one shell; returns the stand-ins' calls and the
    environment `docker compose up` had."""
    bin_dir, checkout, home, calls = tmp_path / "bin", tmp_path / "checkout", tmp_path / "home", tmp_path / "calls"
    for folder in (bin_dir, checkout / ".venv" / "bin", home, calls):
        folder.mkdir(parents=True)
    for name, answers in {**STAND_INS, "sdxl-lora-ops": {}}.items():
        cases = "\n".join(f'  *" {word} "*|*"/{word} "*) echo {_quoted(answer)} ;;' for word, answer in answers.items())
        path = (checkout / ".venv" / "bin" if name == "sdxl-lora-ops" else bin_dir) / name
        path.write_text(STAND_IN.replace("{cases}", cases))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    script = "\n".join(blocks())
    if airflow_role:
        script = re.sub(r"^AirflowRole=", f"AirflowRole={airflow_role}", script, count=1, flags=re.M)
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "GUIDE_CALLS": str(calls),
                   "GUIDE_ENV": str(tmp_path / "compose-up.env"), "LANG": "C.UTF-8"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=checkout, env=environment,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the guide stopped:\n{done.stdout}\n{done.stderr}"
    recorded = [path.read_bytes().decode().split("\0")[:-1] for path in sorted(calls.iterdir())]
    compose_env = (tmp_path / "compose-up.env").read_bytes().decode().split("\0")
    return recorded, dict(item.split("=", 1) for item in compose_env if "=" in item)


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    return run_guide(tmp_path_factory.mktemp("guide"))


def calls_of(recorded: list[list[str]], program: str) -> list[list[str]]:
    return [call[1:] for call in recorded if call[0] == program]


def test_every_sdxl_lora_ops_command_line_parses_and_iam_policies_applies(guide):
    from sdxl_lora_ops import cli, iam_policies

    recorded, _ = guide
    verbs = {}
    for argv in calls_of(recorded, "sdxl-lora-ops"):
        try:
            verbs[argv[0]] = cli.build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"docs/aws.md: `sdxl-lora-ops {' '.join(argv)}` does not parse")
    assert {"iam-policies", "stage-models", "upload-images"} <= set(verbs)
    policies = verbs["iam-policies"]
    assert iam_policies.check(policies) == [] and policies.apply
    assert (policies.account, policies.region, policies.prefix) == (ACCOUNT, "eu-west-1", Settings().prefix)
    assert policies.kms_key_arn == f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/{KEY_ID}"  # step 2's key
    assert verbs["stage-models"].aws and verbs["upload-images"].aws


def test_the_images_and_the_settings_reach_docker_compose(guide):
    recorded, environment = guide
    assert ["images", "REGION=eu-west-1", f"ACCOUNT={ACCOUNT}", "PREFIX=sdxl-lora", "TAG=0.1.0"] in \
        calls_of(recorded, "make")
    bucket = f"sdxl-lora-{ACCOUNT}-eu-west-1"
    for image in ("processing", "training", "inference"):  # as containers/build_and_push.sh names and prints them
        assert environment[f"SDXL_LORA_{image.upper()}_IMAGE"] == \
            f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/sdxl-lora/sdxl-lora-{image}:0.1.0"
    assert environment["SDXL_LORA_ROLE_ARN"] == f"arn:aws:iam::{ACCOUNT}:role/sdxl-lora-sagemaker"
    assert environment["SDXL_LORA_CAPTIONER_URI"] == f"s3://{bucket}/sdxl-finetune-lora/captioner/"
    assert environment["SDXL_LORA_BASE_MODEL_URI"] == f"s3://{bucket}/sdxl-finetune-lora/base_model/"
    assert environment["SDXL_LORA_OUTPUT_KMS_KEY_ID"].endswith(KEY_ID)
    assert json.loads(environment["SDXL_LORA_AWS_CONNECTION"]) == {"conn_type": "aws",
                                                                   "extra": {"region_name": "eu-west-1"}}
    required = re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.aws.yaml").read_text())
    assert required and [name for name in required if not environment.get(name)] == []


@pytest.mark.skipif(not COMPOSE, reason="docker-compose not installed (apt-get install docker-compose)")
def test_docker_compose_accepts_that_environment_and_every_airflow_container_gets_it(guide):
    _, environment = guide
    done = subprocess.run([COMPOSE, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**environment, "PATH": os.environ["PATH"]})  # COMPOSE_FILE names both files
    assert done.returncode == 0, done.stderr
    import yaml

    services = yaml.safe_load(done.stdout)["services"]
    airflow = [s for s in services.values() if s.get("image") == "sdxl-lora-airflow:latest"]
    assert len(airflow) == 6 and "local-stack" not in [n for n, s in services.items() if not s.get("profiles")]
    for service in airflow:
        for name in ("SDXL_LORA_CAPTIONER_URI", "SDXL_LORA_BASE_MODEL_URI", "SDXL_LORA_ROLE_ARN", "AWS_REGION"):
            assert service["environment"][name] == environment[name]


def test_the_first_run_prepares_then_runs_a_grid_sized_to_finish(guide):
    from sdxl_lora import grid

    recorded, _ = guide
    airflow = [call[call.index("airflow") + 1:] for call in calls_of(recorded, "docker") if "airflow" in call]
    triggered = {call[2]: call for call in airflow if call[:2] == ["dags", "trigger"]}
    assert list(triggered) == ["sdxl_dataset_prepare", "sdxl_lora_grid_search"]
    for dag_id, call in triggered.items():
        assert (ROOT / "dags" / f"{dag_id}.py").exists()
        assert ["dags", "unpause", dag_id] in airflow  # paused at creation
        run_id = call[call.index("--run-id") + 1]
        assert ["dags", "state", dag_id, run_id] in airflow  # waited for
    upload = calls_of(recorded, "sdxl-lora-ops")
    version = next(argv[argv.index("--version") + 1] for argv in upload if argv[0] == "upload-images")
    prepare = json.loads(triggered["sdxl_dataset_prepare"][-1])
    assert prepare == {"version": version}
    conf = json.loads(triggered["sdxl_lora_grid_search"][-1])
    assert conf["dataset_version"] == version and conf["deploy_winner"] is True
    trials = grid.from_params(conf)
    settings = Settings()
    assert 1 < len(trials) <= settings.training_pool_size
    longest = max(trial.max_train_steps for trial in trials)
    assert longest * SECONDS_PER_STEP + START_UP_SECONDS <= settings.max_runtime_seconds / 2  # a factor 2 to spare
    # The cost check gets the guide's seconds per step, and the grid it sizes stays under the guide's cap.
    assert ["variables", "set", "sdxl_lora_seconds_per_step", str(int(SECONDS_PER_STEP))] in airflow
    from sdxl_lora.costs import ON_DEMAND_USD_PER_HOUR
    from sdxl_lora.estimate import SAGEMAKER_STARTUP_SECONDS

    hours = sum(trial.max_train_steps * SECONDS_PER_STEP + SAGEMAKER_STARTUP_SECONDS for trial in trials) / 3600
    usd = hours * ON_DEMAND_USD_PER_HOUR[settings.training_instance_type]
    assert usd <= conf["max_cost_usd"]
    assert f"{hours:g} instance-hours, about {usd:.2f} USD" in (ROOT / "docs" / "aws.md").read_text()


def test_with_an_airflow_role_the_guide_attaches_its_policy_and_opens_the_metadata_service(tmp_path):
    recorded, _ = run_guide(tmp_path, airflow_role="airflow-ec2")
    aws = calls_of(recorded, "aws")
    assert ["iam", "attach-role-policy", "--role-name", "airflow-ec2", "--policy-arn",
            f"arn:aws:iam::{ACCOUNT}:policy/sdxl-lora-airflow"] in aws
    assert ["ec2", "modify-instance-metadata-options", "--instance-id", "i-0123456789abcdef0",
            "--http-put-response-hop-limit", "2"] in aws
    assert ["iam", "detach-role-policy", "--role-name", "airflow-ec2", "--policy-arn",
            f"arn:aws:iam::{ACCOUNT}:policy/sdxl-lora-airflow"] in aws  # and tear down undoes it
