"""`sdxl-lora-ops submit`: one training job through the SageMaker Python SDK (sagemaker-core), against the
local stack, with the request the DAGs build."""

import json
import os
import subprocess
import sys

from conftest import BUCKET, wait_for_training

HYPERPARAMETERS = {"resolution": 32, "train_batch_size": 2, "max_train_steps": 4, "train_text_encoder": False,
                   "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "use_8bit_adam": False,
                   "enable_xformers_memory_efficient_attention": False, "mixed_precision": "no",
                   "validation_split": 0.2}


def settings_env(stack, staged) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SDXL_LORA_")},
            "AWS_ENDPOINT_URL": stack.url, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "SDXL_LORA_BUCKET": BUCKET, "SDXL_LORA_USE_SPOT": "false",
            "SDXL_LORA_BASE_MODEL_URI": staged["base"], "SDXL_LORA_TRAINING_IMAGE": "sdxl-lora-training:1.0"}


def test_submit_runs_the_dags_request_on_the_local_stack(stack, staged, sagemaker):
    env = settings_env(stack, staged)
    done = subprocess.run([sys.executable, "-m", "sdxl_lora_ops.cli", "submit", "--dataset-uri", staged["data"],
                           "--job-name", "sdxl-lora-submit-e2e", "--hyperparameters", json.dumps(HYPERPARAMETERS),
                           "--wait", "--timeout", "300"], env=env, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sdxl-lora-submit-e2e: Completed" in done.stdout
    described = wait_for_training(sagemaker, "sdxl-lora-submit-e2e")
    assert described["TrainingJobStatus"] == "Completed"

    # The very request the DAGs' builder makes with these settings reached SageMaker.
    probe = ("import json, sys; from sdxl_lora_ops import submit; "
             f"print(json.dumps(submit.build_request({staged['data']!r}, 'sdxl-lora-submit-e2e', "
             f"{HYPERPARAMETERS!r})))")
    expected = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                         check=True).stdout)
    for field in ("AlgorithmSpecification", "HyperParameters", "InputDataConfig", "OutputDataConfig",
                  "ResourceConfig", "StoppingCondition", "CheckpointConfig", "RoleArn"):
        assert described[field] == expected[field], field
    assert described["ModelArtifacts"]["S3ModelArtifacts"].endswith("/models/sdxl-lora-submit-e2e/output/model.tar.gz")


def test_submit_refuses_bad_input_with_a_clear_message(stack, staged):
    env = settings_env(stack, staged)
    base = [sys.executable, "-m", "sdxl_lora_ops.cli", "submit"]
    bad_name = subprocess.run(base + ["--dataset-uri", staged["data"], "--job-name", "bad_name!"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert bad_name.returncode != 0 and "job name 'bad_name!'" in bad_name.stderr
    bad_uri = subprocess.run(base + ["--dataset-uri", "/local/folder"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert bad_uri.returncode != 0 and "must be an s3:// prefix" in bad_uri.stderr
    bad_json = subprocess.run(base + ["--dataset-version", "v1", "--hyperparameters", "[1]"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert bad_json.returncode == 2 and "expected a JSON object" in bad_json.stderr
