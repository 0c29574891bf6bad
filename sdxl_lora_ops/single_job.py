"""`sdxl-lora-ops demo --train-only`: a tiny SDXL, a synthetic dataset and one real training job, on this machine.

Lays out a SageMaker-style job directory and runs `sdxl-lora train` in it as its own
process, exactly as a container would run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ml.contract.hyperparameters import preset
from ml.fixtures import synthetic, tiny_model

# The local preset (the tiny SDXL on a CPU, as the DAGs' local forms train), with two sharper samples to look at.
DEMO_HYPERPARAMETERS = {**preset("local"), "num_validation_images": 2, "num_validation_inference_steps": 10}


def lay_out_job(job_dir: Path, base_model: Path, dataset: Path, hyperparameters: dict) -> None:
    """SageMaker's training layout: config, channels (symlinked here; SageMaker copies them)."""
    config = job_dir / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    config.joinpath("hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hyperparameters.items()}))
    data = job_dir / "input" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, source in (("base_model", base_model), ("train", dataset)):
        link = data / name
        if not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)


def main(workdir: str, steps: int = 40) -> int:
    root = Path(workdir)
    base_model = root / "tiny-sdxl"
    if not (base_model / "model_index.json").exists():
        tiny_model.build(base_model)
    dataset = synthetic.write_dataset(root / "dataset", count=16)
    job = root / "job"
    for stale in ("model", "output", "checkpoints"):  # a rerun starts clean, as a new SageMaker job would
        shutil.rmtree(job / stale, ignore_errors=True)
    lay_out_job(job, base_model, dataset, {**DEMO_HYPERPARAMETERS, "max_train_steps": steps})
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job.resolve())}
    status = subprocess.call([sys.executable, "-m", "ml.train.job"], env=env)
    if status != 0:
        failure = job / "output" / "failure"
        print(f"training failed: {failure.read_text() if failure.exists() else f'exit status {status}'}")
        return status
    summary = json.loads((job / "model" / "training_summary.json").read_text())
    print(f"\nLoRA: {(job / 'model' / 'pytorch_lora_weights.safetensors').resolve()}")
    print(f"samples: {(job / 'model' / 'samples').resolve()}")
    print(f"steps {summary['global_step']}, final loss {summary['final_loss']:.4f}, "
          f"validation loss {summary['val_loss']:.4f} (base model {summary['baseline_val_loss']:.4f}), "
          f"{summary['wall_seconds']:.1f} s")
    return 0
