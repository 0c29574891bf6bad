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

This module is the job, shaped as diffusers' script: `parse_args()` and `main(args)`, `set_up()` builds
what the loop needs, `train()` is the loop over one step interface (ml/train/steps.py, which the fast
path and accelerate's step both implement), and `finish()` writes the LoRA, its samples and the summary.
The loss is ml/train/loss.py; the base model's parts and the LoRA file are ml/train/models.py, the LoRA
in kohya's format (ComfyUI, Forge, Automatic1111) ml/train/kohya_format.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ml.contract import metrics
from ml.contract.container import (
    KOHYA_LORA_WEIGHTS,
    LORA_WEIGHTS,
    TRAIN_CHANNEL,
    ContainerPaths,
    JobError,
    configure_logging,
    exit_now,
)
from ml.contract.hyperparameters import Hyperparameters, parse
from ml.contract.model_files import pipeline_options
from ml.dataset.imagefolder import Example, load_imagefolder, split_validation
from ml.train import kohya_format, reporting, seeds
from ml.train.checkpoints import (
    PROGRESS_FILE,
    check_resumable,
    complete_checkpoints,
    register_lora_hooks,
    save_checkpoint,
)
from ml.train.ema import LoraEMA
from ml.train.fast_step import FastStep, fast_path_blockers, make_optimizer
from ml.train.frozen import Frozen, cache_frozen, caption_variants, latent_source
from ml.train.interruption import EXIT_INTERRUPTED, Interrupted, StopFlag, check_stop_everywhere
from ml.train.loss import validation_loss
from ml.train.models import (
    RAW_LORA_WEIGHTS,
    TEXT_LORA_TARGETS,
    UNET_LORA_TARGETS,
    base_model_path,
    check_device_support,
    compute_dtype,
    load_frozen_encoders,
    load_frozen_unet,
    save_lora,
)
from ml.train.steps import AcceleratedStep, FastPathStep, TrainingStep, timestep_weights
from ml.train.stream import micro_batch, micro_batches_per_epoch, total_steps

log = logging.getLogger(__name__)


PRODIGY_LR = 1.0  # Prodigy estimates its step size; its authors' lr multiplies the estimate and stays 1


def build_optimizer(unet, text_encoders, hp, device: torch.device, fast: bool) -> torch.optim.Optimizer:
    """The `optimizer` over the trained LoRA parameters: the UNet's at `learning_rate`, each text encoder's at
    `text_encoder_lr` (Prodigy: PRODIGY_LR for all). The constructor's own `lr` is the UNet's too (as in diffusers'
    script): diffusers' polynomial schedule reads its starting rate from `optimizer.defaults["lr"]`."""
    unet_lr, text_lr = hp.learning_rate, hp.text_encoder_lr
    if hp.optimizer == "prodigy":
        unet_lr = text_lr = PRODIGY_LR
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": unet_lr}]
    for encoder in text_encoders or ():
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": text_lr})
    if hp.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=unet_lr)
    if hp.optimizer == "prodigy":
        from prodigyopt import Prodigy

        log.info("optimizer prodigy: it sets its own step size (lr %g); learning_rate is not used", PRODIGY_LR)
        return Prodigy(groups, lr=unet_lr)
    if hp.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (the schedule's), not Adafactor's own relative step and parameter scaling.
        return Adafactor(groups, lr=unet_lr, relative_step=False, scale_parameter=False, warmup_init=False)
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


@dataclass
class Training:
    """What set_up() builds for the loop: the data, the models that train, their step and schedule."""

    paths: ContainerPaths
    hp: Hyperparameters
    accelerator: object
    base: str  # where the base model was loaded from
    train_examples: list[Example]
    val_examples: list[Example]
    train_cache: Frozen
    val_cache: Frozen | None
    noise_scheduler: object
    trained: list  # the prepared UNet, then the text encoders when they train
    lora_configs: tuple  # (UNet's, text encoders') peft LoraConfig
    optimizer: object
    step: TrainingStep
    weight_dtype: torch.dtype
    max_steps: int
    per_epoch: int  # micro-batches per epoch
    resumed_from: int | None
    baseline_val_loss: float | None
    phases: dict[str, float]  # seconds since the process started, at the end of each phase
    interactive: bool
    ema: LoraEMA | None = None  # with ema_decay: the moving average that is saved, scored and rendered
    thread_choice: dict | None = None  # the step's CPU thread choice, kept when the step is dropped

    def deployed(self):
        """A block in which the trained models hold the adapter that is saved: the moving average with ema_decay."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    @property
    def unet(self):
        return self.trained[0]

    @property
    def text_encoders(self):
        return tuple(self.trained[1:]) or None

    def validation_loss(self) -> float:
        """Of the adapter that is saved (the moving average with ema_decay)."""
        with self.deployed():
            return validation_loss(self.unet, self.noise_scheduler, self.val_cache, self.text_encoders,
                                   self.accelerator.device, self.weight_dtype)

    def save_lora(self, folder: Path) -> None:
        """The adapter that is saved (with ema_decay, the moving average)."""
        with self.deployed():
            save_lora(self.accelerator, folder, self.unet, self.text_encoders, *self.lora_configs)

    def save_raw_lora(self, folder: Path) -> None:
        """With ema_decay, the weights as trained, beside the average (RAW_LORA_WEIGHTS)."""
        save_lora(self.accelerator, folder, self.unet, self.text_encoders, *self.lora_configs,
                  weight_name=RAW_LORA_WEIGHTS)

    def save_kohya_lora(self, path: Path, steps: int, title: str) -> None:
        """The LoRA again, in kohya's format with sd-scripts' metadata (ml/train/kohya_format.py)."""
        unwrap = self.accelerator.unwrap_model
        encoders = tuple(unwrap(encoder) for encoder in self.text_encoders or ()) or None
        with self.deployed():
            state = kohya_format.kohya_state(unwrap(self.unet), encoders)
        header = kohya_format.metadata(state, self.hp, reporting.base_model_name(self.base, self.hp),
                                       len(self.train_examples), steps, title)
        kohya_format.save(path, state, header)

    def free_models(self) -> None:
        """Drops the training models, optimizer and step, making room for a pipeline."""
        self.accelerator.free_memory()
        if self.step is not None:
            self.thread_choice = self.step.thread_choice
        self.trained, self.optimizer, self.step = [], None, None
        gc.collect()


@dataclass
class History:
    """What the loop records: where it is, the logged losses, the checkpoints' validation losses and images."""

    global_step: int
    steps_run: int = 0
    losses: list[dict] = field(default_factory=list)
    validation_losses: list[dict] = field(default_factory=list)  # measured at every checkpoint: the curve
    checkpoint_samples: dict[int, list[str]] = field(default_factory=dict)  # with validation_images_at_checkpoints
    loop_seconds: float = 0.0
    fast_path: bool = False  # the step that ran: the fast path's (and its CUDA graphs) or accelerate's
    cuda_graphs: int = 0


def train(paths: ContainerPaths, hp: Hyperparameters, stop: StopFlag) -> dict:
    """The job: set up, then one optimizer step at a time until max_steps, checkpointing (and measuring the
    validation loss) every checkpointing_steps; finish() writes the results. Returns the summary."""
    training = set_up(paths, hp, stop)
    accelerator, step, buckets = training.accelerator, training.step, training.train_cache.buckets
    rank, world = accelerator.process_index, accelerator.num_processes
    history = History(global_step=training.resumed_from or 0)
    progress_bar = _progress_bar(training, history.global_step)
    loop_started = time.monotonic()
    try:
        while history.global_step < training.max_steps:
            check_stop_everywhere(stop, accelerator)
            for micro in range(hp.gradient_accumulation_steps):
                index = history.global_step * hp.gradient_accumulation_steps + micro
                step.micro_step(micro_batch(hp, index, buckets, rank, world),
                                seeds.generator(hp.seed, seeds.NOISE, index, rank), index // training.per_epoch)
            step.update()
            if training.ema is not None:
                training.ema.update()
            history.global_step += 1
            history.steps_run += 1
            if progress_bar is not None:
                progress_bar.update(1)
            if history.global_step % hp.logging_steps == 0 or history.global_step == training.max_steps:
                _record_loss(training, history, progress_bar)
            if history.global_step % hp.checkpointing_steps == 0 and history.global_step < training.max_steps:
                _checkpoint(training, history)
    except Interrupted:
        _checkpoint_on_interruption(training, history.global_step, stop)
        raise
    finally:
        if progress_bar is not None:
            progress_bar.close()
    history.loop_seconds = time.monotonic() - loop_started
    history.fast_path, history.cuda_graphs = step.fast_path, step.graphs_captured()
    del step  # finish() frees the training models before rendering samples: no reference may outlive them
    training.phases["loop_done"] = _process_seconds()
    accelerator.wait_for_everyone()
    summary = finish(training, history)
    accelerator.end_training()
    return summary


def set_up(paths: ContainerPaths, hp: Hyperparameters, stop: StopFlag) -> Training:
    """Data, cached frozen inputs, the UNet (and text encoders) with LoRA adapters, optimizer, schedule,
    the checkpoint resumed, and the step: everything the loop needs."""
    check_device_support(hp)
    examples = load_imagefolder(paths.channel(TRAIN_CHANNEL), hp.caption_column)
    train_examples, val_examples = split_validation(examples, hp.validation_split)
    base = base_model_path(paths, hp)
    interactive = _configure_progress_output()

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    # The torch stack is imported: move its millions of long-lived objects out of the
    # collector's sight, so no collection (automatic ones in the loop included) walks them again.
    gc.freeze()
    phases = {"imported": _process_seconds()}

    accelerator = Accelerator(gradient_accumulation_steps=hp.gradient_accumulation_steps,
                              mixed_precision=hp.mixed_precision)
    world, device = accelerator.num_processes, accelerator.device
    if not accelerator.is_main_process:  # one copy of every log line, from the main process
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(hp.seed)
    weight_dtype = compute_dtype(hp.mixed_precision)

    # Encoders first: they cache what they compute and are freed before the UNet is loaded,
    # which keeps the peak memory to the larger of the two rather than their sum.
    tokenizers, text_encoders, vae, noise_scheduler = load_frozen_encoders(base, weight_dtype, device,
                                                                           hp.train_text_encoder)
    phases["encoders_loaded"] = _process_seconds()
    timestep_weights(hp, noise_scheduler.config.num_train_timesteps)  # a range beyond the scheduler fails now
    log.info("caching latents of %d training and %d validation images", len(train_examples), len(val_examples))
    source = latent_source(examples, hp, base, vae)
    train_cache = cache_frozen(train_examples, hp, vae, tokenizers, text_encoders, device,
                               2 if hp.random_flip else 1, stop, hp.center_crop, source)
    # Held-out images are always center-cropped and never flipped, so every trial scores the same pixels.
    val_cache = cache_frozen(val_examples, hp, vae, tokenizers, text_encoders, device, 1, stop,
                             center_crop=True, source=source) if val_examples else None
    train_cache.variants = caption_variants(train_examples, hp, tokenizers, text_encoders, device)
    del vae
    if not hp.train_text_encoder:
        del text_encoders
        text_encoders = None
    gc.collect()
    phases["latents_cached"] = _process_seconds()

    trained, unet_config, text_config = _models_with_lora(base, hp, weight_dtype, device, text_encoders)
    unet = trained[0]

    baseline_val_loss = None
    resume = complete_checkpoints(paths.checkpoints)
    if val_cache is not None and not resume:
        baseline_val_loss = validation_loss(unet, noise_scheduler, val_cache, text_encoders, device, weight_dtype)
        log.info(metrics.val_loss_line(baseline_val_loss, baseline=True))

    fast_path_off = fast_path_blockers(hp, world)
    optimizer = build_optimizer(unet, text_encoders, hp, device, fast=not fast_path_off)
    clipped = [p for group in optimizer.param_groups for p in group["params"]]
    max_steps = total_steps(hp, train_cache.buckets, world)
    lr_scheduler = get_scheduler(hp.lr_scheduler, optimizer=optimizer, num_warmup_steps=hp.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    *trained, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)

    ema = LoraEMA(clipped, hp.ema_decay) if hp.ema_decay else None
    register_lora_hooks(accelerator, hp, unet_config, text_config, ema)
    resumed_from = None
    if resume:
        checkpoint = resume[-1]
        progress = check_resumable(checkpoint, hp)
        accelerator.load_state(str(checkpoint))
        resumed_from = progress["global_step"]
        log.info("resumed from %s at step %d", checkpoint.name, resumed_from)

    # Built after resuming: the fast path's step captures the loaded optimizer state and loss scale.
    step = _make_step(accelerator, hp, noise_scheduler, train_cache, trained, clipped, optimizer, lr_scheduler,
                      weight_dtype, fast_path_off)

    per_epoch = micro_batches_per_epoch(hp, train_cache.buckets, world)
    log.info("training: %d images, %d micro-batches per epoch, %d optimizer steps, %d process(es) on %s",
             len(train_examples), per_epoch, max_steps, world, device)
    for model in trained:
        model.train()
    phases["model_ready"] = _process_seconds()  # UNet loaded with its LoRA, optimizer built, checkpoint resumed
    return Training(paths, hp, accelerator, base, train_examples, val_examples, train_cache, val_cache,
                    noise_scheduler, trained, (unet_config, text_config), optimizer, step, weight_dtype, max_steps,
                    per_epoch, resumed_from, baseline_val_loss, phases, interactive, ema)


def _models_with_lora(base: str, hp: Hyperparameters, weight_dtype: torch.dtype, device, text_encoders):
    """The UNet (and the text encoders when they train) with fresh LoRA adapters, the LoRA in fp32;
    returns (models that train, the UNet's LoraConfig, the text encoders')."""
    from peft import LoraConfig

    unet = load_frozen_unet(base, weight_dtype, device)
    if hp.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401

            unet.enable_xformers_memory_efficient_attention()
        except ImportError:
            log.warning("xformers is not installed: using PyTorch scaled-dot-product attention")
    unet_config = LoraConfig(r=hp.rank, lora_alpha=hp.lora_alpha, init_lora_weights="gaussian",
                             target_modules=UNET_LORA_TARGETS, use_dora=hp.use_dora)
    unet.add_adapter(unet_config)
    text_config = LoraConfig(r=hp.rank, lora_alpha=hp.lora_alpha, init_lora_weights="gaussian",
                             target_modules=TEXT_LORA_TARGETS, use_dora=hp.use_dora)
    for encoder in text_encoders or ():
        encoder.add_adapter(text_config)
    trained = [unet, *(text_encoders or ())]
    if hp.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in text_encoders or ():
            encoder.gradient_checkpointing_enable()
    for model in trained:  # LoRA parameters train in fp32 whatever the compute precision
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return trained, unet_config, text_config


def _make_step(accelerator, hp: Hyperparameters, noise_scheduler, train_cache: Frozen, trained: list, clipped: list,
               optimizer, lr_scheduler, weight_dtype: torch.dtype, fast_path_off: list[str]) -> TrainingStep:
    """The fast path's step unless something it does not cover is asked for (fast_path_off), else accelerate's."""
    if fast_path_off:
        log.info("training step: accelerate loop (fast path off: %s)", ", ".join(fast_path_off))
        return AcceleratedStep(accelerator, hp, noise_scheduler, train_cache, trained, clipped, optimizer,
                               lr_scheduler, weight_dtype)
    fast = FastStep(trained[0], optimizer.optimizer, noise_scheduler, weight_dtype, accelerator.device,
                    hp.gradient_accumulation_steps, hp.max_grad_norm, hp.snr_gamma, scaler=accelerator.scaler)
    log.info("training step: fast path (LoRA computed in %s, fp32 master weights%s)",
             str(weight_dtype).removeprefix("torch."), ", CUDA graphs per input shape" if fast.graphs else "")
    return FastPathStep(fast, hp, noise_scheduler, train_cache, lr_scheduler, accelerator.scaler)


def _progress_bar(training: Training, initial: int):
    if not (training.interactive and training.accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=training.max_steps, initial=initial, desc="steps")


def _record_loss(training: Training, history: History, progress_bar) -> None:
    """A logged step: its loss and learning rate into the history and the log (`step=N loss=X lr=Y`)."""
    loss, lr = training.step.loss(), training.step.learning_rate()
    if progress_bar is not None:
        progress_bar.set_postfix(loss=f"{loss:.4f}")
    history.losses.append({"step": history.global_step, "loss": loss, "lr": lr})
    if training.accelerator.is_main_process:
        log.info(metrics.step_line(history.global_step, loss, lr))


def _checkpoint(training: Training, history: History) -> None:
    """A resumable checkpoint, then the validation loss and, when asked, validation images at this step."""
    hp, accelerator, at = training.hp, training.accelerator, history.global_step
    save_checkpoint(accelerator, training.paths.checkpoints, at, hp)
    if training.val_cache is not None:
        point = training.validation_loss()
        history.validation_losses.append({"step": at, "val_loss": point})
        log.info("validation loss %.6f at step %d", point, at)
    if hp.validation_images_at_checkpoints and hp.validation_prompt and hp.num_validation_images:
        if accelerator.is_main_process:
            history.checkpoint_samples[at] = render_checkpoint_samples(training, at)
        accelerator.wait_for_everyone()


def _checkpoint_on_interruption(training: Training, at: int, stop: StopFlag) -> None:
    """SIGTERM: the last finished step checkpointed (unless it just was), within SageMaker's 120 s."""
    if at > 0 and not (training.paths.checkpoints / f"checkpoint-{at}" / PROGRESS_FILE).exists():
        save_checkpoint(training.accelerator, training.paths.checkpoints, at, training.hp)
    log.warning("interrupted at step %d; checkpoint written in %.1f s after SIGTERM", at,
                time.monotonic() - (stop.at or time.monotonic()))


def finish(training: Training, history: History) -> dict:
    """The final validation loss (every process), then on the main process the LoRA, its samples, the summary,
    the model card and the report. Returns the summary (empty on the other processes)."""
    paths, hp = training.paths, training.hp
    val_loss = None
    if training.val_cache is not None:
        val_loss = training.validation_loss()
        log.info(metrics.val_loss_line(val_loss))
    if not training.accelerator.is_main_process:
        return {}
    paths.model.mkdir(parents=True, exist_ok=True)
    title = f"lr {hp.learning_rate:g}, rank {hp.rank}, {training.max_steps} steps"
    training.save_lora(paths.model)
    if training.ema is not None:
        training.save_raw_lora(paths.model)
    training.save_kohya_lora(paths.model / KOHYA_LORA_WEIGHTS, history.global_step, title)
    training.phases["lora_saved"] = _process_seconds()
    samples = []
    if hp.validation_prompt and hp.num_validation_images:
        training.free_models()
        samples = render_samples(training.base, paths.model, hp, training.accelerator.device, training.weight_dtype)
    summary = build_summary(training, history, val_loss, samples)
    reporting.write(paths.model, paths.output, summary, LORA_WEIGHTS, title)
    log.info("LoRA written to %s (diffusers) and %s (kohya)", paths.model / LORA_WEIGHTS,
             paths.model / KOHYA_LORA_WEIGHTS)
    return summary


def build_summary(training: Training, history: History, val_loss: float | None, samples: list[str]) -> dict:
    """training_summary.json: what ran, how it went and how long each phase took."""
    hp, losses, loop_seconds = training.hp, history.losses, history.loop_seconds
    return {
        "hyperparameters": hp.as_dict(),
        "base_model": reporting.base_model_name(training.base, hp),
        "train_images": len(training.train_examples),
        "validation_images": len(training.val_examples),
        "max_train_steps": training.max_steps,
        "global_step": history.global_step,
        "resumed_from_step": training.resumed_from,
        "epochs": round(training.max_steps * hp.gradient_accumulation_steps / training.per_epoch, 3),
        "losses": losses,
        "final_loss": losses[-1]["loss"] if losses else None,
        "val_loss": val_loss,
        "baseline_val_loss": training.baseline_val_loss,
        "validation_losses": history.validation_losses,
        "dataset_version": reporting.dataset_version(training.paths.channel(TRAIN_CHANNEL)),
        "loop_seconds": round(loop_seconds, 3),
        "steps_per_second": round(history.steps_run / loop_seconds, 4) if loop_seconds > 0 else None,
        "wall_seconds": round(_process_seconds(), 3),
        "phase_seconds": {name: round(at, 3) for name, at in training.phases.items()},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "cpu_threads": training.step.thread_choice if training.step is not None else training.thread_choice,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "processes": training.accelerator.num_processes,
        "device": str(training.accelerator.device),
        "fast_path": history.fast_path,
        "cuda_graphs": history.cuda_graphs,
        "samples": samples,
        "checkpoint_samples": {str(at): names for at, names in history.checkpoint_samples.items()},
        "sample_seeds": [reporting.sample_seed(i) for i in range(len(samples))],
    }


def render_samples(base: str, model_dir: Path, hp: Hyperparameters, device, weight_dtype: torch.dtype,
                   lora_dir: Path | None = None, folder: str = "samples") -> list[str]:
    """Render validation_prompt with the saved LoRA (in lora_dir, by default model_dir), which also proves
    the file loads; the images go to model_dir/folder/."""
    from diffusers import StableDiffusionXLPipeline

    # The compute dtype on a GPU; fp32 on a CPU, where half-precision inference is slow or unsupported.
    dtype = weight_dtype if torch.cuda.is_available() else torch.float32
    pipeline = StableDiffusionXLPipeline.from_pretrained(base, dtype=dtype, **pipeline_options(base)).to(device)
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


def render_checkpoint_samples(training: Training, at: int) -> list[str]:
    """validation_prompt rendered with the LoRA as it is at a checkpoint, into model/samples/step-<at>/:
    the same prompt and seeds as the final samples, so the images show training's progress. The LoRA
    goes through a temporary file and a pipeline of its own; the training models are left as they are."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lora-") as scratch:
        training.save_lora(Path(scratch))
        names = render_samples(training.base, training.paths.model, training.hp, training.accelerator.device,
                               training.weight_dtype, lora_dir=Path(scratch), folder=f"samples/step-{at}")
    gc.collect()
    log.info("rendered %d validation images at step %d", len(names), at)
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's options. Its hyperparameters come from the container (input/config/hyperparameters.json)."""
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="root of the SageMaker directory layout (default: $SAGEMAKER_BASE_DIR, else /opt/ml)")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """The job's arguments from input_args (by default the command line), as diffusers' scripts parse theirs."""
    parser = argparse.ArgumentParser(prog="python -m ml.train.job", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(input_args)


def main(args: argparse.Namespace | None = None) -> int:
    """Entrypoint of `sdxl-lora train` (which passes no arguments: the container is the job's input);
    returns the process exit status."""
    args = args if args is not None else parse_args([])
    configure_logging()
    paths = ContainerPaths(args.base_dir) if args.base_dir else ContainerPaths.from_env()
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
            return launch.run(config, stop, paths)
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
    exit_now(main(parse_args()))
