"""Retake docs/images/grid-report.png from the last demo, as a user sees it.

    make demo                                          # writes outputs/demo (Airflow home, S3 snapshot)
    make airflow &                                     # opens that home over the restored S3, on :8080
    .venv/bin/python docs/images/shoot_grid_report.py  # headless Debian chromium, logged in as admin

Logs in with the password `make airflow` wrote to outputs/demo/airflow/passwords.json, follows the link in the
demo's grid run's note to its report page, waits until the leaderboard's rows and every image (sheets,
curves) have loaded, and saves the screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from test_report_view import REPORT_ROWS, Chromium, _http  # noqa: E402  (the e2e test's DevTools driver)

BASE = "http://127.0.0.1:8080"
OUT = ROOT / "docs" / "images" / "grid-report.png"
WIDTH, HEIGHT = 1600, 2300


def main() -> int:
    password = json.loads((ROOT / "outputs" / "demo" / "airflow" / "passwords.json").read_text())["admin"]
    status, body = _http("POST", f"{BASE}/auth/token", {"username": "admin", "password": password})
    assert status in (200, 201), body
    token = body["access_token"]
    status, runs = _http("GET", f"{BASE}/api/v2/dags/sdxl_lora_grid_search/dagRuns?order_by=-run_after&limit=1",
                         token=token)
    assert status == 200 and runs["dag_runs"], runs
    run = runs["dag_runs"][0]
    link = re.search(r"\]\((/[^)]+)\)", run["note"] or "")
    assert link, f"no report link in the note of {run['dag_run_id']}: {run['note']!r}"
    print(f"run {run['dag_run_id']} ({run['state']}), note links to {link.group(1)}")
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(Path(profile))
        try:
            browser.call("Network.enable")
            browser.call("Network.setCookie", name="_token", value=token, url=BASE, path="/")
            browser.call("Page.enable")
            # Tall enough for the leaderboard, the sheets and the loss curves in one picture.
            browser.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                         mobile=False)
            browser.call("Page.navigate", url=BASE + link.group(1))
            deadline, shown = time.monotonic() + 120, None
            while time.monotonic() < deadline:
                shown = browser.evaluate(REPORT_ROWS)
                pending = browser.evaluate("[...document.images].filter(i => !i.complete).length")
                if shown and shown["images"] and pending == 0:
                    break
                time.sleep(1)
            assert shown, browser.evaluate("document.body.innerText")
            time.sleep(1)
            shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        finally:
            browser.close()
    # 256 colours, no dithering: a third of the size, the text and curves unchanged to the eye.
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(OUT, optimize=True)
    print(f"{len(shown['rows'])} leaderboard rows {shown['rows']}, {shown['images']} images; saved {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
