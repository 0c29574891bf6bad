"""`sdxl-lora-ops demo`: the whole pipeline through the real DAGs, against the local stack.

Starts `sdxl-lora-ops local-stack`, gives Airflow a home of its own (SQLite, the project's dags and
plugins, the `sagemaker_training` pool, `aws_default` pointing at the stack), stages a tiny SDXL and
synthetic storyboard frames in S3, starts a real Airflow (api-server, scheduler, dag-processor,
triggerer: sdxl_lora_ops/airflow_services.py) with the forms' local preset (SDXL_LORA_PRESET=local:
plugins/sdxl_lora/presets.py, defaults that run on this machine's CPU) and triggers sdxl_dataset_prepare ->
sdxl_lora_grid_search (which deploys its winner) through its REST API with little more than the dataset
version, so the trials run side by side within the pool. It prints the leaderboard, invokes the endpoint
with the preset's smoke request (lora_scale 0.8) and saves the image. Everything lands under the work dir.
`ui` (`make airflow`) starts the same Airflow and keeps it running for the browser.

Both start the stack with `--persist`: its S3 objects are saved under <workdir>/stack/s3/ when it stops and
put back when it starts again on that work dir. So `make airflow` after `make demo` opens the demo's own
Airflow home (its runs, notes and task logs) over the demo's S3 (its leaderboard, sheets and curves): the
grid report shows the demo's grid. SageMaker jobs and endpoints are not kept (they end with the stack).
Each demo starts afresh: it drops the previous demo's Airflow database and S3 snapshot first.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from local_stack.aws import CREDENTIALS, REGION
from local_stack.hosting import free_port
from sdxl_lora_ops import target as targets
from sdxl_lora_ops.airflow_services import AirflowServices

BUCKET, PREFIX, VERSION, ENDPOINT = "sdxl-lora-local", "sdxl-finetune-lora", "demo", "sdxl-lora-demo"
ROOT = Path(__file__).resolve().parents[1]
DEMO_WORKDIR, UI_WORKDIR = Path("outputs/demo"), Path("outputs/airflow")  # relative to where make runs
# The demo's Airflow (and `make airflow`'s) parses the DAGs with the local preset (plugins/sdxl_lora/presets.py), whose
# form defaults run on this machine's CPU, so the runs below name little more than the dataset version: prepared at
# the preset's training resolution, its latents cached (the demo stages the base model), so the trials read the 16:9
# bucket's latents; then the preset's grid, its shared hyperparameters (one validation image per trial: the
# report's sheets) and its smoke request.
PRESET = "local"
PREPARE = {"version": VERSION, "latent_cache": True}
GRID = {"dataset_version": VERSION, "deploy_winner": True, "endpoint_name": ENDPOINT}


_STARTED = time.monotonic()


def _step(message: str) -> None:
    """A step's heading, with the seconds since the command started (where `make demo`'s time goes)."""
    print(f"\n== [{time.monotonic() - _STARTED:5.1f} s] {message}", flush=True)


def _start_stack(workdir: Path, port: int) -> subprocess.Popen:
    log = workdir / "local-stack.log"
    with log.open("w") as out:
        # A session of its own: a Ctrl-C at the terminal reaches the launcher, which stops the stack last.
        stack = subprocess.Popen([sys.executable, "-m", "sdxl_lora_ops.cli", "local-stack", "--port", str(port),
                                  "--workdir", str(workdir / "stack"), "--persist"], stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + 120
    while "\nready\n" not in log.read_text():
        if stack.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the local stack did not start; see {log}")
        time.sleep(0.2)
    # Where `upload-images` and `fetch-results` find this stack (sdxl_lora_ops/target.py); gone when it stops.
    targets.write_record(workdir, f"http://127.0.0.1:{port}", CREDENTIALS, REGION, BUCKET, PREFIX, stack.pid)
    return stack


def _airflow_env(workdir: Path, endpoint_url: str, base_model_uri: str) -> dict[str, str]:
    home = workdir / "airflow"
    return {**os.environ, **CREDENTIALS, "AWS_DEFAULT_REGION": REGION,
            "AIRFLOW_HOME": str(home), "AIRFLOW_CONFIG": str(ROOT / "airflow.cfg"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "SDXL_LORA_BUCKET": BUCKET, "SDXL_LORA_PREFIX": PREFIX, "SDXL_LORA_CHECK_INTERVAL_SECONDS": "2",
            "SDXL_LORA_PRESET": PRESET,
            "SDXL_LORA_BASE_MODEL_URI": base_model_uri,
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                    "password": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                                    "extra": {"endpoint_url": endpoint_url,
                                                              "region_name": REGION}})}


def _model_uris() -> tuple[str, str]:
    """Where the demo stages the base model and the captioner."""
    return f"s3://{BUCKET}/{PREFIX}/base_model/", f"s3://{BUCKET}/{PREFIX}/captioner/"


def _stage(s3, workdir: Path) -> tuple[str, str]:
    """A tiny SDXL, a tiny InstructBLIP and 16 uncaptioned 16:9 frames in S3; returns the models' URIs. A model
    that `sdxl-lora-ops stage-models` put there (into `make airflow`'s persisted S3) is kept instead."""
    from ml.fixtures import synthetic, tiny_captioner, tiny_model
    from sdxl_lora_ops.stage_models import is_staged

    s3.create_bucket(Bucket=BUCKET)
    raw = synthetic.write_dataset(workdir / "raw", count=16)
    (raw / "metadata.jsonl").unlink()  # as the original system's frames came: no captions at all
    uploads = [(f"{PREFIX}/raw_dataset/{VERSION}", raw)]
    for folder, name, index, build in (("base_model", "tiny-sdxl", "model_index.json", tiny_model.build),
                                       ("captioner", "tiny-instructblip", "config.json", tiny_captioner.build)):
        if is_staged(s3, BUCKET, f"{PREFIX}/{folder}"):
            print(f"   keeping the model staged in s3://{BUCKET}/{PREFIX}/{folder}/ (sdxl-lora-ops stage-models)")
            continue
        if not (workdir / name / index).exists():
            build(workdir / name)
        uploads.append((f"{PREFIX}/{folder}", workdir / name))
    for prefix, folder in uploads:
        for path in folder.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return _model_uris()


def _first_caption(s3) -> str:
    rows = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/proc_dataset/{VERSION}/metadata.jsonl")["Body"].read()
    return json.loads(rows.decode().splitlines()[0])["text"]


def _start_airflow(root: Path, endpoint_url: str, s3, staged: str, port: int | None = None,
                   paused_at_creation: bool = True) -> AirflowServices:
    """Stage the models and frames while Airflow's database migrates and its components start (the one imports
    torch and builds the tiny models, the others import Airflow: each keeps a core busy), then set the pool."""
    base_model_uri, captioner_uri = _model_uris()
    env = _airflow_env(root, endpoint_url, base_model_uri)
    env["SDXL_LORA_CAPTIONER_URI"] = captioner_uri
    # The demo unpauses only the DAGs it runs; `make airflow` leaves every DAG on, as a deployment would.
    env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = str(paused_at_creation)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    airflow = AirflowServices(env, port=port, log_dir=logs, parallelism=8)
    with ThreadPoolExecutor(max_workers=1) as pool:  # leaving it waits for the uploads, a failed start too
        staging = pool.submit(_stage, s3, root)
        _step(f"staging {staged} in S3 while Airflow starts in {root / 'airflow'} (component logs: {logs})")
        airflow.migrate()
        airflow.start()
    try:
        staging.result()  # what staging raised, raised here
        # include_deferred: a deferred wait keeps its slot, so the pool caps running jobs in both modes.
        airflow.set_pool("sagemaker_training", _training_pool_size(), "SageMaker training jobs running at once")
    except BaseException:  # the caller never gets this Airflow to stop: stop it here (a failed start left it running)
        airflow.stop(grace=10)
        raise
    return airflow


def _run_dag(airflow: AirflowServices, dag_id: str, conf: dict) -> str:
    airflow.unpause(dag_id)
    run_id = airflow.trigger(dag_id, conf)
    run = airflow.wait_for_run(dag_id, run_id, timeout=1800)
    if run["state"] != "success":
        failed = [f"{t['task_id']}[{t['map_index']}]" if t["map_index"] >= 0 else t["task_id"]
                  for t in airflow.task_instances(dag_id, run_id) if t["state"] in ("failed", "upstream_failed")]
        raise SystemExit(f"{dag_id} {run_id} {run['state']}: {', '.join(failed)}; task logs under "
                         f"{airflow.home / 'logs'}")
    return run_id


def _plugins() -> None:
    """plugins/ on this process's import path too (it is Airflow's, not this process's): the DAGs' settings
    and presets."""
    if str(ROOT / "plugins") not in sys.path:
        sys.path.insert(0, str(ROOT / "plugins"))


def _training_pool_size() -> int:
    """The pool size the DAGs' settings name."""
    _plugins()
    from sdxl_lora.settings import Settings

    return Settings.from_environment().training_pool_size


def _preset():
    """The forms' preset the demo's Airflow runs with (sdxl_lora.presets): its grid and smoke request."""
    _plugins()
    from sdxl_lora.presets import PRESETS

    return PRESETS[PRESET]


def _copy_results(s3, run_id: str, out: Path) -> None:
    """The winner's LoRA and card, the leaderboards, sheets and curves as files (`sdxl-lora-ops fetch-results`)."""
    from sdxl_lora_ops import results

    target = targets.Target(s3, BUCKET, PREFIX, "the demo's local stack", True)
    results.describe(results.fetch(target, run_id, out, "sdxl_lora_grid_search"))


def ui_workdir(workdir: str | None, cwd: Path | None = None) -> Path:
    """`make airflow`'s work dir: the one asked for; else the last demo's (its Airflow database is there),
    so the UI shows the demo's runs and reports; else outputs/airflow."""
    if workdir is not None:
        return Path(workdir)
    base = cwd or Path.cwd()
    demo = base / DEMO_WORKDIR
    return demo if (demo / "airflow" / "airflow.db").exists() else base / UI_WORKDIR


def _forget_previous_demo(root: Path) -> None:
    """A demo starts afresh: no runs, S3 objects or endpoint records of an earlier demo."""
    home = root / "airflow"
    for path in home.glob("airflow.db*"):
        path.unlink()
    shutil.rmtree(root / "stack" / "s3", ignore_errors=True)
    shutil.rmtree(root / "results", ignore_errors=True)


def ui(workdir: str | None, port: int = 8080) -> int:
    """`make airflow`: the Airflow UI against the local stack with staged data, until Ctrl-C or SIGTERM.
    On the demo's work dir (the default after `make demo`) it shows the demo's runs and reports."""
    import boto3

    stopping = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):  # both stop everything, quietly
        signal.signal(number, lambda *_: stopping.set())
    root = ui_workdir(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    reused = (root / "airflow" / "airflow.db").exists()
    stack_port = free_port()
    endpoint_url = f"http://127.0.0.1:{stack_port}"
    _step(f"starting the local stack on {endpoint_url}")
    stack = _start_stack(root, stack_port)
    airflow = None
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=REGION,
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        airflow = _start_airflow(root, endpoint_url, s3, f"a tiny SDXL and raw_dataset/{VERSION}/", port=port,
                                 paused_at_creation=False)
        targets.update_record(root, airflow_url=airflow.url)
        _step(f"Airflow UI on {airflow.url} (loopback only): user admin, password {airflow.password}\n"
              f"   Try sdxl_dataset_prepare with version '{VERSION}', then sdxl_lora_train or sdxl_lora_grid_search "
              f"with dataset_version '{VERSION}': every form's defaults are the {PRESET} preset's, which run on this "
              "machine's CPU. Ctrl-C stops everything.")
        print("   Your own images: sdxl-lora-ops upload-images FOLDER --version V (finds this stack), then "
              "sdxl_dataset_prepare with version V; a grid run's files: sdxl-lora-ops fetch-results --run RUN_ID",
              flush=True)
        if reused:
            print(f"   Earlier runs from {root}: their reports and S3 objects are back (a grid run's note links to its report); "
                  "their SageMaker jobs and endpoints are not (they ended with that stack).", flush=True)
        while not stopping.wait(1):
            dead = [name for name, process in airflow.processes.items() if process.poll() is not None]
            if dead:
                print(f"Airflow's {', '.join(dead)} exited; see {root / 'logs'}. Stopping.", flush=True)
                return 1
        return 0
    finally:
        print("stopping Airflow and the local stack ...", flush=True)
        stack.send_signal(signal.SIGTERM)  # side by side
        if airflow is not None:
            airflow.stop(grace=10)
        stack.wait(timeout=300)
        targets.remove_record(root)
        print("stopped", flush=True)


def main(workdir: str) -> int:
    import boto3

    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _forget_previous_demo(root)
    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    _step(f"starting the local stack on {endpoint_url}")
    stack = _start_stack(root, port)
    airflow, finished = None, False
    try:
        clients = {name: boto3.client(name, endpoint_url=endpoint_url, region_name=REGION,
                                      aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
                   for name in ("s3", "sagemaker-runtime")}
        airflow = _start_airflow(root, endpoint_url, clients["s3"],
                                 "a tiny SDXL, a tiny InstructBLIP and 16 uncaptioned storyboard frames")
        _step("sdxl_dataset_prepare: a SageMaker Processing job checks, captions and buckets raw_dataset/demo")
        _run_dag(airflow, "sdxl_dataset_prepare", PREPARE)
        manifest = json.loads(clients["s3"].get_object(
            Bucket=BUCKET, Key=f"{PREFIX}/proc_dataset/{VERSION}/manifest.json")["Body"].read())
        counts = manifest["counts"]
        print(f"{counts['images_written']} images, captions from {counts['captions_from']}, "
              f"buckets {counts['buckets']}, {counts['latents_cached']} latents cached; first caption: "
              f"{_first_caption(clients['s3'])!r}")
        grid = _preset().grid
        _step(f"sdxl_lora_grid_search: {len(grid['learning_rates'])} learning rates x {len(grid['max_train_steps'])} "
              f"step counts x {len(grid['ranks'])} rank(s) (the {PRESET} preset's grid), then deploy the winner")
        grid_run = _run_dag(airflow, "sdxl_lora_grid_search", GRID)
        s3 = clients["s3"]
        boards = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/grid_search/")["Contents"]]
        board_key = sorted(k for k in boards if k.endswith("leaderboard.md"))[-1]
        print(s3.get_object(Bucket=BUCKET, Key=board_key)["Body"].read().decode())
        smoke = _preset().smoke_request  # what the deployment's smoke test sent
        _step(f"invoking endpoint {ENDPOINT} with lora_scale {smoke['lora_scale']}")
        response = clients["sagemaker-runtime"].invoke_endpoint(EndpointName=ENDPOINT, ContentType="application/json",
                                                                Body=json.dumps(smoke))
        body = json.loads(response["Body"].read())
        image = root / "generated.png"
        image.write_bytes(base64.b64decode(body["images"][0]))
        print(f"variant {response['InvokedProductionVariant']}, seed {body['seed']}: image saved to {image}")
        print(f"leaderboard: s3://{BUCKET}/{board_key} (local stack files under {root / 'stack'})")
        _step(f"copying the results into {root / 'results'}")
        _copy_results(s3, grid_run, root / "results")
        _step("stopping Airflow and the local stack (its S3 is saved for `make airflow`)")
        finished = True
        return 0
    finally:
        stack.send_signal(signal.SIGTERM)  # the two stop side by side: the stack ends its jobs and saves its S3
        if airflow is not None:
            airflow.stop(grace=10)
        stack.wait(timeout=300)
        targets.remove_record(root)
        if finished:
            print(f"demo finished in {time.monotonic() - started:.0f} s, nothing left running; `make airflow` now "
                  "shows its runs: sdxl_lora_grid_search -> its run's note -> the grid report", flush=True)
