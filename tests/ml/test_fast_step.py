"""The training step's fast path (ml/train/fast_step.py) against the accelerate loop, on the tiny SDXL.

Both paths draw the same latents, noise and timesteps and apply the same loss, clipping, AdamW
update and loss scaling, so they learn the same weights. On a CPU the fast path runs eagerly; the
CUDA-graph tests run where a GPU is present and skip elsewhere.
"""

from __future__ import annotations

import logging
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Options that exercise every part of the step: accumulation, a changing schedule, Min-SNR
# weighting, noise offset, flips and a batch that does not divide the dataset.
EXERCISED = {"max_train_steps": 6, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "lr_warmup_steps": 2,
             "snr_gamma": 5.0, "noise_offset": 0.05, "random_flip": True, "train_batch_size": 3}
STEP_LINE = re.compile(r"step=(\d+) loss=(\S+) lr=(\S+)$")


def _step_lines(stdout: str) -> list[tuple[int, float, float]]:
    found = [STEP_LINE.search(line) for line in stdout.splitlines()]
    return [(int(m[1]), float(m[2]), float(m[3])) for m in found if m]


def _assert_same_training(fast, eager, loss_rtol: float, weight_atol: float) -> None:
    assert fast.summary()["fast_path"] is True and eager.summary()["fast_path"] is False
    fast_lines, eager_lines = _step_lines(fast.stdout), _step_lines(eager.stdout)
    assert [s for s, _, _ in fast_lines] == [s for s, _, _ in eager_lines] == list(range(1, len(fast_lines) + 1))
    for (_, fast_loss, fast_lr), (_, eager_loss, eager_lr) in zip(fast_lines, eager_lines):
        assert fast_lr == eager_lr
        assert fast_loss == pytest.approx(eager_loss, rel=loss_rtol)
    expected, actual = load_file(eager.lora), load_file(fast.lora)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert actual[key].dtype == torch.float32  # the saved LoRA is the fp32 master weights
        torch.testing.assert_close(actual[key], expected[key], atol=weight_atol, rtol=0)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fast_path_learns_what_the_accelerate_loop_learns(make_job, mixed_precision):
    values = {**EXERCISED, "mixed_precision": mixed_precision}
    fast = make_job({**values, "fast_path": True}).run()
    eager = make_job({**values, "fast_path": False}).run()
    assert fast.returncode == 0, fast.stdout
    assert eager.returncode == 0, eager.stdout
    assert "training step: fast path" in fast.stdout and "training step: accelerate loop" in eager.stdout
    # bf16 rounds activations; both paths round the same values, in a different order of operations.
    tolerance = {"no": (1e-4, 1e-5), "bf16": (2e-2, 2e-3)}[mixed_precision]
    _assert_same_training(fast, eager, *tolerance)


# The training options the fast path covers beside AdamW (tests/ml/test_train_features.py tests what each does).
FEATURES = {"use_dora": True, "ema_decay": 0.7, "caption_dropout": 0.3, "shuffle_caption": True, "keep_tokens": 1,
            "timestep_bias": "later", "timestep_bias_strength": 3.0}


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fast_path_learns_what_the_accelerate_loop_learns_with_dora_ema_and_caption_options(make_job,
                                                                                           mixed_precision):
    """bf16 runs the fast path's compute-dtype copies of the LoRA, DoRA's magnitudes among them."""
    values = {**EXERCISED, **FEATURES, "max_train_steps": 3, "mixed_precision": mixed_precision}
    fast = make_job({**values, "fast_path": True}).run()
    eager = make_job({**values, "fast_path": False}).run()
    assert fast.returncode == 0, fast.stdout
    assert eager.returncode == 0, eager.stdout
    tolerance = {"no": (1e-4, 1e-5), "bf16": (2e-2, 2e-3)}[mixed_precision]
    _assert_same_training(fast, eager, *tolerance)
    raw = "pytorch_lora_weights_raw.safetensors"
    for key, tensor in load_file(eager.model / raw).items():
        torch.testing.assert_close(load_file(fast.model / raw)[key], tensor, atol=tolerance[1], rtol=0)


def test_fast_path_resumes_to_the_same_weights(make_job):
    values = {**EXERCISED, "max_train_steps": 8, "checkpointing_steps": 3, "checkpoints_total_limit": 5}
    whole = make_job(values).run()
    assert whole.returncode == 0, whole.stdout
    assert whole.summary()["fast_path"] is True
    resumed = make_job(values)
    shutil.copytree(whole.checkpoints / "checkpoint-3", resumed.checkpoints / "checkpoint-3")
    resumed.run()
    assert resumed.returncode == 0, resumed.stdout
    assert resumed.summary()["resumed_from_step"] == 3
    expected, actual = load_file(whole.lora), load_file(resumed.lora)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0)
    after, before = _step_lines(resumed.stdout), _step_lines(whole.stdout)[3:]
    assert [(step, lr) for step, _, lr in after] == [(step, lr) for step, _, lr in before]
    assert [loss for _, loss, _ in after] == pytest.approx([loss for _, loss, _ in before], rel=1e-4)


def test_loss_is_logged_every_logging_steps_and_at_the_end(make_job):
    job = make_job({"max_train_steps": 7, "logging_steps": 3}).run()
    assert job.returncode == 0, job.stdout
    assert [step for step, _, _ in _step_lines(job.stdout)] == [3, 6, 7]
    assert [entry["step"] for entry in job.summary()["losses"]] == [3, 6, 7]
    assert all(loss > 0 for _, loss, _ in _step_lines(job.stdout))


def test_options_the_fast_path_does_not_cover_use_the_accelerate_loop(make_job):
    job = make_job({"train_text_encoder": True, "gradient_checkpointing": True, "max_train_steps": 2}).run()
    assert job.returncode == 0, job.stdout
    assert "fast path off: train_text_encoder, gradient_checkpointing" in job.stdout
    assert job.summary()["fast_path"] is False


@pytest.mark.skipif(torch.cuda.is_available() or torch.get_num_threads() < 2, reason="a CPU with a thread pool")
def test_on_a_cpu_the_job_trains_with_the_pool_only_when_it_is_clearly_faster(make_job, monkeypatch):
    from ml.train.fast_step import POOL_ADVANTAGE

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    job = make_job({"max_train_steps": 2}).run()
    assert job.returncode == 0, job.stdout
    choice = job.summary()["cpu_threads"]  # the job's record of its choice (training_summary.json)
    assert choice["pool"] > 1
    faster = choice["pool_seconds"] * POOL_ADVANTAGE < choice["one_thread_seconds"]
    assert choice["threads"] == (choice["pool"] if faster else 1)
    # The timed passes leave no trace in what is learned: the step equals the accelerate loop's (tested above with
    # the same unset OMP_NUM_THREADS), and a count set by the environment is used as it is.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fixed = make_job({"max_train_steps": 2}).run()
    assert fixed.returncode == 0, fixed.stdout
    assert fixed.summary()["cpu_threads"] is None


# ---------------------------------------------------------------------------------------------
# CUDA graphs: run where a GPU is present.


@cuda
@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_cuda_graphs_learn_what_the_accelerate_loop_learns(make_job, mixed_precision):
    values = {**EXERCISED, "mixed_precision": mixed_precision, "max_train_steps": 8}
    fast = make_job({**values, "fast_path": True}).run()
    eager = make_job({**values, "fast_path": False}).run()
    assert fast.returncode == 0, fast.stdout
    assert eager.returncode == 0, eager.stdout
    # 10 images in batches of 3: shapes of 3 and of 1, each captured, and the update.
    assert fast.summary()["cuda_graphs"] == 3, fast.stdout
    assert "capture" not in fast.stdout or "failed" not in fast.stdout
    # fp32 on the GPU: cuDNN's convolutions use TF32 by default and a captured graph may pick other algorithms
    # than eager, so a gradient differs in its last bits; Adam's normalised update carries that into a weight
    # whose gradient is near zero (an H100 run: 1 of 128 elements 1.4e-5 apart after 8 steps of lr 1e-3).
    tolerance = {"no": (1e-4, 5e-5), "fp16": (1e-2, 1e-3)}[mixed_precision]
    _assert_same_training(fast, eager, *tolerance)


@cuda
def test_cuda_graphs_per_bucket_shape(make_job, tmp_path, base_model):
    from test_train_buckets import prepared_dataset

    # Wide and portrait buckets: two latent shapes, never mixed in a batch, each its own graph.
    dataset = prepared_dataset(tmp_path, base_model, resolution=32, latent_cache=True)
    values = {"max_train_steps": 12, "train_batch_size": 1, "mixed_precision": "fp16"}
    fast = make_job({**values, "fast_path": True}, train=dataset).run()
    eager = make_job({**values, "fast_path": False}, train=dataset).run()
    assert fast.returncode == 0, fast.stdout
    assert eager.returncode == 0, eager.stdout
    assert fast.summary()["cuda_graphs"] == 3, fast.stdout  # two bucket shapes and the update
    _assert_same_training(fast, eager, 1e-2, 1e-3)


def _lora_unet(base_model, device: str):
    """The tiny UNet with a rank-4 LoRA, initialised the same way on every call."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet").to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return unet, [p for p in unet.parameters() if p.requires_grad]


def _batches(base_model, count: int):
    from diffusers import UNet2DConditionModel

    from ml.train.fast_step import StepInputs

    generator = torch.Generator().manual_seed(1)
    config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return [StepInputs(torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator),
                       torch.randint(0, 1000, (2,), generator=generator),
                       torch.randn(2, 77, config["cross_attention_dim"], generator=generator),
                       torch.randn(2, pooled_dim, generator=generator), torch.rand(2, 6, generator=generator) * 32)
            for _ in range(count)]


def test_loss_scaling_skips_and_rescales_as_grad_scaler_does(base_model):
    """fp16's dynamic loss scaling, on the device (here a CPU): steps whose gradients overflow are
    skipped and the scale backs off, then grows, exactly as torch's GradScaler loop does."""
    from diffusers import DDPMScheduler

    from ml.train.fast_step import FastStep, make_optimizer
    from ml.train.loss import diffusion_loss

    scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler")
    batches = _batches(base_model, 8)
    batches[0].noise *= 1e25  # a first step whose gradients overflow
    settings = {"init_scale": 2.0**16, "growth_interval": 2}  # the scale grows within the test

    unet, params = _lora_unet(base_model, "cpu")
    scaler = torch.amp.GradScaler("cpu", **settings)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    expected_losses, expected_scales = [], []
    for batch in batches:
        loss = diffusion_loss(unet, scheduler, batch.latents, batch.noise, batch.timesteps, batch.prompt_embeds,
                              batch.pooled, batch.time_ids)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        expected_losses.append(float(loss.detach()))
        expected_scales.append(scaler.get_scale())

    fast_unet, fast_params = _lora_unet(base_model, "cpu")
    fast_scaler = torch.amp.GradScaler("cpu", **settings)
    fast = FastStep(fast_unet, make_optimizer(fast_params, 1e-3, torch.device("cpu")), scheduler, torch.float32,
                    torch.device("cpu"), 1, 1.0, None, scaler=fast_scaler)
    losses, scales, skipped = [], [], []
    for batch in batches:
        fast.micro_step(batch)
        fast.update()
        losses.append(fast.last_loss())
        scales.append(fast_scaler.get_scale())
        skipped.append(fast.step_was_skipped())

    assert skipped == [True] + [False] * 7
    assert scales == expected_scales == [2.0**15, 2.0**15, 2.0**16, 2.0**16, 2.0**17, 2.0**17, 2.0**18, 2.0**18]
    assert not math.isfinite(losses[0]) and not math.isfinite(expected_losses[0])
    assert losses[1:] == pytest.approx(expected_losses[1:], rel=1e-6)
    for actual, expected in zip(fast_params, params):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@cuda
def test_a_failed_capture_falls_back_to_the_same_eager_step(monkeypatch, caplog, base_model):
    """FastStep itself: capture raising gives a warning and the eager result."""
    from diffusers import DDPMScheduler

    from ml.train.fast_step import FastStep, make_optimizer

    scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler")
    batches = _batches(base_model, 4)

    def train():
        unet, params = _lora_unet(base_model, "cuda")
        step = FastStep(unet, make_optimizer(params, 1e-3, torch.device("cuda")), scheduler, torch.float32,
                        torch.device("cuda"), 1, 1.0, None)
        losses = []
        for batch in batches:
            step.micro_step(batch)
            step.update()
            losses.append(step.last_loss())
        return step, params, losses

    graphed, graphed_params, graphed_losses = train()
    assert graphed.captured() == 2

    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    with caplog.at_level(logging.WARNING, logger="ml.train.fast_step"):
        fallback, fallback_params, fallback_losses = train()
    assert "CUDA graph capture of the micro-batch shape" in caplog.text and "capture refused" in caplog.text
    assert fallback.captured() == 0 and not fallback.graphs
    assert fallback_losses == pytest.approx(graphed_losses, rel=1e-4)
    for actual, expected in zip(fallback_params, graphed_params):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
