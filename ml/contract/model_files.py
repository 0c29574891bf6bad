"""Which weight files of a staged model the jobs load: safetensors only, full precision or a variant alone.

Users stage SDXL as they download it: every file, or only the fp16 variant
(`diffusion_pytorch_model.fp16.safetensors`, `model.fp16.safetensors`), which is half the bytes. diffusers and
transformers load a variant only when asked by name, and when a safetensors file is missing they look for a
pickle (`.bin`) beside it, which unpickling would run as code. So every load names what it wants: the
safetensors files of each component, in full precision when they are there, else the one variant that is, and
never a pickle: a component that holds only pickles is refused here, before any loader opens a file, with a
message naming what was found and what to stage instead.

Pure Python: it only lists directories. A Hub id is left to the loaders, with `use_safetensors=True`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ml.contract.container import JobError
from ml.contract.lora_files import PICKLE_SUFFIXES

SAFETENSORS = ".safetensors"
# `diffusion_pytorch_model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`: the variant is the
# name's second dotted part, before the shard suffix (diffusers' and transformers' naming).
_VARIANT = re.compile(r"^[^.]+\.(?P<variant>[A-Za-z0-9_]+)(?:-\d{5}-of-\d{5})?\.safetensors$")
# Folders of a pipeline that hold no weights (model_index.json lists them beside the models).
_NO_WEIGHTS = ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor", "image_processor", "processor")


class ModelFilesError(JobError):
    """A staged model the jobs cannot load safely; the message names the folder, what it holds and the fix."""


def is_local(model: str | Path) -> bool:
    return Path(model).is_dir()


def variant_of(folder: Path) -> str | None:
    """None when `folder` holds full-precision safetensors; else the variant its safetensors all carry.

    Refuses a folder with pickles and no safetensors (naming them), with no weights at all, or with
    safetensors of several variants and no full-precision ones (it cannot tell which one to load)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    safetensors = [n for n in names if n.endswith(SAFETENSORS)]
    if not safetensors:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelFilesError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}): they are never loaded, because "
                f"unpickling runs code. Stage its safetensors instead (e.g. {_wanted(folder)}, or the .fp16 "
                "variant: `huggingface-cli download <repo> --include '*.safetensors'`).")
        raise ModelFilesError(f"{folder} holds no weights: expected {_wanted(folder)} (or its .fp16 variant)")
    variants = {m["variant"] if (m := _VARIANT.match(n)) else None for n in safetensors}
    if None in variants:
        return None
    if len(variants) > 1:
        raise ModelFilesError(f"{folder} holds safetensors of several variants ({', '.join(sorted(variants))}) "
                              "and none in full precision: stage one variant only")
    return variants.pop()


def load_options(model: str | Path, subfolder: str | None = None) -> dict:
    """from_pretrained() keywords for one component (`subfolder`, or the model itself when None)."""
    if not is_local(model):
        return {"use_safetensors": True}
    folder = Path(model) / subfolder if subfolder else Path(model)
    variant = variant_of(folder)
    return {"use_safetensors": True, **({"variant": variant} if variant else {})}


def pipeline_options(model: str | Path) -> dict:
    """from_pretrained() keywords for a whole diffusers pipeline: every weight component is checked, and the
    variant is asked for when a component has only that variant (diffusers then loads the full-precision files
    of the components that have them)."""
    if not is_local(model):
        return {"use_safetensors": True}
    variants = {variant_of(Path(model) / name) for name in weight_components(Path(model))} - {None}
    if len(variants) > 1:
        raise ModelFilesError(f"{model}: components carry different variants ({', '.join(sorted(variants))}): "
                              "stage one variant only")
    return {"use_safetensors": True, **({"variant": variants.pop()} if variants else {})}


def weight_components(model: Path) -> list[str]:
    """The pipeline's folders that hold weights, from model_index.json."""
    index = model / "model_index.json"
    if not index.is_file():
        raise ModelFilesError(f"{model} has no model_index.json: stage the whole diffusers folder of the model "
                              "(model_index.json and one folder per component)")
    return weight_components_of(json.loads(index.read_text()))


def components_of(index: dict) -> list[str]:
    """Every component folder a parsed model_index.json names (those given as null are absent)."""
    return sorted(name for name, value in index.items()
                  if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None)


def weight_components_of(index: dict) -> list[str]:
    """The component folders of a parsed model_index.json that hold weights."""
    return [name for name in components_of(index) if name not in _NO_WEIGHTS]


def _wanted(folder: Path) -> str:
    config = folder / "config.json"
    library = "diffusers" if config.is_file() and "_diffusers_version" in config.read_text() else "transformers"
    return "diffusion_pytorch_model.safetensors" if library == "diffusers" else "model.safetensors"
