"""Scoring an adapter that exists already: its val_loss on another dataset version's held-out images.

A training job given a `score_adapter` channel trains nothing. It loads that LoRA (the
`pytorch_lora_weights.safetensors` a training job wrote, or that job's `model.tar.gz`, of which only
the LoRA member is read) onto the base model, holds out the train channel's validation images
exactly as training does (ml.dataset.imagefolder.split_validation: the same file-name hash and validation_split),
and computes ml.train.loss.validation_loss on them with the same fixed noise and timesteps, in the same
precision, through the same accelerate wrapping. It prints `val_loss=X` like a training job, so the
job's MetricDefinitions report it, and writes `model/score.json`.

The retraining DAG uses it to compare like with like: the adapter serving now was scored on its own
version's held-out images when it was trained; scoring it again here puts it on the new version's,
which the new adapter's val_loss was computed on. Scoring a training job's own adapter on its own
version gives that job's val_loss (tests/ml/test_evaluate.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ml.contract import metrics
from ml.contract.container import LORA_WEIGHTS, SCORE_CHANNEL, TRAIN_CHANNEL, ContainerPaths, JobError
from ml.contract.hyperparameters import Hyperparameters
from ml.contract.lora_files import LoraFileError, check_safetensors, lora_from_archive, refuse_pickle
from ml.dataset.imagefolder import load_imagefolder, split_validation
from ml.train import reporting
from ml.train.interruption import StopFlag
from ml.train.models import (
    base_model_path,
    check_precision_support,
    compute_dtype,
    load_frozen_encoders,
    load_frozen_unet,
)

log = logging.getLogger(__name__)

SCORE_FILE = "score.json"


def requested(paths: ContainerPaths) -> bool:
    """Whether this training job is a scoring job (it has the score_adapter channel)."""
    return paths.channel(SCORE_CHANNEL).exists()


def adapter_file(channel: Path) -> Path:
    """The channel's LoRA file: pytorch_lora_weights.safetensors at its top, or the one inside its only
    .tar.gz (a training job's model.tar.gz; nothing else of it is extracted). Pickles are refused unopened."""
    if not channel.is_dir():
        raise JobError(f"{SCORE_CHANNEL} channel is not a directory ({channel})")
    try:
        return _lora_in(channel)
    except LoraFileError as error:
        raise JobError(f"{SCORE_CHANNEL} channel: {error}") from None


def _lora_in(channel: Path) -> Path:
    direct = channel / LORA_WEIGHTS
    if direct.is_file():
        check_safetensors(direct, direct.name)
        return direct
    archives = sorted(channel.glob("*.tar.gz"))
    files = sorted(p.name for p in channel.iterdir())
    if len(archives) != 1:
        for name in files:
            refuse_pickle(name, "the adapter")
        raise JobError(f"{SCORE_CHANNEL} channel holds neither {LORA_WEIGHTS} nor one model.tar.gz "
                       f"(found: {', '.join(files) or 'nothing'})")
    with archives[0].open("rb") as stream:
        data = lora_from_archive(stream, archives[0].name)
    target = channel / ".extracted" / LORA_WEIGHTS
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data)
    check_safetensors(target, f"{archives[0].name}:{LORA_WEIGHTS}")
    return target


def score(paths: ContainerPaths, hp: Hyperparameters, stop: StopFlag) -> dict:
    """The adapter's val_loss on the train channel's held-out images, as training computes its own."""
    check_precision_support(hp)
    lora = adapter_file(paths.channel(SCORE_CHANNEL))
    examples = load_imagefolder(paths.channel(TRAIN_CHANNEL), hp.caption_column)
    _, val_examples = split_validation(examples, hp.validation_split)
    if not val_examples:
        raise JobError("validation_split is 0: there are no held-out images to score the adapter on")
    from accelerate import Accelerator
    from diffusers import StableDiffusionXLPipeline

    from ml.train.frozen import cache_frozen, latent_source
    from ml.train.loss import validation_loss

    base = base_model_path(paths, hp)
    try:
        state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
            str(lora.parent), weight_name=lora.name, use_safetensors=True, return_lora_metadata=True)
    except Exception as error:  # safetensors and diffusers raise several kinds
        raise JobError(f"{SCORE_CHANNEL} channel: {lora.name} is not a readable LoRA: {error}") from None
    encoders_adapted = any(key.startswith("text_encoder") for key in state)

    accelerator = Accelerator(mixed_precision=hp.mixed_precision)
    device = accelerator.device
    weight_dtype = compute_dtype(hp.mixed_precision)
    # As in training: text encoders carrying a LoRA encode each caption when scored; frozen ones
    # encode every caption once.
    as_trained = Hyperparameters({**hp.as_dict(), "train_text_encoder": encoders_adapted})
    tokenizers, text_encoders, vae, scheduler = load_frozen_encoders(base, weight_dtype, device, encoders_adapted)
    if encoders_adapted:
        for encoder, prefix in zip(text_encoders, ("text_encoder", "text_encoder_2")):
            StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix,
                                                                  metadata=metadata)
            _lora_in_fp32(encoder)
    source = latent_source(examples, as_trained, base, vae)
    val_cache = cache_frozen(val_examples, as_trained, vae, tokenizers, text_encoders, device, 1, stop,
                             center_crop=True, source=source)
    del vae
    unet = load_frozen_unet(base, weight_dtype, device)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    _lora_in_fp32(unet)
    if encoders_adapted:
        unet, *encoders = accelerator.prepare(unet, *text_encoders)
        text_encoders = tuple(encoders)
    else:
        unet = accelerator.prepare(unet)
        text_encoders = None
    val_loss = validation_loss(unet, scheduler, val_cache, text_encoders, device, weight_dtype)
    log.info("scored adapter %s on %d held-out images", lora.name, len(val_examples))
    log.info(metrics.val_loss_line(val_loss))
    result = {"val_loss": val_loss, "validation_images": len(val_examples),
              "held_out": sorted(e.path.name for e in val_examples),
              "dataset_version": reporting.dataset_version(paths.channel(TRAIN_CHANNEL)),
              "text_encoders_adapted": encoders_adapted, "mixed_precision": hp.mixed_precision,
              "resolution": hp.resolution, "validation_split": hp.validation_split}
    if accelerator.is_main_process:
        paths.model.mkdir(parents=True, exist_ok=True)
        (paths.model / SCORE_FILE).write_text(json.dumps(result, indent=2) + "\n")
    accelerator.end_training()
    return result


def _lora_in_fp32(model) -> None:
    """LoRA weights in fp32, as training keeps them (autocast casts them per call, as it did then)."""
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
            parameter.requires_grad_(False)
