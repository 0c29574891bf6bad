"""Resumable checkpoints: LoRA weights (never the frozen base), optimizer, scheduler and RNG states,
written atomically every checkpointing_steps and resumed from the newest complete one."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ml.contract.container import JobError
from ml.contract.hyperparameters import Hyperparameters

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _complete(checkpoint: Path) -> bool:
    """Its progress file was written (the last thing a save writes) and every file it lists is there, whole. The
    list matters where checkpoints arrive file by file: SageMaker syncs /opt/ml/checkpoints to S3 as files appear
    and restores them from there, so an interrupted upload can leave progress.json without the weights."""
    try:
        progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = progress.get("files")  # absent in checkpoints written before the list was kept: trusted as before
    for name, size in (files or {}).items():
        try:
            if (checkpoint / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def complete_checkpoints(root: Path) -> list[Path]:
    """checkpoint-N directories that are complete (see _complete), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit() and _complete(p)]
    return sorted(found, key=_checkpoint_step)


# Hyperparameters that change the model or its optimizer state: a checkpoint written with
# other values cannot be resumed.
_RESUME_KEYS = ("rank", "lora_alpha", "train_text_encoder", "use_8bit_adam", "optimizer", "use_dora", "ema_decay",
                "seed", "train_batch_size", "gradient_accumulation_steps", "resolution")


def check_resumable(checkpoint: Path, hp: Hyperparameters) -> dict:
    progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
    saved = progress.get("hyperparameters", {})
    for key in _RESUME_KEYS:
        if key in saved and saved[key] != hp.values[key]:
            raise JobError(f"checkpoint {checkpoint.name} was written with {key}={saved[key]!r}, this job has "
                           f"{key}={hp.values[key]!r}: clear the checkpoint location or use the same value")
    return progress


def register_lora_hooks(accelerator, hp: Hyperparameters, unet_config, text_config, ema=None) -> None:
    """Checkpoints hold the LoRA weights only, never the frozen base model, and the LoRA's moving average
    (ml.train.ema.LoraEMA) when there is one."""
    from ml.train.ema import EMA_FILE

    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                state = {k: v.contiguous() for k, v in get_peft_model_state_dict(accelerator.unwrap_model(model)).items()}
                save_file(state, os.path.join(output_dir, f"lora_model_{index}.safetensors"))
            if ema is not None:
                save_file(ema.state_dict(), os.path.join(output_dir, EMA_FILE))
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
        if ema is not None:
            path = os.path.join(input_dir, EMA_FILE)
            if not os.path.isfile(path):
                raise JobError(f"checkpoint in {input_dir} has no {EMA_FILE}: it was written without ema_decay")
            ema.load_state_dict(load_file(path))

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
    # Every process writes its own RNG state into staging: rename only once all have (else a late process
    # re-creates staging after the rename, and the checkpoint lacks its random_states_<i>.pkl).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / PROGRESS_FILE).write_text(json.dumps({"global_step": step, "hyperparameters": hp.as_dict(),
                                                         "files": files}))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in complete_checkpoints(root)[: -hp.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written: %s", final)
    accelerator.wait_for_everyone()
    return final
