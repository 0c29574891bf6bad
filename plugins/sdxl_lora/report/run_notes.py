"""Airflow listener: a grid-search run's note links to its report page.

Runs where the run's state changes (the scheduler, or `airflow dags test`), which hold the
metadata database session; the note is set when the run starts and checked again when it ends
(a `dags test` run never reports its start), and a note a person wrote is kept, the link added below it.
"""

from __future__ import annotations

from airflow.listeners import hookimpl

from sdxl_lora.report import links

LINK_TEXT = "Leaderboard, comparison sheets and loss curves"


def note_with_link(note: str | None, dag_id: str, run_id: str, base_url: str = "") -> str:
    link = f"[{LINK_TEXT}]({base_url.rstrip('/')}/{links.report_path(dag_id, run_id)})"
    if note and link in note:
        return note
    return f"{note.rstrip()}\n\n{link}" if note else link


def _link(dag_run) -> None:
    if dag_run.dag_id not in links.REPORTED_DAGS:
        return
    updated = note_with_link(dag_run.note, dag_run.dag_id, dag_run.run_id, links.base_path())
    if updated != dag_run.note:
        dag_run.note = updated  # committed with the state change by the caller's session


@hookimpl
def on_dag_run_running(dag_run, msg: str):
    _link(dag_run)


@hookimpl
def on_dag_run_success(dag_run, msg: str):
    _link(dag_run)


@hookimpl
def on_dag_run_failed(dag_run, msg: str):
    _link(dag_run)
