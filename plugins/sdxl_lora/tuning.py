"""SageMaker automatic model tuning beside the grid: the request, its ranges and a resumable operator.

A tuning job's trials share one training definition, built from the same request builder as a
grid trial (sagemaker_requests.training_request), so both strategies train the same job and compare by the
same validation loss. Learning rate is a continuous, logarithmic range, max train steps an integer
range and rank a categorical one; the objective is the payload's `val_loss`, minimized.
"""

from __future__ import annotations

from ml.contract.hyperparameters import SWEPT, HyperparameterError, to_sagemaker
from ml.contract.metrics import METRIC_DEFINITIONS
from sdxl_lora import sagemaker_requests
from sdxl_lora.naming import run_token, slug
from sdxl_lora.settings import Settings

OBJECTIVE = {"Type": "Minimize", "MetricName": "val_loss"}
STRATEGIES = ("Bayesian", "Random", "Hyperband")
MAX_NAME_LENGTH = 32  # HyperParameterTuningJobName
# SageMaker counts each categorical value against its 30 and each other range as one: the two others leave 28.
MAX_CATEGORICAL_VALUES = 28
MAX_ATTEMPTS = 20
# CreateTrainingJob members that a HyperParameterTrainingJobDefinition also has (botocore's model).
DEFINITION_MEMBERS = ("AlgorithmSpecification", "RoleArn", "InputDataConfig", "VpcConfig", "OutputDataConfig",
                      "ResourceConfig", "StoppingCondition", "EnableNetworkIsolation",
                      "EnableInterContainerTrafficEncryption", "EnableManagedSpotTraining", "CheckpointConfig",
                      "RetryStrategy", "Environment")
ALGORITHM_MEMBERS = ("TrainingImage", "TrainingInputMode", "AlgorithmName", "MetricDefinitions")
# Every trial gets the definition's CheckpointConfig.S3Uri as it is: one prefix for all trials would let
# a trial resume another's checkpoint. Tuning trials therefore run without one (a spot interruption
# restarts a trial from its first step).
LEFT_OUT = ("CheckpointConfig",)


class TuningError(ValueError):
    pass


def tuning_job_name(prefix: str, run_id: str) -> str:
    """<prefix>-<run token>, short enough for SageMaker's 32 characters even with an attempt suffix."""
    suffix = f"-{run_token(run_id)}"
    return slug(prefix)[:MAX_NAME_LENGTH - len(suffix) - len("-a20")].rstrip("-") + suffix


def parameter_ranges(learning_rate_min: float, learning_rate_max: float, max_train_steps_min: int,
                     max_train_steps_max: int, ranks: list[int]) -> dict:
    if not 0 < learning_rate_min <= learning_rate_max:
        raise TuningError(f"learning rate range: need 0 < learning_rate_min <= learning_rate_max, got "
                          f"[{learning_rate_min:g}, {learning_rate_max:g}]")
    if not 1 <= max_train_steps_min <= max_train_steps_max:
        raise TuningError(f"max train steps range: need 1 <= max_train_steps_min <= max_train_steps_max, got "
                          f"[{max_train_steps_min}, {max_train_steps_max}]")
    if not ranks or len(set(ranks)) != len(ranks) or any(int(r) < 1 for r in ranks):
        raise TuningError(f"ranks: need distinct positive integers, got {ranks}")
    if len(ranks) > MAX_CATEGORICAL_VALUES:
        raise TuningError(f"ranks: at most {MAX_CATEGORICAL_VALUES} values (SageMaker searches at most 30 "
                          f"hyperparameter values in all), got {len(ranks)}")
    for name, values in (("learning_rate", (learning_rate_min, learning_rate_max)),
                         ("max_train_steps", (max_train_steps_min, max_train_steps_max)), ("rank", ranks)):
        for value in values:
            try:
                to_sagemaker({name: value})  # the job's own bounds: a range reaching past them wastes trials
            except HyperparameterError as error:
                raise TuningError(f"{name} range: {error}") from None
    return {
        "ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": repr(float(learning_rate_min)),
                                       "MaxValue": repr(float(learning_rate_max)), "ScalingType": "Logarithmic"}],
        "IntegerParameterRanges": [{"Name": "max_train_steps", "MinValue": str(int(max_train_steps_min)),
                                    "MaxValue": str(int(max_train_steps_max)), "ScalingType": "Linear"}],
        "CategoricalParameterRanges": [{"Name": "rank", "Values": [str(int(r)) for r in ranks]}],
    }


def capped_parallel_jobs(requested: int, pool_size: int) -> int:
    """Never more trials at once than the sagemaker_training pool admits training jobs."""
    if requested < 1 or pool_size < 1:
        raise TuningError(f"max parallel jobs and the training pool size must be at least 1, got {requested} and "
                          f"{pool_size}")
    return min(requested, pool_size)


def training_definition(training_request: dict) -> dict:
    """A HyperParameterTrainingJobDefinition from a CreateTrainingJob request (sagemaker_requests.training_request)."""
    known = {"TrainingJobName", "HyperParameters", "Tags", *DEFINITION_MEMBERS}
    unknown = sorted(set(training_request) - known)
    if unknown:
        raise TuningError(f"the training request has fields a tuning job's training definition cannot carry: "
                          f"{unknown}")
    algorithm = training_request["AlgorithmSpecification"]
    unknown = sorted(set(algorithm) - set(ALGORITHM_MEMBERS))
    if unknown:
        raise TuningError(f"AlgorithmSpecification has fields a tuning job cannot carry: {unknown}")
    definition = {k: v for k, v in training_request.items() if k in DEFINITION_MEMBERS and k not in LEFT_OUT}
    definition["StaticHyperParameters"] = {k: v for k, v in training_request["HyperParameters"].items()
                                           if k not in SWEPT}
    return definition


def tuning_request(settings: Settings, name: str, dataset_uri: str, static_hyperparameters: dict, ranges: dict,
                   strategy: str, max_jobs: int, max_parallel_jobs: int, early_stopping: bool = False,
                   random_seed: int | None = None, job_tags: list[dict] | None = None) -> dict:
    if strategy not in STRATEGIES:
        raise TuningError(f"strategy must be one of {', '.join(STRATEGIES)} (a grid is sdxl_lora_grid_search), "
                          f"got {strategy!r}")
    if strategy == "Hyperband" and early_stopping:
        raise TuningError("early stopping must be off with the Hyperband strategy, which stops trials itself")
    if max_jobs < 1:
        raise TuningError(f"max jobs must be at least 1, got {max_jobs}")
    if not float(static_hyperparameters.get("validation_split") or 0) > 0:
        raise TuningError("the objective val_loss needs held-out images: set validation_split above 0 in the "
                          "hyperparameters")
    if OBJECTIVE["MetricName"] not in {m["Name"] for m in METRIC_DEFINITIONS}:
        raise TuningError(f"the payload's MetricDefinitions do not define {OBJECTIVE['MetricName']}")
    static = {k: v for k, v in static_hyperparameters.items() if k not in SWEPT}
    training = sagemaker_requests.training_request(settings, name, dataset_uri, static)
    config = {
        "Strategy": strategy,
        "HyperParameterTuningJobObjective": dict(OBJECTIVE),
        "ResourceLimits": {"MaxNumberOfTrainingJobs": int(max_jobs),
                           "MaxParallelTrainingJobs": min(int(max_parallel_jobs), int(max_jobs))},
        "ParameterRanges": ranges,
        "TrainingJobEarlyStoppingType": "Auto" if early_stopping else "Off",
    }
    if random_seed is not None:
        config["RandomSeed"] = int(random_seed)
    return {"HyperParameterTuningJobName": name, "HyperParameterTuningJobConfig": config,
            "TrainingJobDefinition": training_definition(training), "Tags": job_tags or []}


def trial_values(summary: dict, static: dict[str, str]) -> tuple[float, int, int]:
    """(learning rate, max train steps, rank) of a trial: its tuned values over the static ones."""
    values = {**static, **summary.get("TunedHyperParameters", {})}
    try:
        return (float(values["learning_rate"].strip('"')), int(float(values["max_train_steps"].strip('"'))),
                int(float(values["rank"].strip('"'))))
    except (KeyError, ValueError) as error:
        raise TuningError(f"trial {summary.get('TrainingJobName')}: cannot read its hyperparameters: {error}") from None
