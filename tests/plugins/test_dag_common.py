from datetime import datetime, timezone
from types import SimpleNamespace

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
