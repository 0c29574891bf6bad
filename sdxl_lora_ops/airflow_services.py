"""A real Airflow 3 on this machine: api-server, scheduler, dag-processor and triggerer (and, with the
CeleryExecutor, a Celery worker) as processes of their own, driven through the REST API.

`make airflow`, `make demo` and the scheduler tests (tests/e2e/) all start Airflow this way instead of
`airflow standalone`, so that:
- everything listens on loopback only: the api-server binds 127.0.0.1 and no log server is started
  (every component writes task logs under one AIRFLOW_HOME, which the api-server reads directly);
- stopping is one call: SIGTERM to each component, and whatever they started (LocalExecutor workers,
  task supervisors, task processes, the Celery pool) is ended too after a short grace, so no idle
  worker outlives its scheduler;
- runs are triggered, followed and read (task instances, logs) through `/api/v2`, as a user's client would.

Nothing here imports Airflow: the components are `python -m airflow ...` subprocesses of this venv.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from local_stack.hosting import free_port

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
FINISHED = ("success", "failed")
ADMIN = "admin"


class AirflowServices:
    """One Airflow deployment: its environment, its processes, and a REST client for it.

    `env` must name AIRFLOW_HOME and the database (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN); everything
    about listening, signing and executing is set here.
    """

    def __init__(self, env: dict[str, str], executor: str = "LocalExecutor", parallelism: int = 8,
                 port: int | None = None, log_dir: Path | None = None):
        self.home = Path(env["AIRFLOW_HOME"])
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir or self.home
        self.executor = executor
        self.password = secrets.token_urlsafe(12)
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({ADMIN: self.password}))
        passwords.chmod(0o600)
        self.env = {
            **env,
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",  # where tasks report
            # One signing secret for every component (each would otherwise make its own).
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            # Log servers are not started (--skip-serve-logs); these ports only keep two deployments apart.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            # Components started by name (celery's pool, task supervisors) are this venv's.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.environ.get("PATH", ""))]),
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self._client: httpx.Client | None = None

    # -- processes ---------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 600) -> str:
        """One `airflow ...` command; its output, or an error that carries it."""
        done = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
        return done.stdout

    def migrate(self) -> None:
        self.cli("db", "migrate")

    def start(self, timeout: float = 180) -> None:
        commands = {"api-server": ["api-server"], "scheduler": ["scheduler", "--skip-serve-logs"],
                    "dag-processor": ["dag-processor"], "triggerer": ["triggerer", "--skip-serve-logs"]}
        if self.executor == "CeleryExecutor":
            commands["celery-worker"] = ["celery", "worker", "--skip-serve-logs", "--concurrency", "4"]
        try:
            for name, args in commands.items():
                self.start_component(name, args)
            self._wait_for_api(timeout)
        except BaseException:
            self.stop()
            raise

    def start_component(self, name: str, args: list[str]) -> None:
        log = self.log_dir / f"{name}.log"
        with log.open("a") as out:
            # A session of its own: a Ctrl-C at the terminal reaches the launcher only, which stops
            # the components in order instead of each printing its own traceback.
            self.processes[name] = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env,
                                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop_component(self, name: str, grace: float = 20) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            _terminate_tree(process, grace)

    def stop(self, grace: float = 20) -> None:
        """SIGTERM every component, then SIGKILL whatever of theirs is still alive when it has exited or after
        `grace` seconds. The signal goes to each component's own process, which stops its children in its own
        order (the triggerer its trigger runner, the scheduler its executor's workers): signalled too, a child
        can die under a parent that then waits for it until the grace is out."""
        trees = []
        for name in list(self.processes):
            process = self.processes.pop(name)
            trees.append((process, _descendants(process.pid)))
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for process, children in trees:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill(process.pid, children)
        if self._client is not None:
            self._client.close()
            self._client = None

    def alive(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is None]

    def all_pids(self) -> set[int]:
        pids = set()
        for process in self.processes.values():
            pids.add(process.pid)
            pids.update(p.pid for p in _descendants(process.pid))
        return pids

    def _wait_for_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [name for name, process in self.processes.items() if process.poll() is not None]
            if dead:
                raise RuntimeError(f"Airflow's {', '.join(dead)} exited at start; see {self.log_dir}/{dead[0]}.log")
            try:
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    # The api-server builds its Task Execution API on the first request there (seconds of CPU,
                    # its one worker busy): paid now, not by the first task, whose supervisor would time out
                    # and retry meanwhile.
                    httpx.get(f"{self.url}/execution/health", timeout=max(5.0, deadline - time.monotonic()))
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Airflow's api-server did not answer within {timeout:.0f} s; "
                                   f"see {self.log_dir}/api-server.log")
            time.sleep(0.5)

    # -- REST API ----------------------------------------------------------------------------

    @property
    def api(self) -> httpx.Client:
        if self._client is None:
            token = httpx.post(f"{self.url}/auth/token", json={"username": ADMIN, "password": self.password},
                               timeout=30)
            token.raise_for_status()
            self._client = httpx.Client(base_url=f"{self.url}/api/v2", timeout=60,
                                        headers={"Authorization": f"Bearer {token.json()['access_token']}"})
        return self._client

    def request(self, method: str, path: str, **kwargs) -> dict | str:
        response = self._send(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:2000]}")
        return response.json() if "json" in response.headers.get("content-type", "") else response.text

    def wait_for_dags(self, *dag_ids: str, timeout: float = 180) -> None:
        """Until the dag-processor has parsed each DAG (and reported no import error)."""
        deadline = time.monotonic() + timeout
        while True:
            known = {d["dag_id"] for d in self.request("GET", "/dags", params={"limit": 100})["dags"]}
            if set(dag_ids) <= known:
                return
            errors = self.request("GET", "/importErrors")["import_errors"]
            if errors:
                raise RuntimeError(f"DAG import errors: {errors}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"DAGs {sorted(set(dag_ids) - known)} not parsed within {timeout:.0f} s")
            time.sleep(0.5)

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One API call; answers of "Database error" (HTTP 500: on SQLite, the scheduler held the one write lock
        longer than the API server waited for it, and the request was rolled back) are asked again."""
        for attempt in range(6):
            response = self.api.request(method, path, **kwargs)
            if response.status_code != 500 or "Database error" not in response.text:
                return response
            time.sleep(0.5 * (attempt + 1))
        return response

    def set_pool(self, name: str, slots: int, description: str = "", include_deferred: bool = True) -> None:
        body = {"name": name, "slots": slots, "description": description, "include_deferred": include_deferred}
        response = self._send("PATCH", f"/pools/{name}", json=body)
        if response.status_code == 404:
            self.request("POST", "/pools", json=body)
        elif response.status_code >= 400:
            raise RuntimeError(f"pool {name}: HTTP {response.status_code} {response.text}")

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict, logical_date: datetime | None = None) -> str:
        body = {"conf": conf, "logical_date": logical_date.isoformat() if logical_date else None}
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def runs(self, dag_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100})["dag_runs"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(dag_id, run_id)
            if run["state"] in FINISHED:
                return run
            dead = [name for name, process in self.processes.items() if process.poll() is not None]
            if dead:
                raise RuntimeError(f"Airflow's {', '.join(dead)} died while {dag_id} {run_id} ran; see {self.log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} {run_id} still {run['state']} after {timeout:.0f} s")
            time.sleep(0.5)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                            params={"limit": 1000})["task_instances"]

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The task log of one try, one line per event."""
        body = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                            params={"map_index": map_index, "full_content": True})
        content = body["content"]
        if isinstance(content, str):
            return content
        return "\n".join(line.get("event", "") if isinstance(line, dict) else str(line) for line in content)


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def utc(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=timezone.utc)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(pid: int, known: list[psutil.Process]) -> None:
    """SIGKILL what remains of a component: its process group, and descendants seen before or now."""
    everyone = {p.pid: p for p in known + _descendants(pid)}
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for process in everyone.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _terminate_tree(process: subprocess.Popen, grace: float) -> None:
    children = _descendants(process.pid)
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _kill(process.pid, children)
