"""The local stack's warm starter (local_stack/warm.py): a container forked from it behaves as the
`python -m ml.cli ...` process it replaces: its output, exit status, working directory, environment,
session and signals; and what it must not warm-start starts cold."""

from __future__ import annotations

import os
import signal
import sys

import psutil
import pytest

from local_stack.warm import DISABLE, WarmStarter

CLI = [sys.executable, "-m", "ml.cli"]


@pytest.fixture(scope="module")
def starter():
    starter = WarmStarter()
    starter.start()
    yield starter
    starter.stop()
    assert starter.process.poll() is not None


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def test_a_container_runs_in_its_directory_with_its_environment_and_exit_status(starter, tmp_path):
    process = starter.launch(CLI + ["tiny-model", "model"], _env(), tmp_path)
    assert process is not None, starter.log.read_text()
    assert os.getpgid(process.pid) == process.pid  # a session of its own: the stack stops it by process group
    assert psutil.Process(process.pid).cwd() == str(tmp_path)
    output = process.stdout.read()
    assert process.wait(timeout=300) == 0, output
    assert "tiny SDXL pipeline written to model" in output
    assert (tmp_path / "model" / "model_index.json").exists()  # relative to the container's directory

    failing = starter.launch(CLI + ["train", "--no-such-flag"], _env(), tmp_path)
    output = failing.stdout.read()
    assert failing.wait(timeout=60) == 2 and "unrecognized arguments: --no-such-flag" in output

    base = tmp_path / "job"  # the container's environment, not the warm starter's, names its /opt/ml
    failing = starter.launch(CLI + ["train"], _env(SAGEMAKER_BASE_DIR=str(base)), tmp_path)
    output = failing.stdout.read()
    assert failing.wait(timeout=120) == 1, output
    assert f"expected a directory at {base}/input/data/train" in output


def test_signals_reach_the_container_and_its_status_says_so(starter, tmp_path):
    process = starter.launch(CLI + ["tiny-model", "model"], _env(), tmp_path)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert process.poll() == -signal.SIGKILL
    process.stdout.read()  # the pipe ends with the process


def test_a_sigterm_sent_as_soon_as_the_pid_is_known_ends_the_container(starter, tmp_path):
    """StopTrainingJob right after CreateTrainingJob: the stack SIGTERMs the pid it was just given. The container
    has its default handlers by then (not the warm starter's, which would swallow the signal and leave the job
    running until the stop grace's SIGKILL)."""
    for _ in range(5):
        process = starter.launch(CLI + ["tiny-model", "model"], _env(), tmp_path)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM
        process.stdout.read()


@pytest.mark.parametrize("command, extra", [
    (["/bin/echo", "hello"], {}),  # not the payload's CLI
    (CLI + ["tiny-model", "m"], {"HF_HOME": "/elsewhere"}),  # read by huggingface_hub when it is imported
    (CLI + ["tiny-model", "m"], {"OMP_NUM_THREADS": "7"}),
    (CLI + ["tiny-model", "m"], {DISABLE: "0"}),
], ids=["other-entrypoint", "import-time-variable", "threads", "disabled"])
def test_what_cannot_be_warm_started_starts_cold(starter, tmp_path, command, extra):
    env = _env(**extra)
    for key in extra:  # differs from the warm starter's environment
        assert starter.env.get(key) != env[key]
    assert not starter.eligible(command, env)
    assert starter.launch(command, env, tmp_path) is None
