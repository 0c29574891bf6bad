"""`sdxl-lora train` end to end on the tiny SDXL, as SageMaker would run it: a process per job."""

from __future__ import annotations

import json
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ml.contract.metrics import final_metrics


def _lora_a_ranks(state: dict) -> set[int]:
    """Rank = rows of the down projections (lora.down in diffusers' key format)."""
    downs = [tensor for key, tensor in state.items() if "lora.down" in key or "lora_A" in key]
    assert downs
    return {tensor.shape[0] for tensor in downs}


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_lora_has_requested_rank_and_keys_follow_train_text_encoder(make_job, train_text_encoder):
    job = make_job({"rank": 8, "lora_alpha": 4, "train_text_encoder": train_text_encoder}).run()
    assert job.returncode == 0, job.stdout
    state = load_file(job.lora)
    prefixes = {key.split(".")[0] for key in state}
    expected = {"unet", "text_encoder", "text_encoder_2"} if train_text_encoder else {"unet"}
    assert prefixes == expected
    assert _lora_a_ranks(state) == {8}
    with safe_open(job.lora, "pt") as handle:
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert adapter["unet.r"] == 8 and adapter["unet.lora_alpha"] == 4


def test_loading_the_lora_changes_the_pipeline_output(make_job, base_model):
    from diffusers import StableDiffusionXLPipeline

    job = make_job({"max_train_steps": 10, "learning_rate": 5e-3}).run()
    assert job.returncode == 0, job.stdout
    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline("storyboard frame, a red circle", num_inference_steps=3, height=32, width=32,
                        generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    before = render()
    pipeline.load_lora_weights(str(job.model), weight_name="pytorch_lora_weights.safetensors")
    after = render()
    assert np.abs(after - before).max() > 1e-3


RESUMABLE = {"max_train_steps": 8, "checkpointing_steps": 3, "checkpoints_total_limit": 5,
             "train_text_encoder": True, "gradient_accumulation_steps": 2, "random_flip": True,
             "lr_scheduler": "cosine", "lr_warmup_steps": 2, "noise_offset": 0.05, "train_batch_size": 3}


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(make_job):
    whole = make_job(RESUMABLE).run()
    assert whole.returncode == 0, whole.stdout
    assert sorted(p.name for p in whole.checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]

    resumed = make_job(RESUMABLE)
    shutil.copytree(whole.checkpoints / "checkpoint-3", resumed.checkpoints / "checkpoint-3")  # as spot restores it
    resumed.run()
    assert resumed.returncode == 0, resumed.stdout
    assert resumed.summary()["resumed_from_step"] == 3
    expected, actual = load_file(whole.lora), load_file(resumed.lora)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0)
    steps = [line for line in resumed.stdout.splitlines() if " step=" in line]
    assert [line.split("step=")[1].split()[0] for line in steps] == ["4", "5", "6", "7", "8"]


def test_a_checkpoint_restored_in_part_is_passed_over_for_the_last_whole_one(make_job):
    """SageMaker restores checkpoints from S3 file by file as they were synced: an upload cut short can leave a
    checkpoint's progress.json without its weights. The job resumes from the newest checkpoint whose files are
    all there, at the sizes its progress file lists (the local stack once restored such a half checkpoint, and
    the retry failed on the missing lora_model_0.safetensors)."""
    whole = make_job(RESUMABLE).run()
    assert whole.returncode == 0, whole.stdout
    listed = json.loads((whole.checkpoints / "checkpoint-6" / "progress.json").read_text())["files"]
    assert {"lora_model_0.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(listed)

    resumed = make_job(RESUMABLE)
    for name in ("checkpoint-3", "checkpoint-6"):
        shutil.copytree(whole.checkpoints / name, resumed.checkpoints / name)
    (resumed.checkpoints / "checkpoint-6" / "lora_model_0.safetensors").unlink()  # the upload that never came
    truncated = resumed.checkpoints / "checkpoint-6" / "optimizer.bin"
    truncated.write_bytes(truncated.read_bytes()[:100])
    resumed.run()
    assert resumed.returncode == 0, resumed.stdout
    assert resumed.summary()["resumed_from_step"] == 3
    expected, actual = load_file(whole.lora), load_file(resumed.lora)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0)


def test_sigterm_checkpoints_exits_and_the_restart_finishes_the_same_job(make_job):
    hyperparameters = {"max_train_steps": 150, "checkpointing_steps": 1000, "logging_steps": 1}
    job = make_job(hyperparameters)
    process = job.start()
    for line in process.stdout:
        if " step=3 " in line:
            break
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output = process.stdout.read()
    assert process.wait(timeout=120) == 143, output
    assert time.monotonic() - sent < 120
    checkpoints = [p.name for p in job.checkpoints.iterdir()]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint-"), checkpoints
    interrupted_at = int(checkpoints[0].split("-")[1])
    assert 3 <= interrupted_at < 150
    assert not job.lora.exists() and job.failure == ""

    job.run()  # the restart SageMaker makes after a spot interruption
    assert job.returncode == 0, job.stdout
    assert job.summary()["resumed_from_step"] == interrupted_at
    uninterrupted = make_job(hyperparameters).run()
    expected, actual = load_file(uninterrupted.lora), load_file(job.lora)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0)


def test_checkpoints_beyond_the_limit_are_pruned(make_job):
    job = make_job({"max_train_steps": 7, "checkpointing_steps": 2, "checkpoints_total_limit": 2}).run()
    assert job.returncode == 0, job.stdout
    assert sorted(p.name for p in job.checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_it_learns_validation_loss_drops_below_the_base_models(make_job):
    job = make_job({"max_train_steps": 60, "learning_rate": 2e-3, "rank": 8, "validation_split": 0.3,
                    "train_batch_size": 4}).run()
    assert job.returncode == 0, job.stdout
    summary = job.summary()
    assert summary["validation_images"] == 3 and summary["train_images"] == 7
    assert summary["val_loss"] < summary["baseline_val_loss"]
    found = final_metrics(job.stdout)  # what SageMaker's MetricDefinitions read from the log
    assert found["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert found["baseline_val_loss"] == pytest.approx(summary["baseline_val_loss"], rel=1e-5)
    assert found["step"] == 60


def test_validation_loss_is_the_same_for_the_same_weights_whatever_the_seed(make_job):
    # Held-out images, noise and timesteps do not depend on the trial: baselines agree across seeds.
    first = make_job({"max_train_steps": 1, "validation_split": 0.3, "seed": 1}).run()
    second = make_job({"max_train_steps": 1, "validation_split": 0.3, "seed": 2}).run()
    assert first.summary()["baseline_val_loss"] == second.summary()["baseline_val_loss"]


def test_log_has_one_metric_line_per_step_and_the_outputs_are_complete(make_job):
    job = make_job({"max_train_steps": 5, "validation_prompt": "storyboard frame, a blue square",
                    "num_validation_images": 2, "num_validation_inference_steps": 2}).run()
    assert job.returncode == 0, job.stdout
    assert sum(" step=" in line and " loss=" in line for line in job.stdout.splitlines()) == 5
    assert "\r" not in job.stdout  # no progress bar without a terminal
    assert sorted(p.name for p in (job.model / "samples").iterdir()) == ["sample-0.png", "sample-1.png"]
    summary = job.summary()
    assert summary["global_step"] == 5 and len(summary["losses"]) == 5
    assert summary["hyperparameters"]["validation_prompt"] == "storyboard frame, a blue square"
    assert summary["peak_rss_mb"] > 0 and summary["wall_seconds"] > 0
    phases = summary["phase_seconds"]  # where the whole job's time goes, in order (README: Benchmark)
    assert list(phases) == ["imported", "encoders_loaded", "latents_cached", "model_ready", "loop_done", "lora_saved"]
    assert 0 < phases["imported"] and list(phases.values()) == sorted(phases.values())
    assert phases["lora_saved"] <= summary["wall_seconds"]
    assert "load_lora_weights" in (job.model / "README.md").read_text()


def test_memory_and_loss_options_train(make_job):
    job = make_job({"gradient_checkpointing": True, "train_text_encoder": True, "snr_gamma": 5.0,
                    "text_encoder_lr": 1e-4, "enable_xformers_memory_efficient_attention": True,
                    "center_crop": True, "max_train_steps": 3}).run()
    assert job.returncode == 0, job.stdout
    assert "xformers is not installed: using PyTorch scaled-dot-product attention" in job.stdout
    assert all(np.isfinite(entry["loss"]) for entry in job.summary()["losses"])


def test_epochs_set_the_step_count_when_max_train_steps_is_absent(make_job):
    job = make_job({"max_train_steps": "None", "num_train_epochs": 2, "train_batch_size": 3,
                    "gradient_accumulation_steps": 2}).run()
    assert job.returncode == 0, job.stdout
    assert job.summary()["global_step"] == 4  # 10 images -> 4 micro-batches per epoch -> 2 steps per epoch


# Failures: output/failure's first line names the problem and the exit status is non-zero.


def _assert_failed(job, first_line_contains: str) -> None:
    assert job.returncode not in (0, None), job.stdout
    assert first_line_contains in job.failure.splitlines()[0], job.failure


def test_missing_train_channel_fails_clearly(make_job):
    _assert_failed(make_job({}, train=None).run(), "train channel is missing")


def test_empty_train_channel_fails_clearly(make_job, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_failed(make_job({}, train=empty).run(), "train channel has no images")


def test_train_channel_without_metadata_fails_clearly(make_job, dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next(dataset.glob("*.png")), images)
    _assert_failed(make_job({}, train=images).run(), "train channel has no metadata.jsonl")


def test_bad_hyperparameter_fails_clearly(make_job):
    _assert_failed(make_job({"learning_rate": "fast"}).run(), "learning_rate: expected a number, got 'fast'")


def test_invalid_hyperparameters_json_fails_clearly(make_job):
    job = make_job({})
    (job.base / "input" / "config" / "hyperparameters.json").write_text("{not json")
    _assert_failed(job.run(), "hyperparameters.json is not valid JSON")


def test_the_command_line_is_honoured(make_job):
    """`python -m ml.train.job --base-dir DIR` reads and writes that job directory, whatever the environment."""
    import subprocess
    import sys

    job = make_job({})
    (job.base / "input" / "config" / "hyperparameters.json").write_text("{not json")
    env = {key: value for key, value in job.env().items() if key != "SAGEMAKER_BASE_DIR"}
    done = subprocess.run([sys.executable, "-m", "ml.train.job", "--base-dir", str(job.base)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "hyperparameters.json is not valid JSON" in job.failure
    refused = subprocess.run([sys.executable, "-m", "ml.train.job", "--learning-rate", "1"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "unrecognized arguments: --learning-rate" in refused.stderr


def test_gpu_only_options_fail_clearly_on_a_cpu(make_job):
    _assert_failed(make_job({"use_8bit_adam": "true"}).run(), "optimizer adamw8bit (use_8bit_adam) needs a CUDA GPU")
    _assert_failed(make_job({"mixed_precision": "fp16"}).run(), "mixed_precision fp16 needs a CUDA GPU")


def test_missing_base_model_fails_clearly(make_job, tmp_path):
    job = make_job({"pretrained_model_name_or_path": str(tmp_path / "nowhere")}, base=None).run()
    _assert_failed(job, f"base model {tmp_path / 'nowhere'} could not be loaded")


def test_checkpoint_from_another_configuration_is_refused(make_job):
    first = make_job({"max_train_steps": 4, "checkpointing_steps": 2}).run()
    second = make_job({"max_train_steps": 4, "checkpointing_steps": 2, "rank": 8})
    shutil.copytree(first.checkpoints / "checkpoint-2", second.checkpoints / "checkpoint-2")
    _assert_failed(second.run(), "checkpoint checkpoint-2 was written with rank=4, this job has rank=8")


def test_bf16_mixed_precision_trains_on_a_cpu(make_job):
    job = make_job({"mixed_precision": "bf16", "max_train_steps": 3}).run()
    assert job.returncode == 0, job.stdout
    assert all(t.dtype == torch.float32 for t in load_file(job.lora).values())


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "accelerate-loop"])
def test_the_polynomial_schedule_decays_from_the_learning_rate_to_its_end(fast):
    """diffusers' polynomial schedule starts from `optimizer.defaults["lr"]`: the optimizer must be built with the
    job's learning rate there, or the schedule decays to the wrong end rate (AdamW's default 1e-3 instead)."""
    from diffusers.optimization import get_scheduler

    from ml.contract.hyperparameters import parse
    from ml.train.job import build_optimizer

    hp = parse({"learning_rate": "0.0002", "lr_scheduler": "polynomial"})
    unet = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(unet, None, hp, torch.device("cpu"), fast=fast)
    schedule = get_scheduler("polynomial", optimizer=optimizer, num_warmup_steps=0, num_training_steps=4)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(4):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    lr_end = 1e-7  # diffusers' default end rate
    assert rates == pytest.approx([2e-4 - (2e-4 - lr_end) * k / 4 for k in range(5)], rel=1e-9)
