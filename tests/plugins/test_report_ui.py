"""The plugin's FastAPI app: a run's report for an Airflow user, nothing without authentication."""

from __future__ import annotations

import json
from urllib.parse import quote

import boto3
import pytest
from moto import mock_aws

from grid_fixture import BUCKET, PREFIX, RUN_ID, grid


@pytest.fixture(scope="module")
def airflow_auth(tmp_path_factory):
    """Airflow's SimpleAuthManager, initialised as the api-server does, with an admin and a user
    who may see nothing."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__AUTH_MANAGER":
           "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
           "AIRFLOW__API_AUTH__JWT_SECRET": "a-test-signing-secret-" + "x" * 64,
           "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                                                   "extra": {"region_name": "us-east-1"}}),
           "SDXL_LORA_BUCKET": BUCKET, "SDXL_LORA_PREFIX": PREFIX}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}")
        from airflow import settings
        from airflow.api_fastapi.app import init_auth_manager
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
        from airflow.models.revoked_token import RevokedToken

        # Token checks look up revoked tokens: a database of the test's own (configure_vars reads the new URL).
        settings.configure_vars()
        settings.reconfigure_orm()
        assert str(settings.engine.url).endswith(str(home / "airflow.db"))
        RevokedToken.__table__.create(settings.engine)
        manager = init_auth_manager()
        yield {"admin": manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin")),
               "nobody": manager.generate_jwt(SimpleAuthManagerUser(username="nobody", role=None))}
    settings.configure_vars()  # back to the session's database
    settings.reconfigure_orm()


@pytest.fixture
def client(airflow_auth):
    from fastapi.testclient import TestClient

    from sdxl_lora import naming
    from sdxl_lora.report import leaderboard as report
    from sdxl_lora.report import view as ui

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        configs, sagemaker = grid(s3)
        report.publish(sagemaker, s3, configs, f"s3://{BUCKET}/{PREFIX}/grid_search/{naming.run_token(RUN_ID)}",
                       "sdxl_lora_grid_search", RUN_ID)
        yield TestClient(ui.app)


def _paths(run_id=RUN_ID):
    base = f"/runs/sdxl_lora_grid_search/{run_id}"
    return {"page": base, "data": f"/api{base}", "sheet": f"{base}/files/sheet-steps-20.png"}


def test_an_authenticated_user_gets_the_runs_leaderboard_page_and_images(client, airflow_auth):
    for how in ({"headers": {"Authorization": f"Bearer {airflow_auth['admin']}"}},
                {"cookies": {"_token": airflow_auth["admin"]}}):  # the UI's cookie, as the browser sends it
        client.cookies.clear()
        for name, value in how.get("cookies", {}).items():
            client.cookies.set(name, value)
        paths = _paths()
        data = client.get(paths["data"], headers=how.get("headers"))
        assert data.status_code == 200, data.text
        board = data.json()
        assert board["run_id"] == RUN_ID and board["winner"] == "g-lr-0-003-mts-20-r-4" and len(board["trials"]) == 4
        page = client.get(paths["page"], headers=how.get("headers"))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text.count("<tr class='trial") == 4 and "class='trial winner'" in page.text
        assert "sheet-steps-40.png" in page.text and "loss_curve.png" in page.text
        assert f"<a id='run' href='/dags/sdxl_lora_grid_search/runs/{quote(RUN_ID, safe='')}'>" in page.text
        sheet = client.get(paths["sheet"], headers=how.get("headers"))
        assert sheet.status_code == 200 and sheet.content.startswith(b"\x89PNG")


def test_unauthenticated_or_forged_requests_get_nothing(client, airflow_auth):
    client.cookies.clear()
    for path in _paths().values():
        anonymous = client.get(path)
        assert anonymous.status_code == 401 and "g-lr" not in anonymous.text
        forged = client.get(path, headers={"Authorization": "Bearer not-a-jwt"})
        assert forged.status_code in (401, 403) and "g-lr" not in forged.text
        nobody = client.get(path, headers={"Authorization": f"Bearer {airflow_auth['nobody']}"})
        assert nobody.status_code == 403 and "g-lr" not in nobody.text


def test_other_runs_dags_and_files_are_refused_clearly(client, airflow_auth):
    auth = {"Authorization": f"Bearer {airflow_auth['admin']}"}
    missing = client.get(_paths("manual__never")["page"], headers=auth)
    assert missing.status_code == 404 and "no report yet for run manual__never" in missing.text
    other = client.get("/api/runs/sdxl_lora_deploy/x", headers=auth)
    assert other.status_code == 404 and "writes no grid report" in other.text
    outside = client.get(f"/runs/sdxl_lora_grid_search/{RUN_ID}/files/leaderboard.md", headers=auth)
    assert outside.status_code == 404 and "not a file of a grid report" in outside.text
    escape = client.get(f"/runs/sdxl_lora_grid_search/{RUN_ID}/files/trials/..%2F..%2Fx.png", headers=auth)
    assert escape.status_code == 404
