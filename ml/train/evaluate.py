"""Scoring an adapter that exists already: its val_loss on another dataset version's held-out images.

A training job given a `score_adapter` channel trains nothing. It loads that LoRA onto the base model: the
`pytorch_lora_weights.safetensors` a training job wrote, that job's `model.tar.gz` (of which only the LoRA
member is read), or the channel's one `.safetensors` file, a kohya or LyCORIS file as users download them (the
formats the endpoint reads, ml.contract.lora_files.detect_format). It holds out the train channel's
validation images exactly as training does (ml.dataset.imagefolder.split_validation: the same file-name hash
and validation_split), and computes ml.train.loss.validation_loss on them with the same fixed noise and
timesteps, in the same precision, through the same accelerate wrapping. It prints `val_loss=X` like a training job, so the
job's MetricDefinitions report it, and writes `model/score.json`.

LoRA files, diffusers' and kohya's, load as training keeps its LoRA: PEFT layers in fp32 beside the frozen
weights (diffusers converts kohya's names), so the project's own kohya file scores what its diffusers file
does. LyCORIS LoHa and LoKr files (and LoCon's Tucker cores) are fused into the base weights in fp32 before
these are cast to the compute dtype, as the endpoint serves them (ml.lora.deltas).

The retraining DAG uses it to compare like with like: the adapter serving now was scored on its own
version's held-out images when it was trained; scoring it again here puts it on the new version's,
which the new adapter's val_loss was computed on. Scoring a training job's own adapter on its own
version gives that job's val_loss (tests/ml/test_evaluate.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from ml.contract import kohya_names, lora_files, metrics
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
    """The channel's LoRA file: pytorch_lora_weights.safetensors at its top, else its one .safetensors file (a
    downloaded one), else the one inside its only .tar.gz (a training job's model.tar.gz; nothing else of it is
    extracted). Pickles are refused unopened."""
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
    files = sorted(p.name for p in channel.iterdir())
    downloaded = sorted(p for p in channel.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
    if len(downloaded) > 1:
        raise JobError(f"{SCORE_CHANNEL} channel holds {len(downloaded)} .safetensors files "
                       f"({', '.join(p.name for p in downloaded)}) and no {LORA_WEIGHTS}: "
                       "which one to score is not clear")
    if downloaded:
        check_safetensors(downloaded[0], downloaded[0].name)
        return downloaded[0]
    archives = sorted(channel.glob("*.tar.gz"))
    if len(archives) != 1:
        for name in files:
            refuse_pickle(name, "the adapter")
        raise JobError(f"{SCORE_CHANNEL} channel holds neither {LORA_WEIGHTS} (or another .safetensors LoRA) nor "
                       f"one model.tar.gz (found: {', '.join(files) or 'nothing'})")
    with archives[0].open("rb") as stream:
        data = lora_from_archive(stream, archives[0].name)
    target = channel / ".extracted" / LORA_WEIGHTS
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data)
    check_safetensors(target, f"{archives[0].name}:{LORA_WEIGHTS}")
    return target


def _layout(lora: Path) -> lora_files.LoraFormat:
    try:
        return lora_files.file_format(lora, lora.name)
    except LoraFileError as error:
        raise JobError(f"{SCORE_CHANNEL} channel: {error}") from None


def _kohya_layers(state: dict, parts: dict, prefixes: tuple[str, ...], lora: Path) -> list:
    """The layers of the kohya file's modules under prefixes on parts (the models loaded so far), checked:
    another model's modules, or modules of other shapes, fail the job here, before anything is scored."""
    from ml.lora.deltas import kohya_layers, module_table

    try:
        return kohya_layers({key: tensor for key, tensor in state.items() if key.startswith(prefixes)},
                            module_table(parts), lora.name)
    except LoraFileError as error:
        raise JobError(f"{SCORE_CHANNEL} channel: {error}") from None


def score(paths: ContainerPaths, hp: Hyperparameters, stop: StopFlag) -> dict:
    """The adapter's val_loss on the train channel's held-out images, as training computes its own."""
    check_precision_support(hp)
    lora = adapter_file(paths.channel(SCORE_CHANNEL))
    examples = load_imagefolder(paths.channel(TRAIN_CHANNEL), hp.caption_column)
    _, val_examples = split_validation(examples, hp.validation_split)
    if not val_examples:
        raise JobError("validation_split is 0: there are no held-out images to score the adapter on")
    import torch
    from accelerate import Accelerator
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from ml.lora.deltas import fuse
    from ml.train.frozen import cache_frozen, latent_source
    from ml.train.loss import validation_loss

    base = base_model_path(paths, hp)
    layout = _layout(lora)
    kohya_state = None
    if layout.kind == lora_files.KOHYA:
        from safetensors.torch import load_file

        kohya_state = load_file(str(lora))  # safetensors alone: nothing is unpickled
    fused = not layout.plain_lora  # LoHa, LoKr, Tucker cores: fused into the weights
    state = alphas = metadata = None
    if not fused:
        # diffusers maps kohya's SGM block names by the UNet's config (as its pipelines' load_lora_weights does).
        unet_config = SimpleNamespace(**UNet2DConditionModel.load_config(base, subfolder="unet")) \
            if kohya_state is not None else None
        try:
            state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
                str(lora.parent), weight_name=lora.name, use_safetensors=True, return_lora_metadata=True,
                unet_config=unet_config)
        except Exception as error:  # safetensors and diffusers raise several kinds
            raise JobError(f"{SCORE_CHANNEL} channel: {lora.name} is not a readable LoRA: {error}") from None
    encoders_adapted = state is not None and any(key.startswith("text_encoder") for key in state)
    text_prefixes = tuple(f"{prefix}_" for prefix in kohya_names.TEXT_ENCODER_PREFIXES.values())
    fused_text = fused and any(key.startswith(text_prefixes) for key in kohya_state)

    accelerator = Accelerator(mixed_precision=hp.mixed_precision)
    device = accelerator.device
    weight_dtype = compute_dtype(hp.mixed_precision)
    # As in training: text encoders carrying a LoRA encode each caption when scored; frozen ones
    # encode every caption once.
    as_trained = Hyperparameters({**hp.as_dict(), "train_text_encoder": encoders_adapted})
    # Fused text encoders stay in fp32 like adapted ones, and encode every caption once like frozen ones.
    tokenizers, text_encoders, vae, scheduler = load_frozen_encoders(base, weight_dtype, device,
                                                                     encoders_adapted or fused_text)
    if kohya_state is not None:
        layers = _kohya_layers(kohya_state, dict(zip(kohya_names.TEXT_ENCODER_PREFIXES, text_encoders)),
                               text_prefixes, lora)
        if fused:
            fuse(layers)
    if encoders_adapted:
        for encoder, prefix in zip(text_encoders, ("text_encoder", "text_encoder_2")):
            StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix,
                                                                  metadata=metadata)
            _lora_in_fp32(encoder)
    source = latent_source(examples, as_trained, base, vae)
    val_cache = cache_frozen(val_examples, as_trained, vae, tokenizers, text_encoders, device, 1, stop,
                             center_crop=True, source=source)
    del vae
    unet = load_frozen_unet(base, torch.float32 if fused else weight_dtype, device)
    if kohya_state is not None:
        layers = _kohya_layers(kohya_state, {"unet": unet}, (f"{kohya_names.UNET_PREFIX}_",), lora)
        if fused:
            fuse(layers)
            unet.to(dtype=weight_dtype)
    if not fused:
        StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
        _lora_in_fp32(unet)
        _check_all_loaded(layout, lora, unet, *(text_encoders if encoders_adapted else ()))
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
              "text_encoders_adapted": encoders_adapted or fused_text, "lora_format": layout.describe(),
              "fused": fused, "mixed_precision": hp.mixed_precision,
              "resolution": hp.resolution, "validation_split": hp.validation_split}
    if accelerator.is_main_process:
        paths.model.mkdir(parents=True, exist_ok=True)
        (paths.model / SCORE_FILE).write_text(json.dumps(result, indent=2) + "\n")
    accelerator.end_training()
    return result


def _check_all_loaded(layout: lora_files.LoraFormat, lora: Path, *models) -> None:
    """Every LoRA module of the file became a PEFT layer: diffusers loads what matches and only warns about the
    rest, so a file for another model would score half-applied."""
    from peft.tuners.lora import LoraLayer

    loaded = sum(isinstance(module, LoraLayer) for model in models for module in model.modules())
    if loaded < layout.modules:
        raise JobError(f"{SCORE_CHANNEL} channel: {lora.name} is not a LoRA for this SDXL model: "
                       f"{layout.modules - loaded} of its {layout.modules} LoRA modules name nothing in it")


def _lora_in_fp32(model) -> None:
    """LoRA weights in fp32, as training keeps them (autocast casts them per call, as it did then)."""
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
            parameter.requires_grad_(False)
