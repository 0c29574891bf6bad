"""
### SDXL LoRA grid search

Trains one LoRA per combination of **learning rate x max train steps x rank** on a processed
dataset version, each as its own SageMaker training job, then ranks the trials by validation
loss (held-out images, fixed noise and timesteps, so trials compare fairly) and writes a
leaderboard (JSON and markdown) next to the trials in S3.

- The trial list is built by one task and expanded with dynamic task mapping; each mapped
  instance shows its job name, which carries its values (`...-lr-0-0002-mts-1500-r-4`).
- Training tasks run in the `sagemaker_training` pool, which caps how many jobs run at once.
- Job names are deterministic per run and trial: a retried task waits for or reuses the job its
  first try started instead of paying for a second one.
- Failed trials are listed on the leaderboard and never chosen; the others are still compared.

Params: lists of at most 10 values each (10 x 10 x 10 = 1000 trials, within Airflow's mapping
limit of 1024), plus the fixed hyperparameters of every trial.
"""

from __future__ import annotations

from airflow.sdk import Param, TriggerRule, dag, task
from sdxl_lora.dag_common import dag_arguments, endpoint_param, run_date, smoke_param, version_param
from sdxl_lora.deploy import deploy_group
from sdxl_lora.operators import ResumableSageMakerTrainingOperator
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_lora_grid_search"
JOB_PREFIX = "sdxl-lora-gridsearch"
SETTINGS = Settings.from_environment()
FIXED_HYPERPARAMETERS = {"resolution": 1024, "train_batch_size": 1, "lr_scheduler": "constant",
                         "checkpointing_steps": 500, "gradient_accumulation_steps": 4,
                         "gradient_checkpointing": True, "mixed_precision": "fp16", "validation_split": 0.1}


def _list_param(default: list, item: dict, description: str) -> Param:
    return Param(default, type="array", items=item, minItems=1, maxItems=10, uniqueItems=True,
                 description=description)


@dag(
    **dag_arguments(DAG_ID, __doc__, "grid-search"),
    schedule=None,
    params={
        "dataset_version": version_param("Processed dataset version (proc_dataset/<version>/); empty: the run's "
                                         "logical date."),
        "learning_rates": _list_param([1e-4, 2e-4], {"type": "number", "exclusiveMinimum": 0, "maximum": 0.1},
                                      "Learning rates to try (the original grid: 0.0001, 0.00015, 0.0002)."),
        "max_train_steps": _list_param([500, 1000], {"type": "integer", "minimum": 1, "maximum": 100000},
                                       "Optimizer steps to try (the original grid: 500, 1000, 2000, 3000)."),
        "ranks": _list_param([4], {"type": "integer", "minimum": 1, "maximum": 1024},
                             "LoRA ranks to try (the original grid: 4, 150, 256, 512, 1024)."),
        "hyperparameters": Param(FIXED_HYPERPARAMETERS, type="object",
                                 description="Hyperparameters every trial shares (see the README's table)."),
        "deploy_winner": Param(False, type="boolean", description="Deploy the best trial to the endpoint."),
        "endpoint_name": endpoint_param(),
        "smoke_request": smoke_param(),
    },
)
def sdxl_lora_grid_search():
    @task
    def build_trials(**context) -> list[dict]:
        from sdxl_lora import grid, naming, requests

        settings = Settings.resolve()
        params, run_id = context["params"], context["run_id"]
        version = params["dataset_version"] or run_date(context)
        trials = grid.expand(params["learning_rates"], params["max_train_steps"], params["ranks"])
        configs = []
        for trial in trials:
            name = naming.trial_job_name(JOB_PREFIX, run_id, trial.learning_rate, trial.max_train_steps, trial.rank)
            hyperparameters = {**params["hyperparameters"], "learning_rate": trial.learning_rate,
                               "max_train_steps": trial.max_train_steps, "rank": trial.rank}
            configs.append(requests.training_request(
                settings, name, settings.processed_dataset(version), hyperparameters,
                requests.tags(dag=DAG_ID, run=run_id, trial=trial.label)))
        return configs

    configs = build_trials()
    trained = ResumableSageMakerTrainingOperator.partial(
        task_id="train_trial",
        pool="sagemaker_training",
        aws_conn_id=SETTINGS.aws_conn_id,
        wait_for_completion=True,
        print_log=True,
        check_interval=SETTINGS.check_interval_seconds,
        max_attempts=SETTINGS.max_status_checks(),
        deferrable=SETTINGS.deferrable,
        map_index_template="{{ task.config['TrainingJobName'] }}",
    ).expand(config=configs)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def select_winner(configs: list[dict], run_id: str) -> dict:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
        from sdxl_lora import naming, selection

        settings = Settings.resolve()
        client = SageMakerHook(aws_conn_id=settings.aws_conn_id).conn
        results = []
        for config in configs:
            base = config["TrainingJobName"]
            attempts = client.list_training_jobs(NameContains=base, SortBy="CreationTime", SortOrder="Descending",
                                                 MaxResults=100)["TrainingJobSummaries"]
            latest = next((j["TrainingJobName"] for j in attempts if j["TrainingJobName"].startswith(base)), base)
            values = {h: float(config["HyperParameters"][h]) for h in ("learning_rate", "max_train_steps", "rank")}
            try:
                description = client.describe_training_job(TrainingJobName=latest)
            except client.exceptions.ClientError:
                description = {"TrainingJobName": latest, "TrainingJobStatus": "NotStarted"}
            results.append(selection.from_description(description, values["learning_rate"],
                                                      int(values["max_train_steps"]), int(values["rank"])))
        folder = settings.uri("grid_search", naming.run_token(run_id))
        s3 = S3Hook(aws_conn_id=settings.aws_conn_id)
        s3.load_string(selection.leaderboard_json(results), f"{folder}/leaderboard.json", replace=True)
        s3.load_string(selection.leaderboard_markdown(results, f"{DAG_ID} {run_id}"), f"{folder}/leaderboard.md",
                       replace=True)
        best = selection.winner(results)
        if best is None:
            raise RuntimeError(f"no trial completed with a validation loss; leaderboard at {folder}/leaderboard.md")
        return {"winner": best.job_name, "val_loss": best.val_loss, "model_artifacts": best.model_artifacts,
                "leaderboard": f"{folder}/leaderboard.md"}

    winner = select_winner(configs)
    trained >> winner

    @task.short_circuit
    def deploy_requested(params: dict) -> bool:
        return params["deploy_winner"]

    gate = deploy_requested()
    deployment = deploy_group(winner["model_artifacts"], "{{ params.endpoint_name or '' }}",
                              "{{ params.smoke_request }}")
    winner >> gate >> deployment


sdxl_lora_grid_search()
