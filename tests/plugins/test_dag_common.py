from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from sdxl_lora.dag_common import dag_arguments, run_date


def test_run_date_uses_the_logical_date_when_there_is_one():
    context = {"logical_date": datetime(2026, 11, 1, 3, tzinfo=timezone.utc),
               "dag_run": SimpleNamespace(run_after=datetime(2026, 11, 26, tzinfo=timezone.utc))}
    assert run_date(context) == "2026-11-01"


def test_run_date_of_a_run_triggered_without_a_logical_date():
    # Airflow 3 runs triggered from the UI or the API may have no logical date (and no `ds`).
    context = {"logical_date": None, "dag_run": SimpleNamespace(run_after=datetime(2026, 11, 26, tzinfo=timezone.utc))}
    assert run_date(context) == "2026-11-26"


def test_every_dag_gets_the_shared_tags_and_retries():
    arguments = dag_arguments("x", "### doc", "extra", retries=1)
    assert arguments["tags"] == ["sdxl", "lora", "sagemaker", "extra"]
    assert arguments["default_args"]["retries"] == 1 and arguments["catchup"] is False


def test_operators_share_their_keyword_arguments_from_the_settings():
    from sdxl_lora.dag_common import job_kwargs, waiting_kwargs
    from sdxl_lora.settings import Settings

    settings = Settings(aws_conn_id="aws_other", check_interval_seconds=5, deferrable=True, max_runtime_seconds=100,
                        max_wait_seconds=10)
    assert waiting_kwargs(settings) == {"aws_conn_id": "aws_other", "wait_for_completion": True, "check_interval": 5,
                                        "deferrable": True}
    assert job_kwargs(settings) == {**waiting_kwargs(settings), "print_log": True, "max_attempts": 21}


def _dag_with_a_cleanup(**short_circuit):
    """build -> train (mapped) -> select (ALL_DONE) -> deploy? (short-circuit) -> deploy -> rollback (ALL_DONE)."""
    import pendulum
    from airflow.sdk import DAG, TriggerRule, task

    with DAG("watched", start_date=pendulum.datetime(2026, 1, 1), schedule=None) as dag:
        @task
        def build() -> list[int]:
            return [1, 2]

        @task
        def train(value: int) -> int:
            return value

        @task(trigger_rule=TriggerRule.ALL_DONE)
        def select(values) -> int:
            return max(values)

        @task.short_circuit(**short_circuit)
        def wanted() -> bool:
            return False

        @task
        def deploy(value: int) -> None:
            pass

        @task(trigger_rule=TriggerRule.ALL_DONE)
        def rollback() -> None:
            pass

        trained = train.expand(value=build())
        chosen = select(trained)
        deployed = deploy(chosen)
        chosen >> wanted() >> deployed >> rollback()
    return dag, trained


def test_the_watcher_is_downstream_of_every_task_and_fails_on_one_failure():
    from airflow.sdk import TriggerRule

    from sdxl_lora.dag_common import WATCHER, watch

    dag, _ = _dag_with_a_cleanup(ignore_downstream_trigger_rules=False)
    with dag:
        watcher = watch()
    assert watcher.task_id == WATCHER and watcher.trigger_rule == TriggerRule.ONE_FAILED and watcher.retries == 0
    # Wired to every task but the short-circuit, which would skip it; that one reaches it through deploy.
    assert watcher.upstream_task_ids == set(dag.task_ids) - {WATCHER, "wanted"}
    assert watcher.get_flat_relative_ids(upstream=True) == set(dag.task_ids) - {WATCHER}
    assert not watcher.downstream_task_ids  # a leaf: its failure is the run's


def test_tasks_judged_downstream_are_watched_only_through_their_judge():
    from sdxl_lora.dag_common import WATCHER, watch

    dag, trained = _dag_with_a_cleanup(ignore_downstream_trigger_rules=False)
    with dag:
        watcher = watch(judged_downstream=[trained])
    assert "train" not in watcher.upstream_task_ids and {"build", "select", "rollback"} <= watcher.upstream_task_ids
    assert "train" in watcher.get_flat_relative_ids(upstream=True)


def test_a_short_circuit_that_would_skip_the_watcher_is_refused():
    from sdxl_lora.dag_common import watch

    dag, _ = _dag_with_a_cleanup()  # ignore_downstream_trigger_rules=True, the default: skips every task after it
    with dag, pytest.raises(ValueError, match="watched.wanted skips every task downstream of it"):
        watch()
    dag, _ = _dag_with_a_cleanup(ignore_downstream_trigger_rules=False)
    with dag, pytest.raises(ValueError, match="no task nothing"):
        watch(judged_downstream=[SimpleNamespace(task_id="nothing")])


def test_the_watchers_message_names_what_failed_and_what_it_blocked():
    from sdxl_lora.dag_common import failure_summary

    assert failure_summary({"select_winner": "failed", "publish_report": "success", "deploy.plan": "upstream_failed",
                            "deploy.rollback": "upstream_failed", "build_trials": "success"}) == \
        "this run failed; failed: select_winner; not run because of it: deploy.plan, deploy.rollback"
    assert failure_summary({}) == "a task of this run failed"


def test_list_params_are_one_value_per_line_boxes_that_say_what_they_take():
    from sdxl_lora.dag_common import grid_param, list_param

    param = grid_param("learning_rate", [1e-4, 2e-4], "Learning rates to try.")
    assert param.value == [1e-4, 2e-4] and param.schema["maxItems"] == 10 and "uniqueItems" not in param.schema
    assert "type" not in param.schema["items"]  # Airflow's form: a text box, one value per line
    assert param.description == ("Learning rates to try. One value per line (through the API, a JSON list of "
                                 "numbers); each a number in (0, 0.1]; at most 10 values.")
    assert param.resolve(["0.0001", "2e-4", ""]) == ["0.0001", "2e-4", ""]  # what the form sends passes
    assert list_param("rank", [4], "Ranks.", 28).schema["maxItems"] == 28


def test_deploy_requested_is_one_short_circuit_on_the_registration_that_spares_the_watcher():
    import pendulum
    from airflow.sdk import DAG, task

    from sdxl_lora.dag_common import deploy_requested, watch

    with DAG("requested", start_date=pendulum.datetime(2026, 1, 1), schedule=None) as dag:
        registered = task(task_id="register_model")(lambda: {"deploy": True})()
        requested = deploy_requested(registered)
        watch()  # would refuse a short-circuit that skips the watcher
    operator = dag.get_task("deploy_requested")
    assert requested.operator is operator and operator.ignore_downstream_trigger_rules is False
    assert operator.upstream_task_ids == {"register_model"}
    assert operator.python_callable(registration={"deploy": True, "package_arn": "arn"}) is True
    assert operator.python_callable(registration={"deploy": False, "package_arn": None}) is False


def test_the_approval_param_is_auto_or_manual():
    from airflow.sdk.definitions.param import ParamValidationError

    from sdxl_lora.dag_common import approval_param

    param = approval_param()
    assert param.resolve() == "auto" and param.resolve("manual") == "manual"
    with pytest.raises(ParamValidationError):
        param.resolve("always")


def test_no_retry_fails_the_task_at_once_with_the_errors_message_and_lets_others_through():
    from airflow.sdk.exceptions import AirflowFailException

    from sdxl_lora.dag_common import no_retry

    with pytest.raises(AirflowFailException, match="^bad rank 0$"):
        with no_retry(ValueError, KeyError):
            raise ValueError("bad rank 0")
    with pytest.raises(RuntimeError):
        with no_retry(ValueError):
            raise RuntimeError("a retry may help")


def test_the_retry_delay_is_a_parse_time_setting(monkeypatch):
    from datetime import timedelta

    from sdxl_lora.dag_common import dag_arguments
    from sdxl_lora.settings import PARSE_TIME

    assert dag_arguments("d", "doc")["default_args"]["retry_delay"] == timedelta(seconds=60)
    monkeypatch.setenv("SDXL_LORA_RETRY_DELAY_SECONDS", "5")
    assert dag_arguments("d", "doc")["default_args"]["retry_delay"] == timedelta(seconds=5)
    assert "retry_delay_seconds" in PARSE_TIME  # the DAGs read it when parsed: a Variable may not contradict it


def test_preset_params_take_their_defaults_from_the_preset_and_name_it():
    from ml.contract.hyperparameters import SWEPT, preset
    from sdxl_lora.dag_common import hyperparameters_param, smoke_param
    from sdxl_lora.presets import PRESETS

    local = PRESETS["local"]
    trials = hyperparameters_param(local, "Shared.", exclude=SWEPT)
    assert trials.value == preset("local", exclude=SWEPT) and not set(SWEPT) & set(trials.schema["properties"])
    assert trials.description == ("Shared. Defaults: the local preset (SDXL_LORA_PRESET=local). Keys, types and "
                                  "bounds: docs/training-job.md.")
    smoke = smoke_param(local)
    assert smoke.value == local.smoke_request and smoke.value is not local.smoke_request  # a form cannot change it
    assert smoke.description.endswith("Defaults: the local preset (SDXL_LORA_PRESET=local).")
    assert hyperparameters_param(PRESETS["production"], "Training.").value == preset("production")
