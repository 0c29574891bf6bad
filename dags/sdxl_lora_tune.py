"""
### SDXL LoRA automatic model tuning

The grid's alternative: one SageMaker hyperparameter tuning job searches **learning rate**
(continuous, logarithmic), **max train steps** (integer) and **rank** (categorical) on a processed
dataset version, minimizing the validation loss (`val_loss`, held-out images, fixed noise and
timesteps) that every trial logs. Its trials are the same training job as a grid trial.

- `strategy`: Bayesian (learns from finished trials), Random, or Hyperband. A grid of fixed values
  is `sdxl_lora_grid_search`.
- `max_parallel_jobs` is capped by the `training_pool_size` setting, which sizes the
  `sagemaker_training` pool, so tuning never runs more jobs at once than the grid may.
- The tuning job's name is deterministic per run: a retried task waits for or reuses it.
- `select_winner` ranks every trial into the same leaderboard as the grid
  (`tuning/<run>/leaderboard.{json,md}`); the winner is registered
  in the model package group (`register_model`, docs/dags.md#model-registry) and can go to the same deploy tasks.

**When the run fails.** As with the grid, failed trials alone do not fail a run that found a
winner: SageMaker completes a tuning job with some failed trials (it counts them), and the
leaderboard's title says how many of its trials failed, each listed with its reason. The run ends
**failed** when no trial succeeded (select_winner finds no winner), when the tuning job itself
failed or was stopped (the `tune` task fails), or when planning or a deploy task failed: the
`watcher` task (trigger rule ONE_FAILED, downstream of every task) fails it then.

`ranks` is a text box in the trigger form, one rank per line (a JSON list of integers through the
API); `plan_tuning` reads it and refuses, without retrying, a bad rank or range, naming the Param. It also logs
the estimated cost of `max_jobs` trials at `max_train_steps_max` and, when `max_cost_usd` is set and the estimate
is above it (or unknown), fails without retrying, so no tuning job starts (docs/dags.md#cost).
"""

from __future__ import annotations

import logging

from airflow.sdk import Param, TriggerRule, chain, dag, task

from ml.contract.hyperparameters import SWEPT, value_schema
from sdxl_lora.dag_common import (
    approval_param,
    cost_cap_param,
    dag_arguments,
    deploy_requested,
    endpoint_param,
    hyperparameters_param,
    list_param,
    no_retry,
    run_date,
    smoke_param,
    version_param,
    waiting_kwargs,
    watch,
)
from sdxl_lora.deploy import deploy_group, register_model
from sdxl_lora.operators.tuning import ResumableSageMakerTuningOperator
from sdxl_lora.presets import active
from sdxl_lora.settings import Settings
from sdxl_lora.tuning import MAX_CATEGORICAL_VALUES, STRATEGIES

DAG_ID = "sdxl_lora_tune"
JOB_PREFIX = "sdxl-lora-tune"
SETTINGS = Settings.from_environment()
PRESET = active(SETTINGS)
log = logging.getLogger(__name__)


def _bound_param(param: str, name: str, description: str) -> Param:
    """One end of a tuning range, its default the preset's, bounded as the job bounds the hyperparameter."""
    return Param(PRESET.tuning[param], description=PRESET.describe(description), **value_schema(name))


@dag(
    **dag_arguments(DAG_ID, __doc__, "tuning"),
    schedule=None,
    params={
        "dataset_version": version_param("Processed dataset version (proc_dataset/<version>/); empty: the run's "
                                         "logical date."),
        "strategy": Param("Bayesian", type="string", enum=list(STRATEGIES),
                          description="How SageMaker chooses each trial's values."),
        "learning_rate_min": _bound_param("learning_rate_min", "learning_rate",
                                          "Lower end of the learning-rate range (searched logarithmically)."),
        "learning_rate_max": _bound_param("learning_rate_max", "learning_rate",
                                          "Upper end of the learning-rate range."),
        "max_train_steps_min": _bound_param("max_train_steps_min", "max_train_steps",
                                            "Fewest optimizer steps a trial trains."),
        "max_train_steps_max": _bound_param("max_train_steps_max", "max_train_steps",
                                            "Most optimizer steps a trial trains."),
        "ranks": list_param("rank", PRESET.tuning["ranks"], PRESET.describe("LoRA ranks to choose from."),
                            MAX_CATEGORICAL_VALUES),
        "max_jobs": Param(PRESET.tuning["max_jobs"], type="integer", minimum=1, maximum=500,
                          description=PRESET.describe("Training jobs the tuning job launches in all.")),
        "max_parallel_jobs": Param(PRESET.tuning["max_parallel_jobs"], type="integer", minimum=1, maximum=100,
                                   description=PRESET.describe("Training jobs at once; capped by the training pool "
                                                               "size setting.")),
        "early_stopping": Param(False, type="boolean",
                                description="Let SageMaker stop trials that are unlikely to beat the best "
                                            "(not with Hyperband)."),
        "random_seed": Param(None, type=["null", "integer"], minimum=0,
                             description="Seed of the search, for a repeatable choice of trials; empty: any."),
        "hyperparameters": hyperparameters_param(PRESET, "Hyperparameters every trial shares (the preset's, less "
                                                         "the tuned ones); validation_split must be above 0.",
                                                 exclude=SWEPT),
        "max_cost_usd": cost_cap_param(),
        "deploy_winner": Param(False, type="boolean", description="Deploy the best trial to the endpoint."),
        "approval": approval_param(),
        "endpoint_name": endpoint_param(),
        "smoke_request": smoke_param(PRESET),
    },
)
def sdxl_lora_tune():
    @task
    def plan_tuning(**context) -> dict:
        from sdxl_lora import estimate, grid, sagemaker_requests, tuning

        settings = Settings.resolve()
        params, run_id = context["params"], context["run_id"]
        version = params["dataset_version"] or run_date(context)
        parallel = tuning.capped_parallel_jobs(params["max_parallel_jobs"], settings.training_pool_size)
        if parallel < params["max_parallel_jobs"]:
            log.info("max_parallel_jobs %d capped to %d: the training pool admits %d jobs (setting "
                     "training_pool_size)", params["max_parallel_jobs"], parallel, settings.training_pool_size)
        with no_retry(grid.GridError, tuning.TuningError):  # a bad Param: a retry would fail the same way
            ranks = grid.values("ranks", params["ranks"], "rank", MAX_CATEGORICAL_VALUES)
            ranges = tuning.parameter_ranges(params["learning_rate_min"], params["learning_rate_max"],
                                             params["max_train_steps_min"], params["max_train_steps_max"], ranks)
        name = tuning.tuning_job_name(JOB_PREFIX, run_id)
        request = tuning.tuning_request(
            settings, name, settings.processed_dataset(version), params["hyperparameters"], ranges,
            params["strategy"], params["max_jobs"], parallel, params["early_stopping"], params["random_seed"],
            sagemaker_requests.tags(dag=DAG_ID, run=run_id, strategy=params["strategy"]))
        with no_retry(estimate.CostCapError):  # over the cap: the tuning job is not created
            estimate.enforce(estimate.of_tuning_request(request, settings), params["max_cost_usd"], log)
        return request

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def select_winner(config: dict, run_id: str) -> dict:
        """The leaderboard of every trial in tuning/<run>/ and the winner's record (selection.select_tuning_winner)."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from sdxl_lora import naming, selection
        from sdxl_lora.operators.tuning import latest_attempt

        settings = Settings.resolve()
        client = SageMakerHook(aws_conn_id=settings.aws_conn_id).conn
        with no_retry(selection.SelectionError):
            tuning_job, results = selection.tuning_results(client, config, latest_attempt)
            return selection.select_tuning_winner(tuning_job, config, results, f"{DAG_ID} {run_id}",
                                                  settings.uri("tuning", naming.run_token(run_id)),
                                                  selection.s3_writer(S3Hook(aws_conn_id=settings.aws_conn_id)),
                                                  logger=log)

    config = plan_tuning()
    tuned = ResumableSageMakerTuningOperator(task_id="tune", config=config, pool="sagemaker_training",
                                             **waiting_kwargs(SETTINGS))
    winner = select_winner(config)
    registered = register_model(winner["model_artifacts"], winner["training"])
    deployment = deploy_group(winner["model_artifacts"], "{{ params.endpoint_name or '' }}",
                              "{{ params.smoke_request }}", training=winner["training"], registered=registered)

    chain(tuned, winner, registered, deploy_requested(registered), deployment)
    watch()  # the tuning job's own status judges its trials: Completed with some failed is green


sdxl_lora_tune()
