"""What every DAG of the project shares: its @dag arguments and the Params that recur."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param

from sdxl_lora.deploy import SMOKE_REQUEST

NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$"
VERSION_PATTERN = r"^[A-Za-z0-9._-]+$"


def dag_arguments(dag_id: str, doc_md: str, *tags: str, retries: int = 2) -> dict:
    return {
        "dag_id": dag_id,
        "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
        "catchup": False,
        "doc_md": doc_md,
        "tags": ["sdxl", "lora", "sagemaker", *tags],
        "default_args": {"retries": retries, "retry_delay": timedelta(minutes=1)},
        "render_template_as_native_obj": True,  # Params that are objects stay objects in templates
    }


def version_param(description: str) -> Param:
    return Param(None, type=["null", "string"], pattern=VERSION_PATTERN, description=description)


def endpoint_param() -> Param:
    return Param(None, type=["null", "string"], pattern=NAME_PATTERN,
                 description="Endpoint to create or update; empty: the configured endpoint name.")


def smoke_param() -> Param:
    return Param(SMOKE_REQUEST, type="object",
                 description="The deployment's smoke-test invocation (a JSON request of sdxl-lora serve).")


def run_date(context) -> str:
    """The run's date: its logical date, or when it was triggered (runs from the UI may have no logical date)."""
    when = context.get("logical_date") or context["dag_run"].run_after
    return when.strftime("%Y-%m-%d")
