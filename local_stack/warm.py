"""Warm starts for the local stack's job and endpoint processes.

A container here is `python -m ml.cli VERB ...`, and most of a tiny job's time went into starting Python
and importing the torch stack (torch, diffusers, transformers, peft, accelerate: about 3 s of a 5 s job on
an idle 2-core machine, over 15 s on a busy one), paid again by every job, trial and endpoint.

The warm starter is one process (`python -m local_stack.warm SOCKET`) that imports those libraries once
and then forks a child per container on request, over a Unix socket: the child gets the container's
stdout pipe (passed as a file descriptor), its environment, working directory and arguments, starts a
session of its own, and runs `ml.cli` as `python -m` would. The payload's own modules (`ml.*`) are
imported fresh in every child (the warm starter drops them after loading the libraries), so settings
they read at import come from the container's environment. The warm starter reports each child's pid,
then its exit status, exactly as Popen would give them (negative: killed by that signal).

The tests' training jobs (tests/ml) start the same way. A container is started cold (a new interpreter,
as before) when it is not `python -m ml...`, when its environment
differs from the warm starter's in a variable that libraries read at import time (HF_*, TORCH*, OMP_*,
...), when the warm starter could not start, or with SDXL_LORA_STACK_WARM_START=0.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

# Imported once in the warm starter: everything the payload's verbs import that is slow to import.
PAYLOAD_MODULES = ("ml.train.job", "ml.prepare.job", "ml.prepare.captioning", "ml.serve.server", "ml.serve.inference", "ml.serve.adapters",
                   "ml.train.fast_step", "ml.train.reporting")
# Variables that libraries read when they are imported: a container whose value differs starts cold.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_",
                        "OPENBLAS_", "CUDA_", "NCCL_", "KMP_", "PYTHON", "LD_", "TOKENIZERS_", "SAFETENSORS_",
                        "ACCELERATE_", "NUMEXPR_", "XDG_CACHE_HOME", "MPLCONFIGDIR")
# What the verbs import lazily, inside their functions (and the libraries' own lazy modules): module ->
# attributes to touch. Without these a warm training job still spent 2.8 s importing peft, accelerate and
# diffusers.optimization after its fork.
LAZY_IMPORTS = {
    "accelerate": ("Accelerator",), "accelerate.utils": ("set_seed",), "diffusers.optimization": ("get_scheduler",),
    "peft": ("LoraConfig",), "peft.utils": ("get_peft_model_state_dict", "set_peft_model_state_dict"),
    "peft.tuners.lora": ("LoraLayer",),
    "diffusers": ("StableDiffusionXLPipeline", "UNet2DConditionModel", "AutoencoderKL", "DDPMScheduler",
                  "EulerDiscreteScheduler"),
    "diffusers.utils": ("convert_state_dict_to_diffusers",),
    "transformers": ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "InstructBlipProcessor",
                     "InstructBlipForConditionalGeneration", "BlipImageProcessorPil", "LlamaTokenizer"),
    "safetensors.torch": ("load_file", "save_file"),
    "PIL.Image": (), "PIL.ImageOps": (), "PIL.ImageDraw": (), "PIL.ImageFont": (),
}
DISABLE = "SDXL_LORA_STACK_WARM_START"
MESSAGE_BYTES = 1 << 20


# -- the warm starter's own process -------------------------------------------------------------

def _preload() -> None:
    import importlib

    for name in PAYLOAD_MODULES:
        importlib.import_module(name)
    for name, attributes in LAZY_IMPORTS.items():
        try:
            module = importlib.import_module(name)
            for attribute in attributes:
                getattr(module, attribute)
        except (ImportError, AttributeError):  # an optional part missing here: the container imports it itself
            pass
    for name in [n for n in sys.modules if n == "ml" or n.startswith("ml.")]:
        del sys.modules[name]  # each child imports the payload afresh, under its own environment


def _child(request: dict, fds: list[int], inherited: list[socket.socket], started: int) -> None:
    """In the forked child: become the container, run `python -m ml.cli ARGS`, exit with its status."""
    code = 1
    try:
        for sock in inherited:  # the warm starter's listener and its other children's connections
            sock.close()
        os.setsid()
        try:  # in its directory before its pid is reported: whoever looks at the process finds it there
            os.chdir(request["cwd"])
            moved = None
        except OSError as error:
            moved = error
        # The default handlers before its pid is reported: a StopTrainingJob right after the start SIGTERMs it
        # at once, and the warm starter's own handler (inherited through fork) would swallow that signal.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        os.write(started, b"s")  # its pid is reported only now: a signal to its process group finds it
        os.close(started)
        _set_name(" ".join([request.get("module", "ml.cli"), *request["args"][:1]]))
        (out,) = fds
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        if moved is not None:  # as a container whose working directory is missing: a message and status 1
            print(f"cannot enter the container's directory: {moved}", file=sys.stderr, flush=True)
            return
        os.environ.clear()
        os.environ.update(request["env"])
        if "numpy" in sys.modules:  # a fresh interpreter would not share its global RNG state with others
            sys.modules["numpy"].random.seed()
        import runpy

        sys.argv = ["sdxl-lora", *request["args"]]
        try:
            runpy.run_module(request.get("module", "ml.cli"), run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:
            if done.code is None or isinstance(done.code, int):
                code = done.code or 0
            else:
                print(done.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _set_name(name: str) -> None:
    """What `top` and `ps -o comm` show for the child (its command line stays the warm starter's)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def serve(path: str) -> int:
    """The warm starter: load the libraries, then fork a child per request until SIGTERM or the stack ends."""
    parent = os.getppid()
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    print("warm", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection its exit status goes to
    while not stopping and os.getppid() == parent:
        try:
            readable, _, _ = select.select([listener], [], [], 0.05)
        except InterruptedError:
            readable = []
        if readable:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, MESSAGE_BYTES, 1)
            try:
                request = json.loads(message)
                sys.stdout.flush()
                sys.stderr.flush()
                ready, started = os.pipe()
                pid = os.fork()
            except Exception as error:  # a request it cannot start is answered, not fatal
                for fd in fds:
                    os.close(fd)
                connection.send(json.dumps({"error": repr(error)}).encode())
                connection.close()
                continue
            if pid == 0:
                os.close(ready)
                _child(request, fds, [listener, connection, *waiting.values()], started)
            os.close(started)
            os.read(ready, 1)  # the child has its session (or has died: then the read ends empty)
            os.close(ready)
            for fd in fds:
                os.close(fd)
            connection.send(json.dumps({"pid": pid}).encode())
            waiting[pid] = connection
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            connection = waiting.pop(pid, None)
            if connection is not None:
                try:
                    connection.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass
                connection.close()
    listener.close()
    return 0


# -- the stack's side ---------------------------------------------------------------------------

class WarmProcess:
    """A forked container, with the part of Popen's interface the stack uses."""

    def __init__(self, pid: int, stdout, connection: socket.socket):
        self.pid, self.stdout, self._connection = pid, stdout, connection
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _receive(self, timeout: float | None) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            readable, _, _ = select.select([self._connection], [], [], timeout)
            if not readable:
                return
            message = self._connection.recv(MESSAGE_BYTES)
            if message:
                self.returncode = json.loads(message)["exit"]
            elif not _alive(self.pid):  # the warm starter is gone: the status is lost, not the fact
                self.returncode = 255
            else:
                return
            self._connection.close()

    def poll(self) -> int | None:
        self._receive(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self._receive(1.0 if left is None else min(left, 1.0))
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class WarmStarter:
    """The stack's handle on its warm starter process: started once, in the background."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        self._folder = tempfile.mkdtemp(prefix="sdxl-lora-warm-")
        self.path = str(Path(self._folder) / "socket")
        self.log = Path(self._folder) / "warm.log"
        self.process: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._failed: str | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start loading in the background; `launch` waits for it (or starts cold if it failed)."""
        with self._lock:
            if self.process is not None:
                return
            with self.log.open("w") as out:
                self.process = subprocess.Popen([sys.executable, "-m", "local_stack.warm", self.path], env=self.env,
                                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                                cwd=str(Path(__file__).resolve().parents[1]))
        threading.Thread(target=self._watch_start, daemon=True).start()

    def _watch_start(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "warm\n" in self.log.read_text(errors="replace"):
                self._ready.set()
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self._failed = self.log.read_text(errors="replace")[-2000:] or "no output"
        self._ready.set()

    def eligible(self, command: list[str], env: dict[str, str]) -> bool:
        """`python -m ml...` (the payload's CLI, or one of its modules) under an environment the libraries
        already imported here would not have read differently."""
        if command[:2] != [sys.executable, "-m"] or len(command) < 3 or env.get(DISABLE, "1") == "0":
            return False
        if not (command[2] == "ml" or command[2].startswith("ml.")):
            return False
        keys = {k for k in {*env, *self.env} if k.startswith(IMPORT_TIME_PREFIXES) and k != "PYTHONUNBUFFERED"}
        return all(env.get(k) == self.env.get(k) for k in keys)

    def launch(self, command: list[str], env: dict[str, str], cwd: Path, wait: float = 120) -> WarmProcess | None:
        """The container forked from the warm starter; None when it must start cold."""
        if not self.eligible(command, env):
            return None
        self.start()
        if not self._ready.wait(wait) or self._failed is not None:
            return None
        read, write = os.pipe()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            connection.connect(self.path)
            request = {"module": command[2], "args": command[3:], "env": env, "cwd": str(cwd)}
            socket.send_fds(connection, [json.dumps(request).encode()], [write])
            answer = json.loads(connection.recv(MESSAGE_BYTES) or b'{"error": "the warm starter closed"}')
        except OSError:
            connection.close()
            os.close(read)
            return None
        finally:
            os.close(write)
        if "pid" not in answer:
            connection.close()
            os.close(read)
            return None
        return WarmProcess(answer["pid"], io.TextIOWrapper(io.FileIO(read, "r"), errors="replace"), connection)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for name in ("socket", "warm.log"):
            try:
                (Path(self._folder) / name).unlink()
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self._folder)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
