"""The SageMaker container contract: where a job finds its inputs and leaves its outputs.

Every /opt/ml path resolves under $SAGEMAKER_BASE_DIR when it is set, which is how the
local stack gives each job a directory of its own. Pure Python.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn
from pathlib import Path

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the LoRA file training writes to model/ and serving loads
# The same LoRA in kohya's format (ComfyUI, Forge, Automatic1111), which training writes beside it.
KOHYA_LORA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"

# Training channels, by the names the request builders (plugins/sdxl_lora) give them and the jobs read them.
TRAIN_CHANNEL = "train"  # the processed dataset version
BASE_MODEL_CHANNEL = "base_model"  # a staged base model (diffusers layout); absent: the job loads pretrained_model
SCORE_CHANNEL = "score_adapter"  # a LoRA to score on this dataset's held-out images instead of training one
NOISY_LOGGERS = ("httpx", "urllib3", "botocore", "accelerate", "diffusers", "transformers", "peft")


def configure_logging() -> None:
    """One log format for every job (its lines become the job's CloudWatch log and metrics)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); 's3://bucket' -> ('bucket', ''). Anything else is refused."""
    if not uri.startswith("s3://") or not uri[len("s3://"):].partition("/")[0]:
        raise ValueError(f"{uri!r} is not an s3:// URI: write it as s3://bucket/key")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


class JobError(RuntimeError):
    """A problem with the job's input or settings; its message becomes the FailureReason."""


@dataclass(frozen=True)
class ContainerPaths:
    base: Path

    @classmethod
    def from_env(cls) -> "ContainerPaths":
        return cls(Path(os.environ.get("SAGEMAKER_BASE_DIR") or "/opt/ml"))

    @property
    def hyperparameters(self) -> Path:
        return self.base / "input" / "config" / "hyperparameters.json"

    @property
    def resource_config(self) -> Path:
        return self.base / "input" / "config" / "resourceconfig.json"

    def channel(self, name: str) -> Path:
        return self.base / "input" / "data" / name

    @property
    def model(self) -> Path:
        return self.base / "model"

    @property
    def output(self) -> Path:
        return self.base / "output"

    @property
    def failure(self) -> Path:
        return self.output / "failure"

    @property
    def checkpoints(self) -> Path:
        return self.base / "checkpoints"

    def read_hyperparameters(self) -> dict:
        if not self.hyperparameters.exists():
            return {}
        try:
            return json.loads(self.hyperparameters.read_text() or "{}")
        except ValueError as error:
            raise JobError(f"hyperparameters.json is not valid JSON: {error}") from None

    def read_resource_config(self) -> dict:
        if not self.resource_config.exists():
            return {}
        return json.loads(self.resource_config.read_text())

    def write_failure(self, error: BaseException, job: str = "training") -> str:
        """Write output/failure: the first line names the problem; a traceback follows for bugs."""
        if isinstance(error, JobError):
            reason, detail = str(error), ""
        else:
            reason = f"{job} failed: {type(error).__name__}: {error}"
            detail = "\n" + "".join(traceback.format_exception(error))
        self.output.mkdir(parents=True, exist_ok=True)
        self.failure.write_text(reason + detail)
        return reason.splitlines()[0] if reason else reason


def exit_now(status: int) -> NoReturn:
    """Exit without interpreter teardown, which takes about a second after importing the torch
    stack and does nothing a finished job needs: logs are flushed and every file is closed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
