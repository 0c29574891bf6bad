"""Errors as AWS gives them."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from conftest import training_request, wait_for_training


def _error(call, **kwargs) -> dict:
    with pytest.raises(ClientError) as caught:
        call(**kwargs)
    return caught.value.response["Error"]


@pytest.mark.parametrize("name", ["x" * 64, "bad_name", "-leading-hyphen", "trailing-"])
def test_invalid_job_names_are_refused(sagemaker, staged, name):
    error = _error(sagemaker.create_training_job, **training_request(name, staged))
    assert error["Code"] == "ValidationException"
    assert "trainingJobName" in error["Message"]


def test_a_63_character_name_is_accepted_and_a_duplicate_refused(sagemaker, staged):
    name = "e2e-" + "n" * 59
    sagemaker.create_training_job(**training_request(name, staged, {"max_train_steps": 1}))
    error = _error(sagemaker.create_training_job, **training_request(name, staged))
    assert error["Code"] == "ValidationException" and "already exists" in error["Message"]
    wait_for_training(sagemaker, name)


def test_missing_required_fields_are_refused_by_the_service(stack, staged):
    unchecked = stack.client("sagemaker", parameter_validation=False)  # what botocore would refuse first
    request = training_request("e2e-missing-output", staged)
    del request["OutputDataConfig"]
    error = _error(unchecked.create_training_job, **request)
    assert error["Code"] == "ValidationException" and "outputDataConfig" in error["Message"]


def test_unknown_images_are_refused(sagemaker, staged):
    request = training_request("e2e-unknown-image", staged)
    request["AlgorithmSpecification"]["TrainingImage"] = "somewhere/other-image:1"
    error = _error(sagemaker.create_training_job, **request)
    assert error["Code"] == "ValidationException" and "not one of this project's images" in error["Message"]


def test_unknown_names(sagemaker):
    # Describe answers ValidationException, as AWS does (the Amazon provider relies on it);
    # Stop answers ResourceNotFound.
    assert _error(sagemaker.describe_training_job, TrainingJobName="e2e-nobody")["Code"] == "ValidationException"
    assert _error(sagemaker.describe_processing_job, ProcessingJobName="e2e-nobody")["Code"] == "ValidationException"
    assert _error(sagemaker.stop_training_job, TrainingJobName="e2e-nobody")["Code"] == "ResourceNotFound"
    assert _error(sagemaker.stop_processing_job, ProcessingJobName="e2e-nobody")["Code"] == "ResourceNotFound"
    assert "Could not find endpoint" in _error(sagemaker.describe_endpoint, EndpointName="e2e-nobody")["Message"]
    assert "Could not find model" in _error(sagemaker.describe_model, ModelName="e2e-nobody")["Message"]
    assert _error(sagemaker.describe_endpoint_config, EndpointConfigName="e2e-nobody")["Code"] == \
        "ValidationException"
