"""`sdxl-lora-ops submit`: one training job without Airflow, through the SageMaker Python SDK.

The request is the one the DAGs send (plugins/sdxl_lora/sagemaker_requests.py with the same settings), handed
to sagemaker-core's `TrainingJob.create`: the SDK's typed resource for CreateTrainingJob. The SDK
validates it against its shapes and serializes it back to the API's form, which `to_sdk_arguments`
makes the identity (a test checks the round trip). Settings come from SDXL_LORA_* environment
variables, the endpoint and credentials from the usual AWS environment.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ml.contract.hyperparameters import preset

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
# Values that are maps of the caller's own keys, not API shapes: their keys stay as they are.
FREE_FORM_MAPS = {"HyperParameters", "Environment"}


def _plugins():
    """plugins/ is Airflow's import path; from a checkout it is next to this package."""
    if str(PLUGINS) not in sys.path:
        sys.path.insert(0, str(PLUGINS))
    from sdxl_lora import naming, sagemaker_requests, settings

    return naming, sagemaker_requests, settings


def to_sdk_arguments(request: dict) -> dict:
    """A boto3 CreateTrainingJob request -> TrainingJob.create keyword arguments (snake_case, nested)."""
    from sagemaker.core.utils.utils import pascal_to_snake

    def convert(value, free_form: bool = False):
        if isinstance(value, dict):
            return {key if free_form else pascal_to_snake(key): convert(item, key in FREE_FORM_MAPS and not free_form)
                    for key, item in value.items()}
        if isinstance(value, list):
            return [convert(item) for item in value]
        return value

    return {pascal_to_snake(key): convert(value, key in FREE_FORM_MAPS) for key, value in request.items()}


def build_request(dataset_uri: str, job_name: str, hyperparameters: dict) -> dict:
    _, sagemaker_requests, settings_module = _plugins()
    settings = settings_module.Settings.from_environment()
    if not dataset_uri.startswith("s3://"):
        raise ValueError(f"dataset URI must be an s3:// prefix, got {dataset_uri!r}")
    values = {**preset(settings.preset), **hyperparameters}  # what the train DAG's form would default to
    return sagemaker_requests.training_request(settings, job_name, dataset_uri, values,
                                     sagemaker_requests.tags(dag="submit", run=job_name))


def create(request: dict):
    """Start the job through the SDK; returns sagemaker-core's TrainingJob resource."""
    from sagemaker.core.resources import TrainingJob

    return TrainingJob.create(**to_sdk_arguments(request))


def main(args: argparse.Namespace) -> int:
    naming, _, settings_module = _plugins()
    settings = settings_module.Settings.from_environment()
    dataset_uri = args.dataset_uri or settings.processed_dataset(args.dataset_version)
    job_name = args.job_name or f"sdxl-lora-submit-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if not naming.is_valid(job_name):
        raise SystemExit(f"job name {job_name!r}: at most 63 characters of letters, digits and '-', "
                         "starting with a letter or digit")
    try:
        request = build_request(dataset_uri, job_name, args.hyperparameters)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    job = create(request)
    print(f"started training job {job.training_job_name} ({job.training_job_arn})")
    print(f"  image {settings.training_image}, data {dataset_uri}, output {settings.models()}/{job_name}/")
    if not args.wait:
        return 0
    job = _wait(job, args.timeout)
    print(f"{job.training_job_name}: {job.training_job_status}")
    if job.training_job_status != "Completed":
        print(f"  {getattr(job, 'failure_reason', '') or ''}")
        return 1
    print(f"  model {job.model_artifacts.s3_model_artifacts}")
    return 0


def _wait(job, timeout: int | None):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job.refresh()
        if job.training_job_status in ("Completed", "Failed", "Stopped"):
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise SystemExit(f"{job.training_job_name} still {job.training_job_status} after {timeout} s")
        time.sleep(2)
