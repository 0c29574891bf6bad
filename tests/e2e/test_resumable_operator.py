"""A retried training task finds the job its first try started: no second, paid job. The job trigger of deferrable
mode waits for a job through aiobotocore against the stack."""

from __future__ import annotations

import pytest

from conftest import stack_environment, training_request, wait_for_training


@pytest.fixture
def operator_for(stack, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    stack_environment(monkeypatch, stack)  # boto3's environment, no Airflow connection (aws_conn_id None)
    from sdxl_lora.operators.jobs import ResumableSageMakerTrainingOperator

    def make(config: dict):
        return ResumableSageMakerTrainingOperator(task_id="train", config=config, aws_conn_id=None,
                                                  wait_for_completion=True, print_log=False, check_interval=1)

    return make


def _jobs(sagemaker, name: str) -> list[str]:
    return sorted(j["TrainingJobName"] for j in
                  sagemaker.list_training_jobs(NameContains=name, MaxResults=100)["TrainingJobSummaries"])


def test_a_retry_waits_for_the_job_in_progress_then_reuses_the_completed_one(operator_for, sagemaker, staged):
    config = training_request("e2e-op-retry", staged)
    sagemaker.create_training_job(**config)  # what the first try started before its worker died
    result = operator_for(config).execute({})
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert _jobs(sagemaker, "e2e-op-retry") == ["e2e-op-retry"]
    again = operator_for(config).execute({})
    assert again["Training"]["TrainingJobName"] == "e2e-op-retry"
    assert _jobs(sagemaker, "e2e-op-retry") == ["e2e-op-retry"]


def test_a_failed_job_leads_to_a_new_attempt(operator_for, sagemaker, staged):
    failing = training_request("e2e-op-failed", staged)
    failing["HyperParameters"]["rank"] = "0"
    sagemaker.create_training_job(**failing)
    assert wait_for_training(sagemaker, "e2e-op-failed")["TrainingJobStatus"] == "Failed"
    result = operator_for(training_request("e2e-op-failed", staged)).execute({})
    assert result["Training"]["TrainingJobName"] == "e2e-op-failed-a2"
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert _jobs(sagemaker, "e2e-op-failed") == ["e2e-op-failed", "e2e-op-failed-a2"]


def test_the_job_trigger_waits_through_aiobotocore_and_fires_with_the_failure_reason(operator_for, sagemaker, staged,
                                                                                     caplog, capsys):
    """Deferrable mode's wait, as the triggerer runs it: the provider's waiter over aiobotocore against the stack."""
    import asyncio
    import logging

    from sdxl_lora.operators.jobs import JobTrigger

    request = training_request("e2e-op-trigger", staged)
    request["HyperParameters"]["learning_rate"] = "fast"
    sagemaker.create_training_job(**request)

    async def first_event():
        trigger = JobTrigger("e2e-op-trigger", "Training", waiter_delay=1, waiter_max_attempts=120)
        return await anext(trigger.run())

    with caplog.at_level(logging.INFO):
        event = asyncio.run(first_event())
    assert event.payload == {"status": "failed", "job_name": "e2e-op-trigger",
                             "message": "learning_rate: expected a number, got 'fast'"}
    lines = "\n".join(r.getMessage() for r in caplog.records) + capsys.readouterr().out  # stdlib or structlog
    assert "Training job e2e-op-trigger: failed: learning_rate: expected a number, got 'fast'" in lines, lines
