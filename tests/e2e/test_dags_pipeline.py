"""The DAGs themselves, run by Airflow (`airflow dags test`) against the local stack."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ml.fixtures import synthetic, tiny_captioner

ROOT = Path(__file__).parents[2]
BUCKET, PREFIX = "sdxl-lora-local", "sdxl-finetune-lora"
GROUP = "e2e-pipeline"


@pytest.fixture(scope="module")
def airflow_env(stack, staged, s3, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "SDXL_LORA_BUCKET": BUCKET, "SDXL_LORA_PREFIX": PREFIX, "SDXL_LORA_CHECK_INTERVAL_SECONDS": "1",
           "SDXL_LORA_RETRY_DELAY_SECONDS": "2",
           "SDXL_LORA_MODEL_PACKAGE_GROUP": GROUP,  # a group of its own: other modules' DAG runs share the stack
           "SDXL_LORA_BASE_MODEL_URI": staged["base"] + "/",
           "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                                                   "extra": {"endpoint_url": stack.url, "region_name": "us-east-1"}})}
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([*airflow, "pools", "set", "sagemaker_training", "2", "SageMaker training jobs",
                    "--include-deferred"], env=env, check=True, capture_output=True, timeout=120)
    s3.create_bucket(Bucket=BUCKET)
    # The original system's raw data: frames without captions, which InstructBLIP (here the tiny one) captions.
    raw = synthetic.write_dataset(tmp_path_factory.mktemp("raw"), count=8, sidecar_captions=True)
    for caption in sorted(raw.glob("*.txt"))[:6]:
        caption.unlink()
    (raw / "broken.png").write_bytes(b"not an image")
    captioner = tiny_captioner.build(tmp_path_factory.mktemp("captioner") / "instructblip")
    for folder, prefix in ((raw, f"{PREFIX}/raw_dataset/v1"), (captioner, f"{PREFIX}/captioner")):
        for path in folder.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
    env["SDXL_LORA_CAPTIONER_URI"] = f"s3://{BUCKET}/{PREFIX}/captioner/"
    return env


def _dags_test_command(dag_id: str, conf: dict) -> list[str]:
    """`airflow dags test`, parsing only the DAG's own file (each DAG file is named by its dag_id)."""
    return [sys.executable, "-m", "airflow", "dags", "test", dag_id, "-f", str(ROOT / "dags" / f"{dag_id}.py"),
            "-c", json.dumps(conf)]


def _dags_test(env: dict, dag_id: str, conf: dict) -> str:
    done = subprocess.run(_dags_test_command(dag_id, conf), env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "state=success" in output, output[-4000:]
    return output


def _comparison(output: str) -> str:
    """The train DAG's log line that compares the new adapter with the serving one."""
    return "\n".join(line for line in output.splitlines() if "val_loss" in line and "serving" in line)


def test_prepare_grid_search_and_deploy_through_the_dags(stack, airflow_env, s3):
    options = {"version": "v1", "resolution": 32, "min_size": 32, "latent_cache": True, "caption_batch_size": 4}
    prepared = _dags_test(airflow_env, "sdxl_dataset_prepare", options)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/proc_dataset/v1/")["Contents"]}
    assert f"{PREFIX}/proc_dataset/v1/metadata.jsonl" in keys
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/proc_dataset/v1/manifest.json")["Body"].read())
    assert manifest["counts"]["captions_from"] == {"instructblip": 6, "sidecar": 2}
    assert manifest["counts"]["buckets"] == {"24x40": 8} and manifest["counts"]["latents_cached"] == 8
    assert manifest["rejected"] == [{"file": "broken.png", "reason": "not_an_image",
                                     "detail": "not an image format PIL recognises"}]
    assert "captions from: 6 instructblip, 2 sidecar" in prepared  # the manifest's summary in the task log

    # Unchanged inputs and options: no job. (That an edited input is prepared again is
    # tests/plugins/test_datasets.py's, on the same decision the DAG's `changed` task makes.)
    skipped = _dags_test(airflow_env, "sdxl_dataset_prepare", options)
    assert "with these options already" in skipped and "skipping" in skipped

    output = _dags_test(airflow_env, "sdxl_lora_grid_search", {
        "dataset_version": "v1", "learning_rates": [0.001, 0.003], "max_train_steps": [6], "ranks": [4],
        "hyperparameters": {"resolution": 32, "train_batch_size": 2, "validation_split": 0.25,
                            "checkpointing_steps": 3}})
    boards = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/grid_search/")["Contents"]]
    board_key = next(k for k in boards if k.endswith("leaderboard.json"))
    board = json.loads(s3.get_object(Bucket=BUCKET, Key=board_key)["Body"].read())
    assert len(board["trials"]) == 2 and all(t["status"] == "Completed" for t in board["trials"])
    assert board["winner"] == board["trials"][0]["job_name"]
    assert board["trials"][0]["val_loss"] <= board["trials"][1]["val_loss"]
    assert "-lr-0-001-mts-6-r-4" in output and "-lr-0-003-mts-6-r-4" in output  # the trials' map indexes
    assert "from the dataset's cache" in output  # the trials reuse the latents prepare cached

    winner = board["trials"][0]["model_artifacts"]
    sagemaker = stack.client("sagemaker")
    # The winner is registered (setting model_package_group), waiting for approval: the run was not asked to
    # deploy it.
    (registered,) = sagemaker.list_model_packages(ModelPackageGroupName=GROUP)["ModelPackageSummaryList"]
    version = sagemaker.describe_model_package(ModelPackageName=registered["ModelPackageArn"])
    assert version["ModelApprovalStatus"] == "PendingManualApproval"
    assert version["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == winner
    assert version["CustomerMetadataProperties"]["training_job"] == board["winner"]
    assert version["CustomerMetadataProperties"]["dataset_version"] == "v1"
    metrics = version["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    document = json.loads(s3.get_object(Bucket=BUCKET, Key=metrics.split("/", 3)[3])["Body"].read())
    assert document["val_loss"] == pytest.approx(board["trials"][0]["val_loss"])

    smoke = {"prompt": "storyboard frame, a red circle", "width": 32, "height": 32, "num_inference_steps": 2,
             "seed": 0, "lora_scale": 0.8}
    _dags_test(airflow_env, "sdxl_lora_deploy", {"model_data_url": winner, "endpoint_name": "e2e-dag-endpoint",
                                                  "smoke_request": smoke})
    served = sagemaker.describe_endpoint(EndpointName="e2e-dag-endpoint")
    assert served["EndpointStatus"] == "InService"

    # A deployment whose smoke test fails is rolled back: the endpoint keeps the config it had.
    failed = subprocess.run(_dags_test_command("sdxl_lora_deploy", {
        "model_data_url": winner, "endpoint_name": "e2e-dag-endpoint", "smoke_request": {**smoke, "width": 33}}),
        env=airflow_env, capture_output=True, text=True, timeout=900)
    assert "state=failed" in failed.stdout + failed.stderr
    after = sagemaker.describe_endpoint(EndpointName="e2e-dag-endpoint")
    assert after["EndpointStatus"] == "InService"
    assert after["EndpointConfigName"] == served["EndpointConfigName"]

    # Retraining a named version compares against what serves now before deploying: a scoring job scores the
    # serving adapter (the grid's winner, deployed from its URL) on the same version's held-out images, and the
    # run deploys only when its own val_loss is lower (retrains of several versions in a row:
    # tests/e2e/test_scheduler_schedules.py).
    retrain = {"dataset_version": "v1", "endpoint_name": "e2e-dag-endpoint", "smoke_request": smoke,
               "hyperparameters": {"resolution": 32, "train_batch_size": 2, "validation_split": 0.25,
                                   "max_train_steps": 4, "checkpointing_steps": 2}}
    before = after["EndpointConfigName"]
    line = _comparison(_dags_test(airflow_env, "sdxl_lora_train", retrain))
    match = re.search(r"both adapters scored on version v1's held-out images: new val_loss (\S+) .* against "
                      r"(\S+) of the serving adapter .*serving on e2e-dag-endpoint: (deploying|keeping what serves)",
                      line)
    assert match, line
    new, current, verdict = float(match[1]), float(match[2]), match[3]
    if new != current:  # (equal as printed to 6 digits: either verdict)
        assert verdict == ("deploying" if new < current else "keeping what serves"), line
    after = sagemaker.describe_endpoint(EndpointName="e2e-dag-endpoint")
    assert after["EndpointStatus"] == "InService"
    assert (after["EndpointConfigName"] != before) == (verdict == "deploying")
    # The retrained adapter is version 2, Approved exactly when it was deployed, with both scores in its metrics.
    retrained = sagemaker.list_model_packages(ModelPackageGroupName=GROUP, SortOrder="Descending",
                                              MaxResults=1)["ModelPackageSummaryList"][0]
    assert retrained["ModelPackageVersion"] == 2
    assert retrained["ModelApprovalStatus"] == ("Approved" if verdict == "deploying" else "PendingManualApproval")
    metrics = sagemaker.describe_model_package(ModelPackageName=retrained["ModelPackageArn"])[
        "ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    document = json.loads(s3.get_object(Bucket=BUCKET, Key=metrics.split("/", 3)[3])["Body"].read())
    assert f"{document['val_loss']:.6g}" == match[1] and f"{document['serving_val_loss']:.6g}" == match[2]
    sagemaker.delete_endpoint(EndpointName="e2e-dag-endpoint")
