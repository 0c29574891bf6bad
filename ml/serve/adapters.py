"""Many LoRA adapters on one SDXL pipeline: where they come from, an LRU cache, and fusing.

Sources of an adapter, by the name a request gives:
- `default`: the model directory's LoRA file at its top: `pytorch_lora_weights.safetensors` (what
  `sdxl-lora train` writes), else its one `.safetensors` file (a downloaded one);
- `<name>`: `adapters/<name>/` (its pytorch_lora_weights.safetensors, else its one .safetensors file) or
  `adapters/<name>.safetensors` in the model directory;
- `s3://bucket/key.safetensors`, `s3://bucket/prefix/` (holding pytorch_lora_weights.safetensors)
  or `s3://bucket/.../model.tar.gz` (a training job's output; only the LoRA member is read).

Formats (ml.contract.lora_files.detect_format): the diffusers/PEFT LoRA training writes, and the kohya-named
files users download (Civitai, ...): kohya LoRA and LoCon, LyCORIS LoHa and LoKr. Anything else, a file for
another model (SD 1.x, Flux, ...) or with tensors of other kinds, is refused with a message naming them.

Only safetensors are read. A pickle file (.bin, .pt, .ckpt, ...) is refused by its name,
without being opened, and a file called .safetensors must start with a safetensors header.

Speed: an adapter is parsed once (on first use) into per-module factors. diffusers parses diffusers files
into PEFT layers, whose LoRA matrices are copied out and the layers removed again; kohya-named files are
read by ml.lora.deltas straight onto the pipeline's modules. Either way the pipeline's modules stay
the base model's plain Linear and Conv2d layers and a generation costs exactly what the base model costs.
The active (adapters, scales) combination is fused into the base weights; a change restores the
touched weights from a copy of the originals and adds the new deltas (B @ A, the LoHa and LoKr products),
from the cached factors, never from disk. Restoring from the copy (not subtracting) makes scale 0,
or any later fusion, bit-exact: nothing drifts however often adapters change.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ml.contract import lora_files
from ml.contract.container import LORA_WEIGHTS, split_s3_uri

log = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"
ADAPTERS_DIR = "adapters"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
SAFETENSORS = ".safetensors"


class AdapterError(Exception):
    """An adapter a request named cannot be used; status is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------
# Where an adapter's file is


def is_s3(name: str) -> bool:
    return name.startswith("s3://")


def refuse_pickle(name: str, where: str) -> None:
    try:
        lora_files.refuse_pickle(name, f"adapter {where}")
    except lora_files.LoraFileError as error:
        raise AdapterError(str(error)) from None


def check_safetensors_header(path: Path, where: str) -> None:
    try:
        lora_files.check_safetensors(path, f"adapter {where}")
    except lora_files.LoraFileError as error:
        raise AdapterError(str(error)) from None


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(f"*{SAFETENSORS}") if p.is_file() and not p.name.startswith("."))


class AdapterLocator:
    """Adapter name or s3:// URI -> a local safetensors file, downloading S3 ones once."""

    def __init__(self, model_dir: Path, s3_cache: Path, s3_prefix: str = ""):
        self.model_dir, self.s3_cache, self.s3_prefix = Path(model_dir), Path(s3_cache), s3_prefix
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def has_default(self) -> bool:
        try:
            return self.find(DEFAULT_ADAPTER) is not None
        except AdapterError:
            return True  # there is one, and locate says why it cannot be used

    def names(self) -> list[str]:
        """Adapters the model directory holds."""
        found = {DEFAULT_ADAPTER} if self.has_default() else set()
        folder = self.model_dir / ADAPTERS_DIR
        if folder.is_dir():
            for entry in folder.iterdir():
                name = entry.name.removesuffix(SAFETENSORS) if entry.is_file() else entry.name
                if NAME_PATTERN.fullmatch(name) and name != DEFAULT_ADAPTER and (
                        entry.name.endswith(SAFETENSORS) if entry.is_file() else _safetensors_files(entry)):
                    found.add(name)
        return sorted(found, key=lambda name: (name != DEFAULT_ADAPTER, name))

    def find(self, name: str) -> Path | None:
        """The adapter's file: its folder's LORA_WEIGHTS, else the folder's one .safetensors file, else (named
        adapters) adapters/<name>.safetensors; None when there is none."""
        folder = self.model_dir if name == DEFAULT_ADAPTER else self.model_dir / ADAPTERS_DIR / name
        if (folder / LORA_WEIGHTS).is_file():
            return folder / LORA_WEIGHTS
        files = _safetensors_files(folder) if folder.is_dir() else []
        if len(files) > 1:
            raise AdapterError(f"adapter {name}: {folder} holds {len(files)} .safetensors files "
                               f"({', '.join(p.name for p in files)}) and no {LORA_WEIGHTS}, so which one is the "
                               "adapter is not clear; keep one, or name it " + LORA_WEIGHTS)
        if files:
            return files[0]
        single = self.model_dir / ADAPTERS_DIR / f"{name}{SAFETENSORS}"
        return single if name != DEFAULT_ADAPTER and single.is_file() else None

    def check_name(self, name: str) -> None:
        """Cheap checks a request can fail on before anything is read."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter names must be non-empty strings, got {name!r}")
        if is_s3(name):
            refuse_pickle(name, name)
            if self.s3_prefix and not name.startswith(self.s3_prefix):
                raise AdapterError(f"adapter {name} is outside {self.s3_prefix}, the only S3 prefix this endpoint "
                                   "loads adapters from", status=403)
            if not name.removeprefix("s3://").partition("/")[0]:
                raise AdapterError(f"adapter {name} names no bucket")
        elif not NAME_PATTERN.fullmatch(name):
            raise AdapterError(f"adapter {name!r} is not a valid name (letters, digits, '.', '_', '-'; at most 64) "
                               "or an s3:// URI")

    def locate(self, name: str) -> Path:
        self.check_name(name)
        if is_s3(name):
            return self._download(name)
        path = self.find(name)
        if path is None:
            folder = self.model_dir if name == DEFAULT_ADAPTER else self.model_dir / ADAPTERS_DIR / name
            pickles = sorted(p.name for p in folder.glob("*") if lora_files.is_pickle(p.name)) \
                if folder.is_dir() else []
            if name != DEFAULT_ADAPTER:  # adapters/<name>.ckpt and the like
                pickles += sorted(p.name for p in (self.model_dir / ADAPTERS_DIR).glob(f"{name}.*")
                                  if lora_files.is_pickle(p.name))
            if pickles:
                refuse_pickle(pickles[0], name)
            known = ", ".join(self.names()) or "none"
            raise AdapterError(f"unknown adapter {name!r}; this endpoint has: {known}", status=404)
        check_safetensors_header(path, name)
        return path

    def _lock(self, uri: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(uri, threading.Lock())

    def _download(self, uri: str) -> Path:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(uri)
        key = key.strip("/")
        if not key.endswith((".safetensors", ".tar.gz")):
            key = f"{key}/{LORA_WEIGHTS}" if key else LORA_WEIGHTS
        target = (self.s3_cache / bucket / key).resolve()
        if key.endswith(".tar.gz"):
            target = target.with_name(target.name.removesuffix(".tar.gz")) / LORA_WEIGHTS
        if not target.is_relative_to(self.s3_cache.resolve()):
            raise AdapterError(f"adapter {uri} is not a valid S3 location")
        with self._lock(uri):
            if not target.is_file():
                s3 = boto3.client("s3")  # honours AWS_ENDPOINT_URL: that is how the local stack is reached
                started = time.perf_counter()
                try:
                    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
                    data = _lora_from_archive(body, uri) if key.endswith(".tar.gz") else body.read()
                except ClientError as error:
                    code = error.response.get("Error", {}).get("Code", "")
                    if code in ("NoSuchKey", "NoSuchBucket", "404"):
                        raise AdapterError(f"unknown adapter {uri}: s3://{bucket}/{key} does not exist",
                                           status=404) from None
                    raise AdapterError(f"adapter {uri} could not be read: {code or error}", status=502) from None
                except BotoCoreError as error:
                    raise AdapterError(f"adapter {uri} could not be read: {error}", status=502) from None
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial")
                partial.write_bytes(data)
                partial.replace(target)  # a present file is complete
                log.info("adapter %s downloaded in %.2f s", uri, time.perf_counter() - started)
        check_safetensors_header(target, uri)
        return target


def _lora_from_archive(body, uri: str) -> bytes:
    """The LoRA member of a model.tar.gz, read as a stream; nothing else is extracted."""
    try:
        return lora_files.lora_from_archive(io.BufferedReader(body), f"adapter {uri}")
    except lora_files.LoraMemberMissing as error:
        raise AdapterError(str(error), status=404) from None
    except lora_files.LoraFileError as error:
        raise AdapterError(str(error)) from None


# ---------------------------------------------------------------------------------------
# Cached adapters and fusing


@dataclass
class Adapter:
    name: str
    layers: list  # ml.lora.deltas.AdapterLayer, one per adapted module
    nbytes: int
    load_seconds: float
    layout: str = ""  # what the file is, as lora_files.LoraFormat.describe() tells it


def extract_adapter(pipeline, path: Path, name: str) -> Adapter:
    """The adapter's layers on the pipeline's modules, from a file of any accepted format."""
    label = f"adapter {name}"
    started = time.perf_counter()
    try:
        header = lora_files.read_header(path, label)
        layout = lora_files.detect_format(header, label)
        if layout.kind == lora_files.KOHYA:
            from ml.lora.deltas import load_layers

            parts = {component: getattr(pipeline, component, None) for component in LORA_COMPONENTS}
            layers = load_layers(path, parts, label, header.get("__metadata__"), pipeline.device)
        else:
            layers = _diffusers_layers(pipeline, path, name, layout)
    except lora_files.LoraFileError as error:
        raise AdapterError(str(error)) from None
    if not layers:
        raise AdapterError(f"adapter {name} holds no LoRA layers this pipeline has")
    nbytes = sum(layer.nbytes for layer in layers)
    return Adapter(name, layers, nbytes, time.perf_counter() - started, layout.describe())


def _diffusers_layers(pipeline, path: Path, name: str, layout: lora_files.LoraFormat) -> list:
    """Let diffusers parse the file into PEFT layers, copy the matrices out, remove the layers."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from ml.lora.deltas import AdapterLayer

    loading = "loading"
    try:
        pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=loading,
                                   use_safetensors=True)
        layers = []
        for component in LORA_COMPONENTS:
            model = getattr(pipeline, component, None)
            if model is None:
                continue
            for module in model.modules():
                if not isinstance(module, PeftLoraLayer) or loading not in module.lora_A:
                    continue
                if module.use_dora.get(loading):
                    raise AdapterError(f"adapter {name} uses DoRA, which this server does not fuse")
                if getattr(module, "fan_in_fan_out", False):
                    raise AdapterError(f"adapter {name} has fan_in_fan_out layers, which this server does not fuse")
                factors = {"lora_down.weight": module.lora_A[loading].weight.detach().clone(),
                           "lora_up.weight": module.lora_B[loading].weight.detach().clone()}
                layers.append(AdapterLayer(module.get_base_layer(), lora_files.LORA, factors,
                                           float(module.scaling[loading])))
    except AdapterError:
        raise
    except Exception as error:  # diffusers and peft raise ValueError, KeyError, safetensors errors...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterError(f"adapter {name} could not be loaded as an SDXL LoRA: {reason}") from error
    finally:
        # Back to plain modules: no PEFT wrapper stays in the forward pass.
        pipeline.unload_lora_weights()
    if layers and len(layers) < layout.modules:
        # diffusers loads what matches and only warns about the rest: a file for another model would half-apply.
        raise AdapterError(f"adapter {name} is not a LoRA for this SDXL model: {layout.modules - len(layers)} of "
                           f"its {layout.modules} LoRA modules name nothing in the pipeline")
    return layers


Combination = tuple[tuple[str, float], ...]  # ((adapter name, effective scale), ...), sorted


@dataclass
class FusionStats:
    loaded: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    fuse_seconds: float = 0.0


class AdapterBank:
    """The pipeline's adapters: an LRU cache of extracted adapters and the fused combination.

    Not thread-safe by design: one worker thread owns the pipeline (ml.serve.inference.Engine).
    """

    def __init__(self, pipeline, locator: AdapterLocator, cache_size: int):
        if cache_size < 1:
            raise ValueError(f"the adapter cache needs room for at least 1 adapter, got {cache_size}")
        self.pipeline, self.locator, self.cache_size = pipeline, locator, cache_size
        self.cache: OrderedDict[str, Adapter] = OrderedDict()
        self.fused: Combination = ()
        self._originals: dict[int, tuple[object, object]] = {}  # id(module) -> (module, original weight)
        self._touched: list[object] = []
        self.evictions = 0

    def get(self, name: str, path: Path | None = None) -> tuple[Adapter, bool]:
        """The cached adapter, loading it on first use; (adapter, loaded now)."""
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name], False
        adapter = extract_adapter(self.pipeline, path or self.locator.locate(name), name)
        self.cache[name] = adapter
        while len(self.cache) > self.cache_size:
            evicted, _ = self.cache.popitem(last=False)
            self.evictions += 1
            log.info("adapter %s evicted from the cache (size %d)", evicted, self.cache_size)
        log.info("adapter %s loaded in %.3f s (%s): %d layers, %.1f MB", name, adapter.load_seconds, adapter.layout,
                 len(adapter.layers), adapter.nbytes / 1e6)
        return adapter, True

    def activate(self, combination: Combination, paths: dict[str, Path] | None = None) -> FusionStats:
        """Make the pipeline's weights base + sum(scale * LoRA) for the combination (empty: the base)."""
        import torch

        stats = FusionStats()
        wanted = tuple((name, scale) for name, scale in combination if scale != 0)
        if len(wanted) > self.cache_size:
            raise AdapterError(f"{len(wanted)} adapters in one request, but the adapter cache holds "
                               f"{self.cache_size}")
        adapters = []
        for name, scale in wanted:
            started = time.perf_counter()
            adapter, loaded = self.get(name, (paths or {}).get(name))
            if loaded:
                stats.loaded.append(name)
                stats.load_seconds += time.perf_counter() - started
            adapters.append((adapter, scale))
        if wanted == self.fused:
            return stats
        started = time.perf_counter()
        try:
            with torch.no_grad():
                self._restore()
                for adapter, scale in adapters:
                    for layer in adapter.layers:
                        weight = layer.module.weight
                        key = id(layer.module)
                        if key not in self._originals:
                            self._originals[key] = (layer.module, weight.detach().clone())
                        self._touched.append(layer.module)
                        weight.add_(layer.delta(scale).to(device=weight.device, dtype=weight.dtype))
            self.fused = wanted
        except BaseException:
            self._restore()  # a failed fusion leaves the base model, never half an adapter
            raise
        finally:
            if self.pipeline.device.type == "cuda":
                torch.cuda.synchronize()
            stats.fuse_seconds = time.perf_counter() - started
        return stats

    def _restore(self) -> None:
        import torch

        with torch.no_grad():
            for module in self._touched:
                module.weight.copy_(self._originals[id(module)][1])
        self._touched = []
        self.fused = ()

    def backup_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for _, w in self._originals.values())


def env_int(name: str, default: int, low: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value
