"""Which ended SageMaker jobs a retry can fix: the one place that decides whether a job's failure fails its
task at once or leaves it to Airflow's retries.

Every retry of a training or processing task starts a new, paid job (`<name>-a2`, ...). A job that failed on
its input or its configuration fails the same way again: no usable images, a bad hyperparameter, a model that
cannot load, a bug. Its task fails at once (AirflowFailException), naming the reason. A retry is left to Airflow
only where the next job may pass:

- the job was Stopped (a spot interruption, StopTrainingJob, MaxRuntime/MaxWait): the next attempt resumes
  from the checkpoints the stopped one synced;
- SageMaker itself failed it (FailureReason starting with one of TRANSIENT_REASONS: capacity, an internal
  error, throttling), or gave no reason at all.

The jobs' own FailureReason (the payload's failure file, ml.contract.container.write_failure) never starts with
those words: SageMaker's platform errors do.
"""

from __future__ import annotations

# FailureReason prefixes of SageMaker's own, passing failures (compared without case).
TRANSIENT_REASONS = (
    "CapacityError",  # "CapacityError: Unable to provision requested ML compute capacity"
    "InsufficientInstanceCapacity",
    "InternalServerError",  # "InternalServerError: We encountered an internal error. Please try again."
    "InternalFailure",
    "ThrottlingException",
)


def retry_may_pass(status: str, reason: str | None) -> bool:
    """True when a new job with the same request may end otherwise (see the module's docstring)."""
    if status == "Stopped" or not (reason or "").strip():
        return True
    return reason.strip().lower().startswith(tuple(r.lower() for r in TRANSIENT_REASONS))


def job_failure(label: str, name: str, status: str, reason: str | None) -> Exception:
    """The exception a task raises for a job that did not complete: retried by Airflow only when it may pass."""
    from airflow.providers.common.compat.sdk import AirflowException
    from airflow.sdk.exceptions import AirflowFailException

    message = f"{label} job {name} {status}: Reason: {reason or '(No reason provided)'}"
    if retry_may_pass(status, reason):
        return AirflowException(message)
    return AirflowFailException(f"{message} (not retried: a new job with the same input and settings would fail "
                                "the same way; fix them and run again)")
