"""The Airflow plugin of this project: the grid report of every sdxl_lora_grid_search run.

- a FastAPI app (plugins/sdxl_lora/report/view.py) mounted by the api-server at /sdxl-lora, behind Airflow's
  authentication;
- an operator extra link, "Grid report", on the grid DAG's publish_report task only, to its run's report page
  (plugins/sdxl_lora/report/links.py says why a link and not a tab);
- a listener that puts a link to the report into the run's note.

Installed packages register it by their `airflow.plugins` entry point (pyproject.toml).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from sdxl_lora.report import links, run_notes
from sdxl_lora.report import view as ui


class SdxlLoraReportPlugin(AirflowPlugin):
    name = "sdxl_lora_report"
    fastapi_apps = [{"app": ui.app, "url_prefix": links.URL_PREFIX, "name": "SDXL LoRA grid report"}]
    operator_extra_links = [links.GridReportLink()]
    listeners = [run_notes]
