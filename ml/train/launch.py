"""Several GPUs or hosts: relaunch `sdxl-lora train` through accelerate, one process per GPU.

SageMaker tells a container its GPUs (SM_NUM_GPUS) and its hosts (resourceconfig.json);
this module turns them into an accelerate launch command. With the deepspeed
hyperparameter it uses the shipped ZeRO-2 configuration, with the job's values filled in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ml.contract.container import ContainerPaths
from ml.contract.hyperparameters import Hyperparameters

DEEPSPEED_CONFIG = Path(__file__).parent / "configs" / "accelerate_deepspeed_zero2.yaml"
MAIN_PROCESS_PORT = 29500


def gpu_count() -> int:
    """GPUs SageMaker gave this host (SM_NUM_GPUS), else what torch sees."""
    if os.environ.get("SM_NUM_GPUS"):
        return int(os.environ["SM_NUM_GPUS"])
    import torch

    return torch.cuda.device_count()


def _launched_by_accelerate() -> bool:
    return "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ


def accelerate_config(hp: Hyperparameters, gpus: int, hosts: list[str], current_host: str) -> dict:
    """The accelerate configuration for this job on this host."""
    if hp.deepspeed:
        config = yaml.safe_load(DEEPSPEED_CONFIG.read_text())
        config["deepspeed_config"]["gradient_accumulation_steps"] = hp.gradient_accumulation_steps
        if hp.mixed_precision != "no":
            config["mixed_precision"] = hp.mixed_precision
    else:
        config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                  "mixed_precision": hp.mixed_precision}
    ordered = sorted(hosts) or [current_host]
    config.update({
        "num_processes": gpus * len(ordered),
        "num_machines": len(ordered),
        "machine_rank": ordered.index(current_host) if current_host in ordered else 0,
        "main_process_ip": ordered[0] if len(ordered) > 1 else "127.0.0.1",
        "main_process_port": MAIN_PROCESS_PORT,
        "gpu_ids": "all",
    })
    return config


def distributed_config(paths: ContainerPaths, hp: Hyperparameters) -> dict | None:
    """The accelerate configuration when this job needs several processes, else None."""
    if _launched_by_accelerate():
        return None
    resources = paths.read_resource_config()
    hosts = resources.get("hosts") or []
    gpus = gpu_count()
    if max(gpus, 1) * max(len(hosts), 1) <= 1:
        return None
    return accelerate_config(hp, max(gpus, 1), hosts, resources.get("current_host", ""))


def launch_command(config_file: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "-m", "ml.train.job"]


def run(config: dict, stop, paths: ContainerPaths) -> int:
    """Run accelerate launch, forwarding SIGTERM so every rank checkpoints and exits. The ranks read the
    job's directory from SAGEMAKER_BASE_DIR, which is set to this job's (a --base-dir included)."""
    with tempfile.TemporaryDirectory(prefix="sdxl-lora-launch-") as folder:
        config_file = os.path.join(folder, "accelerate.yaml")
        with open(config_file, "w") as out:
            yaml.safe_dump(config, out)
        child = subprocess.Popen(launch_command(config_file), env={**os.environ, "SAGEMAKER_BASE_DIR": str(paths.base)})

        def forward(signum, frame):
            stop.raised = True
            child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        return child.wait()
