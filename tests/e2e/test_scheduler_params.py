"""The DAGs' Params through the real REST API and scheduler (tests/e2e/scheduler.py, the shared `scheduled`
Airflow, whose forms are the local preset's): every DAG triggered with only its dataset version runs green on the
local stack; a bad list value is refused with HTTP 400 naming the Param and the value, before any run exists; a grid
typed as the trigger form sends it (text, one value per line, a blank line at the end) runs, and a trial that fails
beside a winner (its jobs stopped) leaves the run green with the failure counted on the leaderboard; in Airflow's own
trigger form (headless Chromium) the lists are text boxes of lines and a refusal reads as the 400 says."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import time

import pytest
from botocore.exceptions import ClientError
from ml.contract.hyperparameters import parse
from ml.fixtures import synthetic
from scheduler import BUCKET, GRID, PREFIX, grid_conf, training_jobs, trials, wait_until
from sdxl_lora import serving
from sdxl_lora.naming import job_name, run_token, slug
from sdxl_lora.presets import PRESETS
from sdxl_lora.settings import Settings
from sdxl_lora.tuning import tuning_job_name

pytestmark = pytest.mark.scheduler
TUNE, TRAIN, PREPARE = "sdxl_lora_tune", "sdxl_lora_train", "sdxl_dataset_prepare"
LOCAL = PRESETS["local"]  # the shared Airflow's SDXL_LORA_PRESET


@pytest.fixture
def airflow(scheduled):
    return scheduled


def test_every_dag_runs_green_with_only_its_dataset_version(airflow, tmp_path):
    """Issue 21: the forms' defaults run where they are deployed. Raw frames as `make airflow` stages them (the
    synthetic frames' default size; captioned, as the shared Airflow stages no captioner) are prepared with only their
    version; then train, grid and tune each run on that version with only it in their conf, side by side. Every run
    is green and every job ran the local preset: the train run deploys its adapter (nothing serves on the default
    endpoint) with the preset's smoke request, which this test then takes down again."""
    s3, sagemaker = airflow.stack.client("s3"), airflow.stack.client("sagemaker")
    version = f"defaults-{secrets.token_hex(3)}"
    raw = synthetic.write_dataset(tmp_path / "raw", count=8)
    for path in sorted(raw.iterdir()):
        s3.upload_file(str(path), BUCKET, f"{PREFIX}/raw_dataset/{version}/{path.name}")
    settings = Settings(bucket=BUCKET, prefix=PREFIX)
    record_bucket, _, record_key = serving.record_uri(settings, settings.endpoint_name).removeprefix(
        "s3://").partition("/")
    started = time.monotonic()
    runs: dict[str, str] = {}

    def run_green(dag_id: str, conf: dict) -> dict:
        run = airflow.wait_for_run(dag_id, runs[dag_id], timeout=900)
        states = {(t["task_id"], t["map_index"]): t["state"] for t in airflow.task_instances(dag_id, runs[dag_id])}
        assert run["state"] == "success" and run["conf"] == conf, (dag_id, run["state"], run["conf"], states)
        return states

    # Paused until the prepare run has published: its Asset event queues no run of sdxl_lora_train.
    paused = (PREPARE, TRAIN, TUNE)
    try:
        airflow.wait_for_dags(*paused)
        airflow.unpause(PREPARE)
        runs[PREPARE] = airflow.trigger(PREPARE, {"version": version})
        run_green(PREPARE, {"version": version})
        prepared = time.monotonic()
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/proc_dataset/{version}/manifest.json")
                              ["Body"].read())
        assert manifest["counts"]["images_written"] == 8 and manifest["rejected"] == [], manifest  # none too_small
        for dag_id in (TRAIN, TUNE):
            airflow.unpause(dag_id)
        for dag_id in (TRAIN, GRID, TUNE):
            runs[dag_id] = airflow.trigger(dag_id, {"dataset_version": version})
        states = {dag_id: run_green(dag_id, {"dataset_version": version}) for dag_id in (TRAIN, GRID, TUNE)}
    finally:
        for dag_id in paused:  # the shared Airflow as it was
            airflow.request("PATCH", f"/dags/{dag_id}", json={"is_paused": True})
        with contextlib.suppress(ClientError):  # the train run's deployment, where it got that far
            sagemaker.delete_endpoint(EndpointName=settings.endpoint_name)
        s3.delete_object(Bucket=record_bucket, Key=record_key)

    local = LOCAL.hyperparameters()
    job = sagemaker.describe_training_job(TrainingJobName=job_name("sdxl-lora-train", runs[TRAIN], slug(version)))
    values = parse(job["HyperParameters"]).as_dict()
    assert {key: values[key] for key in local} == local  # a CPU's: full precision, 64 px, no 8-bit Adam or xformers
    assert states[TRAIN][("deploy.smoke_test", -1)] == "success", states[TRAIN]
    grid_trials = [key for key, state in states[GRID].items() if key[0] == "train_trial" and state == "success"]
    assert len(grid_trials) == len(LOCAL.grid["learning_rates"]) * len(LOCAL.grid["max_train_steps"]) * len(
        LOCAL.grid["ranks"]), states[GRID]
    tuned = sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning_job_name(
        "sdxl-lora-tune", runs[TUNE]))
    assert tuned["TrainingJobStatusCounters"]["Completed"] == LOCAL.tuning["max_jobs"], tuned
    print(f"\n[defaults: the local preset] prepare {prepared - started:.0f} s, then train (deployed), grid "
          f"({len(grid_trials)} trials) and tune ({LOCAL.tuning['max_jobs']} trials) side by side "
          f"{time.monotonic() - prepared:.0f} s: all green with only the dataset version in their conf")


@pytest.mark.parametrize("dag_id, conf, words", [
    (GRID, {"learning_rates": ["0.0001", "abc"]}, "Invalid input for param learning_rates: 'abc' does not match "
                                                  "'^[-+0-9.eE ]*$'"),
    (GRID, {"ranks": [4, 2048]}, "Invalid input for param ranks: 2048 is greater than the maximum of 1024"),
    (GRID, {"max_train_steps": ["1,000"]}, "Invalid input for param max_train_steps: '1,000' does not match"),
    (TUNE, {"ranks": ["4", "sixteen"]}, "Invalid input for param ranks: 'sixteen' does not match '^[0-9 ]*$'"),
])
def test_a_bad_list_value_is_refused_with_http_400_naming_the_param_and_the_value(airflow, dag_id, conf, words):
    airflow.wait_for_dags(dag_id)  # parsed; a paused DAG still validates its Params on trigger
    run_id = f"params-refused-{secrets.token_hex(4)}"
    response = airflow.api.post(f"/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": None,
                                                                  "conf": conf})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail.splitlines()[0] == words or detail.startswith(words), detail
    assert "each value: " in detail  # the items' description, printed with the schema that refused the value
    assert airflow.api.get(f"/dags/{dag_id}/dagRuns/{run_id}").status_code == 404  # no run was created


def test_a_grid_typed_as_text_runs_and_a_failed_trial_beside_a_winner_leaves_it_green(airflow):
    sagemaker = airflow.stack.client("sagemaker")
    # As the form's one-value-per-line boxes send them: text, a blank line where the user pressed Enter at the end.
    run_id = airflow.trigger(GRID, grid_conf("tiny", ["0.001", ""], ["2", "400"], ranks=[" 4"]))
    long_trial = f"{run_token(run_id)}-lr-0-001-mts-400-r-4"

    def stop_the_long_trial() -> bool:
        """As a person would in the SageMaker console: each job of the long trial (each retry's too) is stopped,
        until its task has failed; the short trial runs to its end."""
        for name in training_jobs(sagemaker, long_trial):
            if sagemaker.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] == "InProgress":
                with contextlib.suppress(ClientError):  # it may have moved on since
                    sagemaker.stop_training_job(TrainingJobName=name)
        return any(t["state"] == "failed" and long_trial in (t["rendered_map_index"] or "")  # its last job: -a3
                   for t in trials(airflow, run_id))

    wait_until(stop_the_long_trial, 600, "the stopped trial's task to fail", interval=1)
    run = airflow.wait_for_run(GRID, run_id, timeout=600)
    instances = airflow.task_instances(GRID, run_id)
    states = {(t["task_id"], t["map_index"]): t["state"] for t in instances}
    won, failed = sorted(trials(airflow, run_id), key=lambda t: t["map_index"])
    assert won["rendered_map_index"].endswith("-lr-0-001-mts-2-r-4") and won["state"] == "success", states
    assert long_trial in failed["rendered_map_index"] and failed["state"] == "failed", states
    assert run["state"] == "success" and states[("watcher", -1)] == "skipped", states
    board = airflow.stack.client("s3").get_object(
        Bucket=BUCKET, Key=f"{PREFIX}/grid_search/{run_token(run_id)}/leaderboard.md")["Body"].read().decode()
    assert board.splitlines()[0].endswith(": 1 of 2 trials failed (the winner is the best of the others)"), board
    assert any(long_trial in row and "Stopped" in row for row in board.splitlines()), board  # listed, with why
    winner = airflow.request("GET", f"/dags/{GRID}/dagRuns/{run_id}/taskInstances/select_winner/xcomEntries/"
                                    "return_value")["value"]
    winner = json.loads(winner) if isinstance(winner, str) else winner
    assert winner["winner"] == won["rendered_map_index"] and winner["failed_trials"] == 1, winner


def test_the_trigger_form_shows_list_params_as_boxes_of_lines_and_its_refusals(airflow, tmp_path):
    """In Airflow's own UI (headless Chromium): the grid's lists are text boxes holding one default per line; a
    bad line is refused with the readable 400 in the form; the tune DAG's ranks typed with a trailing Enter reach
    the run's conf as text, which plan_tuning reads (tests/dags). Skipped without Debian's chromium."""
    from test_report_view import CHROMIUM, Chromium

    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    airflow.wait_for_dags(TUNE)  # paused: a run triggered here stays queued, no job starts
    token = airflow.api.headers["Authorization"].split()[1]
    browser = Chromium(tmp_path / "profile")

    def until(expression: str, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = browser.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"the form never showed {what}: {browser.evaluate('document.body.innerText')[:3000]}")

    trigger_button = ("[...document.querySelectorAll('button')]"
                      ".find(b => b.getAttribute('aria-label') === 'Trigger Dag' || b.innerText.trim() === 'Trigger')")

    def open_form(dag_id: str) -> dict:
        for attempt in range(3):  # a page that came up without its Trigger button (seen once, under load) is reloaded
            browser.call("Page.navigate", url=f"{airflow.url}/dags/{dag_id}")
            try:
                until(f"!!{trigger_button}", "its Trigger button", timeout=60)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        browser.evaluate(f"{trigger_button}.click()")
        until("!!document.querySelector('[id^=element_]')", "the Params")
        return {f["name"]: f for f in browser.evaluate(
            "[...document.querySelectorAll('[id^=element_]')].map(e => ({name: e.id.slice(8), tag: e.tagName, "
            "value: e.value, placeholder: e.placeholder}))")}

    def type_lines(name: str, text: str) -> None:  # as a user types: select the box's text, type over it
        browser.evaluate(f"(() => {{ const e = document.querySelector('#element_{name}'); e.focus(); e.select(); }})()")
        browser.call("Input.insertText", text=text)

    def press_trigger() -> None:
        browser.evaluate("[...document.querySelectorAll('[role=dialog] button')]"
                         ".filter(b => b.innerText.trim() === 'Trigger').pop().click()")

    try:
        browser.call("Network.enable")
        browser.call("Network.setCookie", name="_token", value=token, url=airflow.url, path="/")
        browser.call("Page.enable")
        fields = open_form(GRID)
        for name, values in LOCAL.grid.items():  # the shared Airflow's forms: the local preset's defaults
            lines = "\n".join(map(str, values))
            assert fields[name]["tag"] == "TEXTAREA" and fields[name]["value"] == lines, fields[name]
            assert fields[name]["placeholder"] == "Enter each string on a new line"
        assert fields["hyperparameters"]["tag"] != "TEXTAREA"  # an object: Airflow's JSON editor
        runs_before = {r["dag_run_id"] for r in airflow.runs(GRID)}
        type_lines("learning_rates", "0.0001\nabc")
        press_trigger()
        refusal = until("document.body.innerText.includes('Invalid input for param') && document.body.innerText",
                        "the refusal")
        assert "400 Bad Request" in refusal and \
            "Invalid input for param learning_rates: 'abc' does not match '^[-+0-9.eE ]*$'" in refusal
        assert "each value: a number in (0, 0.1]" in refusal
        assert {r["dag_run_id"] for r in airflow.runs(GRID)} == runs_before
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "grid-form-refusal.png").write_bytes(shot)

        tune_runs = {r["dag_run_id"] for r in airflow.runs(TUNE)}
        fields = open_form(TUNE)
        assert fields["ranks"]["tag"] == "TEXTAREA" and fields["ranks"]["value"] == "\n".join(
            map(str, LOCAL.tuning["ranks"]))
        browser.evaluate("[...document.querySelectorAll('[role=dialog] label')]"
                         ".find(l => l.innerText.includes('Unpause'))?.click()")  # stays paused: no job
        type_lines("ranks", "4\n16\n")
        press_trigger()
        (run,) = wait_until(lambda: [r for r in airflow.runs(TUNE) if r["dag_run_id"] not in tune_runs], 60,
                            "the run the form triggered")
    finally:
        browser.close()
    assert airflow.api.delete(f"/dags/{TUNE}/dagRuns/{run['dag_run_id']}").status_code == 204  # else queued for good
    assert run["conf"]["ranks"] == ["4", "16", ""], run["conf"]  # one string per line, the Enter's blank too


def test_a_grid_over_its_cost_cap_fails_its_first_task_once_and_starts_no_job(airflow):
    """Issue 20, cost before spend: the local preset's estimate of two tiny trials on the default ml.g5.2xlarge is a
    fraction of a cent, above a cap of 0.0001 USD. build_trials logs the estimate and fails on its first try, not
    retried; no trial runs and no training job of the run exists."""
    run_id = airflow.trigger(GRID, grid_conf("tiny", [0.001, 0.002], [2], max_cost_usd=0.0001))
    run = airflow.wait_for_run(GRID, run_id, timeout=300)
    instances = airflow.task_instances(GRID, run_id)
    states = {(t["task_id"], t["map_index"]): t["state"] for t in instances}
    (build,) = [t for t in instances if t["task_id"] == "build_trials"]
    assert run["state"] == "failed" and build["state"] == "failed" and build["try_number"] == 1, states
    assert all(t["state"] == "upstream_failed" for t in trials(airflow, run_id)), states
    assert training_jobs(airflow.stack.client("sagemaker"), run_token(run_id)) == []
    log = json.dumps(airflow.request("GET", f"/dags/{GRID}/dagRuns/{run_id}/taskInstances/build_trials/logs/1",
                                     params={"full_content": True}))
    assert "cost estimate: 2 training job(s), 4 optimizer steps in all, on 1 x ml.g5.2xlarge" in log, log[-3000:]
    assert "above max_cost_usd 0.0001 USD. Nothing was launched." in log, log[-3000:]
