"""Training and processing operators that a retried task can rerun without paying for a second job.

The provider's SageMaker{Training,Processing}Operator, when the job name exists, either fails or
appends a timestamp and starts a new, duplicate, paid job. Job names here are deterministic per
DAG run (and trial), so on a retry these operators look the name up first: InProgress -> wait for
that job; Completed -> use it; Failed or Stopped -> start the next attempt (`<name>-a2`, `-a3`, ...),
which is looked up the same way.

Waiting happens in the worker, or with `deferrable` in the triggerer (JobTrigger, the provider's
SageMakerTrigger over aiobotocore), also for a job an earlier try started; a failed job fails the
task with its FailureReason either way, at once (no retry, no second paid job) unless a new job may
pass (sdxl_lora.failures).

When the account's instance quota is used up, SageMaker answers CreateTrainingJob (or
CreateProcessingJob) with ResourceLimitExceeded and creates nothing. The operators then wait for
capacity with a bounded, jittered exponential backoff (in the worker, or deferred on a timer) and
create the job when capacity frees: no Airflow retry is spent and no job is lost or duplicated.

While a training task waits in the worker it tails the job's CloudWatch lines as the provider does,
but asks for the job's status on every `check_interval` tick: the provider's hook asks only every
30 s whatever `check_interval` is, so a 5 s job kept its task (and its pool slot) for 30 s.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import timedelta

from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerProcessingOperator,
    SageMakerTrainingOperator,
    serialize,
)
from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger
from airflow.providers.common.compat.sdk import AirflowException
from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from botocore.exceptions import ClientError

from sdxl_lora.failures import job_failure
from sdxl_lora.missing import describe_or_none
from sdxl_lora.naming import MAX_LENGTH

MAX_ATTEMPTS = 20
NO_CAPACITY = "ResourceLimitExceeded"
BACKOFF_GROWTH_LIMIT = 10  # the longest wait for capacity: 10 x the first (check_interval: 30 s -> at most 5 min)


@dataclass(frozen=True)
class JobKind:
    """What tells one kind of SageMaker job from another to the attempt logic."""

    label: str  # "Training", "Processing": SageMakerTrigger's job_type
    name_key: str
    status_key: str
    describe_method: str  # the boto3 client's Describe* method

    def describe(self, client, name: str) -> dict | None:
        """The job's description, or None when there is no such job."""
        return describe_or_none(getattr(client, self.describe_method), **{self.name_key: name})


TRAINING = JobKind("Training", "TrainingJobName", "TrainingJobStatus", "describe_training_job")
PROCESSING = JobKind("Processing", "ProcessingJobName", "ProcessingJobStatus", "describe_processing_job")


def attempt_name(base: str, attempt: int, max_length: int = MAX_LENGTH) -> str:
    if attempt == 1:
        return base
    suffix = f"-a{attempt}"
    return base[:max_length - len(suffix)].rstrip("-") + suffix


def describe_attempt(client, name: str) -> dict | None:
    """DescribeTrainingJob of one attempt, or None when there is no such job."""
    return TRAINING.describe(client, name)


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


def current_attempt(client, base: str, kind: JobKind, log=None) -> tuple[str, dict | None]:
    """The attempt a (re)run takes up: the first that is running or Completed, with its description, else
    the first not created yet, with None. Attempts that ended otherwise (Failed, Stopped) are passed over."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        name = attempt_name(base, attempt)
        description = kind.describe(client, name)
        if description is None or description[kind.status_key] in ("InProgress", "Completed"):
            return name, description
        if log is not None:
            log.info("%s job %s ended %s: the next attempt is %s", kind.label.lower(), name,
                     description[kind.status_key], attempt_name(base, attempt + 1))
    raise AirflowException(f"{base}: {MAX_ATTEMPTS} attempts already exist; not starting another")


def capacity_backoff(waits: int, first: float, longest: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before trying again to create a job the account has no capacity for, after `waits`
    refusals: exponential from `first`, at most `longest`, with equal jitter (half of it random), so tasks
    refused together do not all come back at the same moment."""
    if first <= 0 or longest < first:
        raise ValueError(f"capacity backoff: need 0 < first <= longest, got first={first}, longest={longest}")
    ceiling = min(longest, first * 2 ** min(waits, 62))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class JobTrigger(SageMakerTrigger):
    """The provider's SageMakerTrigger whose lines in the task's log name the job, carry its status,
    secondary status and failure reason on every check, and end with the job's outcome.

    :param job_name: the job to wait for.
    :param job_type: ``"Training"`` or ``"Processing"`` (JobKind.label).
    :param kwargs: the provider trigger's own (waiter_delay, waiter_max_attempts, aws_conn_id, ...).
    """

    def __init__(self, job_name: str, job_type: str, **kwargs):
        super().__init__(job_name=job_name, job_type=job_type, **kwargs)
        self.status_queries = [self._get_response_status_key(job_type), "SecondaryStatus", "FailureReason"]
        self.status_message = f"{job_type} job {job_name}"
        self.failure_message = f"{job_type} job {job_name} did not complete"

    async def run(self):
        async for event in super().run():
            outcome = event.payload
            if outcome["status"] == "success":
                self.log.info("%s job %s: Completed", self.job_type, self.job_name)
            else:
                self.log.error("%s job %s: %s: %s", self.job_type, self.job_name, outcome["status"],
                               outcome.get("message"))
            yield event


class PromptSageMakerHook(SageMakerHook):
    """SageMakerHook whose log tailing notices a finished training job within one check_interval."""

    def describe_training_job_with_log(self, job_name, positions, stream_names, instance_count, state,
                                       last_description, last_describe_job_call):
        # The provider describes the job only when 30 s have passed since `last_describe_job_call`;
        # claiming the last call was long ago makes it describe on every tick of the caller's loop,
        # which sleeps check_interval between ticks. Log lines are read exactly as before.
        return super().describe_training_job_with_log(job_name, positions, stream_names, instance_count, state,
                                                      last_description, float("-inf"))


class _ResumableJob:
    """execute() shared by the training and processing operators below (the provider's operator supplies
    config, hook, check_interval, max_attempts, deferrable, ...); each names its JobKind and says how to
    create, wait for and report one job."""

    kind: JobKind

    def __init__(self, *, capacity_wait_seconds: int | None = None, capacity_backoff_seconds: float | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        # How long to keep trying to create the job while the account has no capacity (default: as long as
        # the operator would wait for the job itself), and the first pause (default: check_interval).
        self.capacity_wait_seconds = capacity_wait_seconds
        self.capacity_backoff_seconds = capacity_backoff_seconds
        self._preprocessed = False

    def execute(self, context):
        return self._start_or_resume(context, capacity_waits=0, waiting_since=None)

    def resume_after_capacity_wait(self, context, event=None, capacity_waits: int = 0,
                                   waiting_since: float | None = None):
        """Back from a deferred wait for capacity: look the attempts up again, then create or wait."""
        return self._start_or_resume(context, capacity_waits, waiting_since)

    def _start_or_resume(self, context, capacity_waits: int, waiting_since: float | None):
        kind, base = self.kind, self.config[self.kind.name_key]
        while True:
            name, description = current_attempt(self.hook.conn, base, kind, self.log)
            if description is not None:
                break
            try:
                self._create_job(name)
                break
            except ClientError as error:
                if error.response["Error"]["Code"] != NO_CAPACITY:
                    raise
                waiting_since = waiting_since or time.time()
                delay = self._capacity_delay(name, error, capacity_waits, waiting_since)
                capacity_waits += 1
                if self.deferrable:
                    self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=delay)),
                               method_name="resume_after_capacity_wait",
                               kwargs={"capacity_waits": capacity_waits, "waiting_since": waiting_since})
                time.sleep(delay)
        self.config[kind.name_key] = name
        status = description[kind.status_key] if description else "InProgress"
        if status == "Completed":
            self.log.info("%s job %s already completed (an earlier try started it): using it", kind.label.lower(),
                          name)
            return self._result(name)
        if description is not None:
            self.log.info("%s job %s is already running (an earlier try started it): waiting for it",
                          kind.label.lower(), name)
        if not self.wait_for_completion:
            return self._result(name)
        if self.deferrable:
            self.defer(
                timeout=timedelta(seconds=self.max_ingestion_time) if self.max_ingestion_time else
                self.execution_timeout,
                trigger=JobTrigger(name, kind.label, waiter_delay=self.check_interval,
                                   waiter_max_attempts=self.max_attempts, aws_conn_id=self.aws_conn_id,
                                   region_name=self.region_name, verify=self.verify,
                                   botocore_config=self.botocore_config),
                method_name="execute_complete")
        self._wait(name)
        return self._result(name)

    def _create_job(self, name: str) -> None:
        self.config[self.kind.name_key] = name
        if not self._preprocessed:
            self.preprocess_config()
            self._preprocessed = True
        self.log.info("starting %s job %s", self.kind.label.lower(), name)
        self._create(self.config)

    def _capacity_delay(self, name: str, error: ClientError, waits: int, waiting_since: float) -> float:
        """The pause before the next try at creating the job; raises once waiting would pass the bound."""
        first = self.capacity_backoff_seconds or max(1, self.check_interval)
        bound = self.capacity_wait_seconds or self.max_attempts * max(1, self.check_interval)
        delay = capacity_backoff(waits, first, first * BACKOFF_GROWTH_LIMIT)
        waited = time.time() - waiting_since
        message = error.response["Error"].get("Message", "")
        if waited + delay > bound:
            raise AirflowException(f"{self.kind.label.lower()} job {name}: no capacity after {waited:.0f} s of "
                                   f"waiting (the bound is {bound} s): {NO_CAPACITY}: {message}")
        self.log.warning("%s: %s job %s not created (%s); capacity wait %d: trying again in %.1f s "
                         "(%.0f s waited so far, at most %d s)", NO_CAPACITY, self.kind.label.lower(), name, message,
                         waits + 1, delay, waited, bound)
        return delay

    def execute_complete(self, context, event=None):
        """Back from the triggerer: the job's result, or its failure with its FailureReason."""
        if not event:
            raise AirflowException("the trigger sent no event")
        name = event["job_name"]
        if event["status"] != "success":
            description = self.kind.describe(self.hook.conn, name) or {}
            status = description.get(self.kind.status_key, event["status"])
            raise job_failure(self.kind.label, name, status, description.get("FailureReason") or event.get("message"))
        self.log.info("%s job %s completed", self.kind.label.lower(), name)
        return self._result(name)

    def _create(self, config: dict) -> None:
        raise NotImplementedError

    def _wait(self, name: str) -> None:
        raise NotImplementedError

    def _result(self, name: str) -> dict:
        raise NotImplementedError


class ResumableSageMakerTrainingOperator(_ResumableJob, SageMakerTrainingOperator):
    """CreateTrainingJob under a name fixed per run, safe to retry: an earlier try's job is waited for or used,
    a Failed or Stopped one is followed by the next attempt (``<name>-a2``, ...); no capacity is waited out.

    .. seealso:: the provider's SageMakerTrainingOperator, whose other arguments it takes.

    :param config: the CreateTrainingJob request (sagemaker_requests.training_request); its TrainingJobName is
        the first attempt's name. (templated)
    :param aws_conn_id: the Airflow connection to AWS (the provider's; the settings' ``aws_conn_id``).
    :param wait_for_completion: wait for the job to end (default True); False returns once it is created or found.
    :param check_interval: seconds between status checks while waiting.
    :param max_ingestion_time: fail when the job has not ended after this many seconds (None: no limit).
    :param deferrable: wait in the triggerer (JobTrigger) instead of the worker.
    :param capacity_wait_seconds: how long to keep trying to create the job while the account has no capacity
        (ResourceLimitExceeded); default: as long as the operator would wait for the job (max_attempts x
        check_interval).
    :param capacity_backoff_seconds: the first pause between those tries, growing to 10 times it with jitter;
        default: check_interval.
    :param print_log: tail the job's CloudWatch lines into the task log while waiting in the worker.
    :param max_attempts: status checks before giving up when deferred (dag_common.job_kwargs sizes it to outlast
        the longest job).
    :return: ``{"Training": DescribeTrainingJob}`` of the attempt that completed.
    """

    kind = TRAINING
    aws_hook_class = PromptSageMakerHook

    def __init__(self, **kwargs):
        kwargs["check_if_job_exists"] = False  # this operator does its own, cheaper-for-retries, check
        super().__init__(**kwargs)

    def _create(self, config: dict) -> None:
        self.hook.create_training_job(config, wait_for_completion=False, print_log=False)

    def _wait(self, name: str) -> None:
        if self.print_log:  # the job's CloudWatch lines in the task log as they come
            # No failed states for the hook to raise on: how a failure fails the task is decided below.
            self.hook.check_training_status_with_log(
                name, self.hook.non_terminal_states, set(), wait_for_completion=True,
                check_interval=self.check_interval, max_ingestion_time=self.max_ingestion_time)
            description = self.hook.describe_training_job(name)
        else:
            description = self.hook.check_status(name, "TrainingJobStatus", self.hook.describe_training_job,
                                                  self.check_interval, self.max_ingestion_time)
        _raise_unless_completed(TRAINING, description)

    def _result(self, name: str) -> dict:
        return self.serialize_result(name)


class ResumableSageMakerProcessingOperator(_ResumableJob, SageMakerProcessingOperator):
    """CreateProcessingJob under a name fixed per run, safe to retry as ResumableSageMakerTrainingOperator is.

    .. seealso:: the provider's SageMakerProcessingOperator, whose other arguments it takes.

    :param config: the CreateProcessingJob request (sagemaker_requests.processing_request); its
        ProcessingJobName is the first attempt's name. (templated)
    :param aws_conn_id: the Airflow connection to AWS (the provider's; the settings' ``aws_conn_id``).
    :param wait_for_completion: wait for the job to end (default True); False returns once it is created or found.
    :param check_interval: seconds between status checks while waiting.
    :param max_ingestion_time: fail when the job has not ended after this many seconds (None: no limit).
    :param deferrable: wait in the triggerer (JobTrigger) instead of the worker.
    :param capacity_wait_seconds: how long to keep trying to create the job while the account has no capacity
        (ResourceLimitExceeded); default: as long as the operator would wait for the job (max_attempts x
        check_interval).
    :param capacity_backoff_seconds: the first pause between those tries, growing to 10 times it with jitter;
        default: check_interval.
    :param max_attempts: status checks before giving up when deferred.
    :return: ``{"Processing": DescribeProcessingJob, ...}`` with the provider's output files.
    """

    kind = PROCESSING

    def __init__(self, **kwargs):  # defined here, so Airflow's operator metaclass applies default_args to it
        super().__init__(**kwargs)

    def _create(self, config: dict) -> None:
        self.hook.create_processing_job(config, wait_for_completion=False)

    def _wait(self, name: str) -> None:
        description = self.hook.check_status(name, "ProcessingJobStatus", self.hook.describe_processing_job,
                                              self.check_interval, self.max_ingestion_time)
        _raise_unless_completed(PROCESSING, description)

    def _result(self, name: str) -> dict:
        self.serialized_job = serialize(self.hook.describe_processing_job(name))
        return {"Processing": self.serialized_job, **self._read_output_files()}


def _raise_unless_completed(kind: JobKind, description: dict) -> None:
    status = description[kind.status_key]
    if status != "Completed":
        raise job_failure(kind.label, description[kind.name_key], status, description.get("FailureReason"))
