import botocore.session
import pytest
from botocore.validate import ParamValidator

from ml.contract.hyperparameters import SWEPT, parse
from sdxl_lora import sagemaker_requests, tuning
from sdxl_lora.operators import tuning as tuning_operator
from sdxl_lora.naming import is_valid
from sdxl_lora.settings import Settings

SETTINGS = Settings(bucket="my-bucket", prefix="team/sdxl", base_model_uri="s3://my-bucket/team/sdxl/base/")
STATIC = {"resolution": 1024, "train_batch_size": 1, "validation_split": 0.1, "learning_rate": 0.05, "rank": 99}


def _request(**overrides) -> dict:
    arguments = {"settings": SETTINGS, "name": "sdxl-lora-tune-1a2b3c4d", "dataset_uri": "s3://my-bucket/d/",
                 "static_hyperparameters": STATIC,
                 "ranges": tuning.parameter_ranges(1e-5, 1e-3, 500, 3000, [4, 16, 64]),
                 "strategy": "Bayesian", "max_jobs": 12, "max_parallel_jobs": 3,
                 "job_tags": sagemaker_requests.tags(dag="sdxl_lora_tune", run="manual__1")}
    return tuning.tuning_request(**{**arguments, **overrides})


def test_request_matches_botocores_create_hyper_parameter_tuning_job_shape():
    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateHyperParameterTuningJob").input_shape
    report = ParamValidator().validate(_request(early_stopping=True, random_seed=7), shape)
    assert not report.has_errors(), report.generate_report()


def test_trials_share_the_grid_trials_training_definition():
    request = _request()
    definition = request["TrainingJobDefinition"]
    grid_trial = sagemaker_requests.training_request(SETTINGS, "x", "s3://my-bucket/d/", STATIC)
    for key in ("AlgorithmSpecification", "RoleArn", "InputDataConfig", "OutputDataConfig", "ResourceConfig",
                "StoppingCondition", "EnableManagedSpotTraining"):
        assert definition[key] == grid_trial[key], key
    assert "CheckpointConfig" not in definition  # one prefix shared by every trial would mix their checkpoints
    static = definition["StaticHyperParameters"]
    assert not set(static) & set(SWEPT)  # tuned values never also static
    assert parse(static).resolution == 1024
    config = request["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "val_loss"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 12, "MaxParallelTrainingJobs": 3}
    assert config["TrainingJobEarlyStoppingType"] == "Off"
    assert "val_loss" in {m["Name"] for m in definition["AlgorithmSpecification"]["MetricDefinitions"]}


def test_ranges_are_logarithmic_learning_rate_integer_steps_categorical_rank():
    ranges = tuning.parameter_ranges(1e-5, 2e-4, 500, 3000, [4, 150])
    assert ranges["ContinuousParameterRanges"] == [
        {"Name": "learning_rate", "MinValue": "1e-05", "MaxValue": "0.0002", "ScalingType": "Logarithmic"}]
    assert ranges["IntegerParameterRanges"][0] == {"Name": "max_train_steps", "MinValue": "500", "MaxValue": "3000",
                                                   "ScalingType": "Linear"}
    assert ranges["CategoricalParameterRanges"] == [{"Name": "rank", "Values": ["4", "150"]}]


@pytest.mark.parametrize("arguments, message", [
    ((0, 1e-3, 1, 2, [4]), "learning_rate_min"),
    ((1e-4, 0.5, 1, 2, [4]), r"learning_rate range: learning_rate: must be in \(0, 0.1\]"),
    ((1e-4, 1e-3, 1, 200000, [4]), r"max_train_steps range: max_train_steps: must be in \[1, 100000\]"),
    ((1e-4, 1e-3, 1, 2, [4, 2048]), "rank range: rank: must be in"),
    ((1e-3, 1e-4, 1, 2, [4]), "learning_rate_min <= learning_rate_max"),
    ((1e-4, 1e-3, 10, 2, [4]), "max_train_steps_min <= max_train_steps_max"),
    ((1e-4, 1e-3, 1, 2, [4, 4]), "distinct"),
    ((1e-4, 1e-3, 1, 2, []), "distinct"),
    ((1e-4, 1e-3, 1, 2, list(range(1, 30))), "at most 28"),
])
def test_bad_ranges_are_refused_naming_the_problem(arguments, message):
    with pytest.raises(tuning.TuningError, match=message):
        tuning.parameter_ranges(*arguments)


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "Grid"}, "sdxl_lora_grid_search"),
    ({"strategy": "Hyperband", "early_stopping": True}, "Hyperband"),
    ({"static_hyperparameters": {"resolution": 64}}, "validation_split"),
    ({"max_jobs": 0}, "max jobs"),
])
def test_bad_requests_are_refused_naming_the_problem(overrides, message):
    with pytest.raises(tuning.TuningError, match=message):
        _request(**overrides)


def test_parallel_jobs_are_capped_by_the_pool_and_by_max_jobs():
    assert tuning.capped_parallel_jobs(8, 4) == 4
    assert tuning.capped_parallel_jobs(2, 4) == 2
    with pytest.raises(tuning.TuningError):
        tuning.capped_parallel_jobs(0, 4)
    assert _request(max_jobs=2, max_parallel_jobs=3)["HyperParameterTuningJobConfig"]["ResourceLimits"][
        "MaxParallelTrainingJobs"] == 2


def test_definition_refuses_training_fields_a_tuning_job_cannot_carry():
    training = sagemaker_requests.training_request(SETTINGS, "x", "s3://my-bucket/d/", STATIC)
    with pytest.raises(tuning.TuningError, match="DebugHookConfig"):
        tuning.training_definition({**training, "DebugHookConfig": {"S3OutputPath": "s3://b/p"}})


def test_names_fit_sagemakers_32_characters_with_every_attempt():
    name = tuning.tuning_job_name("sdxl-lora-tune", "manual__2026-11-26T10:00:00+00:00")
    assert name == tuning.tuning_job_name("sdxl-lora-tune", "manual__2026-11-26T10:00:00+00:00")
    assert name != tuning.tuning_job_name("sdxl-lora-tune", "manual__2026-11-27T10:00:00+00:00")
    long = tuning.tuning_job_name("a-very-long-prefix-for-tuning-jobs", "r")
    names, long_names = ([tuning_operator.attempt_name(base, attempt) for attempt in range(1, tuning.MAX_ATTEMPTS + 1)]
                         for base in (name, long))
    assert names[0] == name and names[1] == f"{name}-a2" and len(set(names)) == len(names)
    assert all(len(n) <= 32 and is_valid(n) for n in [*names, *long_names])


def test_the_latest_attempt_is_the_last_one_created():
    from unittest import mock

    from botocore.exceptions import ClientError

    created = {"t": {"HyperParameterTuningJobName": "t", "HyperParameterTuningJobStatus": "Failed"},
               "t-a2": {"HyperParameterTuningJobName": "t-a2", "HyperParameterTuningJobStatus": "Completed"}}

    def describe(HyperParameterTuningJobName):
        if HyperParameterTuningJobName not in created:
            raise ClientError({"Error": {"Code": "ResourceNotFound", "Message": "no"}}, "Describe")
        return created[HyperParameterTuningJobName]

    client = mock.Mock(describe_hyper_parameter_tuning_job=describe)
    assert tuning_operator.latest_attempt(client, "t")["HyperParameterTuningJobName"] == "t-a2"
    assert tuning_operator.latest_attempt(client, "other") is None


def test_trial_values_read_tuned_over_static():
    summary = {"TrainingJobName": "t-001", "TunedHyperParameters": {"learning_rate": "0.00012", "rank": "16",
                                                                    "max_train_steps": "700"}}
    assert tuning.trial_values(summary, {"resolution": "1024"}) == (0.00012, 700, 16)
    with pytest.raises(tuning.TuningError, match="t-001"):
        tuning.trial_values({"TrainingJobName": "t-001", "TunedHyperParameters": {"rank": "x"}}, {})
