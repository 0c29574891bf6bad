"""The training job's hyperparameters: one table of types, defaults and bounds, and its presets.

SageMaker writes every hyperparameter as a string, and the SageMaker SDK JSON-encodes
values before that, so ``"0.0002"``, ``"\\"0.0002\\""``, ``"true"`` and ``"\\"True\\""``
all arrive for the same intent. ``parse`` accepts them alike, ignores ``sagemaker_*``
keys, warns about unknown keys and names the key and the value it cannot use.

The same table gives the JSON schema of the DAGs' ``hyperparameters`` Params
(``hyperparameters_schema``), of one value (``value_schema``) and of one item of a list Param such
as the grid's (``list_item_schema``: a number, or its text as the trigger form's one-value-per-line
box sends it; ``coerce`` reads it), so the trigger form refuses what the job would refuse, before
any job starts. ``PRESETS`` holds the
production settings (GPU instances on AWS) and the local ones (the tiny SDXL on a CPU); ``preset(name,
exclude=SWEPT)`` is what every grid or tuning trial of that preset shares.

Pure Python: the DAGs build training requests and Params from this module without torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

from ml.contract.container import JobError

log = logging.getLogger(__name__)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
TIMESTEP_BIASES = ("earlier", "later", "range")  # unset ("none"): timesteps drawn uniformly


class HyperparameterError(JobError, ValueError):
    """A hyperparameter value the job cannot use; the message names the key, `reason` says what is wrong alone."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


@dataclasses.dataclass(frozen=True)
class Spec:
    """One hyperparameter: its type, default, help and bounds. The bounds are data, so the parser
    below and the DAGs' trigger forms (json_schema) check the same thing."""

    name: str
    kind: type  # bool, int, float or str
    default: Any
    help: str
    optional: bool = False  # None is a valid value ("none", "null" or "" in the string form)
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    exclusive_maximum: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] = ()

    def value_schema(self) -> dict[str, Any]:
        """JSON schema of one value (None excluded): a tuning range's end; list Params take list_item_schema."""
        schema: dict[str, Any] = {"type": _JSON_TYPES[self.kind]}
        for key, bound in (("minimum", self.minimum), ("exclusiveMinimum", self.exclusive_minimum),
                           ("maximum", self.maximum), ("exclusiveMaximum", self.exclusive_maximum),
                           ("multipleOf", self.multiple_of)):
            if bound is not None:
                schema[key] = bound
        if self.choices:
            schema["enum"] = list(self.choices)
        elif self.kind is str and not self.optional:
            schema["minLength"] = 1  # the parser reads an empty string as "no value"
        return schema

    def list_item_schema(self) -> dict[str, Any]:
        """JSON schema of one item of a list Param of this numeric hyperparameter: a JSON number within the
        bounds, or its text, as the trigger form sends it (one value per line; a blank line is allowed, and
        ignored). No "type" at the top: Airflow's form shows an array whose items have no type (or "string")
        as a text box, one value per line, and an array of numbers as a JSON editor. The text's bounds are
        checked by `coerce` in the DAG's first task; its pattern stays short because Airflow's HTTP 400
        quotes it, with this schema's title and description."""
        if self.kind not in (int, float):
            raise HyperparameterError(f"{self.name}: only numeric hyperparameters make list Params")
        numbers = {key: value for key, value in self.value_schema().items() if key != "type"}
        # Short: Airflow's 400 prints this schema with pprint, which would break a long description over lines.
        return {"title": self.name, "description": f"each value: {self.words()}",
                "anyOf": [{"type": _JSON_TYPES[self.kind]}, {"type": "string"}], **numbers,
                "pattern": _TEXT_PATTERNS[self.kind]}

    def words(self) -> str:
        """What a value must be, in words: 'an integer in [1, 1024]', 'a number in (0, 0.1]'."""
        noun = {int: "an integer", float: "a number", bool: "true or false", str: "text"}[self.kind]
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        return f"{noun} {self.requirement()}".strip()

    def json_schema(self) -> dict[str, Any]:
        """JSON schema of the hyperparameter as a property of the DAGs' `hyperparameters` Param."""
        schema = self.value_schema()
        if self.optional:
            schema["type"] = [schema["type"], "null"]
            if "enum" in schema:
                schema["enum"] = [*schema["enum"], None]
        return {**schema, "description": self.help}

    def violation(self, value: float) -> str | None:
        """What a number breaks of the bounds, or None when it is within them."""
        if self.multiple_of is not None and value % self.multiple_of:
            return self.requirement()
        if ((self.minimum is not None and value < self.minimum)
                or (self.exclusive_minimum is not None and value <= self.exclusive_minimum)
                or (self.maximum is not None and value > self.maximum)
                or (self.exclusive_maximum is not None and value >= self.exclusive_maximum)):
            return self.requirement()
        return None

    def requirement(self) -> str:
        """The bounds in words: 'a multiple of 8, in [8, 4096]', 'in (0, 0.1]', 'at least 1'."""
        words = [f"a multiple of {self.multiple_of}"] if self.multiple_of is not None else []
        low = self.minimum if self.minimum is not None else self.exclusive_minimum
        high = self.maximum if self.maximum is not None else self.exclusive_maximum
        if low is not None and high is not None:
            words.append(f"in {'[' if self.minimum is not None else '('}{low:g}, {high:g}"
                         f"{']' if self.maximum is not None else ')'}")
        elif low is not None:
            words.append(f"at least {low:g}" if self.minimum is not None else f"above {low:g}")
        elif high is not None:
            words.append(f"at most {high:g}" if self.maximum is not None else f"below {high:g}")
        return ", ".join(words)


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
# What the text of a list item may hold (blank allowed); the job's parser reads and bounds it. Readable on purpose:
# Airflow's HTTP 400 quotes the pattern a value fails ("'1,5' does not match '^[-+0-9.eE ]*$'").
_TEXT_PATTERNS = {int: "^[0-9 ]*$", float: "^[-+0-9.eE ]*$"}
MAX_LEARNING_RATE = 0.1  # far above any LoRA learning rate; a larger one is a typo
MAX_RANK = 1024
MAX_TRAIN_STEPS = 100_000

SPECS: tuple[Spec, ...] = (
    Spec("pretrained_model_name_or_path", str, "stabilityai/stable-diffusion-xl-base-1.0",
         "Base SDXL pipeline (Hub id or local directory); ignored when the base_model channel is given."),
    Spec("base_model_id", str, None,
         "Hub id the base_model channel's pipeline was staged from, named as base_model in the model card; "
         "unset: the staged pipeline's own _name_or_path when that is a Hub id.", optional=True),
    Spec("resolution", int, 1024, "Square training resolution in pixels (multiple of 8).", minimum=8, maximum=4096,
         multiple_of=8),
    Spec("train_batch_size", int, 1, "Images per device per micro-batch.", minimum=1),
    Spec("learning_rate", float, 2e-4, "Learning rate of the UNet LoRA.", exclusive_minimum=0,
         maximum=MAX_LEARNING_RATE),
    Spec("text_encoder_lr", float, None, "Learning rate of the text-encoder LoRAs (default: learning_rate).",
         optional=True, exclusive_minimum=0, maximum=MAX_LEARNING_RATE),
    Spec("lr_scheduler", str, "constant", "Learning-rate schedule.", choices=LR_SCHEDULERS),
    Spec("lr_warmup_steps", int, 0, "Warm-up optimizer steps of the schedule.", minimum=0),
    Spec("num_train_epochs", int, 1, "Passes over the training images (unless max_train_steps is set).", minimum=1),
    Spec("max_train_steps", int, None, "Optimizer steps to train; overrides num_train_epochs.", optional=True,
         minimum=1, maximum=MAX_TRAIN_STEPS),
    Spec("checkpointing_steps", int, 500, "Write a resumable checkpoint every N optimizer steps.", minimum=1),
    Spec("checkpoints_total_limit", int, 2, "Keep at most this many checkpoints.", minimum=1),
    Spec("rank", int, 4, "LoRA rank (dimension of the update matrices).", minimum=1, maximum=MAX_RANK),
    Spec("use_dora", bool, False, "Weight-decomposed LoRA (DoRA, PEFT's use_dora): a trained magnitude per output."),
    Spec("ema_decay", float, 0.0,
         "Exponential moving average of the LoRA weights (0: off): the saved adapter is the average, decay "
         "min(ema_decay, (1 + n) / (10 + n)) at update n as diffusers' EMAModel, the raw weights beside it.",
         minimum=0, exclusive_maximum=1),
    Spec("lora_alpha", int, None, "LoRA alpha (scale alpha/rank); default: rank.", optional=True, minimum=1),
    Spec("train_text_encoder", bool, False, "Also train LoRAs on both text encoders."),
    Spec("gradient_accumulation_steps", int, 1, "Micro-batches per optimizer step.", minimum=1),
    Spec("gradient_checkpointing", bool, False, "Recompute activations in the backward pass to save memory."),
    Spec("enable_xformers_memory_efficient_attention", bool, False,
         "Use xformers attention when xformers is installed (PyTorch SDPA otherwise)."),
    Spec("optimizer", str, "adamw",
         "Optimizer of the LoRA: adamw (torch, fused), adamw8bit (bitsandbytes, CUDA only), prodigy (prodigyopt; "
         "it sets its own step size: learning_rate and text_encoder_lr are ignored, Prodigy's lr is 1), adafactor "
         "(transformers, relative_step off, at learning_rate).", choices=OPTIMIZERS),
    Spec("use_8bit_adam", bool, False, "Alias of optimizer adamw8bit (bitsandbytes 8-bit AdamW, CUDA only)."),
    Spec("mixed_precision", str, "no", "Compute precision of the frozen weights and activations.",
         choices=MIXED_PRECISIONS),
    Spec("max_grad_norm", float, 1.0, "Gradient clipping norm.", exclusive_minimum=0),
    Spec("snr_gamma", float, None, "Min-SNR loss weighting gamma (5.0 is the paper's value); off when unset.",
         optional=True, exclusive_minimum=0),
    Spec("noise_offset", float, 0.0, "Noise offset added to the training noise.", minimum=0),
    Spec("timestep_bias", str, None,
         "Bias of the sampled timesteps, as diffusers' --timestep_bias_strategy: earlier (low, fine-detail "
         "timesteps), later (high, composition), range (timestep_bias_begin to _end); unset: uniform.",
         optional=True, choices=TIMESTEP_BIASES),
    Spec("timestep_bias_strength", float, 2.0,
         "Weight of the biased timesteps relative to the others (diffusers' --timestep_bias_multiplier).",
         exclusive_minimum=0),
    Spec("timestep_bias_portion", float, 0.25, "Share of the timesteps that earlier and later weight.",
         exclusive_minimum=0, maximum=1),
    Spec("timestep_bias_begin", int, 0, "First timestep of the range bias.", minimum=0),
    Spec("timestep_bias_end", int, 1000, "End (exclusive) of the range bias, at most the scheduler's timesteps.",
         minimum=1),
    Spec("caption_dropout", float, 0.0,
         "Share of examples trained with an empty caption (drawn per image and epoch from the seed).", minimum=0,
         maximum=1),
    Spec("shuffle_caption", bool, False, "Shuffle each caption's comma-separated tags every epoch (from the seed)."),
    Spec("keep_tokens", int, 0, "With shuffle_caption, the first N tags stay in place (a trigger word).",
         minimum=0),
    Spec("center_crop", bool, False, "Center-crop to the resolution (else a random crop, drawn once per image)."),
    Spec("random_flip", bool, False, "Flip images horizontally at random."),
    Spec("caption_column", str, "text", "Column of metadata.jsonl that holds the caption."),
    Spec("seed", int, 42, "Seed of initialisation, data order, noise and timesteps."),
    Spec("validation_prompt", str, None, "Prompt rendered after training into model/samples/.", optional=True),
    Spec("num_validation_images", int, 4, "Images rendered from validation_prompt.", minimum=0),
    Spec("num_validation_inference_steps", int, 25, "Denoising steps of the validation images.", minimum=1),
    Spec("validation_images_at_checkpoints", bool, False,
         "Also render validation_prompt at every checkpoint into model/samples/step-N/ (a pipeline load each)."),
    Spec("validation_split", float, 0.0,
         "Fraction of images held out and scored with a deterministic validation loss.", minimum=0,
         exclusive_maximum=1),
    Spec("logging_steps", int, 1, "Log step=N loss=X lr=Y every N optimizer steps.", minimum=1),
    Spec("fast_path", bool, True,
         "Fast training step: LoRA computed in the compute dtype with fp32 master weights, the loss read on logged "
         "steps only, and on a CUDA GPU one CUDA graph per input shape (eager, with a warning, if capture fails). "
         "Applies to single-process UNet LoRA training with AdamW; false: the accelerate loop."),
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


def _refused(spec: Spec, reason: str, raw: Any) -> HyperparameterError:
    return HyperparameterError(f"{spec.name}: {reason}, got {raw!r}", reason)


def _coerce(spec: Spec, raw: Any) -> Any:
    value = _unwrap(raw)
    if isinstance(value, str):
        value = value.strip()
    if value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS):
        if spec.optional:
            return None
        raise _refused(spec, "a value is required", raw)
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise _refused(spec, "expected true or false", raw)
    if spec.kind is int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _refused(spec, "expected an integer", raw) from None
        if isinstance(value, bool) or not number.is_integer():
            raise _refused(spec, "expected an integer", raw)
        value = int(number)
    elif spec.kind is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise _refused(spec, "expected a number", raw) from None
        if not math.isfinite(value):
            raise _refused(spec, "expected a finite number", raw)
    else:
        value = str(value)
        if spec.choices and value not in spec.choices:
            raise _refused(spec, f"expected one of {', '.join(spec.choices)}", raw)
    if spec.kind in (int, float):
        problem = spec.violation(value)
        if problem:
            raise _refused(spec, f"must be {problem}", raw)
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
    _resolve_optimizer(values)
    if values["timestep_bias"] == "range" and values["timestep_bias_begin"] >= values["timestep_bias_end"]:
        raise HyperparameterError(
            f"timestep_bias_begin must be below timestep_bias_end, got {values['timestep_bias_begin']} and "
            f"{values['timestep_bias_end']}", "timestep_bias_begin must be below timestep_bias_end")
    if values["lora_alpha"] is None:
        values["lora_alpha"] = values["rank"]
    if values["text_encoder_lr"] is None:
        values["text_encoder_lr"] = values["learning_rate"]
    return Hyperparameters(values)


def _resolve_optimizer(values: dict[str, Any]) -> None:
    """use_8bit_adam is the older spelling of optimizer adamw8bit: both end up saying the same."""
    if values["use_8bit_adam"]:
        if values["optimizer"] not in ("adamw", "adamw8bit"):
            raise HyperparameterError(
                f"use_8bit_adam: it means optimizer adamw8bit, which conflicts with optimizer {values['optimizer']}; "
                "set one of them", "conflicts with optimizer")
        values["optimizer"] = "adamw8bit"
    values["use_8bit_adam"] = values["optimizer"] == "adamw8bit"


def to_sagemaker(values: dict[str, Any]) -> dict[str, str]:
    """The string form SageMaker expects in CreateTrainingJob's HyperParameters."""
    unknown = sorted(set(values) - set(SPEC_BY_NAME))
    if unknown:
        raise HyperparameterError(f"unknown hyperparameters: {', '.join(unknown)}")
    for key, value in values.items():
        _coerce(SPEC_BY_NAME[key], value)
    return {key: json.dumps(value) if isinstance(value, bool) else str(value) for key, value in values.items()}


def hyperparameters_schema(exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """JSON schema of a hyperparameters object for an Airflow Param: every hyperparameter but the
    excluded ones, with its type, bounds and help; any other key is refused."""
    unknown = sorted(set(exclude) - set(SPEC_BY_NAME))
    if unknown:
        raise HyperparameterError(f"unknown hyperparameters: {', '.join(unknown)}")
    return {"type": "object", "additionalProperties": False,
            "properties": {spec.name: spec.json_schema() for spec in SPECS if spec.name not in exclude}}


def value_schema(name: str) -> dict[str, Any]:
    """JSON schema of one value of a hyperparameter (None excluded): a tuning range's ends."""
    if name not in SPEC_BY_NAME:
        raise HyperparameterError(f"unknown hyperparameter: {name}")
    return SPEC_BY_NAME[name].value_schema()


def list_item_schema(name: str) -> dict[str, Any]:
    """JSON schema of one item of a list Param of a numeric hyperparameter (the grid's values, the tuning ranks)."""
    if name not in SPEC_BY_NAME:
        raise HyperparameterError(f"unknown hyperparameter: {name}")
    return SPEC_BY_NAME[name].list_item_schema()


def coerce(name: str, raw: Any) -> Any:
    """One value of a hyperparameter, read and checked as the job reads it (a number or its text)."""
    if name not in SPEC_BY_NAME:
        raise HyperparameterError(f"unknown hyperparameter: {name}")
    return _coerce(SPEC_BY_NAME[name], raw)


# What the grid and automatic tuning vary per trial; every other hyperparameter is fixed for a run.
SWEPT = ("learning_rate", "max_train_steps", "rank")

# The original system's production settings (its grid search's winner: 2e-4, rank 4), plus a held-out
# tenth so that every run reports the val_loss that deployment and selection compare.
PRODUCTION = {
    "resolution": 1024, "train_batch_size": 1, "learning_rate": 2e-4, "lr_scheduler": "constant",
    "num_train_epochs": 58, "checkpointing_steps": 500, "rank": 4, "train_text_encoder": True,
    "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
    "enable_xformers_memory_efficient_attention": True, "use_8bit_adam": True, "mixed_precision": "fp16",
    "validation_split": 0.1,
}

# The local stack's settings: the tiny SDXL on a CPU (`make airflow`, `make demo`, the Compose stack). Full precision,
# AdamW and PyTorch attention (fp16, 8-bit Adam and xformers need CUDA), 64 pixels (the staged frames are 128x72),
# a few steps at a learning rate the tiny model moves with, a held-out quarter so that every run reports val_loss,
# and one validation image per run (fixed seed) for the model card and the grid report's sheets.
LOCAL = {
    "resolution": 64, "train_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "constant",
    "max_train_steps": 20, "checkpointing_steps": 10, "rank": 4, "train_text_encoder": False,
    "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
    "enable_xformers_memory_efficient_attention": False, "use_8bit_adam": False, "mixed_precision": "no",
    "validation_split": 0.25, "random_flip": True,
    "validation_prompt": "storyboard frame, ink outline, a red circle on the left, flat colours, hard shadow",
    "num_validation_images": 1, "num_validation_inference_steps": 4,
}

PRESETS: dict[str, dict[str, Any]] = {"production": PRODUCTION, "local": LOCAL}


def preset(name: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of a preset (callers may change it) without the excluded keys. A grid or tuning trial takes
    preset(name, exclude=SWEPT), so a winner is a recipe for the configuration the preset trains."""
    if name not in PRESETS:
        raise HyperparameterError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    unknown = sorted(set(exclude) - set(SPEC_BY_NAME))
    if unknown:
        raise HyperparameterError(f"unknown hyperparameters: {', '.join(unknown)}")
    return {key: value for key, value in PRESETS[name].items() if key not in exclude}
