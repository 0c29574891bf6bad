"""The stack's own behaviour: a taken port, stopping cleanly, writing only inside its work dir."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import BUCKET, Stack, free_port, processes_under, training_request, wait_for_endpoint
from ml.fixtures import synthetic, tiny_model


def test_a_taken_port_is_a_clear_error(stack, tmp_path):
    done = subprocess.run([sys.executable, "-m", "sdxl_lora_ops.cli", "local-stack", "--port", str(stack.port),
                           "--workdir", str(tmp_path / "second")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{stack.port}" in done.stderr + done.stdout


def test_stopping_the_stack_ends_every_job_and_endpoint_process(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    workdir = tmp_path / "work"
    own = Stack(workdir, free_port(), cwd=cwd)
    try:
        s3, sagemaker = own.client("s3"), own.client("sagemaker")
        s3.create_bucket(Bucket=BUCKET)
        base = tiny_model.build(tmp_path / "base")
        data = synthetic.write_dataset(tmp_path / "data", count=4)
        for prefix, folder in (("base", base), ("data", data)):
            for path in folder.rglob("*"):
                if path.is_file():
                    s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
        staged = {"base": f"s3://{BUCKET}/base", "data": f"s3://{BUCKET}/data"}
        sagemaker.create_training_job(**training_request("e2e-left-running", staged, {
            "max_train_steps": 100000, "checkpointing_steps": 100000, "validation_split": 0}))
        sagemaker.create_model(ModelName="m", PrimaryContainer={
            "Image": "sdxl-lora-inference:latest", "Environment": {"BASE_MODEL": str(base)}})
        sagemaker.create_endpoint_config(EndpointConfigName="c", ProductionVariants=[
            {"VariantName": "v", "ModelName": "m", "InitialInstanceCount": 1, "InstanceType": "ml.g5.xlarge"}])
        sagemaker.create_endpoint(EndpointName="e", EndpointConfigName="c")
        assert wait_for_endpoint(sagemaker, "e")["EndpointStatus"] == "InService"
        deadline = time.monotonic() + 60
        while not processes_under(workdir / "training"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert processes_under(workdir / "endpoints")
    finally:
        assert own.stop() == 0
    assert processes_under(workdir) == []
    assert list(cwd.iterdir()) == []  # nothing written outside the work dir
