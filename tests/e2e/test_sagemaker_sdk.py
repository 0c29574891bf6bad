"""The SageMaker Python SDK v2, as users call it, against the local stack.

The SDK runs in a virtual environment of its own (its pins need not match Airflow's), made from the package
index once and kept under the temporary directory for later runs; tests/e2e/sdk_v2_client.py runs in it, one step
per test: Estimator.fit with spot, checkpoints, logs and metric definitions, TrainingJobAnalytics, a
HyperparameterTuner, and Model.deploy / predict / delete_endpoint.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import subprocess
import tempfile
import venv
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import BUCKET, IMAGE, ROLE, training_request, wait_for
from PIL import Image

SDK = "sagemaker==2.257.7"  # the newest 2.x on the package index when this was written
INFERENCE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdxl-lora-inference:latest"
REQUEST = {"prompt": "storyboard frame, a red circle", "width": 32, "height": 32, "num_inference_steps": 2, "seed": 1}
CLIENT = Path(__file__).with_name("sdk_v2_client.py")
# Opting out of the SDK's telemetry, as a user without internet access would: its requests would only time out.
SDK_CONFIG = "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"


@pytest.fixture(scope="module")
def sdk_python() -> Path:
    """The SDK's venv, made once per SDK version (a lock keeps parallel workers from making it twice)."""
    home = Path(tempfile.gettempdir()) / f"sdxl-lora-sdk-venv-{SDK.replace('==', '-')}"
    home.mkdir(exist_ok=True)
    python = home / "venv" / "bin" / "python"
    with (home / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "installed").exists():
            venv.create(home / "venv", with_pip=True, clear=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                            SDK],
                           check=True, timeout=900, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
            (home / "installed").write_text(SDK)
    (home / "config.yaml").write_text(SDK_CONFIG)
    return python


def test_the_sdk_venv_holds_the_sdk_and_no_torch(sdk_python):
    found = subprocess.run([str(sdk_python), "-c", "import importlib.metadata as m, importlib.util as u, json; "
                            "print(json.dumps([m.version('sagemaker'), bool(u.find_spec('torch'))]))"],
                           capture_output=True, text=True, timeout=120, env=_sdk_environment(None, sdk_python))
    assert found.returncode == 0, found.stderr[-2000:]
    assert json.loads(found.stdout) == [SDK.split("==")[1], False]


def _sdk_environment(stack, sdk_python: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHON", "SAGEMAKER_"))}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               SAGEMAKER_USER_CONFIG_OVERRIDE=str(sdk_python.parents[2] / "config.yaml"))
    if stack is not None:
        env["AWS_ENDPOINT_URL"] = stack.url
    return env


def _run(sdk_python: Path, stack, tmp_path: Path, step: str, **config) -> dict:
    from ml.contract.hyperparameters import to_sagemaker
    from ml.contract.metrics import METRIC_DEFINITIONS

    config = {"endpoint_url": stack.url, "role": ROLE, "training_image": IMAGE, "inference_image": INFERENCE_IMAGE,
              "output_path": f"s3://{BUCKET}/sdk-v2/models", "metric_definitions": METRIC_DEFINITIONS,
              "hyperparameters": to_sagemaker({"resolution": 32, "train_batch_size": 2, "max_train_steps": 6,
                                               "validation_split": 0.2, "checkpointing_steps": 2}),
              **config}
    path = tmp_path / f"{step}.json"
    path.write_text(json.dumps(config))
    done = subprocess.run([str(sdk_python), str(CLIENT), step, str(path)], capture_output=True, text=True,
                          timeout=600, env=_sdk_environment(stack, sdk_python), cwd=tmp_path)
    (tmp_path / f"{step}.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"the SDK's {step} failed; its output: {tmp_path / f'{step}.log'}"
    line = next(line for line in done.stdout.splitlines() if line.startswith("sdk-v2-client result: "))
    return json.loads(line.split(": ", 1)[1])


@pytest.fixture(scope="module")
def inputs(staged) -> dict:
    return {"train": staged["data"], "base_model": staged["base"]}


@pytest.fixture(scope="module")
def fitted(sdk_python, stack, staged, inputs, tmp_path_factory) -> dict:
    return _run(sdk_python, stack, tmp_path_factory.mktemp("sdk-train"), "train", inputs=inputs,
                checkpoint_uri=f"s3://{BUCKET}/sdk-v2/checkpoints")


def test_estimator_fit_with_spot_checkpoints_and_logs_completes(fitted, s3):
    assert fitted["status"] == "Completed"
    assert fitted["spot"] is True and fitted["checkpoint_uri"] == f"s3://{BUCKET}/sdk-v2/checkpoints"
    assert "Interrupted" in fitted["transitions"]  # the stack reclaims each spot job once; it resumed
    bucket, key = fitted["model_data"].removeprefix("s3://").split("/", 1)
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    assert {"train_loss", "val_loss"} <= set(fitted["final_metrics"])


def test_training_job_analytics_reads_the_metrics_from_cloudwatch(fitted, stack):
    rows = fitted["analytics"]
    assert {"train_loss", "val_loss"} <= {row["metric_name"] for row in rows}
    assert all(isinstance(row["value"], float) for row in rows)
    cloudwatch = stack.client("cloudwatch")
    metrics = cloudwatch.list_metrics(Namespace="/aws/sagemaker/TrainingJobs",
                                      Dimensions=[{"Name": "TrainingJobName", "Value": fitted["job_name"]}])["Metrics"]
    assert {"train_loss", "val_loss"} <= {m["MetricName"] for m in metrics}


def test_hyperparameter_tuner_fits_and_names_the_best_trial(sdk_python, stack, inputs, tmp_path):
    tuned = _run(sdk_python, stack, tmp_path, "tune", inputs=inputs)
    assert tuned["status"] == "Completed", tuned["failure"]
    assert tuned["definition_resources"] == ["HyperParameterTuningResourceConfig"]  # what the SDK sends
    assert len(tuned["trials"]) == 2 and set(tuned["trials"].values()) == {"Completed"}
    assert tuned["best"] in tuned["trials"]
    assert all(1e-4 <= rate <= 1e-3 for rate in tuned["learning_rates"])


def test_deploy_predict_and_delete_endpoint(sdk_python, stack, staged, fitted, tmp_path):
    answer = _run(sdk_python, stack, tmp_path, "deploy", model_data=fitted["model_data"], base_model=staged["base"],
                  request=REQUEST)
    assert answer["status"] == "InService"
    assert len(answer["images"]) == 1
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert image.format == "PNG" and image.size == (32, 32)
    assert "sdk-v2-endpoint" not in answer["endpoints_after"]


# -- what the SDK's tuner sends, through plain boto3: HyperParameterTuningResourceConfig ------------------------


def _tuning_request(name: str, staged: dict, **resources) -> dict:
    definition = {k: v for k, v in training_request("unused", staged).items()
                  if k not in ("TrainingJobName", "HyperParameters", "ResourceConfig")}
    definition["StaticHyperParameters"] = {"resolution": "32", "max_train_steps": "2", "train_batch_size": "2",
                                           "validation_split": "0.2"}
    return {"HyperParameterTuningJobName": name,
            "HyperParameterTuningJobConfig": {
                "Strategy": "Random", "HyperParameterTuningJobObjective": {"Type": "Minimize", "MetricName": "val_loss"},
                "ResourceLimits": {"MaxNumberOfTrainingJobs": 1, "MaxParallelTrainingJobs": 1},
                "ParameterRanges": {"ContinuousParameterRanges": [
                    {"Name": "learning_rate", "MinValue": "0.0001", "MaxValue": "0.001"}]}},
            "TrainingJobDefinition": {**definition, **resources}}


FIXED = {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50}


@pytest.mark.parametrize("resources, words", [
    ({}, "exactly one of ResourceConfig and HyperParameterTuningResourceConfig"),
    ({"ResourceConfig": FIXED, "HyperParameterTuningResourceConfig": FIXED},
     "exactly one of ResourceConfig and HyperParameterTuningResourceConfig"),
    ({"HyperParameterTuningResourceConfig": {"InstanceCount": 1}}, "hyperParameterTuningResourceConfig.instanceType"),
    ({"HyperParameterTuningResourceConfig": {**FIXED, "InstanceConfigs": [FIXED]}}, "do not provide values"),
    ({"HyperParameterTuningResourceConfig": {"InstanceConfigs": [FIXED], "AllocationStrategy": "Cheapest"}},
     "Prioritized"),
    ({"HyperParameterTuningResourceConfig": {"InstanceConfigs": [FIXED] * 7}}, "length less than or equal to 6"),
])
def test_tuning_resources_are_checked_as_aws_checks_them(sagemaker, staged, resources, words):
    with pytest.raises(ClientError) as raised:
        sagemaker.create_hyper_parameter_tuning_job(**_tuning_request("sdk-bad-resources", staged, **resources))
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    assert words in raised.value.response["Error"]["Message"]


def test_instance_configs_give_the_trial_its_first_instance_type(sagemaker, staged):
    configs = [{"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30}, FIXED]
    sagemaker.create_hyper_parameter_tuning_job(**_tuning_request(
        "sdk-instance-configs", staged,
        HyperParameterTuningResourceConfig={"InstanceConfigs": configs, "AllocationStrategy": "Prioritized"}))
    try:
        trials = wait_for(lambda: {"n": str(len(sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
            HyperParameterTuningJobName="sdk-instance-configs")["TrainingJobSummaries"]))}, "n", done=("1",))
        assert trials["n"] == "1"
        trial = sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
            HyperParameterTuningJobName="sdk-instance-configs")["TrainingJobSummaries"][0]["TrainingJobName"]
        resources = sagemaker.describe_training_job(TrainingJobName=trial)["ResourceConfig"]
        assert resources == configs[0]
    finally:  # the trial need not run to its end
        try:
            sagemaker.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName="sdk-instance-configs")
        except ClientError:
            pass  # it ended meanwhile
    ended = wait_for(lambda: sagemaker.describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName="sdk-instance-configs"), "HyperParameterTuningJobStatus")
    assert ended["HyperParameterTuningJobStatus"] in ("Stopped", "Completed")
