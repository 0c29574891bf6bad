"""What every DAG of the project shares: its @dag arguments, the Params that recur, the
keyword arguments of the SageMaker operators that wait for a job, the tasks that recur
(deploy_requested), the approval Param, the watcher that fails a run when one of its tasks failed, and no_retry."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import pendulum
from airflow.sdk import Param, TriggerRule, task

from ml.contract.hyperparameters import SPEC_BY_NAME, hyperparameters_schema, list_item_schema
from sdxl_lora.assets import VERSION_PATTERN
from sdxl_lora.grid import MAX_GRID_VALUES
from sdxl_lora.presets import Preset
from sdxl_lora.settings import Settings

NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$"
WATCHER = "watcher"
FAILED_STATES = ("failed", "upstream_failed")
log = logging.getLogger(__name__)


def dag_arguments(dag_id: str, doc_md: str, *tags: str, retries: int = 2) -> dict:
    retry_delay = timedelta(seconds=Settings.from_environment().retry_delay_seconds)  # parse-time, as the DAG is
    return {
        "dag_id": dag_id,
        "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
        "catchup": False,
        "doc_md": doc_md,
        "tags": ["sdxl", "lora", "sagemaker", *tags],
        "default_args": {"retries": retries, "retry_delay": retry_delay},
        "render_template_as_native_obj": True,  # Params that are objects stay objects in templates
    }


def waiting_kwargs(settings: Settings) -> dict:
    """Every SageMaker operator that waits for its job or endpoint: connection, polling, deferral."""
    return {"aws_conn_id": settings.aws_conn_id, "wait_for_completion": True,
            "check_interval": settings.check_interval_seconds, "deferrable": settings.deferrable}


def job_kwargs(settings: Settings) -> dict:
    """The processing and training operators: waiting, the job's log in the task log, and enough
    status checks to outlast the longest job."""
    return {**waiting_kwargs(settings), "print_log": True, "max_attempts": settings.max_status_checks()}


def version_param(description: str) -> Param:
    return Param(None, type=["null", "string"], pattern=VERSION_PATTERN, description=description)


def hyperparameters_param(preset: Preset, description: str, exclude: tuple[str, ...] = ()) -> Param:
    """A hyperparameters object Param: the preset's hyperparameters (less the excluded keys) as its default,
    every key typed and bounded by ml.contract.hyperparameters, unknown keys refused, so the trigger form
    refuses what the job would.

    :param preset: the forms' preset (sdxl_lora.presets.active), named in the description.
    :param description: what the Param holds.
    :param exclude: hyperparameters the DAG takes from other Params (a trial's swept ones).
    """
    return Param(preset.hyperparameters(exclude),
                 description=f"{preset.describe(description)} Keys, types and bounds: docs/training-job.md.",
                 **hyperparameters_schema(exclude=exclude))


def list_param(name: str, default: list, description: str, max_values: int) -> Param:
    """A list of values of one numeric hyperparameter. The trigger form shows it as a text box, one value per
    line (items without a "type"; an array of numbers would get a JSON editor), and sends text; the API may
    send numbers. Numbers are bounded at trigger time, text is checked for its characters there and read
    and bounded by the DAG's first task (sdxl_lora.grid.values), which also drops blank lines and refuses
    duplicates (so no uniqueItems: two empty lines would be refused as duplicates)."""
    return Param(default, type="array", items=list_item_schema(name), minItems=1, maxItems=max_values,
                 description=f"{description} One value per line (through the API, a JSON list of numbers); "
                             f"each {SPEC_BY_NAME[name].words()}; at most {max_values} values.")


def grid_param(name: str, default: list, description: str) -> Param:
    """A grid list (learning rates, steps, ranks): at most MAX_GRID_VALUES values."""
    return list_param(name, default, description, MAX_GRID_VALUES)


def endpoint_param() -> Param:
    return Param(None, type=["null", "string"], pattern=NAME_PATTERN,
                 description="Endpoint to create or update; empty: the configured endpoint name.")


def cost_cap_param() -> Param:
    """max_cost_usd: the run's cap on its training jobs' estimated cost (sdxl_lora.estimate), None for none."""
    return Param(None, type=["null", "number"], minimum=0, description=(
        "Refuse the run, before any job starts, when its training jobs' estimated on-demand cost is above this "
        "(USD); empty: no cap. The estimate is in the first task's log either way (docs/dags.md#cost)."))


def smoke_param(preset: Preset) -> Param:
    return Param(dict(preset.smoke_request), type="object", description=preset.describe(
        "The deployment's smoke-test invocation (a JSON request of sdxl-lora serve)."))


def run_date(context) -> str:
    """The run's date: its logical date, or when it was triggered (runs from the UI may have no logical date)."""
    when = context.get("logical_date") or context["dag_run"].run_after
    return when.strftime("%Y-%m-%d")


@contextmanager
def no_retry(*errors: type[BaseException]) -> Iterator[None]:
    """Inside a task: the given errors (a bad Param, no winner) are ones a retry would meet again, so they fail
    the task at once, without its retries, with their message (AirflowFailException).

    :param errors: the exception classes to fail on.
    """
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except errors as error:
        raise AirflowFailException(str(error)) from None


def approval_param() -> Param:
    """approval: how the version a run registers is approved (sdxl_lora.registry)."""
    return Param("auto", type="string", enum=["auto", "manual"], description=(
        "auto: the registered model version is Approved when this run deploys it, else waits for approval; "
        "manual: it waits for approval (PendingManualApproval) and nothing is deployed (docs/dags.md#model-registry)."))


def deploy_requested(registered, task_id: str = "deploy_requested"):
    """A short-circuit task that lets the deploy group run only when the run decided to deploy what it registered.

    It skips only its direct downstream task (the deploy group's first); the rest follow their trigger rules, so
    they are skipped too while the watcher after them is not (ignore_downstream_trigger_rules=False, which
    watch() requires). Call it inside the @dag function, between register_model and the group.

    :param registered: register_model's XComArg (``{deploy, ...}``): its ``deploy`` decides.
    :param task_id: the task's id.
    :return: the task's XComArg, to chain.
    """
    @task.short_circuit(task_id=task_id, ignore_downstream_trigger_rules=False)
    def requested(registration: dict) -> bool:
        return bool(registration["deploy"])

    return requested(registered)


@task(task_id=WATCHER, trigger_rule=TriggerRule.ONE_FAILED, retries=0)
def _watcher(**context) -> None:
    """Runs only when a task it watches failed (or could not run because one upstream of it failed)."""
    from airflow.sdk.exceptions import AirflowFailException

    ti = context["ti"]
    try:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id],
                                    task_ids=sorted(context["task"].upstream_task_ids)).get(ti.run_id, {})
    except Exception:  # noqa: BLE001 - naming the failed tasks is a courtesy; failing the run is the job
        log.exception("could not read the watched tasks' states")
        states = {}
    summary = failure_summary(states)
    log.error("%s", summary)  # a line of its own in the task log, beside the exception
    raise AirflowFailException(summary)


def failure_summary(states: dict[str, str | None]) -> str:
    """The watcher's message: the tasks that failed, then those that could not run because of them."""
    failed = sorted(name for name, state in states.items() if state == "failed")
    blocked = sorted(name for name, state in states.items() if state == "upstream_failed")
    if not failed and not blocked:
        return "a task of this run failed"
    words = [f"failed: {', '.join(failed)}"] if failed else []
    if blocked:
        words.append(f"not run because of it: {', '.join(blocked)}")
    return "this run failed; " + "; ".join(words)


def watch(judged_downstream: Iterable = ()):
    """Airflow's watcher pattern (its system tests): a last task, trigger rule ONE_FAILED, downstream of every
    task of the DAG, that fails when one of them failed. Airflow sets a run's state from its leaf tasks, and
    cleanup or report tasks (ALL_DONE, ONE_FAILED) succeed after a failure upstream: without the watcher such a
    run ends green. Call it last in the @dag function.

    judged_downstream: tasks whose failure alone must not fail the run because a watched task downstream of them
    judges their outcome (the grid's trials: select_winner fails when no trial succeeded). Tasks that skip their
    direct downstream (short-circuit, branch) are not wired to the watcher, which they would skip; their failure
    reaches it through the tasks after them. A short-circuit that skips everything downstream of it
    (ignore_downstream_trigger_rules=True, the default) would skip the watcher too, so it is refused.

    :param judged_downstream: tasks (operators or XComArgs) not wired to the watcher, as above.
    :return: the watcher operator.
    :raises ValueError: a judged task not in the DAG, a short-circuit that would skip the watcher, or a task
        whose failure could not reach the watcher."""
    watcher = _watcher().operator
    dag = watcher.dag
    judged = {getattr(getattr(t, "operator", t), "task_id") for t in judged_downstream}
    unknown = judged - set(dag.task_ids)
    if unknown:
        raise ValueError(f"watch(): no task {', '.join(sorted(unknown))} in {dag.dag_id}")
    indirect = set(judged)
    for task_ in dag.tasks:
        if task_ is watcher or task_.task_id in judged:
            continue
        if task_.inherits_from_skipmixin:
            if getattr(task_, "ignore_downstream_trigger_rules", False):
                raise ValueError(f"{dag.dag_id}.{task_.task_id} skips every task downstream of it, the watcher "
                                 "included: give it ignore_downstream_trigger_rules=False (its direct downstream "
                                 "tasks are skipped, the others follow their trigger rules)")
            if task_.downstream_task_ids:
                indirect.add(task_.task_id)
                continue
        task_ >> watcher
    unwatched = indirect - watcher.get_flat_relative_ids(upstream=True)
    if unwatched:
        raise ValueError(f"watch(): no task downstream of {', '.join(sorted(unwatched))} reaches the watcher")
    return watcher
