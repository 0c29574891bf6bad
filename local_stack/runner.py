"""One container process: started under the contract, its output streamed to CloudWatch Logs."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from local_stack.warm import DISABLE, WarmStarter
from ml.contract.job_images import verb_for

# `sdxl-lora` inside an image is the project's CLI; here it is this interpreter's.
CLI = [sys.executable, "-m", "ml.cli"]
STOP_GRACE_SECONDS = 120  # what SageMaker gives a container between SIGTERM and SIGKILL


def command_for(image: str, entrypoint: list[str] | None = None, arguments: list[str] | None = None,
                default_verb_args: list[str] | None = None) -> list[str]:
    """The local command for a container: the named entrypoint, else the image's verb."""
    if entrypoint:
        head = CLI if entrypoint[0] == "sdxl-lora" else [entrypoint[0]]
        return head + list(entrypoint[1:]) + list(arguments or [])
    return CLI + [verb_for(image)] + list(default_verb_args or []) + list(arguments or [])


def container_path(base: Path, path: str) -> Path:
    """/opt/ml/... inside a container is base/... here (what SAGEMAKER_BASE_DIR tells the payload)."""
    if path.startswith("/opt/ml/"):
        return base / path[len("/opt/ml/"):]
    if path.startswith("/opt/ml"):
        return base
    return Path(path)


def rewrite_arguments(base: Path, arguments: list[str]) -> list[str]:
    return [str(container_path(base, a)) if a.startswith("/opt/ml") else a for a in arguments]


class LogSink:
    """Batches a process's lines into a CloudWatch log stream."""

    def __init__(self, logs, group: str, stream: str):
        self.logs, self.group, self.stream = logs, group, stream
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()
        try:
            logs.create_log_group(logGroupName=group)
        except logs.exceptions.ResourceAlreadyExistsException:
            pass
        try:
            logs.create_log_stream(logGroupName=group, logStreamName=stream)
        except logs.exceptions.ResourceAlreadyExistsException:
            pass  # a restart (spot) within the same second as the first start: its lines follow on the same stream

    def add(self, line: str) -> None:
        if not line:  # CloudWatch Logs refuses empty messages (and its agent drops them)
            return
        with self.lock:
            self.pending.append({"timestamp": int(time.time() * 1000), "message": line})
            due = len(self.pending) >= 100 or time.monotonic() - self.last_flush > 0.5
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            events, self.pending = self.pending, []
            self.last_flush = time.monotonic()
        if events:
            self.logs.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=events)


_warm: WarmStarter | None = None
_warm_lock = threading.Lock()


def warm_starter() -> WarmStarter:
    """This stack's warm starter (local_stack/warm.py), created on first use and stopped at exit."""
    global _warm
    with _warm_lock:
        if _warm is None:
            _warm = WarmStarter()
            atexit.register(_warm.stop)
        return _warm


def prestart() -> None:
    """Load the warm starter's libraries while the stack waits for its first job."""
    if os.environ.get(DISABLE, "1") != "0":
        warm_starter().start()


class ContainerProcess:
    """A running job process with its own SAGEMAKER_BASE_DIR; lines go to on_line and the sink."""

    def __init__(self, command: list[str], base: Path, env: dict[str, str], sink: LogSink,
                 on_line: Callable[[str], None]):
        self.base = base
        self.tail: deque[str] = deque(maxlen=20)  # last lines, for error messages
        self.log_file = (base / "container.log").open("a")
        env = {**os.environ, **env, "SAGEMAKER_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1"}
        # Forked from the warm starter when it can be (the torch stack already imported), else a new process.
        self.process = warm_starter().launch(command, env, base) or subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            cwd=base)
        self.warm = not isinstance(self.process, subprocess.Popen)
        self.sink, self.on_line = sink, on_line
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            self.log_file.write(raw)
            self.log_file.flush()
            self.sink.add(line)
            self.tail.append(line)
            self.on_line(line)
        self.sink.flush()

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self) -> int:
        code = self.process.wait()
        self.reader.join()
        self.log_file.close()
        return code

    def terminate(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM, then SIGKILL to the whole process group after the grace period."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()
        return self.wait()

    def kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
