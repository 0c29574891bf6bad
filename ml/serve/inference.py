"""Inference handlers: SDXL plus many LoRA adapters, one JSON request in, images out.

The four functions keep the Hugging Face inference toolkit's signatures (model_fn, input_fn,
predict_fn, output_fn, each with an optional context), so this module also works as
`code/inference.py` in a Hugging Face inference container. `sdxl-lora serve` (ml/serve/server.py)
calls them behind its own SageMaker-contract HTTP server. torch and diffusers are imported
where they are used, so importing this module is instant and request validation is plain Python.

Request (application/json):
    prompt (required), negative_prompt, width, height, num_inference_steps, guidance_scale,
    num_images_per_prompt, seed, adapter, lora_scale
    adapter: a name (`default`, a folder or .safetensors file under adapters/, or an s3:// URI) of a
    diffusers, kohya or LyCORIS LoRA file (ml.serve.adapters), or an object of
    names to weights ({"ink": 0.7, "s3://b/style.safetensors": 0.5}); left out: `default`
    when the model directory has one, else the base model. lora_scale multiplies every weight.
Response, by Accept:
    application/json (default): {"images": [base64 PNG, ...], "image_format": "png", "seed",
        "adapter", "lora_scale", "inference_seconds", "timings": {...}}
    image/png or image/jpeg: the image itself (one per request), the seed and timings in the
        X-Amzn-SageMaker-Custom-Attributes header (InvokeEndpoint's CustomAttributes).

Fields left out take the pipeline's defaults (image size from the model, 50 steps, guidance
5.0), except seed (drawn at random and returned, so any image can be reproduced).
One worker thread owns the pipeline (Engine): requests queue for it, those sharing an
adapter combination run back to back under one fusion (ml.serve.adapters), and no request ever
sees another's adapter or scale.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from pathlib import Path

from ml.contract.container import LORA_WEIGHTS, split_s3_uri
from ml.contract.model_files import ModelFilesError, pipeline_options
from ml.serve.adapters import DEFAULT_ADAPTER, AdapterBank, AdapterError, AdapterLocator, Combination, env_int

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
MAX_SEED = 2**63 - 1
WARMUP_PROMPT = "warm-up"


class RequestError(ValueError):
    """A request this server cannot answer; the message names the problem, status is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ModelLoadError(RuntimeError):
    """BASE_MODEL or the LoRA in model_dir cannot be loaded."""


# ---------------------------------------------------------------------------------------
# Limits, from the container's environment


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # a request is a prompt and a few numbers
    max_prompt_chars: int = 2000  # before tokenizing; the token limit is the text encoders' (77)
    max_pixels: int = 2 * 1024 * 1024  # width * height of one image: 2048x1024, 1448x1448, ...
    max_images: int = 4  # num_images_per_prompt
    max_steps: int = 150
    max_adapters: int = 4  # adapters combined in one request
    adapter_cache_size: int = 8  # adapters kept parsed in memory (LRU)
    max_queue: int = 64  # requests waiting for the pipeline; more get 503
    warmup_steps: int = 2  # denoising steps of the warm-up generation before /ping is healthy; 0: none

    ENV = {"max_body_bytes": "SDXL_SERVE_MAX_BODY_BYTES", "max_prompt_chars": "SDXL_SERVE_MAX_PROMPT_CHARS",
           "max_pixels": "SDXL_SERVE_MAX_PIXELS", "max_images": "SDXL_SERVE_MAX_IMAGES",
           "max_steps": "SDXL_SERVE_MAX_STEPS", "max_adapters": "SDXL_SERVE_MAX_ADAPTERS",
           "adapter_cache_size": "SDXL_SERVE_ADAPTER_CACHE_SIZE", "max_queue": "SDXL_SERVE_MAX_QUEUE",
           "warmup_steps": "SDXL_SERVE_WARMUP_STEPS"}

    @classmethod
    def from_env(cls) -> "Limits":
        low = {"warmup_steps": 0}
        return cls(**{name: env_int(variable, getattr(cls, name), low.get(name, 1))
                      for name, variable in cls.ENV.items()})


# ---------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Bounds:
    kind: type  # int or float
    low: float
    high: float
    multiple_of: int = 1


def bounds(limits: Limits) -> dict[str, Bounds]:
    size = Bounds(int, 8, 4096, multiple_of=8)  # down to 8 so the tiny test model renders 32x32
    return {
        "width": size,
        "height": size,
        "num_inference_steps": Bounds(int, 1, limits.max_steps),
        "guidance_scale": Bounds(float, 0.0, 50.0),
        "num_images_per_prompt": Bounds(int, 1, limits.max_images),
        "seed": Bounds(int, 0, MAX_SEED),
        # 0 renders the base model, 1 the LoRA as trained; up to 2 exaggerates it.
        "lora_scale": Bounds(float, 0.0, 2.0),
    }


ADAPTER_WEIGHT = Bounds(float, 0.0, 2.0)


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
    adapter: str | dict | None = None  # as requested; None: the endpoint's default
    lora_scale: float = 1.0


REQUEST_FIELDS = tuple(field.name for field in fields(GenerationRequest))


def _check_number(name: str, value, bounds: Bounds):
    # bool is an int subclass in Python, but `true` is never a sensible step count.
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (bounds.kind is int and not isinstance(value, int)):
        noun = "an integer" if bounds.kind is int else "a number"
        raise RequestError(f"{name} must be {noun}, got {json.dumps(value)[:100]}")
    # Written so that NaN (which json.loads accepts) fails the check too.
    if not bounds.low <= value <= bounds.high:
        raise RequestError(f"{name} must be between {bounds.low} and {bounds.high}, got {value}")
    if bounds.multiple_of > 1 and value % bounds.multiple_of:
        raise RequestError(f"{name} must be a multiple of {bounds.multiple_of}, got {value}")
    return bounds.kind(value)


def _check_text(name: str, value, limits: Limits) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {json.dumps(value)[:100]}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(f"{name} is {len(value)} characters, longer than the {limits.max_prompt_chars} allowed")
    return value


def _check_adapter(value, limits: Limits) -> str | dict:
    if isinstance(value, str):
        if not value:
            raise RequestError("adapter must not be empty")
        return value
    if not isinstance(value, dict):
        raise RequestError(f"adapter must be a name or an object of names to weights, got {json.dumps(value)[:100]}")
    if not 1 <= len(value) <= limits.max_adapters:
        raise RequestError(f"adapter must name between 1 and {limits.max_adapters} adapters, got {len(value)}")
    return {name: _check_number(f"adapter weight of {name[:100]}", weight, ADAPTER_WEIGHT)
            for name, weight in value.items()}


def parse_request(body, limits: Limits | None = None) -> GenerationRequest:
    """Validate a decoded JSON body; a missing or null optional field takes its default."""
    limits = limits or Limits.from_env()
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        listed = ", ".join(name[:40] for name in unknown[:10])
        raise RequestError(f"unknown field(s): {listed}; expected: {', '.join(REQUEST_FIELDS)}")
    given = {name: value for name, value in body.items() if value is not None}
    if "prompt" not in given:
        raise RequestError("prompt is required")
    if not _check_text("prompt", given["prompt"], limits).strip():
        raise RequestError("prompt must not be empty")
    if "negative_prompt" in given:
        _check_text("negative_prompt", given["negative_prompt"], limits)
    for name, limit in bounds(limits).items():
        if name in given:
            given[name] = _check_number(name, given[name], limit)
    if "width" in given and "height" in given and given["width"] * given["height"] > limits.max_pixels:
        raise RequestError(f"width x height is {given['width'] * given['height']} pixels, over this endpoint's "
                           f"budget of {limits.max_pixels}")
    if "adapter" in given:
        given["adapter"] = _check_adapter(given["adapter"], limits)
    given.setdefault("seed", random.randint(0, MAX_SEED))
    return GenerationRequest(**given)


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def input_fn(input_data, content_type, context=None) -> GenerationRequest:
    if _media_type(content_type) not in ("application/json", ""):
        raise RequestError(f"content type {content_type} is not supported; send application/json", status=415)
    try:
        body = json.loads(input_data)
    except (ValueError, TypeError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"request body is not valid JSON: {str(error)[:200]}") from None
    return parse_request(body)


JSON, PNG, JPEG = "application/json", "image/png", "image/jpeg"
_ACCEPTED = {JSON: JSON, "application/*": JSON, "*/*": JSON, PNG: PNG, JPEG: JPEG, "image/*": PNG}


def negotiate(accept: str | None) -> str:
    """The media type to answer with: the client's preferred (by q, then order) of JSON, PNG, JPEG."""
    if not (accept or "").strip():
        return JSON
    best, best_q = None, 0.0
    for part in accept.split(","):
        media, *parameters = [piece.strip() for piece in part.split(";")]
        q = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        chosen = _ACCEPTED.get(media.lower())
        if chosen and q > best_q:
            best, best_q = chosen, q
    if best is None:
        raise RequestError(f"accept {accept[:200]} is not supported; this endpoint answers application/json, "
                           "image/png or image/jpeg", status=406)
    return best


# ---------------------------------------------------------------------------------------
# The model


def _s3_cache_root() -> Path:
    return Path(os.environ.get("BASE_MODEL_CACHE_DIR") or Path(tempfile.gettempdir()) / "sdxl-lora-base-model")


def download_s3_prefix(uri: str, cache_root: Path) -> Path:
    """Copy every object under an s3:// prefix to cache_root/<bucket>/<prefix>.

    Files already there with the object's size are kept, so a restarted container does not
    download gigabytes again (boto3 writes to a temporary name first, so a present file is complete).
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        bucket, prefix = split_s3_uri(uri)
    except ValueError as error:
        raise ModelLoadError(f"BASE_MODEL: {error}") from None
    prefix = prefix.strip("/")
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
        options = pipeline_options(location)  # safetensors only; the fp16 variant when that is what is staged
    except ModelFilesError as error:
        raise ModelLoadError(f"BASE_MODEL {base}: {error}") from None
    try:
        return StableDiffusionXLPipeline.from_pretrained(location, dtype=dtype, **options)
    except Exception as error:  # diffusers raises OSError, ValueError, safetensors errors...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"BASE_MODEL {base} could not be loaded as an SDXL pipeline: {reason}") from error


def _disable_progress_bars() -> None:
    """A server's log is read in CloudWatch or a file, where progress bars are noise."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@dataclass(frozen=True)
class Prediction:
    images: list  # PIL images
    seed: int
    adapter: str | dict | None  # what rendered it; None: the base model
    lora_scale: float | None
    inference_seconds: float  # the pipeline call alone
    timings: dict = field(default_factory=dict)


@dataclass
class _Job:
    request: GenerationRequest
    combination: Combination
    paths: dict
    future: Future
    queued_at: float


class Engine:
    """The pipeline, its adapters, and the one worker thread that renders with them."""

    def __init__(self, pipeline, locator: AdapterLocator, limits: Limits):
        self.pipeline, self.locator, self.limits = pipeline, locator, limits
        self.bank = AdapterBank(pipeline, locator, limits.adapter_cache_size)
        self.default_adapter = DEFAULT_ADAPTER if locator.has_default() else None
        self.warmup_seconds = 0.0
        self._queue: deque[_Job] = deque()
        self._wakeup = threading.Condition()
        # The callers' prompt-length checks use a copy of the tokenizer, never the pipeline's own: a fast
        # tokenizer keeps its padding and truncation settings in its backend, so a check (no padding) running
        # while the worker encodes a prompt (padded to max_length) would hand the worker unpadded ids, and the
        # two text encoders' embeddings would no longer line up. The lock: fast tokenizers refuse concurrent calls.
        self._length_tokenizer = copy.deepcopy(pipeline.tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="pipeline-worker", daemon=True)
        self._worker.start()

    # -- requests, in the caller's thread ---------------------------------------------------

    def resolve(self, request: GenerationRequest) -> tuple[Combination, dict]:
        """(adapter name, effective scale) pairs and their local files; 4xx for unknown or refused ones."""
        adapters = request.adapter if request.adapter is not None else self.default_adapter
        if adapters is None:
            return (), {}
        weights = {adapters: 1.0} if isinstance(adapters, str) else adapters
        paths = {}
        try:
            for name in weights:
                paths[name] = self.locator.locate(name)
        except AdapterError as error:
            raise RequestError(str(error), status=error.status) from None
        return tuple(sorted((name, weight * request.lora_scale) for name, weight in weights.items())), paths

    def check_prompt_length(self, request: GenerationRequest) -> None:
        tokenizer = self._length_tokenizer
        limit = tokenizer.model_max_length
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name)
            if not text:
                continue
            with self._tokenizer_lock:
                count = len(tokenizer(text, truncation=False).input_ids)
            if count > limit:
                raise RequestError(f"{name} is {count} tokens, longer than the {limit} the text encoders read")

    def check_size(self, request: GenerationRequest) -> None:
        default = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        width, height = request.width or default, request.height or default
        if width * height > self.limits.max_pixels:
            raise RequestError(f"width x height is {width} x {height} = {width * height} pixels, over this "
                               f"endpoint's budget of {self.limits.max_pixels}")

    def submit(self, request: GenerationRequest) -> Future:
        self.check_size(request)
        self.check_prompt_length(request)
        combination, paths = self.resolve(request)
        job = _Job(request, combination, paths, Future(), time.perf_counter())
        with self._wakeup:
            if len(self._queue) >= self.limits.max_queue:
                raise RequestError(f"{len(self._queue)} requests are waiting already; try again shortly", status=503)
            self._queue.append(job)
            self._wakeup.notify()
        return job.future

    def generate(self, request: GenerationRequest) -> Prediction:
        return self.submit(request).result()

    # -- the worker ---------------------------------------------------------------------------

    def _next_group(self) -> list[_Job]:
        """The oldest request and every queued one sharing its adapters and scales (one fusion)."""
        with self._wakeup:
            while not self._queue:
                self._wakeup.wait()
            first = self._queue.popleft()
            group = [first] + [job for job in self._queue if job.combination == first.combination]
            for job in group[1:]:
                self._queue.remove(job)
        return group

    def _work(self) -> None:
        while True:
            for job in self._next_group():
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(self._render(job))
                    except AdapterError as error:
                        job.future.set_exception(RequestError(str(error), status=error.status))
                    except BaseException as error:  # noqa: BLE001 - handed to the request's thread
                        job.future.set_exception(error)

    def _render(self, job: _Job) -> Prediction:
        import torch

        request = job.request
        started = time.perf_counter()
        stats = self.bank.activate(job.combination, job.paths)
        # A CPU generator draws the same starting noise whatever the device, so a seed means one thing.
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        options = {name: getattr(request, name) for name in ("negative_prompt", "width", "height",
                                                             "num_inference_steps", "guidance_scale")
                   if getattr(request, name) is not None}
        generating = time.perf_counter()
        images = self.pipeline(prompt=request.prompt, num_images_per_prompt=request.num_images_per_prompt,
                               generator=generator, **options).images
        done = time.perf_counter()
        adapter = request.adapter if request.adapter is not None else self.default_adapter
        timings = {"queue_seconds": started - job.queued_at, "adapter_load_seconds": stats.load_seconds,
                   "fuse_seconds": stats.fuse_seconds, "inference_seconds": done - generating}
        return Prediction(images, request.seed, adapter, request.lora_scale if adapter else None,
                          done - generating, {key: round(value, 4) for key, value in timings.items()})

    def warm_up(self) -> float:
        """One small generation with the default adapter fused, so the first request pays no start-up costs."""
        if not self.limits.warmup_steps:
            return 0.0
        started = time.perf_counter()
        self.generate(GenerationRequest(prompt=WARMUP_PROMPT, num_inference_steps=self.limits.warmup_steps, seed=0))
        self.warmup_seconds = time.perf_counter() - started
        return self.warmup_seconds


def model_fn(model_dir, context=None) -> Engine:
    """BASE_MODEL (local directory, s3:// URI or Hub id) plus the adapters of model_dir, warmed up."""
    import torch

    limits = Limits.from_env()
    base = os.environ.get("BASE_MODEL") or DEFAULT_BASE_MODEL
    _disable_progress_bars()
    cuda = torch.cuda.is_available()
    # fp16 halves GPU memory and time; CPUs have no fast fp16 kernels. SDXL's VAE config
    # asks the pipeline to decode in fp32 (force_upcast), which avoids its fp16 overflow.
    pipeline = load_base_pipeline(base, torch.float16 if cuda else torch.float32)
    pipeline.to("cuda" if cuda else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    locator = AdapterLocator(Path(model_dir), _s3_cache_root().parent / "sdxl-lora-adapters",
                             os.environ.get("SDXL_SERVE_ADAPTER_S3_PREFIX", ""))
    engine = Engine(pipeline, locator, limits)
    if engine.default_adapter:
        where = f"the default adapter of {model_dir}"
        try:
            where = str(locator.find(DEFAULT_ADAPTER))
            engine.bank.get(DEFAULT_ADAPTER, locator.locate(DEFAULT_ADAPTER))
        except AdapterError as error:
            raise ModelLoadError(f"{where} could not be loaded: {error}") from error
    else:
        log.warning("no %s (nor another .safetensors file) in %s: requests without an adapter get the base model",
                    LORA_WEIGHTS, model_dir)
    warm = engine.warm_up()
    log.info("model ready: base %s on %s, adapters %s, warm-up %.2f s", base, pipeline.device,
             ", ".join(locator.names()) or "none", warm)
    return engine


# ---------------------------------------------------------------------------------------
# Prediction and response


def predict_fn(data: GenerationRequest, model: Engine, context=None) -> Prediction:
    return model.generate(data)


def encode_image(image, media: str) -> bytes:
    buffer = io.BytesIO()
    if media == JPEG:
        image.convert("RGB").save(buffer, format="JPEG", quality=92)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_media(media: str, request: GenerationRequest) -> None:
    """A raw image answer carries one image."""
    if media != JSON and request.num_images_per_prompt > 1:
        raise RequestError(f"accept {media} answers one image, but num_images_per_prompt is "
                           f"{request.num_images_per_prompt}; ask for application/json", status=406)


def custom_attributes(prediction: Prediction) -> str:
    """Seed and timings for a raw image answer (SageMaker hands the header to the caller as CustomAttributes)."""
    adapter = prediction.adapter
    if isinstance(adapter, dict):
        adapter = "+".join(f"{name}*{weight:g}" for name, weight in adapter.items())
    values = {"seed": prediction.seed, "adapter": adapter or "", "lora_scale": prediction.lora_scale,
              "inference_seconds": round(prediction.inference_seconds, 3)}
    return ",".join(f"{key}={'' if value is None else value}" for key, value in values.items())[:1024]


def output_fn(prediction: Prediction, accept, context=None) -> str | bytes:
    media = negotiate(accept)
    if media != JSON:
        if len(prediction.images) != 1:
            raise RequestError(f"accept {media} answers one image, this prediction has {len(prediction.images)}",
                               status=406)
        return encode_image(prediction.images[0], media)
    return json.dumps({
        "images": [base64.b64encode(encode_image(image, PNG)).decode("ascii") for image in prediction.images],
        "image_format": "png",
        "seed": prediction.seed,
        "adapter": prediction.adapter,
        "lora_scale": prediction.lora_scale,
        "inference_seconds": round(prediction.inference_seconds, 3),
        "timings": prediction.timings,
    })
