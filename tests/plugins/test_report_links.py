"""The Grid report button (plugins/sdxl_lora/report/links.py) and the plugin that registers it: a link on the
report task's runs, no tab on every DAG's runs, and one registration of the plugin, by entry point."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

from sdxl_lora.report import links

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "manual__2026-11-26T10:00:00+00:00"


def test_the_link_opens_the_runs_report_page_under_the_uis_base_path(monkeypatch):
    link, key = links.GridReportLink(), SimpleNamespace(dag_id="sdxl_lora_grid_search", run_id=RUN_ID,
                                                        task_id="publish_report", map_index=-1, try_number=1)
    assert link.name == "Grid report"
    assert link.get_link(None, ti_key=key) == \
        "/sdxl-lora/runs/sdxl_lora_grid_search/manual__2026-11-26T10%3A00%3A00%2B00%3A00"
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com:8443/team/")
    assert link.get_link(None, ti_key=key) == \
        "/team/sdxl-lora/runs/sdxl_lora_grid_search/manual__2026-11-26T10%3A00%3A00%2B00%3A00"
    # A DAG the report app does not serve gets no button (Airflow shows none for an empty link).
    assert link.get_link(None, ti_key=SimpleNamespace(dag_id="sdxl_lora_deploy", run_id=RUN_ID)) == ""


def test_report_task_is_a_task_of_the_class_the_link_names():
    from airflow.sdk import dag

    @dag(dag_id="report_task_probe", schedule=None)
    def probe():
        @links.report_task(retries=2)
        def publish(value: int) -> int:
            return value

        publish(1)

    task = probe().get_task("publish")
    assert isinstance(task, links.GridReportOperator) and task.retries == 2
    assert links.GridReportLink.operators == [links.GridReportOperator]


def test_the_plugin_adds_the_link_and_no_tab():
    import sdxl_lora_ui

    plugin = sdxl_lora_ui.SdxlLoraReportPlugin
    assert plugin.external_views == [] and plugin.react_apps == []  # a tab would be on every DAG's runs
    assert [type(link) for link in plugin.operator_extra_links] == [links.GridReportLink]
    assert plugin.global_operator_extra_links == []
    assert [app["url_prefix"] for app in plugin.fastapi_apps] == [links.URL_PREFIX]


def test_the_package_registers_the_plugin_and_the_plugins_folder_does_not_again():
    """An installed package brings the plugin by entry point; where plugins/ is also Airflow's plugins folder (make
    airflow, Compose, the tests), its .airflowignore keeps Airflow from loading the same plugin from its files."""
    from airflow._shared.plugins_manager import _load_plugins_from_plugin_directory  # what Airflow calls

    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert entry_points["airflow.plugins"] == {"sdxl_lora_report": "sdxl_lora_ui:SdxlLoraReportPlugin"}
    for syntax in ("glob", "regexp"):  # [core] dag_ignore_file_syntax applies to the plugins folder too
        plugins, errors = _load_plugins_from_plugin_directory(str(ROOT / "plugins"), ignore_file_syntax=syntax)
        assert (plugins, errors) == ([], {}), syntax
