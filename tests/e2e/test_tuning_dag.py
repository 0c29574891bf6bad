"""sdxl_lora_tune run by Airflow (`airflow dags test`) against the local stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUCKET

ROOT = Path(__file__).parents[2]
PREFIX = "tune-e2e"


@pytest.fixture(scope="module")
def airflow_env(stack, staged, s3, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow-home-tune")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "SDXL_LORA_BUCKET": BUCKET, "SDXL_LORA_PREFIX": PREFIX, "SDXL_LORA_CHECK_INTERVAL_SECONDS": "1",
           "SDXL_LORA_RETRY_DELAY_SECONDS": "2",
           "SDXL_LORA_TRAINING_POOL_SIZE": "2", "SDXL_LORA_BASE_MODEL_URI": staged["base"] + "/",
           "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                                                   "extra": {"endpoint_url": stack.url, "region_name": "us-east-1"}})}
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([*airflow, "pools", "set", "sagemaker_training", "2", "SageMaker training jobs",
                    "--include-deferred"], env=env, check=True, capture_output=True, timeout=120)
    # The processed dataset the DAG trains on: the staged synthetic frames and their metadata.jsonl.
    source = staged["data"].removeprefix(f"s3://{BUCKET}/")
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=source + "/")["Contents"]:
        s3.copy_object(Bucket=BUCKET, CopySource={"Bucket": BUCKET, "Key": item["Key"]},
                       Key=f"{PREFIX}/proc_dataset/v1/{item['Key'][len(source) + 1:]}")
    return env


def max_overlap(trials: list[dict]) -> int:
    """Most trials that ran at the same time, from their creation and end times."""
    events = sorted([(t["CreationTime"], 1) for t in trials] + [(t["TrainingEndTime"], -1) for t in trials],
                    key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_tuning_through_the_dag_picks_the_lowest_val_loss_and_deploys_it(stack, airflow_env, s3):
    smoke = {"prompt": "storyboard frame, a red circle", "width": 32, "height": 32, "num_inference_steps": 2,
             "seed": 0, "lora_scale": 0.8}
    conf = {"dataset_version": "v1", "strategy": "Bayesian", "learning_rate_min": 0.0005, "learning_rate_max": 0.05,
            "max_train_steps_min": 3, "max_train_steps_max": 6, "ranks": [2, 4], "max_jobs": 3,
            "max_parallel_jobs": 4, "random_seed": 7, "deploy_winner": True, "endpoint_name": "e2e-tune-endpoint",
            "smoke_request": smoke,
            "hyperparameters": {"resolution": 32, "train_batch_size": 2, "validation_split": 0.25,
                                "checkpointing_steps": 3}}
    done = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "sdxl_lora_tune", "-c", json.dumps(conf)],
                          env=airflow_env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "state=success" in output, output[-4000:]
    assert "max_parallel_jobs 4 capped to 2" in output

    sagemaker = stack.client("sagemaker")
    tuning_jobs = sagemaker.list_hyper_parameter_tuning_jobs(NameContains="sdxl-lora-tune")
    name = tuning_jobs["HyperParameterTuningJobSummaries"][0]["HyperParameterTuningJobName"]
    tuning_job = sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    assert tuning_job["HyperParameterTuningJobStatus"] == "Completed"
    assert tuning_job["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxParallelTrainingJobs"] == 2
    trials = sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=name, MaxResults=100)["TrainingJobSummaries"]
    assert len(trials) == 3 and max_overlap(trials) <= 2
    for trial in trials:
        tuned = trial["TunedHyperParameters"]
        assert 0.0005 <= float(tuned["learning_rate"]) <= 0.05 and 3 <= int(tuned["max_train_steps"]) <= 6
        assert tuned["rank"] in ("2", "4")

    boards = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/tuning/")["Contents"]]
    board = json.loads(s3.get_object(Bucket=BUCKET, Key=next(k for k in boards if k.endswith(".json")))["Body"].read())
    assert len(board["trials"]) == 3 and all(t["status"] == "Completed" for t in board["trials"])
    lowest = min(board["trials"], key=lambda t: t["val_loss"])
    assert board["winner"] == lowest["job_name"] == tuning_job["BestTrainingJob"]["TrainingJobName"]
    assert {t["job_name"] for t in board["trials"]} == {t["TrainingJobName"] for t in trials}

    # The winner went through the shared deploy tasks, deployed as the registry's version of it (registered and
    # Approved by the run: the endpoint's model is made from that version).
    endpoint = sagemaker.describe_endpoint(EndpointName="e2e-tune-endpoint")
    assert endpoint["EndpointStatus"] == "InService"
    model = sagemaker.describe_model(ModelName=sagemaker.describe_endpoint_config(
        EndpointConfigName=endpoint["EndpointConfigName"])["ProductionVariants"][0]["ModelName"])
    version = sagemaker.describe_model_package(ModelPackageName=model["PrimaryContainer"]["ModelPackageName"])
    assert version["ModelApprovalStatus"] == "Approved"
    assert version["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == lowest["model_artifacts"]
    sagemaker.delete_endpoint(EndpointName="e2e-tune-endpoint")
