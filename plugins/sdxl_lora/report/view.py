"""The grid report inside the Airflow UI: a FastAPI app the api-server mounts at /sdxl-lora.

Pages and data of one DAG run, read from `grid_search/<run>/report/` in S3 through the AWS
connection (`aws_conn_id` setting). Every route needs an Airflow user allowed to read the DAG's
runs (Airflow's own JWT, from the `_token` cookie the UI holds or an Authorization: Bearer header):
a request without one gets 401 and no data, a user without access 403.

- GET /runs/{dag_id}/{run_id}            HTML: leaderboard, sheets, curves (the Grid report button of the run's
                                         publish_report task opens it: sdxl_lora.report.links)
- GET /api/runs/{dag_id}/{run_id}        the report's leaderboard.json
- GET /runs/{dag_id}/{run_id}/files/...  an image of that report (sheets, trials' curves and samples)
"""

from __future__ import annotations

import html
import json
import re
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse

from ml.contract.container import split_s3_uri
from sdxl_lora.report.links import REPORTED_DAGS, base_path
_FILE = re.compile(r"^(sheet-steps-\d+\.png|trials/[A-Za-z0-9-]{1,63}/(loss_curve\.png|samples/sample-\d{1,3}\.png))$")


async def _user(request: Request):
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


def _allowed(dag_id: str, user) -> None:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.configuration import conf

    team = None
    if conf.getboolean("core", "multi_team", fallback=False):
        from airflow.models.dag import DagModel

        team = DagModel.get_team_name(dag_id)
    if not get_auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN,
                                                details=DagDetails(id=dag_id, team_name=team), user=user):
        raise HTTPException(403, "Forbidden")


async def reader(request: Request, dag_id: str) -> str:
    """Dependency of every route: an authenticated user who may read this DAG's runs."""
    user = await _user(request)
    _allowed(dag_id, user)
    if dag_id not in REPORTED_DAGS:
        raise HTTPException(404, f"{dag_id} writes no grid report (only {', '.join(REPORTED_DAGS)} does)")
    return dag_id


def _s3():
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from sdxl_lora.settings import Settings

    settings = Settings.from_environment()  # bucket, prefix and connection are parse-time settings
    return S3Hook(aws_conn_id=settings.aws_conn_id).get_conn(), settings


def report_location(run_id: str) -> tuple[str, str]:
    from sdxl_lora import naming
    from sdxl_lora.report import leaderboard as report
    from sdxl_lora.settings import Settings

    folder = Settings.from_environment().uri("grid_search", naming.run_token(run_id), report.REPORT)
    bucket, prefix = split_s3_uri(folder)
    return bucket, prefix


def _read(run_id: str, name: str) -> tuple[bytes, str]:
    s3, _ = _s3()
    bucket, prefix = report_location(run_id)
    try:
        found = s3.get_object(Bucket=bucket, Key=f"{prefix}/{name}")
    except s3.exceptions.NoSuchKey:
        raise HTTPException(404, f"no report yet for run {run_id}: s3://{bucket}/{prefix}/{name} does not exist "
                                 "(it is written when the run's select_winner and publish_report tasks finish)")
    return found["Body"].read(), found.get("ContentType") or "application/octet-stream"


def load_leaderboard(run_id: str) -> dict:
    from sdxl_lora.report import leaderboard as report

    body, _ = _read(run_id, report.LEADERBOARD)
    return json.loads(body)


app = FastAPI(title="SDXL LoRA grid report", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/api/runs/{dag_id}/{run_id}")
def run_data(run_id: str, dag_id: str = Depends(reader)) -> dict:
    return load_leaderboard(run_id)


@app.get("/runs/{dag_id}/{run_id}/files/{name:path}")
def run_file(run_id: str, name: str, dag_id: str = Depends(reader)) -> Response:
    if not _FILE.match(name):
        raise HTTPException(404, f"not a file of a grid report: {name!r}")
    body, _ = _read(run_id, name)
    return Response(body, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str, dag_id: str = Depends(reader)) -> HTMLResponse:
    run = f"{base_path()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"  # the run in Airflow's UI
    try:
        board = load_leaderboard(run_id)
    except HTTPException as missing:
        if missing.status_code != 404:
            raise
        return HTMLResponse(page(f"{dag_id} {run_id}", f"<p class='empty'>{html.escape(missing.detail)}</p>", run),
                            status_code=404)
    return HTMLResponse(page(f"{dag_id} {run_id}", body(board, f"{quote(run_id, safe='')}/files/"), run))


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def body(board: dict, files: str) -> str:
    """The report's HTML; files is the URL prefix of its images, relative to the page."""
    e = html.escape
    rows = []
    for row in board["trials"]:
        link_html = " ".join(f"<a href='{e(url)}' target='_blank' rel='noopener'>{e(name)}</a>"
                             for name, url in row["links"].items() if url.startswith("https://"))
        model = row["links"].get("model")
        if model:
            link_html += f" <code title='model artifact'>{e(model)}</code>"
        discount = f"{row['spot_discount']:.0%}" if row["spot"] and row["spot_discount"] is not None else "-"
        status = row["status"] + (f": {row['failure_reason']}" if row.get("failure_reason") else "")
        winner = " winner" if row["job_name"] == board.get("winner") else ""
        rows.append(
            f"<tr class='trial{winner}' data-job='{e(row['job_name'])}'><td>{row['place'] or '-'}</td>"
            f"<td>{e(row['job_name'])}</td><td>{row['learning_rate']:g}</td><td>{row['max_train_steps']}</td>"
            f"<td>{row['rank']}</td><td>{_num(row['val_loss'], '.5f')}</td>"
            f"<td>{_num(row['baseline_val_loss'], '.5f')}</td><td>{_num(row['training_seconds'], 'd')}</td>"
            f"<td>{_num(row['billable_seconds'], 'd')}</td><td>{discount}</td>"
            f"<td title='{e(str(row['instance_count']))} x {e(str(row['instance_type']))} at "
            f"{_num(row['usd_per_hour_on_demand'], '.3f')} USD/h on demand'>{_num(row['estimated_cost_usd'], '.4f')}</td>"
            f"<td>{e(status)}</td><td>{link_html}</td></tr>")
    sheets = "".join(
        f"<figure><img src='{files}{e(s['file'])}' alt='sheet for {s['max_train_steps']} steps'>"
        f"<figcaption>max_train_steps {s['max_train_steps']}</figcaption></figure>" for s in board["sheets"])
    curves = "".join(
        f"<figure><img class='curve' src='{files}{e(r['curve'])}' alt='loss curve of {e(r['job_name'])}'>"
        f"<figcaption>{e(r['job_name'])}</figcaption></figure>" for r in board["trials"] if r.get("curve"))
    prompt = (f"Validation images: prompt <q>{e(board['prompt'])}</q>, seed {board['seed']}, the same in every cell."
              if board.get("prompt") else "The trials rendered no validation images (no validation_prompt).")
    return f"""
<h2>Leaderboard</h2>
<p>Ranked by {e(board['metric'])} on held-out images (lower is better); winner:
<b>{e(board.get('winner') or 'none')}</b>. Estimated cost: billable seconds at the on-demand price
({e(board['price_region'])} list price); {_num(board['estimated_cost_usd'], '.2f')} USD in all.</p>
<table id='leaderboard'><thead><tr><th>#</th><th>trial</th><th>learning rate</th><th>steps</th><th>rank</th>
<th>val_loss</th><th>base val_loss</th><th>training s</th><th>billable s</th><th>spot discount</th>
<th>est. cost (USD)</th><th>status</th><th>links</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<h2>Comparison sheets</h2><p>{prompt}</p><div class='sheets'>{sheets}</div>
<h2>Loss curves</h2><div class='curves'>{curves}</div>
"""


def page(title: str, content: str, run_url: str = "") -> str:
    back = f"<p><a id='run' href='{html.escape(run_url)}'>The run in Airflow</a></p>" if run_url else ""
    return f"""<!doctype html>
<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #1a1a1a; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #d0d0d0; padding: 4px 8px; text-align: right; }}
th {{ background: #f2f4f7; }} td:nth-child(2), td:nth-child(12), td:nth-child(13) {{ text-align: left; }}
tr.winner td {{ background: #e8f5e9; font-weight: 600; }}
figure {{ display: inline-block; margin: 0 16px 16px 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
img.curve {{ width: 480px; }} figcaption {{ font-size: 12px; color: #555; }} .empty {{ color: #a33; }}
</style></head><body>{back}<h1>{html.escape(title)}</h1>{content}</body></html>"""
