"""The operators (plugins/sdxl_lora/operators/jobs.py) without AWS or an Airflow process: the training hook notices a
finished job within check_interval and still prints its log lines; the attempt logic both operators share; waiting
out ResourceLimitExceeded with a bounded, jittered backoff (in the worker, or deferred on a timer); deferral to the
job trigger and a failed job's FailureReason."""

from __future__ import annotations

import json

import pytest
from airflow.providers.amazon.aws.hooks import sagemaker as provider

from sdxl_lora.operators.jobs import PromptSageMakerHook, ResumableSageMakerTrainingOperator

JOB = "sdxl-lora-gridsearch-run-lr-0-001-mts-2-r-4"


class FakeClock:
    """time.sleep advances time.monotonic: the hook's waiting loop runs instantly, in simulated seconds."""

    def __init__(self):
        self.now = 1000.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


class FakeLogs:
    """CloudWatch Logs with one stream that gains a line each time it is read."""

    def __init__(self):
        self.reads = 0

    def get_conn(self):
        return self

    def describe_log_streams(self, **kwargs):
        return {"logStreams": [{"logStreamName": f"{JOB}/algo-1-0"}]}

    def get_log_events(self, group, stream, start_time=0, skip=0):
        self.reads += 1
        events = [{"timestamp": 10 * i, "message": f"step={i} loss=0.5"} for i in range(1, self.reads + 1)]
        return iter([e for e in events if e["timestamp"] >= start_time][skip:])


def _waited_seconds(hook_class, monkeypatch, capsys, completes_after: int = 3, check_interval: int = 2) -> float:
    clock = FakeClock()
    monkeypatch.setattr(provider.time, "sleep", clock.sleep)
    monkeypatch.setattr(provider.time, "monotonic", clock.monotonic)
    hook = hook_class(aws_conn_id=None)
    hook.logs_hook = FakeLogs()
    checks = []

    def describe(name):
        checks.append(clock.now)
        status = "Completed" if len(checks) > completes_after else "InProgress"
        return {"TrainingJobName": name, "TrainingJobStatus": status, "ResourceConfig": {"InstanceCount": 1},
                "TrainingStartTime": provider.datetime(2026, 1, 1), "TrainingEndTime": provider.datetime(2026, 1, 1),
                "LastModifiedTime": provider.datetime(2026, 1, 1, tzinfo=provider.timezone.utc),
                "SecondaryStatusTransitions": [{"Status": "Training", "StatusMessage": status}]}

    monkeypatch.setattr(hook, "describe_training_job", describe)
    started = clock.now
    hook.check_training_status_with_log(JOB, hook.non_terminal_states, hook.training_failed_states,
                                        wait_for_completion=True, check_interval=check_interval)
    return clock.now - started


def test_a_finished_job_is_noticed_within_check_interval(monkeypatch, capsys):
    waited = _waited_seconds(PromptSageMakerHook, monkeypatch, capsys, completes_after=3, check_interval=2)
    # Three status checks see InProgress (one per 2 s tick), the fourth Completed, one more tick reads the last lines.
    assert waited <= 4 * 2 + 2
    printed = capsys.readouterr().out  # Airflow's structlog writes task logs to stdout here
    assert "step=1 loss=0.5" in printed and "step=4 loss=0.5" in printed  # the job's lines, as they came


def test_the_providers_hook_alone_would_wait_30_s_per_status_check(monkeypatch, capsys):
    waited = _waited_seconds(provider.SageMakerHook, monkeypatch, capsys, completes_after=3, check_interval=2)
    assert waited >= 3 * 30  # the reason for PromptSageMakerHook


def test_the_training_operator_uses_the_prompt_hook():
    operator = ResumableSageMakerTrainingOperator(task_id="train", config={"TrainingJobName": JOB},
                                                  aws_conn_id=None, check_interval=1)
    assert isinstance(operator.hook, PromptSageMakerHook)


@pytest.mark.parametrize("interval", [1, 5])
def test_the_wait_scales_with_check_interval(monkeypatch, capsys, interval):
    assert _waited_seconds(PromptSageMakerHook, monkeypatch, capsys, completes_after=1,
                           check_interval=interval) <= 3 * interval


# -- the attempt logic, ResourceLimitExceeded backoff and deferral, with a fake SageMaker -----------------------

import random  # noqa: E402

from airflow.providers.common.compat.sdk import AirflowException  # noqa: E402
from airflow.sdk.exceptions import TaskDeferred  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from sdxl_lora.operators import jobs as operators  # noqa: E402

NO_CAPACITY = {"Error": {"Code": "ResourceLimitExceeded", "Message": "The account-level service limit "
                         "'ml.g5.2xlarge for training job usage' is 1 Instances"}}


class FakeSageMaker:
    """The hook and client calls the operators make: jobs by name with a status, creation refused while
    `refusals` lasts (ResourceLimitExceeded, as AWS answers at the quota), waits that end a job Completed."""

    non_terminal_states = {"InProgress", "Stopping"}
    training_failed_states = {"Failed", "Stopped"}

    def __init__(self, jobs: dict | None = None, refusals: int = 0):
        self.jobs = dict(jobs or {})
        self.refusals = refusals
        self.created: list[str] = []
        self.conn = self

    def _describe(self, key: str, name: str) -> dict:
        if name not in self.jobs:
            raise ClientError({"Error": {"Code": "ValidationException", "Message": "not found"}}, "Describe")
        status = self.jobs[name]
        description = {key.replace("Status", "Name"): name, key: status}
        if status == "Failed":
            description["FailureReason"] = "train channel has no images"
        return description

    def describe_training_job(self, name=None, TrainingJobName=None):
        return self._describe("TrainingJobStatus", name or TrainingJobName)

    def describe_processing_job(self, name=None, ProcessingJobName=None):
        return self._describe("ProcessingJobStatus", name or ProcessingJobName)

    def _create(self, name: str) -> dict:
        if self.refusals:
            self.refusals -= 1
            raise ClientError(NO_CAPACITY, "CreateTrainingJob")
        assert name not in self.jobs, f"{name} created twice"
        self.jobs[name] = "InProgress"
        self.created.append(name)
        return {"ResponseMetadata": {"HTTPStatusCode": 200}}

    def create_training_job(self, config, wait_for_completion=True, print_log=True, **kwargs):
        assert not wait_for_completion and not print_log  # the operator waits itself
        return self._create(config["TrainingJobName"])

    def create_processing_job(self, config, wait_for_completion=True, **kwargs):
        assert not wait_for_completion
        return self._create(config["ProcessingJobName"])

    def configure_s3_resources(self, config):
        pass

    def check_status(self, name, key, describe, check_interval, max_ingestion_time=None):
        self.jobs[name] = "Completed"
        return describe(name)

    def check_training_status_with_log(self, name, *args, **kwargs):
        self.jobs[name] = "Completed"


TRAINING_CONFIG = {"TrainingJobName": JOB, "ResourceConfig": {"InstanceCount": 1, "VolumeSizeInGB": 50},
                   "StoppingCondition": {"MaxRuntimeInSeconds": 600}}
PROCESSING_CONFIG = {"ProcessingJobName": "sdxl-lora-prepare-run-v1",
                     "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "VolumeSizeInGB": 30}}}


def _operator(fake: FakeSageMaker, processing: bool = False, **kwargs):
    cls = operators.ResumableSageMakerProcessingOperator if processing else ResumableSageMakerTrainingOperator
    config = PROCESSING_CONFIG if processing else TRAINING_CONFIG
    operator = cls(task_id="job", config=json.loads(json.dumps(config)), aws_conn_id=None,
                   **{"check_interval": 1, "print_log": False, "max_attempts": 100, **kwargs})
    operator.hook = fake  # cached_property: the instance attribute wins
    return operator


@pytest.fixture
def sleeps(monkeypatch):
    """time.sleep in the operators module, recorded instead of slept; the clock advances with it."""
    slept = []
    clock = FakeClock()
    monkeypatch.setattr(operators.time, "sleep", lambda s: (slept.append(s), clock.sleep(s)))
    monkeypatch.setattr(operators.time, "time", clock.monotonic)
    return slept


def test_the_backoff_doubles_from_the_first_pause_up_to_the_longest_with_equal_jitter():
    rng = random.Random(7)
    for waits, ceiling in enumerate([2, 4, 8, 16, 20, 20, 20]):
        delays = [operators.capacity_backoff(waits, 2, 20, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (waits, min(delays), max(delays))
        assert max(delays) - min(delays) > ceiling / 4  # jittered: tasks refused together spread out
    assert operators.capacity_backoff(10_000, 2, 20, rng) <= 20  # no overflow however long the wait


@pytest.mark.parametrize("first, longest", [(0, 10), (-1, 10), (5, 4)])
def test_a_backoff_without_a_positive_first_pause_below_the_longest_is_refused(first, longest):
    with pytest.raises(ValueError, match="capacity backoff"):
        operators.capacity_backoff(0, first, longest)


def test_resource_limit_exceeded_is_waited_out_with_backoff_and_the_job_created_once(sleeps, capsys):
    fake = FakeSageMaker(refusals=3)
    result = _operator(fake).execute({})
    assert fake.created == [JOB]  # one job, under the first attempt's name: the refusals created nothing
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert len(sleeps) == 3 and 0.5 <= sleeps[0] <= 1 and 1 <= sleeps[1] <= 2 and 2 <= sleeps[2] <= 4
    printed = capsys.readouterr().out
    assert printed.count("ResourceLimitExceeded: training job") == 3 and "capacity wait 3" in printed
    assert "ml.g5.2xlarge for training job usage" in printed  # AWS's own message, in the task log


def test_waiting_for_capacity_is_bounded_and_then_fails_the_try_naming_the_quota(sleeps):
    fake = FakeSageMaker(refusals=1000)
    with pytest.raises(AirflowException, match=r"no capacity after \d+ s of waiting \(the bound is 30 s\): "
                                                r"ResourceLimitExceeded: The account-level service limit"):
        _operator(fake, capacity_wait_seconds=30).execute({})
    assert fake.created == [] and sum(sleeps) <= 30 and len(sleeps) >= 3


def test_other_client_errors_are_not_waited_out(sleeps):
    fake = FakeSageMaker()
    fake.create_training_job = lambda *a, **k: (_ for _ in ()).throw(
        ClientError({"Error": {"Code": "ValidationException", "Message": "bad request"}}, "CreateTrainingJob"))
    with pytest.raises(ClientError, match="bad request"):
        _operator(fake).execute({})
    assert sleeps == []


def test_deferrable_waits_for_capacity_on_a_timer_then_creates_and_defers_to_the_job_trigger(sleeps):
    fake = FakeSageMaker(refusals=1)
    operator = _operator(fake, deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({})
    assert sleeps == [] and fake.created == []  # the worker is freed: the triggerer keeps the time
    assert deferred.value.method_name == "resume_after_capacity_wait"
    assert type(deferred.value.trigger).__name__ == "TimeDeltaTrigger"
    assert deferred.value.kwargs["capacity_waits"] == 1
    resumed, resume_kwargs = _operator(fake, deferrable=True), deferred.value.kwargs  # resumed: a fresh operator
    with pytest.raises(TaskDeferred) as deferred:
        resumed.resume_after_capacity_wait({}, event=None, **resume_kwargs)
    assert fake.created == [JOB]
    trigger = deferred.value.trigger
    assert deferred.value.method_name == "execute_complete" and isinstance(trigger, operators.JobTrigger)
    classpath, kwargs = trigger.serialize()  # what the triggerer rebuilds it from
    assert classpath == "sdxl_lora.operators.jobs.JobTrigger"
    assert (kwargs["job_name"], kwargs["job_type"], kwargs["waiter_delay"]) == (JOB, "Training", 1)
    assert operators.JobTrigger(**kwargs).status_queries == ["TrainingJobStatus", "SecondaryStatus", "FailureReason"]


def test_a_deferrable_retry_defers_to_wait_for_the_job_its_first_try_started(sleeps):
    fake = FakeSageMaker({JOB: "Failed", f"{JOB}-a2": "InProgress"})
    with pytest.raises(TaskDeferred) as deferred:
        _operator(fake, deferrable=True).execute({})
    assert fake.created == [] and deferred.value.trigger.job_name == f"{JOB}-a2"


def test_a_failed_job_reported_by_the_trigger_fails_the_task_with_its_failure_reason():
    fake = FakeSageMaker({JOB: "Failed"})
    event = {"status": "failed", "job_name": JOB, "message": "train channel has no images"}
    with pytest.raises(AirflowException, match=f"Training job {JOB} Failed: Reason: train channel has no images"):
        _operator(fake, deferrable=True).execute_complete({}, event)
    fake.jobs[JOB] = "Completed"
    done = _operator(fake, deferrable=True).execute_complete({}, {"status": "success", "job_name": JOB})
    assert done["Training"]["TrainingJobStatus"] == "Completed"


@pytest.mark.parametrize("jobs, created, waited", [
    ({}, ["sdxl-lora-prepare-run-v1"], True),  # first try
    ({"sdxl-lora-prepare-run-v1": "InProgress"}, [], True),  # a retry while its job runs: wait for it
    ({"sdxl-lora-prepare-run-v1": "Completed"}, [], False),  # a retry after it completed: use it
    ({"sdxl-lora-prepare-run-v1": "Failed"}, ["sdxl-lora-prepare-run-v1-a2"], True),  # the next attempt
])
def test_the_processing_operator_shares_the_attempt_logic(sleeps, jobs, created, waited):
    fake = FakeSageMaker(jobs)
    waits = []
    check_status = fake.check_status
    fake.check_status = lambda name, *a, **k: (waits.append(name), check_status(name, *a, **k))[1]
    result = _operator(fake, processing=True).execute({})
    assert fake.created == created and bool(waits) == waited
    assert result["Processing"]["ProcessingJobStatus"] == "Completed"


def test_a_stopped_job_fails_the_processing_task():
    fake = FakeSageMaker()
    fake.check_status = lambda name, key, describe, *a: (fake.jobs.__setitem__(name, "Stopped"), describe(name))[1]
    with pytest.raises(AirflowException, match="Processing job sdxl-lora-prepare-run-v1 Stopped"):
        _operator(fake, processing=True).execute({})


@pytest.mark.parametrize("print_log", [True, False])
def test_a_job_that_failed_on_its_input_fails_the_task_at_once_whether_its_log_is_tailed_or_not(print_log):
    from airflow.sdk.exceptions import AirflowFailException

    fake = FakeSageMaker()
    failing = lambda name, *a, **k: (fake.jobs.__setitem__(name, "Failed"), fake.describe_training_job(name))[1]  # noqa: E731
    fake.check_status = fake.check_training_status_with_log = failing
    with pytest.raises(AirflowFailException, match=f"Training job {JOB} Failed: Reason: train channel has no images "
                                                   r"\(not retried"):
        _operator(fake, print_log=print_log).execute({})
    assert fake.created == [JOB]
