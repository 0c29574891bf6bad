"""`sdxl-lora train`: LoRA fine-tuning of SDXL under the SageMaker training contract.

The loop follows diffusers' train_text_to_image_lora_sdxl.py (peft adapters on the UNet's
attention projections and optionally on both text encoders, epsilon/v targets, Min-SNR
weighting, noise offset, SDXL size conditioning) with three differences that make it
faster and resumable:

- the VAE is frozen, so every image is encoded once and its latent distribution reused
  across epochs (both mirror images when random_flip is on); frozen text encoders encode
  every caption once; both are then freed;
- data order, flips, noise and timesteps derive from (seed, position in the stream), so a
  run resumed from a checkpoint continues exactly where the interrupted one stopped;
- SIGTERM (spot interruption, StopTrainingJob) checkpoints at the next optimizer step and
  exits with status 143.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ml import latents as latents_module
from ml import metrics, reporting
from ml.buckets import bucket_sizes, nearest_bucket
from ml.contract import ContainerPaths, JobError, exit_now
from ml.data import Example, flipped, load_imagefolder, preprocess, preprocess_bucketed, split_validation
from ml.hyperparameters import Hyperparameters, parse

log = logging.getLogger("sdxl_lora.train")

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PROGRESS_FILE = "progress.json"
VALIDATION_TIMESTEPS = 5  # fixed timesteps scored per held-out image
VALIDATION_SEED = 0  # independent of the trial's seed, so every trial sees the same noise
EXIT_INTERRUPTED = 143


class Interrupted(Exception):
    """SIGTERM arrived; a checkpoint has been written when training had started."""


class StopFlag:
    """Set by SIGTERM; the loop checks it between optimizer steps."""

    def __init__(self) -> None:
        self.raised = False
        self.at: float | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.raised:
            log.warning("SIGTERM received: checkpointing at the next optimizer step and exiting")
        self.raised, self.at = True, time.monotonic()

    def check(self) -> None:
        if self.raised:
            raise Interrupted()


# ---------------------------------------------------------------------------------------
# Deterministic randomness: every draw is a function of (seed, purpose, position).


def _generator(*key: int) -> torch.Generator:
    value = 0
    for part in key:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(value)


_ORDER, _NOISE, _CROP = 1, 2, 3


# ---------------------------------------------------------------------------------------
# Model loading and caching


@dataclass
class Frozen:
    """Per-image tensors computed once with the frozen VAE (and frozen text encoders)."""

    latent_mean: list[torch.Tensor]  # per image [flips, 4, h, w] (h, w: its bucket), times the VAE's scaling factor
    latent_std: list[torch.Tensor]
    time_ids: torch.Tensor  # [n, flips, 6]
    buckets: tuple[tuple[int, int], ...]  # per image (height, width): a batch never mixes two
    prompt_embeds: torch.Tensor | None  # [n, 77, 2048] when the text encoders are frozen
    pooled_embeds: torch.Tensor | None
    input_ids: torch.Tensor | None  # [n, 2, 77] when they are trained


def _base_model_path(paths: ContainerPaths, hp: Hyperparameters) -> str:
    channel = paths.channel("base_model")
    if channel.is_dir() and (channel / "model_index.json").exists():
        return str(channel)
    if channel.is_dir() and any(channel.iterdir()):
        raise JobError("base_model channel has no model_index.json: expected a diffusers SDXL pipeline directory")
    return hp.pretrained_model_name_or_path


def _loading(base: str, load):
    try:
        return load()
    except (OSError, ValueError) as error:
        raise JobError(f"base model {base} could not be loaded: {str(error).splitlines()[0]}") from None


def load_encoders(base: str, text_dtype: torch.dtype):
    """Tokenizers, text encoders (in text_dtype), the VAE (fp32) and the noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load():
        tokenizers = (CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
                      CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2"))
        text_encoders = (CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=text_dtype),
                         CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2",
                                                                     dtype=text_dtype))
        # fp32: SDXL's VAE overflows in fp16, and it runs only once per image here.
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=torch.float32)
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        return tokenizers, text_encoders, vae, scheduler

    return _loading(base, load)


def load_unet(base: str, dtype: torch.dtype):
    """The UNet, straight into its compute dtype (half the memory of loading fp32 and casting)."""
    from diffusers import UNet2DConditionModel

    return _loading(base, lambda: UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=dtype))


def tokenize(tokenizers, captions: list[str]) -> torch.Tensor:
    """[n, 2, max_length] token ids for both tokenizers."""
    ids = [
        tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        for tok in tokenizers
    ]
    return torch.stack(ids, dim=1)


def encode_text(text_encoders, input_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: penultimate hidden states of both encoders, pooled output of the second."""
    embeds = []
    pooled = None
    for index, encoder in enumerate(text_encoders):
        out = encoder(input_ids[:, index].to(device), output_hidden_states=True, return_dict=True)
        if index == 1:
            pooled = out.text_embeds
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def _time_ids(prepared, resolution: int) -> torch.Tensor:
    return torch.tensor([*prepared.original_size, *prepared.crop_top_left, resolution, resolution], dtype=torch.float32)


@dataclass(frozen=True)
class LatentSource:
    """Where the latents come from: the training resolution's buckets, and the prepare job's cache
    when it was made with this VAE (fingerprint None: no usable cache)."""

    sizes: list[tuple[int, int]]
    fingerprint: str | None


def latent_source(examples: list[Example], hp: Hyperparameters, base: str, vae) -> LatentSource:
    from diffusers import UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
    multiple = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet_config["block_out_channels"]) - 1)
    fingerprint = None
    if any(e.latents for e in examples):
        fingerprint = latents_module.vae_fingerprint(base)
    return LatentSource(bucket_sizes(hp.resolution, multiple), fingerprint)


@torch.no_grad()
def cache_frozen(examples: list[Example], hp: Hyperparameters, vae, tokenizers, text_encoders, device, flips: int,
                 stop: StopFlag, center_crop: bool, source: LatentSource) -> Frozen:
    """Latents (from the prepare job's cache when it matches, else encoded here), time ids and, for
    frozen text encoders, the prompt embeddings of every image."""
    means, stds, time_ids, keys = [], [], [], []
    crop_generator = _generator(hp.seed, _CROP)
    reused = 0
    for example in examples:
        stop.check()
        if example.placement is None:  # a plain imagefolder: square crops at the resolution
            prepared = preprocess(example.path, hp.resolution, center_crop, crop_generator)
            versions = [prepared] + ([flipped(prepared, hp.resolution)] if flips == 2 else [])
            pixels = torch.stack([v.pixels for v in versions])
            ids = [_time_ids(v, hp.resolution) for v in versions]
            key = (hp.resolution, hp.resolution)
        else:
            key = nearest_bucket(*example.placement.bucket, source.sizes)
            cached = None
            if source.fingerprint and example.latents and key == example.placement.bucket:
                cached = latents_module.load(example.latents, source.fingerprint, key, flips)
            placement = example.placement
            if cached is None:
                image, placement = preprocess_bucketed(example, key)
                pixels = torch.stack([image, image.flip(-1)][:flips])
            versions = [placement, placement.mirrored()][:flips]
            ids = [torch.tensor(v.time_ids(), dtype=torch.float32) for v in versions]
            if cached is not None:
                means.append(cached[0])
                stds.append(cached[1])
                time_ids.append(torch.stack(ids))
                keys.append(key)
                reused += 1
                continue
        mean, std = latents_module.encode(vae, pixels.to(device))
        means.append(mean)
        stds.append(std)
        time_ids.append(torch.stack(ids))
        keys.append(key)
    if reused:
        log.info("took the latents of %d of %d images from the dataset's cache", reused, len(examples))
    input_ids = tokenize(tokenizers, [e.caption for e in examples])
    prompt_embeds = pooled = None
    if not hp.train_text_encoder:
        prompt_embeds, pooled = encode_text(text_encoders, input_ids, device)
        prompt_embeds, pooled = prompt_embeds.float().cpu(), pooled.float().cpu()
        input_ids = None
    return Frozen(means, stds, torch.stack(time_ids), tuple(keys), prompt_embeds, pooled, input_ids)


# ---------------------------------------------------------------------------------------
# The loss


def compute_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def diffusion_loss(unet, scheduler, latents, noise, timesteps, prompt_embeds, pooled, time_ids,
                   snr_gamma: float | None = None, reduce: bool = True) -> torch.Tensor:
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                return_dict=False)[0]
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
        if scheduler.config.prediction_type == "v_prediction":
            weights = weights * snr / (snr + 1)
        per_sample = per_sample * weights
    return per_sample.mean() if reduce else per_sample


# ---------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """checkpoint-N directories whose progress file was written (the last thing a save writes)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit() and (p / PROGRESS_FILE).exists()]
    return sorted(found, key=_checkpoint_step)


# Hyperparameters that change the model or its optimizer state: a checkpoint written with
# other values cannot be resumed.
_RESUME_KEYS = ("rank", "lora_alpha", "train_text_encoder", "use_8bit_adam", "seed", "train_batch_size",
                "gradient_accumulation_steps", "resolution")


def check_resumable(checkpoint: Path, hp: Hyperparameters) -> dict:
    progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
    saved = progress.get("hyperparameters", {})
    for key in _RESUME_KEYS:
        if key in saved and saved[key] != hp.values[key]:
            raise JobError(f"checkpoint {checkpoint.name} was written with {key}={saved[key]!r}, this job has "
                           f"{key}={hp.values[key]!r}: clear the checkpoint location or use the same value")
    return progress


# ---------------------------------------------------------------------------------------
# The job


@dataclass
class Models:
    unet: torch.nn.Module
    text_encoders: tuple | None  # only when trained


def _lora_state(model) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def _check_device_support(hp: Hyperparameters) -> None:
    cuda = torch.cuda.is_available()
    if hp.mixed_precision == "fp16" and not cuda:
        raise JobError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on a CPU")
    if hp.use_8bit_adam:
        if not cuda:
            raise JobError("use_8bit_adam needs a CUDA GPU (bitsandbytes 8-bit Adam has no CPU kernels)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise JobError("use_8bit_adam needs bitsandbytes installed in the training image") from None


@functools.lru_cache(maxsize=2)  # the stream reads one epoch at a time
def _epoch_batches(seed: int, random_flip: bool, epoch: int, groups: tuple, batch_size: int, rank: int,
                   world: int) -> list[list[tuple[int, int]]]:
    """This process's micro-batches of (image, flip) pairs for an epoch: images shuffled, grouped by
    bucket in that order, cut into batches, and the batches shuffled, so a batch never mixes buckets
    and every image comes once per epoch. Processes take every world-th batch (padded to equal counts)."""
    generator = _generator(seed, _ORDER, epoch)
    count = len(groups)
    order = torch.randperm(count, generator=generator).tolist()
    flips = (torch.rand(count, generator=generator) < 0.5).long().tolist() if random_flip else [0] * count
    by_bucket: dict = {}
    for image in order:
        by_bucket.setdefault(groups[image], []).append((image, flips[image]))
    batches = [members[start:start + batch_size] for members in by_bucket.values()
               for start in range(0, len(members), batch_size)]
    if len(by_bucket) > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    if world > 1:
        batches = (batches + batches[: (-len(batches)) % world])[rank::world]
    return batches


def micro_batch(hp: Hyperparameters, index: int, groups: tuple, rank: int, world: int) -> list[tuple[int, int]]:
    """(image, flip) pairs of the index-th micro-batch of the endless stream of epochs; groups holds
    each image's bucket."""
    per_epoch = micro_batches_per_epoch(hp, groups, world)
    epoch, position = divmod(index, per_epoch)
    return _epoch_batches(hp.seed, hp.random_flip, epoch, groups, hp.train_batch_size, rank, world)[position]


def micro_batches_per_epoch(hp: Hyperparameters, groups: tuple, world: int) -> int:
    sizes = Counter(groups).values()
    return math.ceil(sum(math.ceil(size / hp.train_batch_size) for size in sizes) / world)


def total_steps(hp: Hyperparameters, groups: tuple, world: int) -> int:
    if hp.max_train_steps is not None:
        return hp.max_train_steps
    return math.ceil(hp.num_train_epochs * micro_batches_per_epoch(hp, groups, world) / hp.gradient_accumulation_steps)


def conditioning(frozen: Frozen, images: list[int], text_encoders, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and pooled embeddings of some images: cached, or encoded by the trained encoders."""
    if frozen.prompt_embeds is not None:
        return frozen.prompt_embeds[images].to(device), frozen.pooled_embeds[images].to(device)
    return encode_text(text_encoders, frozen.input_ids[images], device)


def sample_latents(frozen: Frozen, pairs: list[tuple[int, int]], generator: torch.Generator) -> torch.Tensor:
    mean = torch.stack([frozen.latent_mean[i][f] for i, f in pairs])
    std = torch.stack([frozen.latent_std[i][f] for i, f in pairs])
    return mean + std * torch.randn(mean.shape, generator=generator)


def validation_loss(unet, scheduler, frozen: Frozen, text_encoders, device, dtype) -> float:
    """Mean epsilon MSE on held-out images at fixed timesteps with fixed noise.

    Seeded independently of the trial, so every trial and the base model are scored on
    exactly the same latents, noise and timesteps.
    """
    count = len(frozen.latent_mean)
    k = VALIDATION_TIMESTEPS
    train_steps = scheduler.config.num_train_timesteps
    timesteps = torch.tensor([int((j + 0.5) * train_steps / k) for j in range(k)], device=device)
    total = 0.0
    was_training = unet.training
    unet.eval()
    with torch.no_grad():
        for i in range(count):
            generator = _generator(VALIDATION_SEED, i)
            latents = sample_latents(frozen, [(i, 0)], generator).repeat(k, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=generator)
            embeds, pooled = conditioning(frozen, [i], text_encoders, device)
            losses = diffusion_loss(unet, scheduler, latents.to(device, dtype), noise.to(device, dtype), timesteps,
                                    embeds.repeat(k, 1, 1).to(dtype), pooled.repeat(k, 1).to(dtype),
                                    frozen.time_ids[i, :1].repeat(k, 1).to(device, dtype))
            total += float(losses)
    unet.train(was_training)
    return total / count


def _check_stop_everywhere(stop: StopFlag, accelerator) -> None:
    """Ranks agree on stopping, so all of them reach the checkpoint's collective calls together."""
    if accelerator.num_processes > 1:
        flag = torch.tensor([int(stop.raised)], device=accelerator.device)
        if int(accelerator.reduce(flag, reduction="sum")) > 0:
            stop.raised = True
    stop.check()


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
    _check_device_support(hp)
    examples = load_imagefolder(paths.channel("train"), hp.caption_column)
    train_examples, val_examples = split_validation(examples, hp.validation_split)
    base = _base_model_path(paths, hp)
    interactive = _configure_progress_output()

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    # The torch stack is imported: move its millions of long-lived objects out of the
    # collector's sight, so no collection (automatic ones in the loop included) walks them again.
    gc.freeze()

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

    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": hp.learning_rate}]
    for encoder in text_encoders or ():
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": hp.text_encoder_lr})
    if hp.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups)
    else:
        # fused: one kernel for all LoRA tensors instead of a loop of small ops per tensor
        optimizer = torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"))
    max_steps = total_steps(hp, train_cache.buckets, world)
    lr_scheduler = get_scheduler(hp.lr_scheduler, optimizer=optimizer, num_warmup_steps=hp.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained, optimizer, lr_scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    unet = trained[0]
    text_encoders = tuple(trained[1:]) or None

    _register_lora_hooks(accelerator, hp, unet_config, text_config)
    global_step = 0
    resumed_from = None
    if resume:
        checkpoint = resume[-1]
        progress = check_resumable(checkpoint, hp)
        accelerator.load_state(str(checkpoint))
        global_step = resumed_from = progress["global_step"]
        log.info("resumed from %s at step %d", checkpoint.name, global_step)

    per_epoch = micro_batches_per_epoch(hp, train_cache.buckets, world)
    log.info("training: %d images, %d micro-batches per epoch, %d optimizer steps, %d process(es) on %s",
             len(train_examples), per_epoch, max_steps, world, device)
    losses: list[dict] = []
    validation_losses: list[dict] = []  # measured at every checkpoint: the validation curve
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
            _check_stop_everywhere(stop, accelerator)
            step_loss = 0.0
            for micro in range(hp.gradient_accumulation_steps):
                index = global_step * hp.gradient_accumulation_steps + micro
                pairs = micro_batch(hp, index, train_cache.buckets, rank, world)
                generator = _generator(hp.seed, _NOISE, index, rank)
                with accelerator.accumulate(*trained):
                    latents = sample_latents(train_cache, pairs, generator)
                    noise = torch.randn(latents.shape, generator=generator)
                    if hp.noise_offset:
                        noise += hp.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                               generator=generator)
                    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                              generator=generator)
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
                        accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], hp.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            global_step += 1
            steps_run += 1
            lr = lr_scheduler.get_last_lr()[0]
            if progress_bar is not None:
                progress_bar.update(1)
                progress_bar.set_postfix(loss=f"{step_loss:.4f}")
            if global_step % hp.logging_steps == 0 or global_step == max_steps:
                losses.append({"step": global_step, "loss": step_loss, "lr": lr})
                if accelerator.is_main_process:
                    log.info(metrics.step_line(global_step, step_loss, lr))
            if global_step % hp.checkpointing_steps == 0 and global_step < max_steps:
                save_checkpoint(accelerator, paths.checkpoints, global_step, hp)
                if val_cache is not None:
                    point = validation_loss(unet, scheduler, val_cache, text_encoders, device, weight_dtype)
                    validation_losses.append({"step": global_step, "val_loss": point})
                    log.info("validation loss %.6f at step %d", point, global_step)
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
    accelerator.wait_for_everyone()

    val_loss = None
    if val_cache is not None:
        val_loss = validation_loss(unet, scheduler, val_cache, text_encoders, device, weight_dtype)
        log.info(metrics.val_loss_line(val_loss))

    summary = {}
    if accelerator.is_main_process:
        paths.model.mkdir(parents=True, exist_ok=True)
        save_lora(accelerator, paths.model, unet, text_encoders, unet_config, text_config)
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
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "processes": world,
            "device": str(device),
            "samples": samples,
            "sample_seeds": [reporting.sample_seed(i) for i in range(len(samples))],
        }
        reporting.write(paths.model, paths.output, summary, LORA_WEIGHTS,
                        f"lr {hp.learning_rate:g}, rank {hp.rank}, {max_steps} steps")
        log.info("LoRA written to %s", paths.model / LORA_WEIGHTS)
    accelerator.end_training()
    return summary


def _register_lora_hooks(accelerator, hp: Hyperparameters, unet_config, text_config) -> None:
    """Checkpoints hold the LoRA weights only, never the frozen base model."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                state = {k: v.contiguous() for k, v in get_peft_model_state_dict(accelerator.unwrap_model(model)).items()}
                save_file(state, os.path.join(output_dir, f"lora_model_{index}.safetensors"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        index = 0
        while models:  # emptying the list keeps accelerate from loading full model files
            model = models.pop(0)
            state = load_file(os.path.join(input_dir, f"lora_model_{index}.safetensors"))
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), state)
            if getattr(result, "unexpected_keys", None):
                raise JobError(f"checkpoint in {input_dir} does not match the model: {result.unexpected_keys[:3]}")
            index += 1

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, root: Path, step: int, hp: Hyperparameters) -> Path:
    """Write checkpoint-<step> atomically (a temporary name, renamed when complete), then prune."""
    final = root / f"checkpoint-{step}"
    staging = root / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        (staging / PROGRESS_FILE).write_text(json.dumps({"global_step": step, "hyperparameters": hp.as_dict()}))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in complete_checkpoints(root)[: -hp.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written: %s", final)
    accelerator.wait_for_everyone()
    return final


def save_lora(accelerator, model_dir: Path, unet, text_encoders, unet_config, text_config) -> None:
    from diffusers import StableDiffusionXLPipeline

    layers = {"unet_lora_layers": _lora_state(accelerator.unwrap_model(unet)),
              "unet_lora_adapter_metadata": unet_config.to_dict()}
    if text_encoders is not None:
        for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
            layers[f"{name}_lora_layers"] = _lora_state(accelerator.unwrap_model(encoder))
            layers[f"{name}_lora_adapter_metadata"] = text_config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(model_dir, weight_name=LORA_WEIGHTS, safe_serialization=True, **layers)


def render_samples(base: str, model_dir: Path, hp: Hyperparameters, device, dtype) -> list[str]:
    """Render validation_prompt with the saved LoRA, which also proves the file loads."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(base, dtype=dtype).to(device)
    pipeline.load_lora_weights(str(model_dir), weight_name=LORA_WEIGHTS)
    pipeline.set_progress_bar_config(disable=True)
    out = model_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(hp.num_validation_images):
        generator = torch.Generator(device="cpu").manual_seed(reporting.sample_seed(index))  # same in every trial
        image = pipeline(hp.validation_prompt, height=hp.resolution, width=hp.resolution,
                         num_inference_steps=hp.num_validation_inference_steps, generator=generator).images[0]
        name = f"samples/sample-{index}.png"
        image.save(model_dir / name)
        names.append(name)
    return names


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    for noisy in ("httpx", "urllib3", "accelerate", "diffusers", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of `sdxl-lora train`; returns the process exit status."""
    configure_logging()
    paths = ContainerPaths.from_env()
    stop = StopFlag()
    stop.install()
    try:
        hp = parse(paths.read_hyperparameters())
        from ml import launch

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
