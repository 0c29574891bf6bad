"""
### SDXL dataset preparation

Turns raw images at `raw_dataset/<version>/` into a training dataset at `proc_dataset/<version>/`
(an imagefolder with metadata.jsonl) with a SageMaker Processing job running `sdxl-lora prepare`.
The processed dataset is an outlet Asset, so `sdxl_lora_train` can run when a new version lands.

`version` defaults to the run's logical date, so a backfill over dates prepares one version per
date. A version whose processed dataset already exists is skipped unless `force` is set.
"""

from __future__ import annotations

from airflow.providers.amazon.aws.operators.sagemaker import SageMakerProcessingOperator
from airflow.sdk import Asset, Param, dag, task
from sdxl_lora.dag_common import dag_arguments, run_date, version_param
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_dataset_prepare"
SETTINGS = Settings.from_environment()
PROCESSED_DATASET = Asset(SETTINGS.uri("proc_dataset") + "/", extra={"layout": "proc_dataset/<version>/"})


@dag(
    **dag_arguments(DAG_ID, __doc__, "data"),
    schedule=None,
    params={
        "version": version_param("Dataset version (raw_dataset/<version>/); empty: the run's logical date."),
        "force": Param(False, type="boolean", description="Prepare again even when the processed dataset exists."),
    },
)
def sdxl_dataset_prepare():
    @task.short_circuit
    def needs_preparing(**context) -> bool:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        settings = Settings.resolve()
        params = context["params"]
        version = params["version"] or run_date(context)
        done = S3Hook(aws_conn_id=settings.aws_conn_id).check_for_key(
            settings.processed_dataset(version) + "metadata.jsonl")
        if done and not params["force"]:
            print(f"{settings.processed_dataset(version)} already exists: skipping (set force to redo it)")
            return False
        return True

    @task
    def build_request(**context) -> dict:
        from sdxl_lora import naming, requests

        settings = Settings.resolve()
        run_id = context["run_id"]
        version = context["params"]["version"] or run_date(context)
        name = naming.job_name("sdxl-lora-prepare", run_id, naming.slug(version))
        return requests.processing_request(settings, name, settings.raw_dataset(version),
                                           settings.processed_dataset(version),
                                           requests.tags(dag=DAG_ID, run=run_id, version=version))

    request = build_request()
    prepare = SageMakerProcessingOperator(
        task_id="prepare",
        config=request,
        aws_conn_id=SETTINGS.aws_conn_id,
        wait_for_completion=True,
        print_log=True,
        check_interval=SETTINGS.check_interval_seconds,
        max_attempts=SETTINGS.max_status_checks(),
        action_if_job_exists="fail",  # the name is per run and version: an existing job means a retry
        deferrable=SETTINGS.deferrable,
        outlets=[PROCESSED_DATASET],
    )
    needs_preparing() >> request >> prepare


sdxl_dataset_prepare()
