"""The latest attempt at a training job (plugins/sdxl_lora/operators/jobs.py), without AWS."""

from unittest import mock

import pytest
from botocore.exceptions import ClientError

from sdxl_lora.operators import jobs as operators


def _client(created: dict, error: str = "ValidationException"):
    def describe(TrainingJobName):
        if TrainingJobName not in created:
            raise ClientError({"Error": {"Code": error, "Message": "Requested resource not found"}}, "Describe")
        return {"TrainingJobName": TrainingJobName, "TrainingJobStatus": created[TrainingJobName]}

    return mock.Mock(describe_training_job=describe)


def test_the_latest_attempt_is_the_last_one_created():
    client = _client({"job": "Failed", "job-a2": "Stopped", "job-a3": "Completed"})
    assert operators.latest_attempt(client, "job") == {"TrainingJobName": "job-a3", "TrainingJobStatus": "Completed"}
    assert operators.latest_attempt(client, "other") is None


def test_errors_other_than_a_missing_job_are_raised():
    with pytest.raises(ClientError, match="ThrottlingException"):
        operators.latest_attempt(_client({}, error="ThrottlingException"), "job")
