"""`sdxl-lora train`: LoRA fine-tuning of SDXL under the SageMaker training contract.

The loop follows diffusers' train_text_to_image_lora_sdxl.py (peft adapters on the UNet's
attention projections and optionally on both text encoders, epsilon/v targets, Min-SNR
weighting, noise offset, SDXL size conditioning) with four differences that make it
faster and resumable:

- the VAE is frozen, so every image is encoded once and its latent distribution reused
  across epochs (both mirror images when random_flip is on); frozen text encoders encode
  every caption once; both are then freed (ml/train/frozen.py);
- data order, flips, noise and timesteps derive from (seed, position in the stream), so a
  run resumed from a checkpoint continues exactly where the interrupted one stopped
  (ml/train/seeds.py, ml/train/stream.py, ml/train/checkpoints.py);
- SIGTERM (spot interruption, StopTrainingJob) checkpoints at the next optimizer step and
  exits with status 143 (ml/train/interruption.py);
- the step itself, by default, is ml/train/fast_step.py's: LoRA computed in the compute dtype with
  fp32 master weights, no host synchronisation per step, and CUDA graphs on a GPU (fast_path).

This module is the job: `train()` is the loop, as in diffusers' script; the loss is ml/train/loss.py
and the base model's parts and the LoRA file are ml/train/models.py.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

from ml.contract import metrics
from ml.contract.container import LORA_WEIGHTS, ContainerPaths, JobError, configure_logging, exit_now
from ml.contract.hyperparameters import Hyperparameters, parse
from ml.dataset.imagefolder import load_imagefolder, split_validation
from ml.train import reporting, seeds
from ml.train.checkpoints import (
    PROGRESS_FILE,
    check_resumable,
    complete_checkpoints,
    register_lora_hooks,
    save_checkpoint,
)
from ml.train.fast_step import FastStep, StepInputs, fast_path_blockers, make_optimizer
from ml.train.frozen import cache_frozen, conditioning, latent_source, sample_latents
from ml.train.interruption import EXIT_INTERRUPTED, Interrupted, StopFlag, check_stop_everywhere
from ml.train.loss import diffusion_loss, validation_loss
from ml.train.models import (
    TEXT_LORA_TARGETS,
    UNET_LORA_TARGETS,
    base_model_path,
    check_device_support,
    load_encoders,
    load_unet,
    save_lora,
)
from ml.train.stream import micro_batch, micro_batches_per_epoch, total_steps

log = logging.getLogger(__name__)


def build_optimizer(unet, text_encoders, hp, device: torch.device, fast: bool) -> torch.optim.Optimizer:
    """The optimizer over the trained LoRA parameters: the UNet's at `learning_rate`, each text encoder's at
    `text_encoder_lr`. The constructor's own `lr` is `learning_rate` too (as in diffusers' script): diffusers'
    polynomial schedule reads its starting rate from `optimizer.defaults["lr"]`."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": hp.learning_rate}]
    for encoder in text_encoders or ():
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": hp.text_encoder_lr})
    if hp.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=hp.learning_rate)
    if fast:
        return make_optimizer(groups[0]["params"], hp.learning_rate, device)
    # fused: one kernel for all LoRA tensors instead of a loop of small ops per tensor
    return torch.optim.AdamW(groups, lr=hp.learning_rate, fused=device.type in ("cpu", "cuda"))


def _process_seconds() -> float:
    """Seconds since this process started (interpreter start and imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _configure_progress_output() -> bool:
    """Progress bars only on an interactive terminal; returns whether that is the case."""
    interactive = sys.stderr.isatty()
    if not interactive:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    return interactive


def train(paths: ContainerPaths, hp: Hyperparameters, stop: StopFlag) -> dict:
    check_device_support(hp)
    examples = load_imagefolder(paths.channel("train"), hp.caption_column)
    train_examples, val_examples = split_validation(examples, hp.validation_split)
    base = base_model_path(paths, hp)
    interactive = _configure_progress_output()

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    # The torch stack is imported: move its millions of long-lived objects out of the
    # collector's sight, so no collection (automatic ones in the loop included) walks them again.
    gc.freeze()
    phases = {"imported": _process_seconds()}  # seconds since the process started, at the end of each phase

    accelerator = Accelerator(gradient_accumulation_steps=hp.gradient_accumulation_steps,
                              mixed_precision=hp.mixed_precision)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if not accelerator.is_main_process:  # one copy of every log line, from the main process
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(hp.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(hp.mixed_precision, torch.float32)

    # Encoders first: they cache what they compute and are freed before the UNet is loaded,
    # which keeps the peak memory to the larger of the two rather than their sum.
    tokenizers, text_encoders, vae, scheduler = load_encoders(
        base, torch.float32 if hp.train_text_encoder else weight_dtype)
    for model in (vae, *text_encoders):
        model.requires_grad_(False)
        model.to(device)
    phases["encoders_loaded"] = _process_seconds()
    flips = 2 if hp.random_flip else 1
    log.info("caching latents of %d training and %d validation images", len(train_examples), len(val_examples))
    source = latent_source(examples, hp, base, vae)
    train_cache = cache_frozen(train_examples, hp, vae, tokenizers, text_encoders, device, flips, stop, hp.center_crop,
                               source)
    # Held-out images are always center-cropped and never flipped, so every trial scores the same pixels.
    val_cache = cache_frozen(val_examples, hp, vae, tokenizers, text_encoders, device, 1, stop,
                             center_crop=True, source=source) if val_examples else None
    del vae
    if not hp.train_text_encoder:
        del text_encoders
        text_encoders = None
    gc.collect()
    phases["latents_cached"] = _process_seconds()

    unet = load_unet(base, weight_dtype)
    unet.requires_grad_(False)
    # NHWC convolutions: about 15% faster UNet steps on CPU here, and the layout GPU tensor cores want.
    unet.to(device, memory_format=torch.channels_last)
    if hp.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401

            unet.enable_xformers_memory_efficient_attention()
        except ImportError:
            log.warning("xformers is not installed: using PyTorch scaled-dot-product attention")
    unet_config = LoraConfig(r=hp.rank, lora_alpha=hp.lora_alpha, init_lora_weights="gaussian",
                             target_modules=UNET_LORA_TARGETS)
    unet.add_adapter(unet_config)
    text_config = LoraConfig(r=hp.rank, lora_alpha=hp.lora_alpha, init_lora_weights="gaussian",
                             target_modules=TEXT_LORA_TARGETS)
    if text_encoders is not None:
        for encoder in text_encoders:
            encoder.add_adapter(text_config)
    trained = [unet] + list(text_encoders or ())
    if hp.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in text_encoders or ():
            encoder.gradient_checkpointing_enable()
    for model in trained:  # LoRA parameters train in fp32 whatever the compute precision
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()

    baseline_val_loss = None
    resume = complete_checkpoints(paths.checkpoints)
    if val_cache is not None and not resume:
        baseline_val_loss = validation_loss(unet, scheduler, val_cache, text_encoders, device, weight_dtype)
        log.info(metrics.val_loss_line(baseline_val_loss, baseline=True))

    fast_path_off = fast_path_blockers(hp, world)
    optimizer = build_optimizer(unet, text_encoders, hp, device, fast=not fast_path_off)
    trained_parameters = [p for group in optimizer.param_groups for p in group["params"]]  # what clipping sees
    max_steps = total_steps(hp, train_cache.buckets, world)
    lr_scheduler = get_scheduler(hp.lr_scheduler, optimizer=optimizer, num_warmup_steps=hp.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained, optimizer, lr_scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    unet = trained[0]
    text_encoders = tuple(trained[1:]) or None

    register_lora_hooks(accelerator, hp, unet_config, text_config)
    global_step = 0
    resumed_from = None
    if resume:
        checkpoint = resume[-1]
        progress = check_resumable(checkpoint, hp)
        accelerator.load_state(str(checkpoint))
        global_step = resumed_from = progress["global_step"]
        log.info("resumed from %s at step %d", checkpoint.name, global_step)

    fast = None
    if not fast_path_off:  # built after resuming: it captures the loaded optimizer state and loss scale
        fast = FastStep(unet, optimizer.optimizer, scheduler, weight_dtype, device, hp.gradient_accumulation_steps,
                        hp.max_grad_norm, hp.snr_gamma, scaler=accelerator.scaler)
        log.info("training step: fast path (LoRA computed in %s, fp32 master weights%s)",
                 str(weight_dtype).removeprefix("torch."), ", CUDA graphs per input shape" if fast.graphs else "")
    else:
        log.info("training step: accelerate loop (fast path off: %s)", ", ".join(fast_path_off))
    # fp16 loss scaling skips steps with overflowing gradients, and the LR schedule waits for them as
    # accelerate's does; only a schedule that changes needs to know (a read of the device per step).
    schedule_follows_skips = accelerator.scaler is not None and hp.lr_scheduler != "constant"

    per_epoch = micro_batches_per_epoch(hp, train_cache.buckets, world)
    log.info("training: %d images, %d micro-batches per epoch, %d optimizer steps, %d process(es) on %s",
             len(train_examples), per_epoch, max_steps, world, device)
    losses: list[dict] = []
    validation_losses: list[dict] = []  # measured at every checkpoint: the validation curve
    checkpoint_samples: dict[int, list[str]] = {}  # step -> images, with validation_images_at_checkpoints
    phases["model_ready"] = _process_seconds()  # UNet loaded with its LoRA, optimizer built, checkpoint resumed
    loop_started = time.monotonic()
    steps_run = 0
    progress_bar = None
    if interactive and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=max_steps, initial=global_step, desc="steps")
    for model in trained:
        model.train()
    try:
        while global_step < max_steps:
            check_stop_everywhere(stop, accelerator)
            step_loss = 0.0
            for micro in range(hp.gradient_accumulation_steps):
                index = global_step * hp.gradient_accumulation_steps + micro
                pairs = micro_batch(hp, index, train_cache.buckets, rank, world)
                generator = seeds.generator(hp.seed, seeds.NOISE, index, rank)
                if fast is not None:
                    latents, noise, timesteps = draw_noise(hp, scheduler, train_cache, pairs, generator)
                    embeds, pooled = conditioning(train_cache, [i for i, _ in pairs], None, "cpu")
                    time_ids = torch.stack([train_cache.time_ids[i, f] for i, f in pairs])
                    fast.micro_step(StepInputs(latents, noise, timesteps, embeds, pooled, time_ids))
                    continue
                with accelerator.accumulate(*trained):
                    latents, noise, timesteps = draw_noise(hp, scheduler, train_cache, pairs, generator)
                    images = [i for i, _ in pairs]
                    embeds, pooled = conditioning(train_cache, images, text_encoders, device)
                    time_ids = torch.stack([train_cache.time_ids[i, f] for i, f in pairs])
                    nhwc = torch.channels_last
                    loss = diffusion_loss(unet, scheduler, latents.to(device, weight_dtype, memory_format=nhwc),
                                          noise.to(device, weight_dtype, memory_format=nhwc), timesteps.to(device),
                                          embeds.to(weight_dtype), pooled.to(weight_dtype),
                                          time_ids.to(device, weight_dtype), hp.snr_gamma)
                    step_loss += float(accelerator.gather(loss.detach().reshape(1)).mean()) / hp.gradient_accumulation_steps
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trained_parameters, hp.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if fast is not None:
                fast.update()
                if not (schedule_follows_skips and fast.step_was_skipped()):
                    lr_scheduler.scheduler.step()
            global_step += 1
            steps_run += 1
            logged = global_step % hp.logging_steps == 0 or global_step == max_steps
            if fast is not None and logged:
                step_loss = fast.last_loss()  # the fast path reads the device on logged steps only
            if progress_bar is not None:
                progress_bar.update(1)
                if fast is None or logged:
                    progress_bar.set_postfix(loss=f"{step_loss:.4f}")
            if logged:
                lr = float(lr_scheduler.get_last_lr()[0])
                losses.append({"step": global_step, "loss": step_loss, "lr": lr})
                if accelerator.is_main_process:
                    log.info(metrics.step_line(global_step, step_loss, lr))
            if global_step % hp.checkpointing_steps == 0 and global_step < max_steps:
                save_checkpoint(accelerator, paths.checkpoints, global_step, hp)
                if val_cache is not None:
                    point = validation_loss(unet, scheduler, val_cache, text_encoders, device, weight_dtype)
                    validation_losses.append({"step": global_step, "val_loss": point})
                    log.info("validation loss %.6f at step %d", point, global_step)
                if hp.validation_images_at_checkpoints and hp.validation_prompt and hp.num_validation_images:
                    if accelerator.is_main_process:
                        checkpoint_samples[global_step] = render_checkpoint_samples(
                            accelerator, base, paths.model, hp, global_step, (unet, text_encoders, unet_config,
                                                                               text_config), device, weight_dtype)
                    accelerator.wait_for_everyone()
    except Interrupted:
        if global_step > 0 and not (paths.checkpoints / f"checkpoint-{global_step}" / PROGRESS_FILE).exists():
            save_checkpoint(accelerator, paths.checkpoints, global_step, hp)
        log.warning("interrupted at step %d; checkpoint written in %.1f s after SIGTERM", global_step,
                    time.monotonic() - (stop.at or time.monotonic()))
        raise
    finally:
        if progress_bar is not None:
            progress_bar.close()
    loop_seconds = time.monotonic() - loop_started
    phases["loop_done"] = _process_seconds()
    accelerator.wait_for_everyone()

    val_loss = None
    if val_cache is not None:
        val_loss = validation_loss(unet, scheduler, val_cache, text_encoders, device, weight_dtype)
        log.info(metrics.val_loss_line(val_loss))

    summary = {}
    if accelerator.is_main_process:
        paths.model.mkdir(parents=True, exist_ok=True)
        save_lora(accelerator, paths.model, unet, text_encoders, unet_config, text_config)
        phases["lora_saved"] = _process_seconds()
        samples = []
        if hp.validation_prompt and hp.num_validation_images:
            accelerator.free_memory()  # the training models are no longer needed: make room for a pipeline
            del unet, text_encoders, trained, optimizer
            gc.collect()
            render_dtype = weight_dtype if torch.cuda.is_available() else torch.float32
            samples = render_samples(base, paths.model, hp, device, render_dtype)
        summary = {
            "hyperparameters": hp.as_dict(),
            "base_model": base,
            "train_images": len(train_examples),
            "validation_images": len(val_examples),
            "max_train_steps": max_steps,
            "global_step": global_step,
            "resumed_from_step": resumed_from,
            "epochs": round(max_steps * hp.gradient_accumulation_steps / per_epoch, 3),
            "losses": losses,
            "final_loss": losses[-1]["loss"] if losses else None,
            "val_loss": val_loss,
            "baseline_val_loss": baseline_val_loss,
            "validation_losses": validation_losses,
            "dataset_version": reporting.dataset_version(paths.channel("train")),
            "loop_seconds": round(loop_seconds, 3),
            "steps_per_second": round(steps_run / loop_seconds, 4) if loop_seconds > 0 else None,
            "wall_seconds": round(_process_seconds(), 3),
            "phase_seconds": {name: round(at, 3) for name, at in phases.items()},
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "processes": world,
            "device": str(device),
            "fast_path": fast is not None,
            "cuda_graphs": fast.captured() if fast is not None else 0,
            "samples": samples,
            "checkpoint_samples": {str(step): names for step, names in checkpoint_samples.items()},
            "sample_seeds": [reporting.sample_seed(i) for i in range(len(samples))],
        }
        reporting.write(paths.model, paths.output, summary, LORA_WEIGHTS,
                        f"lr {hp.learning_rate:g}, rank {hp.rank}, {max_steps} steps")
        log.info("LoRA written to %s", paths.model / LORA_WEIGHTS)
    accelerator.end_training()
    return summary


def draw_noise(hp: Hyperparameters, scheduler, cache, pairs, generator: torch.Generator):
    """A micro-batch's sampled latents, noise and timesteps, drawn in this order from its generator."""
    latents = sample_latents(cache, pairs, generator)
    noise = torch.randn(latents.shape, generator=generator)
    if hp.noise_offset:
        noise += hp.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    return latents, noise, timesteps


def render_samples(base: str, model_dir: Path, hp: Hyperparameters, device, dtype, lora_dir: Path | None = None,
                   folder: str = "samples") -> list[str]:
    """Render validation_prompt with the saved LoRA (in lora_dir, by default model_dir), which also proves
    the file loads; the images go to model_dir/folder/."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(base, dtype=dtype).to(device)
    pipeline.load_lora_weights(str(lora_dir or model_dir), weight_name=LORA_WEIGHTS)
    pipeline.set_progress_bar_config(disable=True)
    out = model_dir / folder
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(hp.num_validation_images):
        generator = torch.Generator(device="cpu").manual_seed(reporting.sample_seed(index))  # same in every trial
        image = pipeline(hp.validation_prompt, height=hp.resolution, width=hp.resolution,
                         num_inference_steps=hp.num_validation_inference_steps, generator=generator).images[0]
        name = f"{folder}/sample-{index}.png"
        image.save(model_dir / name)
        names.append(name)
    return names


def render_checkpoint_samples(accelerator, base: str, model_dir: Path, hp: Hyperparameters, step: int, models,
                              device, dtype) -> list[str]:
    """validation_prompt rendered with the LoRA as it is at a checkpoint, into model/samples/step-<step>/:
    the same prompt and seeds as the final samples, so the images show training's progress. The LoRA
    goes through a temporary file and a pipeline of its own; the training models are left as they are."""
    import tempfile

    unet, text_encoders, unet_config, text_config = models
    with tempfile.TemporaryDirectory(prefix="lora-") as scratch:
        save_lora(accelerator, Path(scratch), unet, text_encoders, unet_config, text_config)
        render_dtype = dtype if torch.cuda.is_available() else torch.float32
        names = render_samples(base, model_dir, hp, device, render_dtype, lora_dir=Path(scratch),
                               folder=f"samples/step-{step}")
    gc.collect()
    log.info("rendered %d validation images at step %d", len(names), step)
    return names


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of `sdxl-lora train`; returns the process exit status."""
    configure_logging()
    paths = ContainerPaths.from_env()
    stop = StopFlag()
    stop.install()
    try:
        hp = parse(paths.read_hyperparameters())
        from ml.train import evaluate, launch

        if evaluate.requested(paths):  # a scoring job: an existing adapter's val_loss, nothing trained
            evaluate.score(paths, hp, stop)
            return 0

        config = launch.distributed_config(paths, hp)
        if config is not None:
            return launch.run(config, stop)
        train(paths, hp, stop)
        return 0
    except Interrupted:
        return EXIT_INTERRUPTED
    except Exception as error:  # every failure must leave output/failure behind
        reason = paths.write_failure(error)
        log.error("%s", reason)
        if not isinstance(error, JobError):
            log.exception("traceback")
        return 1


if __name__ == "__main__":
    exit_now(main())
