"""What every DAG of the project shares: its @dag arguments, the Params that recur and the
keyword arguments of the SageMaker operators that wait for a job."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param

from ml.hyperparameters import hyperparameters_schema, preset, value_schema
from sdxl_lora.assets import VERSION_PATTERN
from sdxl_lora.settings import Settings

NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$"
MAX_GRID_VALUES = 10  # 10 x 10 x 10 = 1000 trials, within Airflow's [core] max_map_length of 1024
SMOKE_REQUEST = {"prompt": "storyboard frame, ink outline, a red circle on the left", "width": 512, "height": 512,
                 "num_inference_steps": 4, "seed": 0, "lora_scale": 0.8}


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


def hyperparameters_param(preset_name: str, description: str, exclude: tuple[str, ...] = ()) -> Param:
    """A hyperparameters object Param: the preset as its default, every key typed and bounded by
    ml.hyperparameters, unknown keys refused, so the trigger form refuses what the job would."""
    return Param(preset(preset_name), description=description + " Keys, types and bounds: the README's table.",
                 **hyperparameters_schema(exclude=exclude))


def grid_param(name: str, default: list, description: str) -> Param:
    """A list of values of one hyperparameter, each bounded as the job bounds it."""
    return Param(default, type="array", items=value_schema(name), minItems=1, maxItems=MAX_GRID_VALUES,
                 uniqueItems=True, description=description)


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
