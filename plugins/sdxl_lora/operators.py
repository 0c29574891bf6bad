"""A training operator that a retried task can rerun without paying for a second job.

The provider's SageMakerTrainingOperator, when the job name exists, either fails or
appends a timestamp and starts a new, duplicate, paid job. Job names here are deterministic
per DAG run and trial, so on a retry this operator looks the name up first:
InProgress -> wait for that job; Completed -> use it; Failed or Stopped -> start the next
attempt (`<name>-a2`, `-a3`, ...), which is looked up the same way.

While it waits it tails the job's CloudWatch lines as the provider does, but asks for the job's
status on every `check_interval` tick: the provider's hook asks only every 30 s whatever
`check_interval` is, so a 5 s job kept its task (and its pool slot) for 30 s.
"""

from __future__ import annotations

from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator
from botocore.exceptions import ClientError

from sdxl_lora.naming import MAX_LENGTH

MAX_ATTEMPTS = 20


def attempt_name(base: str, attempt: int, max_length: int = MAX_LENGTH) -> str:
    if attempt == 1:
        return base
    suffix = f"-a{attempt}"
    return base[:max_length - len(suffix)].rstrip("-") + suffix


def describe_attempt(client, name: str) -> dict | None:
    """DescribeTrainingJob of one attempt, or None when there is no such job."""
    try:
        return client.describe_training_job(TrainingJobName=name)
    except ClientError as error:
        if error.response["Error"]["Code"] == "ValidationException":  # AWS: no such job
            return None
        raise


def latest_attempt(client, base: str, describe=describe_attempt, max_length: int = MAX_LENGTH) -> dict | None:
    """The description (DescribeTrainingJob by default) of the last attempt a run made at a job (`<base>`,
    `<base>-a2`, ...: each attempt is started only after the one before ended); None when not even the
    first was created."""
    latest = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        description = describe(client, attempt_name(base, attempt, max_length))
        if description is None:
            break
        latest = description
    return latest


class PromptSageMakerHook(SageMakerHook):
    """SageMakerHook whose log tailing notices a finished training job within one check_interval."""

    def describe_training_job_with_log(self, job_name, positions, stream_names, instance_count, state,
                                       last_description, last_describe_job_call):
        # The provider describes the job only when 30 s have passed since `last_describe_job_call`;
        # claiming the last call was long ago makes it describe on every tick of the caller's loop,
        # which sleeps check_interval between ticks. Log lines are read exactly as before.
        return super().describe_training_job_with_log(job_name, positions, stream_names, instance_count, state,
                                                      last_description, float("-inf"))


class ResumableSageMakerTrainingOperator(SageMakerTrainingOperator):
    aws_hook_class = PromptSageMakerHook

    def __init__(self, **kwargs):
        kwargs["check_if_job_exists"] = False  # this operator does its own, cheaper-for-retries, check
        super().__init__(**kwargs)

    def execute(self, context):
        base = self.config["TrainingJobName"]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            name = attempt_name(base, attempt)
            description = describe_attempt(self.hook.conn, name)
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
