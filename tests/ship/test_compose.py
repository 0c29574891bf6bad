"""docker-compose.yaml and its AWS override: `docker-compose config` (Debian's docker-compose 1.29) and the
Compose specification's JSON schema (the compose_spec.json that package ships), plus the layout."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")
SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
AWS_ENV = {"SDXL_LORA_AWS_CONNECTION": '{"conn_type": "aws"}', "AWS_DEFAULT_REGION": "eu-west-1",
           "SDXL_LORA_BUCKET": "b", "SDXL_LORA_ROLE_ARN": "role", "SDXL_LORA_PROCESSING_IMAGE": "p",
           "SDXL_LORA_TRAINING_IMAGE": "t", "SDXL_LORA_INFERENCE_IMAGE": "i", "SDXL_LORA_BASE_MODEL_URI": "s3://b/m/"}
needs_compose = pytest.mark.skipif(not COMPOSE, reason="docker-compose not installed (apt-get install docker-compose)")


CREDENTIALS = {"AWS_PROFILE": "sdxl", "AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
               "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"}
AWS_FILES = "/home/airflow/.aws"


def compose(*args, env=None):
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SDXL_LORA_", "AWS_", "COMPOSE_"))}
    return subprocess.run([COMPOSE, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**inherited, **(env or {})})


def aws_services(env: dict) -> dict:
    done = compose("-f", "docker-compose.yaml", "-f", "docker-compose.aws.yaml", "config", env=env)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    airflow = {name: service for name, service in services.items() if service.get("image") == "sdxl-lora-airflow:latest"}
    assert {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
            "airflow-init"} <= set(airflow)
    return airflow


@needs_compose
def test_compose_config_accepts_the_local_stack_file():
    done = compose("config")
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "airflow-worker", "airflow-init", "local-stack"} <= set(services)
    init = " ".join(services["airflow-init"]["command"])
    assert "pools set sagemaker_training" in init and "--include-deferred" in init
    assert "connections add aws_default" in init
    connection = json.loads(services["airflow-init"]["environment"]["SDXL_LORA_AWS_CONNECTION"])
    assert connection["extra"]["endpoint_url"] == "http://local-stack:4566"
    mounts = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in services["airflow-scheduler"]["volumes"]}
    assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/airflow.cfg"} <= mounts
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-worker", "airflow-apiserver"):
        assert services[name]["environment"]["SDXL_LORA_PRESET"] == "local"  # forms the stack's CPU jobs run


@needs_compose
def test_aws_override_needs_the_settings_and_drops_the_local_stack():
    refused = compose("-f", "docker-compose.yaml", "-f", "docker-compose.aws.yaml", "config")
    assert refused.returncode != 0 and "set SDXL_LORA_AWS_CONNECTION" in refused.stderr
    done = compose("-f", "docker-compose.yaml", "-f", "docker-compose.aws.yaml", "config", env=AWS_ENV)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["local-stack"]["profiles"] == ["local-only"]  # not started unless asked for
    environment = services["airflow-worker"]["environment"]
    assert environment["SDXL_LORA_AWS_CONNECTION"] == '{"conn_type": "aws"}'
    assert environment["SDXL_LORA_NETWORK_ISOLATION"] == "true"
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-worker", "airflow-apiserver"):
        assert services[name]["environment"]["SDXL_LORA_PRESET"] == "production"
    # what `sdxl-lora-ops stage-models` prints reaches the components; unset, they stay empty
    assert environment["SDXL_LORA_CAPTIONER_URI"] == "" and environment["SDXL_LORA_BASE_MODEL_ID"] == ""
    staged = {**AWS_ENV, "SDXL_LORA_CAPTIONER_URI": "s3://b/c/", "SDXL_LORA_BASE_MODEL_ID": "org/sdxl"}
    environment = yaml.safe_load(compose("-f", "docker-compose.yaml", "-f", "docker-compose.aws.yaml", "config",
                                         env=staged).stdout)["services"]["airflow-scheduler"]["environment"]
    assert environment["SDXL_LORA_CAPTIONER_URI"] == "s3://b/c/" and environment["SDXL_LORA_BASE_MODEL_ID"] == "org/sdxl"


@needs_compose
def test_aws_credentials_of_the_shell_reach_every_airflow_container():
    for name, service in aws_services({**AWS_ENV, **CREDENTIALS}).items():
        environment = service["environment"]
        assert {key: environment[key] for key in CREDENTIALS} == CREDENTIALS, name
        assert environment["AWS_DEFAULT_REGION"] == "eu-west-1", name
        assert environment["AWS_CONFIG_FILE"] == f"{AWS_FILES}/config", name
        assert environment["AWS_SHARED_CREDENTIALS_FILE"] == f"{AWS_FILES}/credentials", name
        mounts = [volume.split(":") for volume in service["volumes"] if isinstance(volume, str)]
        aws = [(source, mode) for source, target, *mode in mounts if target == AWS_FILES]
        assert aws == [(str(Path.home() / ".aws"), ["ro"])], name  # profiles and SSO caches, read-only


@needs_compose
def test_credentials_the_shell_lacks_stay_unset_in_the_containers():
    for name, service in aws_services(AWS_ENV).items():
        environment = service["environment"]
        # no value (null): Compose passes the variable only when the shell has it; an empty AWS_PROFILE or
        # AWS_ACCESS_KEY_ID would make boto3 look for a profile named "" or refuse half a key pair
        assert all(environment[key] is None for key in CREDENTIALS), name


@needs_compose
def test_every_parse_time_setting_can_reach_every_airflow_container():
    from sdxl_lora.settings import PARSE_TIME

    # aws_conn_id aside: the init service imports the connection as aws_default, the name the settings default to
    parse_time = {f"SDXL_LORA_{name.upper()}": "1" for name in PARSE_TIME if name != "aws_conn_id"}
    for name, service in aws_services({**AWS_ENV, **parse_time}).items():
        assert {key: service["environment"].get(key) for key in parse_time} == parse_time, name


@pytest.mark.skipif(not SCHEMA.exists(), reason="the Compose spec schema comes with Debian's docker-compose")
@pytest.mark.parametrize("name", ["docker-compose.yaml", "docker-compose.aws.yaml"])
def test_files_validate_against_the_compose_specification_schema(name):
    import jsonschema

    document = yaml.safe_load((ROOT / name).read_text())
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    broken = {**document, "services": {"x": {"image": "a", "ports": "not-a-list"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))
