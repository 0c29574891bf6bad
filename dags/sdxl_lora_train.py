"""
### SDXL LoRA training (production hyperparameters)

Trains one LoRA on a processed dataset version with the production hyperparameters (the original
system's: learning rate 2e-4, rank 4, text encoders trained, 8-bit Adam, fp16, ...), as a SageMaker
training job on spot capacity with checkpoints, and deploys it when its validation loss beats the
adapter the endpoint serves now.

Runs on the retraining cron (settings: `retrain_schedule`) and whenever `sdxl_dataset_prepare`
publishes a processed dataset (Asset). The version is the run's logical date when that version
exists (so backfills train each version), else the newest processed version.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from sdxl_lora.dag_common import dag_arguments, endpoint_param, run_date, smoke_param, version_param
from sdxl_lora.deploy import deploy_group
from sdxl_lora.operators import ResumableSageMakerTrainingOperator
from sdxl_lora.requests import PRODUCTION_HYPERPARAMETERS
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_lora_train"
SETTINGS = Settings.from_environment()
PROCESSED_DATASET = Asset(SETTINGS.uri("proc_dataset") + "/")


@dag(
    **dag_arguments(DAG_ID, __doc__, "training"),
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(SETTINGS.retrain_schedule, timezone="UTC"),
                                 assets=PROCESSED_DATASET),
    max_active_runs=1,
    params={
        "dataset_version": version_param("Processed dataset version; empty: the logical date's, else the newest."),
        "hyperparameters": Param(PRODUCTION_HYPERPARAMETERS, type="object",
                                 description="Training hyperparameters (see the README's table)."),
        "deploy_if_better": Param(True, type="boolean",
                                  description="Deploy when the validation loss beats the adapter serving now."),
        "endpoint_name": endpoint_param(),
        "smoke_request": smoke_param(),
    },
)
def sdxl_lora_train():
    @task
    def build_request(**context) -> dict:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from sdxl_lora import naming, requests

        settings = Settings.resolve()
        params, run_id, ds = context["params"], context["run_id"], run_date(context)
        s3 = S3Hook(aws_conn_id=settings.aws_conn_id)
        version = params["dataset_version"]
        if not version:
            bucket, prefix = settings.uri("proc_dataset")[len("s3://"):].split("/", 1)
            versions = sorted(p.rstrip("/").rsplit("/", 1)[-1]
                              for p in s3.list_prefixes(bucket_name=bucket, prefix=prefix + "/", delimiter="/"))
            if not versions:
                raise RuntimeError(f"no processed dataset under {settings.uri('proc_dataset')}/: run "
                                   "sdxl_dataset_prepare first")
            version = ds if ds in versions else versions[-1]
        name = naming.job_name("sdxl-lora-train", run_id, naming.slug(version))
        return requests.training_request(settings, name, settings.processed_dataset(version), params["hyperparameters"],
                                         requests.tags(dag=DAG_ID, run=run_id, version=version))

    config = build_request()
    trained = ResumableSageMakerTrainingOperator(
        task_id="train", config=config, aws_conn_id=SETTINGS.aws_conn_id, wait_for_completion=True, print_log=True,
        check_interval=SETTINGS.check_interval_seconds, max_attempts=SETTINGS.max_status_checks(),
        deferrable=SETTINGS.deferrable, pool="sagemaker_training")

    @task.short_circuit
    def better_than_serving(training: dict, params: dict) -> bool:
        import json

        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
        from sdxl_lora.deploy import serving_record_uri
        from sdxl_lora.selection import METRIC

        if not params["deploy_if_better"]:
            return False
        settings = Settings.resolve()

        def val_loss(description: dict) -> float | None:
            return {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList", [])}.get(METRIC)

        new = val_loss(training["Training"])
        if new is None:
            print("the new adapter has no validation loss (validation_split is 0): not deploying it automatically")
            return False
        endpoint = params["endpoint_name"] or settings.endpoint_name
        s3 = S3Hook(aws_conn_id=settings.aws_conn_id)
        record_uri = serving_record_uri(settings, endpoint)
        if not s3.check_for_key(record_uri):
            print(f"nothing recorded as serving on {endpoint}: deploying (val_loss {new:.5f})")
            return True
        serving = json.loads(s3.read_key(record_uri))
        job = serving["model_data_url"].rsplit("/output/", 1)[0].rsplit("/", 1)[-1]
        current = val_loss(SageMakerHook(aws_conn_id=settings.aws_conn_id).describe_training_job(job))
        print(f"new val_loss {new:.5f} against {current} for {job}, serving on {endpoint}")
        return current is None or new < current

    @task
    def model_artifacts(training: dict) -> str:
        return training["Training"]["ModelArtifacts"]["S3ModelArtifacts"]

    gate = better_than_serving(trained.output)
    deployment = deploy_group(model_artifacts(trained.output), "{{ params.endpoint_name or '' }}",
                              "{{ params.smoke_request }}")
    gate >> deployment


sdxl_lora_train()
