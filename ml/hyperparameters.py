"""The training job's hyperparameters: one table, parsed from SageMaker's string values.

SageMaker writes every hyperparameter as a string, and the SageMaker SDK JSON-encodes
values before that, so ``"0.0002"``, ``"\\"0.0002\\""``, ``"true"`` and ``"\\"True\\""``
all arrive for the same intent. ``parse`` accepts them alike, ignores ``sagemaker_*``
keys, warns about unknown keys and names the key and the value it cannot use.

Pure Python: the DAGs build training requests from this table without torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Callable

from ml.contract import JobError

log = logging.getLogger(__name__)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


class HyperparameterError(JobError, ValueError):
    """A hyperparameter value the job cannot use; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    kind: type  # bool, int, float or str
    default: Any
    help: str
    optional: bool = False  # None is a valid value ("none", "null" or "" in the string form)
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # says what check demands, for the error message
    choices: tuple[str, ...] = ()


def _positive(value) -> bool:
    return value > 0


def _non_negative(value) -> bool:
    return value >= 0


SPECS: tuple[Spec, ...] = (
    Spec("pretrained_model_name_or_path", str, "stabilityai/stable-diffusion-xl-base-1.0",
         "Base SDXL pipeline (Hub id or local directory); ignored when the base_model channel is given."),
    Spec("resolution", int, 1024, "Square training resolution in pixels (multiple of 8).",
         check=lambda v: v >= 8 and v % 8 == 0, requirement="a multiple of 8, at least 8"),
    Spec("train_batch_size", int, 1, "Images per device per micro-batch.", check=_positive, requirement="at least 1"),
    Spec("learning_rate", float, 2e-4, "Learning rate of the UNet LoRA.", check=_positive, requirement="positive"),
    Spec("text_encoder_lr", float, None, "Learning rate of the text-encoder LoRAs (default: learning_rate).",
         optional=True, check=_positive, requirement="positive"),
    Spec("lr_scheduler", str, "constant", "Learning-rate schedule.", choices=LR_SCHEDULERS),
    Spec("lr_warmup_steps", int, 0, "Warm-up optimizer steps of the schedule.", check=_non_negative,
         requirement="0 or more"),
    Spec("num_train_epochs", int, 1, "Passes over the training images (unless max_train_steps is set).",
         check=_positive, requirement="at least 1"),
    Spec("max_train_steps", int, None, "Optimizer steps to train; overrides num_train_epochs.", optional=True,
         check=_positive, requirement="at least 1"),
    Spec("checkpointing_steps", int, 500, "Write a resumable checkpoint every N optimizer steps.", check=_positive,
         requirement="at least 1"),
    Spec("checkpoints_total_limit", int, 2, "Keep at most this many checkpoints.", check=_positive,
         requirement="at least 1"),
    Spec("rank", int, 4, "LoRA rank (dimension of the update matrices).", check=_positive, requirement="at least 1"),
    Spec("lora_alpha", int, None, "LoRA alpha (scale alpha/rank); default: rank.", optional=True, check=_positive,
         requirement="at least 1"),
    Spec("train_text_encoder", bool, False, "Also train LoRAs on both text encoders."),
    Spec("gradient_accumulation_steps", int, 1, "Micro-batches per optimizer step.", check=_positive,
         requirement="at least 1"),
    Spec("gradient_checkpointing", bool, False, "Recompute activations in the backward pass to save memory."),
    Spec("enable_xformers_memory_efficient_attention", bool, False,
         "Use xformers attention when xformers is installed (PyTorch SDPA otherwise)."),
    Spec("use_8bit_adam", bool, False, "bitsandbytes 8-bit AdamW (CUDA only)."),
    Spec("mixed_precision", str, "no", "Compute precision of the frozen weights and activations.",
         choices=MIXED_PRECISIONS),
    Spec("max_grad_norm", float, 1.0, "Gradient clipping norm.", check=_positive, requirement="positive"),
    Spec("snr_gamma", float, None, "Min-SNR loss weighting gamma (5.0 is the paper's value); off when unset.",
         optional=True, check=_positive, requirement="positive"),
    Spec("noise_offset", float, 0.0, "Noise offset added to the training noise.", check=_non_negative,
         requirement="0 or more"),
    Spec("center_crop", bool, False, "Center-crop to the resolution (else a random crop, drawn once per image)."),
    Spec("random_flip", bool, False, "Flip images horizontally at random."),
    Spec("caption_column", str, "text", "Column of metadata.jsonl that holds the caption."),
    Spec("seed", int, 42, "Seed of initialisation, data order, noise and timesteps."),
    Spec("validation_prompt", str, None, "Prompt rendered after training into model/samples/.", optional=True),
    Spec("num_validation_images", int, 4, "Images rendered from validation_prompt.", check=_non_negative,
         requirement="0 or more"),
    Spec("num_validation_inference_steps", int, 25, "Denoising steps of the validation images.", check=_positive,
         requirement="at least 1"),
    Spec("validation_split", float, 0.0,
         "Fraction of images held out and scored with a deterministic validation loss.",
         check=lambda v: 0 <= v < 1, requirement="in [0, 1)"),
    Spec("logging_steps", int, 1, "Log step=N loss=X lr=Y every N optimizer steps.", check=_positive,
         requirement="at least 1"),
    Spec("deepspeed", bool, False,
         "With several GPUs, launch with the shipped DeepSpeed ZeRO-2 accelerate configuration."),
)

SPEC_BY_NAME = {spec.name: spec for spec in SPECS}


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Resolved hyperparameters; build with parse() or from_dict()."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


_NONE_WORDS = {"", "none", "null"}
_TRUE_WORDS = {"true", "1", "yes"}
_FALSE_WORDS = {"false", "0", "no"}


def _unwrap(raw: Any) -> Any:
    """Peel the JSON encodings that the SDK and SageMaker add: '"0.0002"' -> '0.0002' -> 0.0002."""
    value = raw
    for _ in range(3):
        if not isinstance(value, str):
            return value
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if decoded == value:
            return value
        value = decoded
    return value


def _coerce(spec: Spec, raw: Any) -> Any:
    value = _unwrap(raw)
    if isinstance(value, str):
        value = value.strip()
    if value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS):
        if spec.optional:
            return None
        raise HyperparameterError(f"{spec.name}: a value is required, got {raw!r}")
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise HyperparameterError(f"{spec.name}: expected true or false, got {raw!r}")
    if spec.kind is int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise HyperparameterError(f"{spec.name}: expected an integer, got {raw!r}") from None
        if isinstance(value, bool) or not number.is_integer():
            raise HyperparameterError(f"{spec.name}: expected an integer, got {raw!r}")
        value = int(number)
    elif spec.kind is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise HyperparameterError(f"{spec.name}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise HyperparameterError(f"{spec.name}: expected a finite number, got {raw!r}")
    else:
        value = str(value)
        if spec.choices and value not in spec.choices:
            raise HyperparameterError(f"{spec.name}: expected one of {', '.join(spec.choices)}, got {raw!r}")
    if spec.check is not None and not spec.check(value):
        raise HyperparameterError(f"{spec.name}: must be {spec.requirement}, got {raw!r}")
    return value


def parse(raw: dict[str, Any]) -> Hyperparameters:
    """Resolve a hyperparameters.json mapping against SPECS (defaults fill the gaps)."""
    if not isinstance(raw, dict):
        raise HyperparameterError(f"hyperparameters must be a JSON object, got {type(raw).__name__}")
    values = {spec.name: spec.default for spec in SPECS}
    for key, value in raw.items():
        if key.startswith("sagemaker_"):
            continue
        spec = SPEC_BY_NAME.get(key)
        if spec is None:
            log.warning("ignoring unknown hyperparameter %s=%r", key, value)
            continue
        values[key] = _coerce(spec, value)
    if values["lora_alpha"] is None:
        values["lora_alpha"] = values["rank"]
    if values["text_encoder_lr"] is None:
        values["text_encoder_lr"] = values["learning_rate"]
    return Hyperparameters(values)


def to_sagemaker(values: dict[str, Any]) -> dict[str, str]:
    """The string form SageMaker expects in CreateTrainingJob's HyperParameters."""
    unknown = sorted(set(values) - set(SPEC_BY_NAME))
    if unknown:
        raise HyperparameterError(f"unknown hyperparameters: {', '.join(unknown)}")
    for key, value in values.items():
        _coerce(SPEC_BY_NAME[key], value)
    return {key: json.dumps(value) if isinstance(value, bool) else str(value) for key, value in values.items()}
