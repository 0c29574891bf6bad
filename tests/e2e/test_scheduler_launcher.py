"""`make airflow` (`sdxl-lora-ops airflow`): listens on loopback only, and Ctrl-C or SIGTERM stops every
process it started, quietly, within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import free_port

pytestmark = pytest.mark.scheduler
STOP_SECONDS = 30  # generous on a loaded 2-core machine; the figure measured is in the README
PARALLELISM = 8  # sdxl_lora_ops.demo's Airflow


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _executor_workers(pid: int) -> list[psutil.Process]:
    """The scheduler's LocalExecutor workers: forked at its start, `parallelism` of them."""
    for process in _tree(pid):
        try:
            if "scheduler" in process.cmdline():
                return process.children()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return []


def _listening(processes: list[psutil.Process]) -> set[str]:
    addresses = set()
    for process in processes:
        try:
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    addresses.add(connection.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return addresses


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_make_airflow_binds_loopback_and_stops_everything_quietly(tmp_path, stop_signal):
    output = tmp_path / "output.log"
    with output.open("w") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "sdxl_lora_ops.cli", "airflow", "--workdir",
                                     str(tmp_path / "work"), "--port", str(free_port())],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 400
        while "Airflow UI on" not in output.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(1)
        while len(_executor_workers(launcher.pid)) < PARALLELISM:  # all of the processes there will be
            assert launcher.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.5)
        processes = _tree(launcher.pid)
        seen.update((p.pid, p) for p in processes)
        addresses = _listening(processes)
        assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses

        stopped_at = time.monotonic()
        if stop_signal == signal.SIGINT:
            os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's foreground group
        else:
            launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=STOP_SECONDS)
        seen.update((p.pid, p) for p in _tree(launcher.pid))
        took = time.monotonic() - stopped_at
        time.sleep(1)
        alive = [p.pid for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        text = output.read_text()
        print(f"\n[make airflow] {len(seen)} processes, stopped by {stop_signal.name} in {took:.1f} s")
        assert alive == [], f"still alive after {stop_signal.name}: {alive}"
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
        assert "stopped" in text
    finally:
        for process in seen.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if launcher.poll() is None:
            launcher.kill()
