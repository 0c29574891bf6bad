import pytest
from airflow.sdk.exceptions import AirflowFailException

from sdxl_lora.failures import job_failure, retry_may_pass


@pytest.mark.parametrize("status, reason", [
    ("Failed", "train channel has no images (/opt/ml/input/data/train)"),  # the payload's own refusals
    ("Failed", "learning_rate: expected a number, got 'fast'"),
    ("Failed", "only 0 usable image(s) of 16 file(s), fewer than min_images 1; rejected: 16 too_small"),
    ("Failed", "training failed: RuntimeError: CUDA out of memory"),  # a bug or a limit: the same again
])
def test_a_job_that_failed_on_its_input_or_settings_is_not_retried(status, reason):
    assert not retry_may_pass(status, reason)
    error = job_failure("Training", "job-1", status, reason)
    assert isinstance(error, AirflowFailException)
    assert str(error).startswith(f"Training job job-1 {status}: Reason: {reason} (not retried")


@pytest.mark.parametrize("status, reason", [
    ("Stopped", None),  # spot interruption, StopTrainingJob, MaxRuntime: the next attempt resumes from checkpoints
    ("Stopped", "Training job reached MaxRuntimeInSeconds"),
    ("Failed", "CapacityError: Unable to provision requested ML compute capacity. Please retry using a different ML"
               " instance type."),
    ("Failed", "InternalServerError: We encountered an internal error. Please try again."),
    ("Failed", "ThrottlingException: Rate exceeded"),
    ("Failed", None),
    ("Failed", "  "),
])
def test_a_failure_a_new_job_may_pass_is_left_to_airflows_retries(status, reason):
    assert retry_may_pass(status, reason)
    error = job_failure("Processing", "job-2", status, reason)
    assert not isinstance(error, AirflowFailException)
    assert str(error).startswith(f"Processing job job-2 {status}: Reason: ")
