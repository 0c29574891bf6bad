"""
### SDXL LoRA training (production hyperparameters)

Trains one LoRA on a processed dataset version with the production hyperparameters (the original
system's: learning rate 2e-4, rank 4, text encoders trained, 8-bit Adam, fp16, ...), as a SageMaker
training job on spot capacity with checkpoints, and deploys it when its validation loss beats the
adapter the endpoint serves now (the serving record keeps that adapter's training job and val_loss).

Runs on the retraining cron (settings: `retrain_schedule`) and whenever `sdxl_dataset_prepare`
publishes a processed dataset (Asset). The version it trains: `dataset_version` when given, else
the one its triggering Asset event names, else its logical date's (so backfills train each
version); never the newest in S3. A scheduled or backfill run whose date has no prepared version
is skipped, saying so in the `dataset_version` task's log.
"""

from __future__ import annotations

import logging

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, chain, dag, task
from sdxl_lora.assets import processed_dataset
from sdxl_lora.dag_common import (dag_arguments, endpoint_param, hyperparameters_param, job_kwargs, run_date,
                                  smoke_param, version_param)
from sdxl_lora.deploy import deploy_group
from sdxl_lora.operators import ResumableSageMakerTrainingOperator
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_lora_train"
JOB_PREFIX = "sdxl-lora-train"
SETTINGS = Settings.from_environment()
PROCESSED_DATASET = processed_dataset(SETTINGS)
log = logging.getLogger(__name__)


@dag(
    **dag_arguments(DAG_ID, __doc__, "training"),
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(SETTINGS.retrain_schedule, timezone="UTC"),
                                 assets=PROCESSED_DATASET),
    max_active_runs=1,
    params={
        "dataset_version": version_param("Processed dataset version; empty: the triggering Asset event's, else "
                                         "the run's logical date."),
        "hyperparameters": hyperparameters_param("production", "Training hyperparameters (the production preset)."),
        "deploy_if_better": Param(True, type="boolean",
                                  description="Deploy when the validation loss beats the adapter serving now."),
        "endpoint_name": endpoint_param(),
        "smoke_request": smoke_param(),
    },
)
def sdxl_lora_train():
    @task
    def dataset_version(params: dict, dag_run=None, triggering_asset_events=None, **context) -> str:
        """The version this run trains; skips a scheduled run whose date has no prepared version."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from sdxl_lora import assets

        settings = Settings.resolve()
        events = triggering_asset_events.get(PROCESSED_DATASET, []) if triggering_asset_events else []
        choice = assets.choose_version(params["dataset_version"], events, dag_run.run_type, run_date(context))
        location = settings.processed_dataset(choice.version)
        prepared = S3Hook(aws_conn_id=settings.aws_conn_id).check_for_key(location + "manifest.json")
        assets.require_prepared(choice, location, prepared)
        log.info("training dataset version %s (from %s): %s", choice.version, choice.source, location)
        return choice.version

    @task
    def build_request(version: str, params: dict, run_id: str) -> dict:
        from sdxl_lora import naming, requests

        settings = Settings.resolve()
        name = naming.job_name(JOB_PREFIX, run_id, naming.slug(version))
        return requests.training_request(settings, name, settings.processed_dataset(version), params["hyperparameters"],
                                         requests.tags(dag=DAG_ID, run=run_id, version=version))

    @task
    def candidate(training: dict) -> dict:
        """The trained model, its job and val_loss: what deployment records and the comparison reads."""
        from sdxl_lora import selection

        description = training["Training"]
        return {"model_artifacts": description["ModelArtifacts"]["S3ModelArtifacts"],
                "training": {"training_job": description["TrainingJobName"],
                             "val_loss": selection.final_metrics(description).get(selection.METRIC)}}

    @task.short_circuit
    def better_than_serving(trained: dict, params: dict) -> bool:
        import json

        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from sdxl_lora import serving

        if not params["deploy_if_better"]:
            log.info("deploy_if_better is off: not deploying")
            return False
        settings = Settings.resolve()
        endpoint = params["endpoint_name"] or settings.endpoint_name
        s3 = S3Hook(aws_conn_id=settings.aws_conn_id)
        uri = serving.record_uri(settings, endpoint)
        record = json.loads(s3.read_key(uri)) if s3.check_for_key(uri) else None
        deploy, reason = serving.better_than_serving(trained["training"]["val_loss"], record, endpoint)
        log.info("%s", reason)
        return deploy

    version = dataset_version()
    config = build_request(version)
    train = ResumableSageMakerTrainingOperator(task_id="train", config=config, pool="sagemaker_training",
                                               **job_kwargs(SETTINGS))
    trained = candidate(train.output)
    deployment = deploy_group(trained["model_artifacts"], "{{ params.endpoint_name or '' }}",
                              "{{ params.smoke_request }}", training=trained["training"])

    chain(version, config, train, trained, better_than_serving(trained), deployment)


sdxl_lora_train()
