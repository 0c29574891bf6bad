"""containers/: each job image's Dockerfile names a pinned base and the `sdxl-lora` entrypoint, and
agrees with ml/contract/job_images.py (the registry the local stack uses) and with the SDK's DLC look-up."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ml.cli import build_parser
from ml.contract.job_images import IMAGE_VERBS
from sdxl_lora_ops import base_images

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def base_of(path: Path) -> str:
    """The FROM line with the build arguments' defaults filled in (an argument without one stays ${NAME})."""
    steps = instructions(path)
    args = {k.split("=", 1)[0]: k.split("=", 1)[1] for kind, k in steps if kind == "ARG" and "=" in k}
    frm = [a for kind, a in steps if kind == "FROM"]
    assert len(frm) == 1, f"{path}: one FROM"
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), frm[0])


def pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return bool(tag) and tag != "latest" and bool(re.search(r"\d+\.\d+", tag))


@pytest.mark.parametrize("image", sorted(IMAGE_VERBS))
def test_job_image_dockerfile_matches_the_registry(image):
    path = CONTAINERS / image.removeprefix("sdxl-lora-") / "Dockerfile"
    steps = dict(instructions(path))
    assert json.loads(steps["ENTRYPOINT"]) == ["sdxl-lora"]
    assert json.loads(steps["CMD"]) == [IMAGE_VERBS[image]]
    # The base is a build argument without a default: its registry account is the SDK's to name, per region.
    assert base_of(path) == "${BASE_IMAGE}" and ("ARG", "BASE_IMAGE") in instructions(path)
    base = base_images.retrieve(image, "us-east-1")  # what build_and_push.sh passes, per region
    assert pinned(base), f"{image}: unpinned base {base}"
    assert '.[payload]' in steps["RUN"] and "-c constraints.txt" in steps["RUN"]


def test_every_verb_the_images_run_is_a_container_verb():
    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    assert set(IMAGE_VERBS.values()) <= verbs
    assert not {"local-stack", "airflow", "demo", "submit"} & verbs  # those are sdxl-lora-ops


def test_training_image_adds_the_gpu_set_and_the_others_do_not():
    assert '.[gpu]' in dict(instructions(CONTAINERS / "training" / "Dockerfile"))["RUN"]
    for name in ("processing", "inference"):
        assert "[gpu]" not in (CONTAINERS / name / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in ("bitsandbytes", "deepspeed", "xformers"):
        assert re.search(rf'"{package}==[\d.]+"', pyproject), f"{package} pinned exactly"


@pytest.mark.parametrize("name", ["airflow", "local-stack"])
def test_tooling_images_have_pinned_bases(name):
    assert pinned(base_of(CONTAINERS / name / "Dockerfile"))


def test_airflow_image_installs_the_project_as_into_any_airflow_and_carries_no_payload():
    """docs/airflow-deployment.md's way (tests/ship/test_airflow_image.py runs it): the `airflow` extra with all its
    dependencies, the image's own Airflow version held, no constraints of this repository over the image's."""
    run = dict(instructions(CONTAINERS / "airflow" / "Dockerfile"))["RUN"]
    assert 'pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "/opt/sdxl-lora[airflow]"' in run
    assert "--no-deps" not in run and "constraints" not in run and "[payload]" not in run and "[dev]" not in run
    assert "sdxl-lora-ops install-dags --dags-folder /opt/airflow/dags" in run


@pytest.mark.parametrize("name", ["airflow", "inference", "processing", "training", "local-stack"])
def test_every_image_that_installs_the_project_copies_every_folder_it_is_built_from(name):
    import tomllib

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    sources = {src.rstrip("/") for kind, args in instructions(CONTAINERS / name / "Dockerfile") if kind == "COPY"
               for src in args.split()[:-1] if not src.startswith("--")}
    assert {"pyproject.toml", "README.md", *package_dir.values()} <= sources


@pytest.fixture
def fake_tools(tmp_path):
    """docker and aws that record their arguments instead of building or calling AWS."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("docker", "aws"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n'
                                    f'[ "$1 $2" = "ecr describe-repositories" ] && exit 254\nexit 0\n')
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}, log


def run_script(env, *args):
    return subprocess.run([str(CONTAINERS / "build_and_push.sh"), *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_build_and_push_builds_every_registry_image_on_its_regional_base(fake_tools):
    env, log = fake_tools
    done = run_script(env, "--region", "eu-west-1", "--account", "123456789012", "--prefix", "team/sdxl", "--tag", "t1")
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    for image in IMAGE_VERBS:
        uri = f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/sdxl/{image}:t1"
        build = next(c for c in calls if c.startswith("docker build") and uri in c)
        assert f"BASE_IMAGE={base_images.retrieve(image, 'eu-west-1')}" in build
        assert f"containers/{image.removeprefix('sdxl-lora-')}/Dockerfile" in build
        assert f"docker push {uri}" in calls
        assert any(c.startswith("aws ecr create-repository") and f"team/sdxl/{image}" in c for c in calls)
    assert "SDXL_LORA_TRAINING_IMAGE=123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/sdxl/sdxl-lora-training:t1" \
        in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--account", "123456789012"], "--region is required"),
    (["--region", "us-east-1", "--account", "12345"], "12-digit AWS account id"),
    (["--region", "us-east-1", "--account", "123456789012", "--images", "sdxl-lora-gpu"], "unknown image sdxl-lora-gpu"),
])
def test_build_and_push_refuses_bad_arguments(fake_tools, args, message):
    env, log = fake_tools
    done = run_script(env, *args)
    assert done.returncode == 2 and message in done.stderr
    assert not log.exists() or "docker build" not in log.read_text()
