"""
### SDXL LoRA grid search

Trains one LoRA per combination of **learning rate x max train steps x rank** on a processed
dataset version, each as its own SageMaker training job, then ranks the trials by validation
loss (held-out images, fixed noise and timesteps, so trials compare fairly) and writes a
leaderboard (JSON and markdown) next to the trials in S3. `publish_report` adds the report its
"Grid report" button opens: costs, links, one XY sheet of validation images per steps value
(rows learning rate, columns rank) and every trial's loss curve.

- The trial list is built by one task and expanded with dynamic task mapping; each mapped
  instance shows its job name, which carries its values (`...-lr-0-0002-mts-1500-r-4`).
- Training tasks run in the `sagemaker_training` pool, which caps how many jobs run at once.
- Job names are deterministic per run and trial: a retried task waits for or reuses the job its
  first try started instead of paying for a second one.
- Failed trials are listed on the leaderboard and never chosen; the others are still compared.
- `register_model` registers the winner as a version in the model package group (setting
  `model_package_group`): Approved when `deploy_winner` deploys it, else waiting for approval; with
  `approval` `manual` it waits and nothing is deployed (docs/dags.md#model-registry). An Approved
  version is what deploys (the endpoint's model is made from it), so the serving record names it.

**When the run fails.** A run that selected a winner (and deployed it, when asked) ends green
even if some trials failed: a sweep explores, and a trial that fails (a diverging learning rate, a
rank too large for the instance) is one of its results, as in a SageMaker tuning job, which
completes with failed trials among its counts. The failed trials stay visible: their tasks are
red in the Grid view, with the job's FailureReason in the task log, and the leaderboard's title
counts them ("1 of 4 trials failed"), each listed with its reason. The run ends **failed** when
no trial succeeded (select_winner finds no winner), or when building the trials, the report or
any deploy task failed: the `watcher` task (trigger rule ONE_FAILED, downstream of every task but
the trials, whose outcome select_winner judges) fails the run then, because the tasks that end it
(publish_report, the deploy group's rollback) succeed after a failure upstream.

Params: lists of at most 10 values each (10 x 10 x 10 = 1000 trials, within Airflow's mapping
limit of 1024), plus the fixed hyperparameters of every trial. In the trigger form each list is a
text box with one value per line (`0.0001`, `2e-4`; blank lines are ignored); through the API, a
JSON list of numbers. Numbers out of bounds and text that is not a number are refused when the run
is triggered; `build_trials`, the first task, reads the text and refuses, without retrying, a
value out of bounds or listed twice, naming the Param and the value. It also logs the trials' estimated cost and,
when `max_cost_usd` is set and the estimate is above it (or unknown), fails without retrying, so no trial starts
(docs/dags.md#cost).
"""

from __future__ import annotations

import logging

from airflow.sdk import Param, TriggerRule, chain, dag, task

from ml.contract.hyperparameters import SWEPT
from sdxl_lora.dag_common import (
    approval_param,
    cost_cap_param,
    dag_arguments,
    deploy_requested,
    endpoint_param,
    grid_param,
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
from sdxl_lora.report.links import report_task
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_lora_grid_search"
JOB_PREFIX = "sdxl-lora-gridsearch"
SETTINGS = Settings.from_environment()
PRESET = active(SETTINGS)
log = logging.getLogger(__name__)


@dag(
    **dag_arguments(DAG_ID, __doc__, "grid-search"),
    schedule=None,
    params={
        "dataset_version": version_param("Processed dataset version (proc_dataset/<version>/); empty: the run's "
                                         "logical date."),
        "learning_rates": grid_param("learning_rate", PRESET.grid["learning_rates"], PRESET.describe(
            "Learning rates to try (the original grid: 0.0001, 0.00015, 0.0002).")),
        "max_train_steps": grid_param("max_train_steps", PRESET.grid["max_train_steps"], PRESET.describe(
            "Optimizer steps to try (the original grid: 500, 1000, 2000, 3000).")),
        "ranks": grid_param("rank", PRESET.grid["ranks"], PRESET.describe(
            "LoRA ranks to try (the original grid: 4, 150, 256, 512, 1024).")),
        "hyperparameters": hyperparameters_param(PRESET, "Hyperparameters every trial shares (the preset's, less "
                                                         "the swept ones).", exclude=SWEPT),
        "max_cost_usd": cost_cap_param(),
        "deploy_winner": Param(False, type="boolean", description="Deploy the best trial to the endpoint."),
        "approval": approval_param(),
        "endpoint_name": endpoint_param(),
        "smoke_request": smoke_param(PRESET),
    },
)
def sdxl_lora_grid_search():
    @task
    def build_trials(**context) -> list[dict]:
        from sdxl_lora import estimate, grid, naming, sagemaker_requests

        settings = Settings.resolve()
        params, run_id = context["params"], context["run_id"]
        version = params["dataset_version"] or run_date(context)
        with no_retry(grid.GridError):  # a bad Param: a retry would fail the same way
            trials = grid.from_params(params)
        log.info("%d trials on dataset version %s", len(trials), version)
        configs = []
        for trial in trials:
            name = naming.trial_job_name(JOB_PREFIX, run_id, trial.learning_rate, trial.max_train_steps, trial.rank)
            hyperparameters = {**params["hyperparameters"], "learning_rate": trial.learning_rate,
                               "max_train_steps": trial.max_train_steps, "rank": trial.rank}
            configs.append(sagemaker_requests.training_request(
                settings, name, settings.processed_dataset(version), hyperparameters,
                sagemaker_requests.tags(dag=DAG_ID, run=run_id, trial=trial.label)))
        with no_retry(estimate.CostCapError):  # over the cap: no trial starts, and a retry would refuse again
            estimate.enforce(estimate.of_training_requests(configs, settings), params["max_cost_usd"], log)
        return configs

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def select_winner(configs: list[dict], run_id: str) -> dict:
        """The leaderboard in grid_search/<run>/ and the winner's record (selection.select_winner)."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from sdxl_lora import naming, selection
        from sdxl_lora.operators.jobs import latest_attempt

        settings = Settings.resolve()
        client = SageMakerHook(aws_conn_id=settings.aws_conn_id).conn
        results = selection.grid_results(configs, lambda base: latest_attempt(client, base))
        with no_retry(selection.SelectionError):
            return selection.select_winner(results, f"{DAG_ID} {run_id}",
                                           settings.uri("grid_search", naming.run_token(run_id)),
                                           selection.s3_writer(S3Hook(aws_conn_id=settings.aws_conn_id)), logger=log)

    @report_task(trigger_rule=TriggerRule.ALL_DONE)
    def publish_report(configs: list[dict], run_id: str) -> str:
        """Leaderboard with costs and links, one XY sheet per steps value and every trial's loss curve in
        grid_search/<run>/report/: the page this task's "Grid report" button opens (plugins/sdxl_lora_ui.py)."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from sdxl_lora import naming
        from sdxl_lora.report import leaderboard as report

        settings = Settings.resolve()
        folder = settings.uri("grid_search", naming.run_token(run_id))
        board = report.publish(SageMakerHook(aws_conn_id=settings.aws_conn_id).conn,
                               S3Hook(aws_conn_id=settings.aws_conn_id).get_conn(), configs, folder, DAG_ID, run_id)
        log.info("report of %d trials (%d sheets, estimated cost %.2f USD) at %s/report/", len(board["trials"]),
                 len(board["sheets"]), board["estimated_cost_usd"], folder)
        return f"{folder}/report/{report.LEADERBOARD}"

    configs = build_trials()
    trials = ResumableSageMakerTrainingOperator.partial(
        task_id="train_trial", pool="sagemaker_training", map_index_template="{{ task.config['TrainingJobName'] }}",
        **job_kwargs(SETTINGS),
    ).expand(config=configs)
    winner = select_winner(configs)
    registered = register_model(winner["model_artifacts"], winner["training"])
    deployment = deploy_group(winner["model_artifacts"], "{{ params.endpoint_name or '' }}",
                              "{{ params.smoke_request }}", training=winner["training"], registered=registered)

    chain(trials, winner, registered, deploy_requested(registered), deployment)
    trials >> publish_report(configs)
    watch(judged_downstream=[trials])  # a failed trial alone leaves the run green: select_winner judges the trials


sdxl_lora_grid_search()
