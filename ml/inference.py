"""Inference handlers: SDXL plus the trained LoRA, one JSON request in, base64 PNGs out.

The four functions keep the Hugging Face inference toolkit's signatures (model_fn, input_fn,
predict_fn, output_fn, each with an optional context), so this module also works as
`code/inference.py` in a Hugging Face inference container. `sdxl-lora serve` (ml/serve.py)
calls them behind its own SageMaker-contract HTTP server. Only the torch stack and the
standard library are imported (boto3 only for an s3:// BASE_MODEL), so the file stands alone;
torch and diffusers are imported where they are used, so importing this module is instant
(the server binds its port at once) and request validation is plain Python.

Request (application/json):
    prompt (required), negative_prompt, width, height, num_inference_steps, guidance_scale,
    num_images_per_prompt, seed, lora_scale
Response (application/json):
    {"images": [base64 PNG, ...], "seed": int, "lora_scale": float or null, "inference_seconds": float}

Fields left out take the pipeline's defaults (image size from the model, 50 steps, guidance
5.0), except seed (drawn at random and returned, so any image can be reproduced) and
lora_scale (1.0; null in the response when no LoRA is loaded).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

log = logging.getLogger("sdxl_lora.inference")

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what `sdxl-lora train` writes to model/
ADAPTER_NAME = "trained"
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request this server cannot answer; the message names the problem, status is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ModelLoadError(RuntimeError):
    """BASE_MODEL or the LoRA in model_dir cannot be loaded."""


# ---------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Bounds:
    kind: type  # int or float
    low: float
    high: float
    multiple_of: int = 1


# Sizes go down to 8 so the tiny test model can render 32x32 images; SDXL itself wants ~1024.
SIZE = Bounds(int, 8, 2048, multiple_of=8)
BOUNDS = {
    "width": SIZE,
    "height": SIZE,
    "num_inference_steps": Bounds(int, 1, 150),
    "guidance_scale": Bounds(float, 0.0, 50.0),
    "num_images_per_prompt": Bounds(int, 1, 8),
    "seed": Bounds(int, 0, MAX_SEED),
    # 0 renders the base model, 1 the LoRA as trained; up to 2 exaggerates it.
    "lora_scale": Bounds(float, 0.0, 2.0),
}


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_images_per_prompt: int = 1
    seed: int
    lora_scale: float = 1.0


REQUEST_FIELDS = tuple(field.name for field in fields(GenerationRequest))


def _check_number(name: str, value, bounds: Bounds):
    # bool is an int subclass in Python, but `true` is never a sensible step count.
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (bounds.kind is int and not isinstance(value, int)):
        noun = "an integer" if bounds.kind is int else "a number"
        raise RequestError(f"{name} must be {noun}, got {json.dumps(value)}")
    # Written so that NaN (which json.loads accepts) fails the check too.
    if not bounds.low <= value <= bounds.high:
        raise RequestError(f"{name} must be between {bounds.low} and {bounds.high}, got {value}")
    if bounds.multiple_of > 1 and value % bounds.multiple_of:
        raise RequestError(f"{name} must be a multiple of {bounds.multiple_of}, got {value}")
    return bounds.kind(value)


def _check_text(name: str, value) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {json.dumps(value)}")
    return value


def parse_request(body) -> GenerationRequest:
    """Validate a decoded JSON body; a missing or null optional field takes its default."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)}; expected: {', '.join(REQUEST_FIELDS)}")
    given = {name: value for name, value in body.items() if value is not None}
    if "prompt" not in given:
        raise RequestError("prompt is required")
    if not _check_text("prompt", given["prompt"]).strip():
        raise RequestError("prompt must not be empty")
    if "negative_prompt" in given:
        _check_text("negative_prompt", given["negative_prompt"])
    for name, bounds in BOUNDS.items():
        if name in given:
            given[name] = _check_number(name, given[name], bounds)
    given.setdefault("seed", random.randint(0, MAX_SEED))
    return GenerationRequest(**given)


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def input_fn(input_data, content_type, context=None) -> GenerationRequest:
    if _media_type(content_type) not in ("application/json", ""):
        raise RequestError(f"content type {content_type} is not supported; send application/json", status=415)
    try:
        body = json.loads(input_data)
    except (ValueError, TypeError) as error:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"request body is not valid JSON: {error}") from None
    return parse_request(body)


# ---------------------------------------------------------------------------------------
# The model


@dataclass
class LoadedModel:
    pipeline: object  # StableDiffusionXLPipeline
    adapter: str | None  # None: serving the base model
    # The pipeline is shared by every request thread, and a call mutates it (scheduler
    # timesteps, LoRA scales), so calls run one at a time.
    lock: threading.Lock


def _s3_cache_root() -> Path:
    return Path(os.environ.get("BASE_MODEL_CACHE_DIR") or Path(tempfile.gettempdir()) / "sdxl-lora-base-model")


def download_s3_prefix(uri: str, cache_root: Path) -> Path:
    """Copy every object under an s3:// prefix to cache_root/<bucket>/<prefix>.

    Files already there with the object's size are kept, so a restarted container does not
    download gigabytes again (boto3 writes to a temporary name first, so a present file is complete).
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ModelLoadError(f"BASE_MODEL {uri} names no bucket")
    target = (cache_root / bucket / prefix).resolve()
    key_prefix = f"{prefix}/" if prefix else ""
    s3 = boto3.client("s3")  # honours AWS_ENDPOINT_URL, which is how the local stack is reached
    count = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(key_prefix):]
                if not relative or relative.endswith("/"):  # folder markers
                    continue
                path = (target / relative).resolve()
                if not path.is_relative_to(target):
                    raise ModelLoadError(f"BASE_MODEL {uri} holds a key outside its prefix: {item['Key']}")
                count += 1
                if path.is_file() and path.stat().st_size == item["Size"]:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(path))
    except (BotoCoreError, ClientError) as error:
        raise ModelLoadError(f"BASE_MODEL {uri} could not be downloaded: {error}") from None
    if not count:
        raise ModelLoadError(f"BASE_MODEL {uri} has no objects")
    log.info("BASE_MODEL %s: %d files in %s", uri, count, target)
    return target


def resolve_base_model(base: str) -> str:
    """A local pipeline directory for a path or an s3:// URI; anything else is a Hub id."""
    if base.startswith("s3://"):
        path = download_s3_prefix(base, _s3_cache_root())
    else:
        path = Path(base).expanduser()
        if not path.exists():
            if base.startswith(("/", ".", "~")):
                raise ModelLoadError(f"BASE_MODEL {base} does not exist")
            return base
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"BASE_MODEL {base} has no model_index.json: expected a diffusers SDXL pipeline directory")
    return str(path)


def load_base_pipeline(base: str, dtype):
    from diffusers import StableDiffusionXLPipeline

    location = resolve_base_model(base)
    try:
        return StableDiffusionXLPipeline.from_pretrained(location, dtype=dtype)
    except Exception as error:  # diffusers raises OSError, ValueError, safetensors errors...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"BASE_MODEL {base} could not be loaded as an SDXL pipeline: {reason}") from error


def load_lora(pipeline, model_dir: Path) -> str | None:
    """Load model_dir's LoRA as a named adapter; None when there is none to load."""
    weights = model_dir / LORA_WEIGHTS
    if not weights.is_file():
        log.warning("no %s in %s: serving the base model without a LoRA", LORA_WEIGHTS, model_dir)
        return None
    try:
        pipeline.load_lora_weights(str(model_dir), weight_name=LORA_WEIGHTS, adapter_name=ADAPTER_NAME)
    except Exception as error:
        raise ModelLoadError(f"{weights} could not be loaded as an SDXL LoRA: {error}") from error
    parts = ", ".join(sorted(pipeline.get_list_adapters()))
    log.info("LoRA %s loaded into %s", weights, parts)
    return ADAPTER_NAME


def _disable_progress_bars() -> None:
    """A server's log is read in CloudWatch or a file, where progress bars are noise."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def model_fn(model_dir, context=None) -> LoadedModel:
    """BASE_MODEL (local directory, s3:// URI or Hub id) plus the LoRA in model_dir."""
    import torch

    base = os.environ.get("BASE_MODEL") or DEFAULT_BASE_MODEL
    _disable_progress_bars()
    cuda = torch.cuda.is_available()
    # fp16 halves GPU memory and time; CPUs have no fast fp16 kernels. SDXL's VAE config
    # asks the pipeline to decode in fp32 (force_upcast), which avoids its fp16 overflow.
    pipeline = load_base_pipeline(base, torch.float16 if cuda else torch.float32)
    pipeline.to("cuda" if cuda else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    adapter = load_lora(pipeline, Path(model_dir))
    log.info("model ready: base %s on %s, %s", base, pipeline.device,
             "with the LoRA" if adapter else "without a LoRA")
    return LoadedModel(pipeline, adapter, threading.Lock())


# ---------------------------------------------------------------------------------------
# Prediction and response


@dataclass(frozen=True)
class Prediction:
    images: list  # PIL images
    seed: int
    lora_scale: float | None
    inference_seconds: float


def predict_fn(data: GenerationRequest, model: LoadedModel, context=None) -> Prediction:
    import torch

    # A CPU generator draws the same starting noise whatever the device, so a seed means one thing.
    generator = torch.Generator(device="cpu").manual_seed(data.seed)
    options = {name: getattr(data, name) for name in ("negative_prompt", "width", "height", "num_inference_steps",
                                                      "guidance_scale") if getattr(data, name) is not None}
    with model.lock:
        started = time.perf_counter()
        if model.adapter:
            # Sets each LoRA layer's scale outright (UNet and text encoders), so nothing carries
            # over from the previous request. cross_attention_kwargs={"scale": s} would instead
            # multiply the scales and divide them back afterwards, which drifts in floating
            # point and resets them when s is 0; fusing would rewrite the base weights.
            model.pipeline.set_adapters([model.adapter], adapter_weights=[data.lora_scale])
        images = model.pipeline(prompt=data.prompt, num_images_per_prompt=data.num_images_per_prompt,
                                generator=generator, **options).images
        seconds = time.perf_counter() - started
    return Prediction(images, data.seed, data.lora_scale if model.adapter else None, seconds)


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _accepts_json(accept: str | None) -> bool:
    types = {_media_type(part) for part in (accept or "").split(",")}
    return bool(types & {"", "*/*", "application/*", "application/json"})


def output_fn(prediction: Prediction, accept, context=None) -> str:
    if not _accepts_json(accept):
        raise RequestError(f"accept {accept} is not supported; this endpoint answers application/json", status=406)
    return json.dumps({
        "images": [_png_base64(image) for image in prediction.images],
        "seed": prediction.seed,
        "lora_scale": prediction.lora_scale,
        "inference_seconds": round(prediction.inference_seconds, 3),
    })
