"""Several GPUs or hosts: the accelerate launch the job makes, and data-parallel training itself."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from ml.contract.container import ContainerPaths
from ml.contract.hyperparameters import parse
from ml.train import launch


def test_one_gpu_one_host_trains_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_NUM_GPUS", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launch.distributed_config(ContainerPaths(tmp_path), parse({})) is None


def test_several_gpus_relaunch_through_accelerate(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_NUM_GPUS", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    config = launch.distributed_config(ContainerPaths(tmp_path), parse({"mixed_precision": "bf16"}))
    command = launch.launch_command("/x/accelerate.yaml")
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-2:] == ["-m", "ml.train.job"]
    assert config["distributed_type"] == "MULTI_GPU"
    assert config["num_processes"] == 4 and config["num_machines"] == 1
    assert config["mixed_precision"] == "bf16"


def test_a_process_launched_by_accelerate_does_not_relaunch(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_NUM_GPUS", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch.distributed_config(ContainerPaths(tmp_path), parse({})) is None


def test_deepspeed_uses_the_original_zero2_configuration_with_the_jobs_values():
    hp = parse({"deepspeed": "true", "gradient_accumulation_steps": "4"})
    config = launch.accelerate_config(hp, gpus=4, hosts=["algo-2", "algo-1"], current_host="algo-2")
    assert config["distributed_type"] == "DEEPSPEED"
    ds = config["deepspeed_config"]
    assert ds["zero_stage"] == 2 and ds["offload_optimizer_device"] == "cpu" and ds["offload_param_device"] == "cpu"
    assert ds["gradient_clipping"] == 1.0 and ds["gradient_accumulation_steps"] == 4
    assert config["mixed_precision"] == "fp16"  # the original system's precision unless the job names another
    assert config["num_processes"] == 8 and config["num_machines"] == 2
    assert config["machine_rank"] == 1 and config["main_process_ip"] == "algo-1"


@pytest.mark.parametrize("hosts, current, rank", [(["algo-1"], "algo-1", 0), (["algo-1", "algo-2", "algo-3"], "algo-3", 2)])
def test_hosts_from_resourceconfig(hosts, current, rank):
    config = launch.accelerate_config(parse({}), gpus=1, hosts=hosts, current_host=current)
    assert config["machine_rank"] == rank and config["num_processes"] == len(hosts)


def test_data_parallel_training_on_two_processes(make_job):
    """The same loop under torch.distributed (gloo on the CPU), as accelerate runs it on several GPUs."""
    job = make_job({"max_train_steps": 4, "checkpointing_steps": 2, "validation_split": 0.2})
    env = {**job.env(), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ml.train.job"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = job.summary()
    assert summary["processes"] == 2 and summary["global_step"] == 4
    assert sum(" val_loss=" in line for line in done.stdout.splitlines()) == 1  # only the main process logs
    assert sorted(p.name for p in job.checkpoints.iterdir()) == ["checkpoint-2"]
    # each process's RNG state is in it (written before the rename, not into a staging dir left behind)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (job.checkpoints / "checkpoint-2").iterdir()}
    assert {key.split(".")[0] for key in load_file(job.lora)} == {"unet"}
