"""A training operator that a retried task can rerun without paying for a second job.

The provider's SageMakerTrainingOperator, when the job name exists, either fails or
appends a timestamp and starts a new, duplicate, paid job. Job names here are deterministic
per DAG run and trial, so on a retry this operator looks the name up first:
InProgress -> wait for that job; Completed -> use it; Failed or Stopped -> start the next
attempt (`<name>-a2`, `-a3`, ...), which is looked up the same way.
"""

from __future__ import annotations

from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator
from botocore.exceptions import ClientError

from sdxl_lora.naming import MAX_LENGTH

MAX_ATTEMPTS = 20


def attempt_name(base: str, attempt: int) -> str:
    if attempt == 1:
        return base
    suffix = f"-a{attempt}"
    return base[:MAX_LENGTH - len(suffix)].rstrip("-") + suffix


class ResumableSageMakerTrainingOperator(SageMakerTrainingOperator):
    def __init__(self, **kwargs):
        kwargs["check_if_job_exists"] = False  # this operator does its own, cheaper-for-retries, check
        super().__init__(**kwargs)

    def _describe(self, name: str) -> dict | None:
        try:
            return self.hook.describe_training_job(name)
        except ClientError as error:
            if error.response["Error"]["Code"] == "ValidationException":  # AWS: no such job
                return None
            raise

    def execute(self, context):
        base = self.config["TrainingJobName"]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            name = attempt_name(base, attempt)
            description = self._describe(name)
            if description is None:
                self.config["TrainingJobName"] = name
                self.log.info("starting training job %s", name)
                return super().execute(context)
            status = description["TrainingJobStatus"]
            if status == "InProgress":
                self.log.info("training job %s is already running (an earlier try started it): waiting for it", name)
                self.config["TrainingJobName"] = name
                self.hook.check_training_status_with_log(
                    name, self.hook.non_terminal_states, self.hook.training_failed_states, wait_for_completion=True,
                    check_interval=self.check_interval, max_ingestion_time=self.max_ingestion_time)
                return self.serialize_result(name)
            if status == "Completed":
                self.log.info("training job %s already completed (an earlier try started it): using it", name)
                return self.serialize_result(name)
            self.log.info("training job %s ended %s: starting the next attempt", name, status)
        raise RuntimeError(f"{base}: {MAX_ATTEMPTS} attempts already exist; not starting another")
