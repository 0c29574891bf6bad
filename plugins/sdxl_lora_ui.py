"""The Airflow plugin of this project: the grid report as a tab of every sdxl_lora_grid_search run.

- a FastAPI app (plugins/sdxl_lora/report/view.py) mounted by the api-server at /sdxl-lora, behind Airflow's
  authentication;
- an external view on DAG runs whose page is that app's HTML, shown inside the UI (iframe);
- a listener that puts a link to the tab into the run's note.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from sdxl_lora.report import run_notes
from sdxl_lora.report import view as ui


class SdxlLoraReportPlugin(AirflowPlugin):
    name = "sdxl_lora_report"
    fastapi_apps = [{"app": ui.app, "url_prefix": ui.URL_PREFIX, "name": "SDXL LoRA grid report"}]
    external_views = [{
        "name": "Grid report",
        "href": ui.URL_PREFIX.lstrip("/") + "/runs/{DAG_ID}/{RUN_ID}",
        "destination": "dag_run",
        "url_route": ui.VIEW_ROUTE,
    }]
    listeners = [run_notes]
