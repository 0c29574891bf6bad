"""The tuning job as an operator a retried task can run again: tuning job names are deterministic per run."""

from __future__ import annotations

from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTuningOperator, serialize
from sdxl_lora.missing import describe_or_none
from sdxl_lora.operators import jobs as operators
from sdxl_lora.tuning import MAX_ATTEMPTS, MAX_NAME_LENGTH


class ResumableSageMakerTuningOperator(SageMakerTuningOperator):
    """The provider's tuning operator, safe to retry: tuning job names are deterministic per run.

    On a retry it looks the name up first: InProgress or Stopping -> waits for that job;
    Completed -> uses it; Failed or Stopped -> starts the next attempt (`<name>-a2`, ...). When
    the task is killed, the tuning job it waits for is stopped, which stops its trials.

    .. seealso:: the provider's SageMakerTuningOperator, whose other arguments it takes.

    :param config: the CreateHyperParameterTuningJob request (tuning.tuning_request); its
        HyperParameterTuningJobName is the first attempt's name. (templated)
    :param aws_conn_id: the Airflow connection to AWS.
    :param wait_for_completion: wait for the tuning job to end.
    :param check_interval: seconds between status checks while waiting.
    :param max_ingestion_time: fail when the job has not ended after this many seconds (None: no limit).
    :param deferrable: wait in the triggerer (the provider's) for a job this try creates.
    :return: ``{"Tuning": DescribeHyperParameterTuningJob}``.
    """

    def execute(self, context):
        base = self.config["HyperParameterTuningJobName"]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            name = attempt_name(base, attempt)
            description = describe_attempt(self.hook.conn, name)
            self.config["HyperParameterTuningJobName"] = name
            if description is None:
                return super().execute(context)
            status = description["HyperParameterTuningJobStatus"]
            if status in self.hook.non_terminal_states:
                self.log.info("tuning job %s is already %s (an earlier try started it): waiting for it", name, status)
                description = self.hook.check_status(name, "HyperParameterTuningJobStatus",
                                                     self.hook.describe_tuning_job, self.check_interval,
                                                     self.max_ingestion_time)
                return {"Tuning": serialize(description)}
            if status == "Completed":
                self.log.info("tuning job %s already completed (an earlier try started it): using it", name)
                return {"Tuning": serialize(description)}
            self.log.info("tuning job %s ended %s: starting the next attempt", name, status)
        raise RuntimeError(f"{base}: {MAX_ATTEMPTS} attempts already exist; not starting another")

    def on_kill(self) -> None:
        name = self.config.get("HyperParameterTuningJobName")
        description = describe_attempt(self.hook.conn, name) if name else None
        if description and description["HyperParameterTuningJobStatus"] == "InProgress":
            self.log.info("stopping tuning job %s and its trials", name)
            self.hook.conn.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)


def attempt_name(base: str, attempt: int) -> str:
    return operators.attempt_name(base, attempt, MAX_NAME_LENGTH)


def describe_attempt(client, name: str) -> dict | None:
    """DescribeHyperParameterTuningJob of one attempt, or None when there is no such job."""
    return describe_or_none(client.describe_hyper_parameter_tuning_job, HyperParameterTuningJobName=name)


def latest_attempt(client, base: str) -> dict | None:
    """The description of the last tuning job a run started (`<base>`, `<base>-a2`, ...); None when none."""
    return operators.latest_attempt(client, base, describe_attempt, MAX_NAME_LENGTH)
