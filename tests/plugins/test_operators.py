"""The training operator's hook notices a finished job within check_interval and still prints its log lines."""

from __future__ import annotations

import pytest
from airflow.providers.amazon.aws.hooks import sagemaker as provider
from sdxl_lora.operators import PromptSageMakerHook, ResumableSageMakerTrainingOperator

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
