"""Fixtures for the payload tests: one tiny SDXL and one synthetic dataset per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml.fixtures import synthetic, tiny_model

# Small, fast defaults; each test overrides what it exercises.
FAST = {"resolution": 32, "train_batch_size": 2, "rank": 4, "max_train_steps": 6, "checkpointing_steps": 100,
        "learning_rate": 1e-3, "seed": 3}


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return synthetic.write_dataset(tmp_path_factory.mktemp("data") / "train", count=10, seed=1)


@dataclass
class Job:
    """A SageMaker-style job directory and how its last run ended."""

    base: Path
    returncode: int | None = None
    stdout: str = ""

    @property
    def model(self) -> Path:
        return self.base / "model"

    @property
    def lora(self) -> Path:
        return self.model / "pytorch_lora_weights.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.base / "checkpoints"

    @property
    def failure(self) -> str:
        path = self.base / "output" / "failure"
        return path.read_text() if path.exists() else ""

    def summary(self) -> dict:
        return json.loads((self.model / "training_summary.json").read_text())

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("SM_NUM_GPUS",)}
        env["SAGEMAKER_BASE_DIR"] = str(self.base)
        return env

    def start(self):
        """`python -m ml.train.job` as the container runs it: forked from the warm starter (the torch stack
        imported once per session, local_stack/warm.py) when it can be, else a new interpreter."""
        command, env = [sys.executable, "-m", "ml.train.job"], self.env()
        return _warm_starter().launch(command, env, Path.cwd()) or subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self) -> "Job":
        process = self.start()
        self.stdout = process.stdout.read()
        self.returncode = process.wait(timeout=600)
        return self


_warm = None


def _warm_starter():
    global _warm
    if _warm is None:
        import atexit

        from local_stack.warm import WarmStarter

        _warm = WarmStarter()
        atexit.register(_warm.stop)
    return _warm


@pytest.fixture
def make_job(tmp_path, base_model, dataset):
    """make_job(hyperparameters, train=..., base=...) lays out a job dir as SageMaker would."""
    counter = iter(range(1000))

    def make(hyperparameters: dict, train: Path | None = dataset, base: Path | None = base_model,
             raw: bool = False) -> Job:
        job = Job(tmp_path / f"job-{next(counter)}")
        config = job.base / "input" / "config"
        config.mkdir(parents=True)
        values = hyperparameters if raw else {k: str(v) for k, v in {**FAST, **hyperparameters}.items()}
        (config / "hyperparameters.json").write_text(json.dumps(values))
        data = job.base / "input" / "data"
        data.mkdir(parents=True)
        if train is not None:
            (data / "train").symlink_to(train, target_is_directory=True)
        if base is not None:
            (data / "base_model").symlink_to(base, target_is_directory=True)
        return job

    return make


@pytest.fixture(scope="session")
def captioner_model(tmp_path_factory) -> Path:
    """The tiny random InstructBLIP (`sdxl-lora tiny-captioner`)."""
    from ml.fixtures import tiny_captioner

    return tiny_captioner.build(tmp_path_factory.mktemp("captioner") / "instructblip", seed=0)
