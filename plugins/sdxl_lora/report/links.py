"""Where the UI leads to a grid run's report: a "Grid report" button on the run's publish_report task.

Airflow 3 shows a plugin's external views on the runs of every DAG (it filters them by destination alone); an
operator extra link shows only on the tasks of the operator classes it names. publish_report is the one task of its
class (`report_task`: @task with a class of its own), so the button is on grid runs only. The plugin
(plugins/sdxl_lora_ui.py) registers the link, so the api-server computes it when the UI asks: no XCom, and runs
that ran before the link existed have it too.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

# The standard provider's @task operator: a subclass of it is a @task whose tasks an operator link can name.
from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk import BaseOperatorLink
from airflow.sdk.bases.decorator import task_decorator_factory

URL_PREFIX = "/sdxl-lora"  # where the api-server mounts the report app (sdxl_lora.report.view)
REPORTED_DAGS = ("sdxl_lora_grid_search",)


def report_path(dag_id: str, run_id: str) -> str:
    """The run's report page, relative to the UI's base URL."""
    return f"{URL_PREFIX.lstrip('/')}/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"


def base_path() -> str:
    """The path of the UI's base URL ([api] base_url), without its host or port: a link then holds wherever the UI
    is served from (the demo's Airflow on a free port, the same database later behind `make airflow`, a proxy)."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class GridReportOperator(_PythonDecoratedOperator):
    """The operator of a `report_task`: a @task operator that GridReportLink names."""

    custom_operator_name = "@report_task"


def report_task(python_callable=None, **kwargs):
    """@task for the task that publishes a grid run's report: its task instances show the Grid report button.

    :param python_callable: the task's function (as for @task)
    :param kwargs: the task's arguments (as for @task: trigger_rule, retries, ...)
    """
    return task_decorator_factory(python_callable=python_callable, decorated_operator_class=GridReportOperator,
                                  **kwargs)


class GridReportLink(BaseOperatorLink):
    """The button: the run's report page (sdxl_lora.report.view), behind Airflow's login like the UI."""

    name = "Grid report"
    operators = [GridReportOperator]

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id not in REPORTED_DAGS:
            return ""  # no button: the report app serves only the grid DAG's runs
        return f"{base_path()}/{report_path(ti_key.dag_id, ti_key.run_id)}"
