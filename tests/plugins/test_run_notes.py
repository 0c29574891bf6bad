"""The grid run's note links to its report page; a person's note is kept."""

from __future__ import annotations

from types import SimpleNamespace

from sdxl_lora.report import run_notes


def test_the_link_is_added_once_below_a_persons_note():
    link = "[Leaderboard, comparison sheets and loss curves](/sdxl-lora/runs/sdxl_lora_grid_search/manual__2026-11-26T10%3A00%3A00%2B00%3A00)"
    first = run_notes.note_with_link(None, "sdxl_lora_grid_search", "manual__2026-11-26T10:00:00+00:00")
    assert first == link
    kept = run_notes.note_with_link("try rank 8 next", "sdxl_lora_grid_search", "manual__2026-11-26T10:00:00+00:00")
    assert kept == f"try rank 8 next\n\n{link}"
    assert run_notes.note_with_link(kept, "sdxl_lora_grid_search", "manual__2026-11-26T10:00:00+00:00") == kept
    behind_proxy = run_notes.note_with_link(None, "d", "r", "https://airflow.example.com/team/")
    assert "(https://airflow.example.com/team/sdxl-lora/runs/d/r)" in behind_proxy


def test_the_listener_notes_grid_runs_only():
    grid = SimpleNamespace(dag_id="sdxl_lora_grid_search", run_id="r1", note=None)
    other = SimpleNamespace(dag_id="sdxl_lora_deploy", run_id="r1", note=None)
    run_notes.on_dag_run_success(dag_run=grid, msg="success")
    run_notes.on_dag_run_running(dag_run=other, msg="started")
    assert "sdxl-lora/runs/sdxl_lora_grid_search/r1" in grid.note and other.note is None


def test_the_listeners_link_keeps_only_the_base_urls_path(monkeypatch):
    """The demo's Airflow runs on a free port, `make airflow` opens the same database on 8080: the note's
    link must not name the host or port it was written under."""
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:41234/team/")
    grid = SimpleNamespace(dag_id="sdxl_lora_grid_search", run_id="r1", note=None)
    run_notes.on_dag_run_running(dag_run=grid, msg="started")
    assert grid.note.endswith("(/team/sdxl-lora/runs/sdxl_lora_grid_search/r1)"), grid.note
    assert "41234" not in grid.note
