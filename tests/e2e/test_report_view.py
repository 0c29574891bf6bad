"""The grid report in a real headless Chromium and a real Airflow (standalone), as `make airflow` serves it: the
Grid report button of the run's publish_report task in the UI (its Details tab), the report page it opens, its
leaderboard rows, a screenshot saved and checked; no Grid report tab on the run's page.

Needs Debian's chromium (`apt-get install -y chromium`); skipped, saying so, without it.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_DIR = Path(os.environ.get("SDXL_LORA_SCREENSHOT_DIR", ROOT / "outputs" / "screenshots"))
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install -y chromium")

_spec = importlib.util.spec_from_file_location("grid_fixture", ROOT / "tests" / "plugins" / "grid_fixture.py")
grid_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid_fixture)


def _http(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        text, status = error.read().decode(), error.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _wait(what: str, check, timeout: float, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"airflow standalone exited while waiting for {what}:\n{log.read_text()[-4000:]}")
        try:
            found = check()
        except (urllib.error.URLError, ConnectionError, OSError):
            found = None
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def airflow(stack, tmp_path_factory):
    """`airflow standalone` with this repository's dags and plugins, aws_default at the local stack, DAGs
    paused (a run created here stays queued: no job starts) and a known admin password."""
    home = tmp_path_factory.mktemp("airflow-ui")
    port = free_port()
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": "report-view-test"}))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW_CONFIG": str(ROOT / "airflow.cfg"),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
           "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__WORKERS": "1",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__API_AUTH__JWT_SECRET": "report-view-test-" + "s" * 48,
           "AIRFLOW__API__SECRET_KEY": "report-view-test-secret-key",
           "SDXL_LORA_BUCKET": grid_fixture.BUCKET, "SDXL_LORA_PREFIX": grid_fixture.PREFIX,
           "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                                                   "extra": {"endpoint_url": stack.url, "region_name": "us-east-1"}}),
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    log = home / "standalone.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        token = _wait("a token from the api-server", lambda: _token(base), 300, process, log)
        _wait("the grid DAG to be parsed", lambda: _http("GET", f"{base}/api/v2/dags/sdxl_lora_grid_search",
                                                         token=token)[0] == 200, 300, process, log)
        yield {"base": base, "token": token, "log": log}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _token(base: str) -> str | None:
    status, body = _http("POST", f"{base}/auth/token", {"username": "admin", "password": "report-view-test"})
    return body["access_token"] if status in (200, 201) else None


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             # a closed network: nothing of Chromium's own reaches out (and waits) in the background
             "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1600,1400", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                break
            if not line and self.process.poll() is not None:
                raise AssertionError(f"chromium exited with status {self.process.returncode}")
        else:
            raise AssertionError("chromium did not open its DevTools port")
        port = re.search(r":(\d+)/", found.group(1)).group(1)
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        from websockets.sync.client import connect

        self.socket = connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"], max_size=2**26)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


REPORT_ROWS = """(() => {
  const rows = [...document.querySelectorAll('#leaderboard tr.trial')].map(r => r.dataset.job);
  const images = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  return rows.length ? {rows, images, text: document.body.innerText} : null;
})()"""
# The href of the UI's button named NAME (Airflow renders an operator extra link as an <a> with the link's name).
BUTTON = """(() => {{
  const link = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === {name!r});
  return link ? link.getAttribute('href') : null;
}})()"""


def _until(browser: "Chromium", expression: str, timeout: float = 300):
    """The expression's value once it is truthy (a loaded machine renders slowly; nothing here is timed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.evaluate(expression)
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"nothing after {timeout} s; page text: {browser.evaluate('document.body.innerText')}")


def test_the_report_tasks_button_opens_the_leaderboard_sheets_and_curves(airflow, stack, tmp_path):
    from PIL import Image

    from sdxl_lora import naming
    from sdxl_lora.report import leaderboard as report

    s3 = stack.client("s3")
    configs, sagemaker = grid_fixture.grid(s3)
    run_id = grid_fixture.RUN_ID
    status, body = _http("POST", f"{airflow['base']}/api/v2/dags/sdxl_lora_grid_search/dagRuns",
                         {"dag_run_id": run_id, "logical_date": None, "note": "a grid from the view test"},
                         token=airflow["token"])
    assert status == 200, body
    board = report.publish(sagemaker, s3, configs, f"s3://{grid_fixture.BUCKET}/{grid_fixture.PREFIX}/grid_search/"
                           f"{naming.run_token(run_id)}", "sdxl_lora_grid_search", run_id)
    expected = [row["job_name"] for row in board["trials"]]

    status, body = _http("GET", f"{airflow['base']}/api/v2/plugins", token=airflow["token"])
    plugin = next((p for p in body["plugins"] if p["name"] == "sdxl_lora_report"), None)
    assert plugin, ("no sdxl_lora_report plugin: Airflow loads it by the package's airflow.plugins entry point, "
                    "which a venv installed before the entry point existed lacks (pip install -e . again; make does)")
    assert plugin["external_views"] == [] and plugin["react_apps"] == []  # a run tab would be on every DAG's runs

    # Without Airflow's login the plugin answers nothing.
    status, body = _http("GET", f"{airflow['base']}/sdxl-lora/api/runs/sdxl_lora_grid_search/{run_id}")
    assert status == 401 and "g-lr" not in json.dumps(body)

    # The button is on the report task only.
    run_path = f"{airflow['base']}/api/v2/dags/sdxl_lora_grid_search/dagRuns/{urllib.request.quote(run_id, safe='')}"
    page = f"/sdxl-lora/runs/sdxl_lora_grid_search/{urllib.request.quote(run_id, safe='')}"
    status, body = _http("GET", f"{run_path}/taskInstances/publish_report/links", token=airflow["token"])
    assert status == 200 and body["extra_links"] == {"Grid report": page}, body
    status, body = _http("GET", f"{run_path}/taskInstances/build_trials/links", token=airflow["token"])
    assert status == 200 and body["extra_links"] == {}, body

    browser = Chromium(tmp_path / "profile")
    try:
        browser.call("Network.enable")
        browser.call("Network.setCookie", name="_token", value=airflow["token"], url=airflow["base"], path="/")
        ui_run = f"{airflow['base']}/dags/sdxl_lora_grid_search/runs/{urllib.request.quote(run_id, safe='')}"
        browser.call("Page.enable")
        browser.call("Page.navigate", url=ui_run)
        # The run's tabs, drawn once the UI has the plugins (a plugin's dag_run view would be one of them).
        tabs = _until(browser, "performance.getEntriesByType('resource').some(e => e.name.includes('/api/v2/plugins'))"
                               " && document.body.innerText.includes('Task Instances') && document.body.innerText")
        assert "Grid report" not in tabs, "a Grid report tab on the run's page"
        browser.call("Page.navigate", url=f"{ui_run}/tasks/publish_report/details")  # where the UI lists extra links
        assert _until(browser, BUTTON.format(name="Grid report")) == page
        browser.evaluate("[...document.querySelectorAll('a')].find(a => a.textContent.trim() === 'Grid report')"
                         ".click()")
        images = len(board["sheets"]) + 3  # the sheets and the finished trials' curves
        shown = _until(browser, f"(() => {{ const shown = {REPORT_ROWS}; return shown && shown.images >= {images} "
                                f"&& shown; }})()")
        assert shown["rows"] == expected
        assert browser.evaluate("location.pathname") == page  # the button opened the report in the same browser tab
        assert browser.evaluate("document.getElementById('run').getAttribute('href')") == page.replace(
            "/sdxl-lora/runs/sdxl_lora_grid_search/", "/dags/sdxl_lora_grid_search/runs/")  # and links back
        # The winner's row is drawn in its highlight colour, and both sheets' first cells (lr 0.001: the red
        # sample of steps 20, the blue one of steps 40) are on screen: screenshots until they are painted (an
        # image loaded is not yet an image drawn), rather than one after a fixed pause.
        wanted, deadline = {(232, 245, 233), (255, 0, 0), (0, 0, 255)}, time.monotonic() + 120
        while True:
            shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
            image = Image.open(io.BytesIO(shot)).convert("RGB")
            present = {colour for _, colour in image.getcolors(maxcolors=2**20)}
            if wanted <= present or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        browser.close()
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    saved = SCREENSHOT_DIR / "grid-report.png"
    saved.write_bytes(shot)
    assert image.size[0] >= 1200
    assert (232, 245, 233) in present, f"no highlighted winner row in {saved}"
    assert {(255, 0, 0), (0, 0, 255)} <= present, f"no sheet cells in {saved}"
