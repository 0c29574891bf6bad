"""
### SDXL LoRA training

Trains one LoRA on a processed dataset version with the preset's hyperparameters (setting `preset`:
on AWS `production`, the original system's: learning rate 2e-4, rank 4, text encoders trained, 8-bit
Adam, fp16, ...; on the local stack `local`, full precision on a CPU), as a SageMaker training job on
spot capacity with checkpoints, and deploys it when its validation loss beats the adapter the
endpoint serves now.

Runs on the retraining cron (settings: `retrain_schedule`) and whenever `sdxl_dataset_prepare`
publishes a processed dataset (Asset). An Asset-triggered run trains nothing itself: `version_runs`
reads its events (and those of the Asset since, which Airflow would otherwise leave for a later
event) and `queue_version_runs` queues one run per event, `dataset_<version>__<event time>`, with
that version as `dataset_version`; runs go one at a time, in event order, so every prepared version
is trained once and compared with what serves after the previous one. Other runs train
`dataset_version` when given, else their logical date's `YYYY-MM-DD` (never the newest in S3). A
scheduled or backfill run whose date has no prepared version is skipped, saying so in the
`dataset_version` task's log.

A run no one gave hyperparameters to (cron, Asset, backfill without `--dag-run-conf`) uses the
preset's hyperparameters updated with the Airflow Variable `sdxl_lora_retrain_hyperparameters` (a JSON
object) when it is set.

The comparison is like with like: each version holds out its own validation images, so while the
new adapter trains, `score_serving` scores the adapter serving now on the new version's held-out
images (a scoring job: ml/train/evaluate.py, the same split, fixed noise and timesteps and precision the
new job's val_loss uses), and `better_than_serving` compares the two numbers, both in its log
(the rule: `sdxl_lora.selection.compare_with_serving`).

Whatever the comparison says, `register_model` registers the new adapter as a version in the model
package group (setting `model_package_group`) with its val_loss, the serving adapter's score and its
lineage: Approved when it is deployed, else waiting for approval; with the Param `approval` `manual`,
it waits for approval and nothing is deployed (docs/dags.md#model-registry). An Approved version is what
deploys (the endpoint's model is made from it), so the serving record names it.

Before any job starts, `build_request` logs the job's estimated cost (the image count from the dataset's
manifest) and, when `max_cost_usd` is set and the estimate is above it (or unknown), fails without retrying
(docs/dags.md#cost); the scoring job's start-up is not counted.

A failed training (or scoring, or deployment) fails the run: the `watcher` task (trigger rule ONE_FAILED,
downstream of every task) fails it then, though `rollback` after a failed deployment succeeds.
"""

from __future__ import annotations

import logging

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, TriggerRule, chain, dag, task

from sdxl_lora.assets import processed_dataset
from sdxl_lora.dag_common import (
    approval_param,
    cost_cap_param,
    dag_arguments,
    deploy_requested,
    endpoint_param,
    hyperparameters_param,
    job_kwargs,
    no_retry,
    run_date,
    smoke_param,
    version_param,
    watch,
)
from sdxl_lora.deploy import deploy_group, register_model
from sdxl_lora.operators.jobs import ResumableSageMakerTrainingOperator
from sdxl_lora.presets import active
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_lora_train"
JOB_PREFIX = "sdxl-lora-train"
SETTINGS = Settings.from_environment()
PRESET = active(SETTINGS)
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
        "hyperparameters": hyperparameters_param(PRESET, "Training hyperparameters."),
        "max_cost_usd": cost_cap_param(),
        "deploy_if_better": Param(True, type="boolean",
                                  description="Deploy when the validation loss beats the adapter serving now."),
        "approval": approval_param(),
        "endpoint_name": endpoint_param(),
        "smoke_request": smoke_param(PRESET),
    },
)
def sdxl_lora_train():
    @task
    def dataset_version(params: dict, dag_run=None, **context) -> str:
        """The version this run trains; skips a scheduled run whose date has no prepared version, and an
        Asset-triggered run, whose versions train in the runs it queues."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.sdk.exceptions import AirflowSkipException

        from sdxl_lora import assets

        if dag_run.run_type == "asset_triggered":
            reason = "an Asset-triggered run trains in the runs queue_version_runs queues, one per event's version"
            log.info("%s", reason)
            raise AirflowSkipException(reason)
        settings = Settings.resolve()
        # run_date falls back to the run's run_after when it has no logical date
        choice = assets.choose_version(params["dataset_version"], dag_run.run_type,
                                       run_date({**context, "dag_run": dag_run}))
        location = settings.processed_dataset(choice.version)
        prepared = S3Hook(aws_conn_id=settings.aws_conn_id).check_for_key(location + "manifest.json")
        assets.require_prepared(choice, location, prepared)
        log.info("training dataset version %s (from %s): %s", choice.version, choice.source, location)
        return choice.version

    @task(inlets=[PROCESSED_DATASET])
    def version_runs(dag_run=None, triggering_asset_events=None, inlet_events=None) -> list:
        """An Asset-triggered run's events, one run to queue per event (other runs: none)."""
        from sdxl_lora import assets

        if dag_run.run_type != "asset_triggered":
            return []
        consumed = list(triggering_asset_events[PROCESSED_DATASET])
        first = min(event.timestamp for event in consumed)
        seen = list(inlet_events[PROCESSED_DATASET].after(first.isoformat()))
        runs = assets.version_runs(consumed, seen)
        log.info("%d Asset event(s) of this run, %d of the Asset from %s on: queuing %s", len(consumed), len(seen),
                 first.isoformat(), ", ".join(f"{r['trigger_run_id']} (dataset version {r['conf']['dataset_version']})"
                                              for r in runs))
        return runs

    @task
    def build_request(version: str, params: dict, run_id: str, dag_run=None) -> dict:
        """The training request, after its estimated cost is logged and checked against max_cost_usd."""
        import json

        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.sdk import Variable

        from ml.contract.manifest import MANIFEST
        from sdxl_lora import assets, estimate, naming, sagemaker_requests

        settings = Settings.resolve()
        hyperparameters = params["hyperparameters"]
        if "hyperparameters" not in (dag_run.conf or {}):  # nobody chose them: the retraining recipe
            hyperparameters = assets.retrain_hyperparameters(hyperparameters,
                                                             Variable.get(assets.RETRAIN_VARIABLE, default=None))
        name = naming.job_name(JOB_PREFIX, run_id, naming.slug(version))
        request = sagemaker_requests.training_request(settings, name, settings.processed_dataset(version),
                                                      hyperparameters,
                                                      sagemaker_requests.tags(dag=DAG_ID, run=run_id, version=version))
        # The image count: num_train_epochs counts the steps (the production preset's way).
        manifest = S3Hook(aws_conn_id=settings.aws_conn_id).read_key(settings.processed_dataset(version) + MANIFEST)
        found = estimate.of_training_requests([request], settings, estimate.manifest_images(json.loads(manifest)))
        with no_retry(estimate.CostCapError):  # over the cap: neither the training nor the scoring job starts
            estimate.enforce(found, params["max_cost_usd"], log)
        return request

    @task
    def candidate(training: dict) -> dict:
        """The trained model, its job and val_loss: what deployment records and the comparison reads."""
        from sdxl_lora import selection

        return selection.candidate(training["Training"])

    @task
    def serving_adapter(version: str, params: dict) -> dict | None:
        """The endpoint's serving record (None: nothing serves), read before the comparison's scoring job."""
        return _serving_record(params)

    @task
    def build_scoring_request(request: dict, serving: dict | None, version: str, params: dict, run_id: str) -> dict:
        """A scoring job for the serving adapter on the new version's held-out images; skipped when nothing
        serves or nothing will be deployed (selection.scoring_skip_reason)."""
        from airflow.sdk.exceptions import AirflowSkipException

        from sdxl_lora import naming, sagemaker_requests, selection

        skip = selection.scoring_skip_reason(params["deploy_if_better"], serving)
        if skip:
            raise AirflowSkipException(skip)
        name = naming.job_name("sdxl-lora-score", run_id, naming.slug(version))
        log.info("scoring the serving adapter %s (%s) on version %s's held-out images: job %s",
                 serving["model_data_url"], serving.get("training_job"), version, name)
        return selection.scoring_request(request, name, serving["model_data_url"], sagemaker_requests.tags(
            dag=DAG_ID, run=run_id, version=version, scores=serving.get("training_job") or "serving"))

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)  # score_serving is skipped when nothing serves
    def better_than_serving(trained: dict, serving: dict | None, scoring: dict | None, version: str,
                            params: dict) -> dict:
        """Deploy? selection.deploy_decision, its reason in the log; register_model files both with the version."""
        from sdxl_lora import selection

        wanted = params["deploy_if_better"]
        now = _serving_record(params) if wanted else None  # what serves now matters only when deploying
        deploy, reason = selection.deploy_decision(
            trained["training"], scoring and scoring["Training"], serving, now,
            params["endpoint_name"] or Settings.resolve().endpoint_name, version, wanted)
        log.info("%s", reason)
        rescored = selection.trained(scoring["Training"]) if scoring else {}
        return {"deploy": deploy, "reason": reason, "serving_val_loss": rescored.get("val_loss")}

    version = dataset_version()
    TriggerDagRunOperator.partial(  # a run already queued for an event (its id) is left as it is
        task_id="queue_version_runs", trigger_dag_id=DAG_ID, logical_date=None, skip_when_already_exists=True,
        openlineage_inject_parent_info=False,  # the queued run's conf is its dataset_version, nothing else
    ).expand_kwargs(version_runs())
    config = build_request(version)
    train = ResumableSageMakerTrainingOperator(task_id="train", config=config, pool="sagemaker_training",
                                               **job_kwargs(SETTINGS))
    trained = candidate(train.output)
    serving = serving_adapter(version)
    scoring = build_scoring_request(config, serving, version)
    score = ResumableSageMakerTrainingOperator(task_id="score_serving", config=scoring, pool="sagemaker_training",
                                               **job_kwargs(SETTINGS))
    compared = better_than_serving(trained, serving, score.output, version)
    registered = register_model(trained["model_artifacts"], trained["training"], compared)
    deployment = deploy_group(trained["model_artifacts"], "{{ params.endpoint_name or '' }}",
                              "{{ params.smoke_request }}", training=trained["training"], registered=registered)

    chain(version, config, train, trained, compared, registered, deploy_requested(registered), deployment)
    chain(scoring, score, compared)
    watch()  # a failed train, score or deployment fails the run


def _serving_record(params: dict) -> dict | None:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from sdxl_lora import serving

    settings = Settings.resolve()
    return serving.read_record(S3Hook(aws_conn_id=settings.aws_conn_id), settings,
                               params["endpoint_name"] or settings.endpoint_name)


sdxl_lora_train()
