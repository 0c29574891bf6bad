"""Where `stage-models` takes a model from, and which of its files it stages.

A source is a local directory or a Hugging Face Hub id (`org/name`, or `org/name@revision`). A Hub id is
fetched with huggingface_hub's `snapshot_download` into the Hugging Face cache (HF_HOME): interrupted
downloads resume, files already there are not fetched again, and with HF_HUB_OFFLINE=1 it resolves from the
cache alone. Either way one set of rules chooses the files the jobs' loaders read, and only those:

- configs, tokenizers and scheduler files (.json, .txt, .model, .jinja);
- of each folder that holds weights, its safetensors in one precision, named as diffusers and transformers
  name them (`diffusion_pytorch_model[.fp16][-00001-of-00002].safetensors`, `model...`, and their index):
  the variant asked for where the folder has it, else full precision, else the one variant it has;
- of a pipeline, only model_index.json and the folders it lists.

Never a pickle (`.bin`, `.ckpt`, ...), an ONNX, OpenVINO or Flax export, a single-file checkpoint beside the
folders (`sd_xl_base_1.0.safetensors`), a README or an image. A weight folder with pickles and no
safetensors is refused here, by name, before anything is downloaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ml.contract.lora_files import PICKLE_SUFFIXES
from ml.contract.model_files import components_of, weight_components_of

PIPELINE, MODEL = "a diffusers pipeline", "a single model"
# What the jobs load of an SDXL base pipeline (ml/train/models.py, ml/serve/inference.py).
SDXL_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae")
SUPPORT_SUFFIXES = (".json", ".txt", ".model", ".jinja")  # configs, vocabularies and merges, sentencepiece, templates
_WEIGHTS = re.compile(r"^(?:diffusion_pytorch_model|model)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d{5}-of-\d{5})?"
                      r"\.safetensors$")
_SAFETENSORS_INDEX = re.compile(r"^(?:diffusion_pytorch_model|model)\.safetensors\.index"
                                r"(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")
_OTHER_INDEX = re.compile(r"\.(?:bin|msgpack|h5|pt|ckpt)\.index(?:\.[A-Za-z0-9_]+)?\.json$")  # a pickle's shard index
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# The architecture of an AutoencoderKL: a VAE put in place of the base model's must match it in all of these.
VAE_ARCHITECTURE = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types",
                    "up_block_types", "layers_per_block")


class SourceError(Exception):
    """A source that cannot be staged; the message names it, what is wrong and what to give instead."""


@dataclass
class Chosen:
    """The files to stage: path in the staged folder -> the file to read it from."""
    files: dict[str, Path]
    description: str  # for people: "the directory ...", "org/name at commit ... (Hugging Face cache)"
    hub_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.files.values())


def _parent(name: str) -> str:
    parent = PurePosixPath(name).parent.as_posix()
    return "" if parent == "." else parent


def _is_support(name: str) -> bool:
    base = PurePosixPath(name).name
    return (base.endswith(SUPPORT_SUFFIXES) and not _SAFETENSORS_INDEX.match(base)
            and not _OTHER_INDEX.search(base))


def _weights(what: str, folder: str, names: list[str], variant: str | None, notes: list[str]) -> list[str]:
    """The safetensors (and their index) of one weight folder, in one precision."""
    label = f"{what} {folder + '/' if folder else 'folder'}"
    by_precision: dict[str | None, list[str]] = {}
    for name in names:
        match = _WEIGHTS.match(PurePosixPath(name).name)
        if match:
            by_precision.setdefault(match["variant"], []).append(name)
    if variant in by_precision:
        chosen = variant
    elif None in by_precision:
        chosen = None
        if variant:
            notes.append(f"{label}: no {variant} variant, full precision staged")
    elif len(by_precision) == 1:
        chosen = next(iter(by_precision))
        notes.append(f"{label}: only the {chosen} variant is there, staged")
    elif by_precision:
        raise SourceError(f"{label} holds safetensors of several variants ({', '.join(sorted(by_precision))}) and "
                          "none in full precision: give --variant to choose one")
    else:
        pickles = sorted(PurePosixPath(n).name for n in names if n.lower().endswith(PICKLE_SUFFIXES))
        wanted = "diffusion_pytorch_model.safetensors" if folder in ("unet", "vae") or what == "vae" else \
            "model.safetensors"
        if pickles:
            raise SourceError(
                f"{label} holds only pickle weights ({', '.join(pickles)}): they are never staged or loaded, "
                f"because unpickling runs code. Give a copy with its safetensors ({wanted}, or its .fp16 variant "
                "with --variant fp16), e.g. the Hub id itself, or convert them to safetensors first")
        raise SourceError(f"{label} holds no weights: expected {wanted} (or its .fp16 variant)")
    indexes = [n for n in names if (m := _SAFETENSORS_INDEX.match(PurePosixPath(n).name)) and m["variant"] == chosen]
    return sorted(by_precision[chosen]) + indexes


def select(names: list[str], index: dict | None, variant: str | None, what: str) -> tuple[list[str], list[str]]:
    """(the files to stage, notes for people) of a listing; `index` is the parsed model_index.json of a
    pipeline, None for a single model (its weights at the top, e.g. InstructBLIP or a VAE)."""
    names = sorted(n for n in names if not any(part.startswith(".") for part in PurePosixPath(n).parts))
    notes: list[str] = []
    if index is not None:
        components = set(components_of(index))
        names = [n for n in names if n == "model_index.json" or PurePosixPath(n).parts[0] in components]
        weight_folders = weight_components_of(index)
    else:
        weight_folders = [""]
    chosen = [n for n in names if _is_support(n)]
    for folder in weight_folders:
        chosen += _weights(what, folder, [n for n in names if _parent(n) == folder], variant, notes)
    return sorted(set(chosen)), notes


def check_kind(names: list[str], kind: str, what: str, source: str) -> None:
    if kind == PIPELINE:
        if "model_index.json" not in names:
            raise SourceError(f"{what} {source} has no model_index.json: give the diffusers folder of an SDXL "
                              "pipeline (model_index.json and one folder per component), e.g. "
                              "stabilityai/stable-diffusion-xl-base-1.0")
    elif "config.json" not in names or "model_index.json" in names:
        raise SourceError(f"{what} {source} is not {kind}: expected its config.json and weights at the top "
                          "(a pipeline's model_index.json is not one model)")


def check_sdxl(index: dict, source: str) -> None:
    missing = sorted(set(SDXL_COMPONENTS) - set(components_of(index)))
    if missing:
        raise SourceError(f"base model {source} is not an SDXL base pipeline: its model_index.json lists no "
                          f"{', '.join(missing)} (class {index.get('_class_name')}); give "
                          "stabilityai/stable-diffusion-xl-base-1.0 or a fine-tune of it in diffusers layout")


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def from_directory(folder: Path, kind: str, variant: str | None, what: str) -> Chosen:
    names = _listing(folder)
    check_kind(names, kind, what, str(folder))
    index = json.loads((folder / "model_index.json").read_text()) if kind == PIPELINE else None
    if index is not None and what == "base model":
        check_sdxl(index, str(folder))
    files, notes = select(names, index, variant, what)
    return Chosen({name: folder / name for name in files}, f"the directory {folder}", None, notes)


def _hub_listing(repo: str, revision: str | None, offline: bool) -> list[str]:
    """Every file of the repository at the revision: the Hub's listing, or offline the cache's."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    if not offline:
        return [info.filename for info in snapshot_download(repo, revision=revision, dry_run=True)]
    try:  # recorded by an earlier snapshot_download of this revision
        return [entry.path for entry in get_cached_repo_tree(repo, revision=revision)]
    except CachedRepoTreeNotFoundError:  # a cache without the listing: what its snapshot folder holds
        return _listing(Path(snapshot_download(repo, revision=revision)))


def from_hub(repo: str, revision: str | None, kind: str, variant: str | None, what: str) -> Chosen:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub

    offline = constants.is_offline_mode()
    cache = constants.HF_HUB_CACHE
    named = f"{repo}" + (f"@{revision}" if revision else "")
    try:
        names = _hub_listing(repo, revision, offline)
        check_kind(names, kind, what, named)
        index, files = None, ["model_index.json"]
        if kind == PIPELINE:
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=files))
            index = json.loads((folder / "model_index.json").read_text())
            if what == "base model":
                check_sdxl(index, named)
        files, notes = select(names, index, variant, what)
        # Resumable: a file fetched already is not fetched again, a partial one continues.
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=files))
    except hub.IncompleteSnapshotError as error:  # the cache's listing names files its snapshot lacks
        folder = Path(error.snapshot_path)
    except hub.LocalEntryNotFoundError:
        if offline:
            raise SourceError(f"{what} {named} is not in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE=1 "
                              "forbids downloading it: run once with network access, point HF_HOME at the cache "
                              "that holds it, or give a local directory") from None
        raise SourceError(f"{what} {named}: the Hub could not be reached and the model is not in the Hugging "
                          f"Face cache ({cache}): check the network, or give a local directory") from None
    except hub.GatedRepoError:
        raise SourceError(f"{what} {named} is gated: accept its terms on https://huggingface.co/{repo} and log in "
                          "(`hf auth login`, or HF_TOKEN)") from None
    except hub.RepositoryNotFoundError:
        raise SourceError(f"{what} {named} is not a model on the Hugging Face Hub (or it is private: log in "
                          "with `hf auth login`, or HF_TOKEN), nor a local directory") from None
    except hub.RevisionNotFoundError:
        raise SourceError(f"{what} {named}: the Hub knows no revision {revision!r} of {repo}") from None
    except hub.HfHubHTTPError as error:
        raise SourceError(f"{what} {named}: the Hub answered {str(error).splitlines()[0]}") from None
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise SourceError(f"{what} {named}: the Hugging Face cache ({cache}) lacks {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}: run once with network access (without "
                          "HF_HUB_OFFLINE=1) to fetch them, or give the --variant the cache holds")
    where = "Hugging Face cache" if offline else "downloaded to the Hugging Face cache"
    return Chosen({name: folder / name for name in files}, f"{repo} at commit {folder.name[:12]} ({where} {cache})",
                  repo, notes)


def resolve(source: str, kind: str, variant: str | None, what: str) -> Chosen:
    """A directory when `source` is one, else a Hub id (`org/name` or `org/name@revision`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return from_directory(path.resolve(), kind, variant, what)
    if path.exists():
        raise SourceError(f"{what} {source} is a file: give the model's folder (or a Hub id)")
    match = HUB_ID.match(source)
    if match is None or source.startswith((".", "~")):
        raise SourceError(f"{what} {source!r} is neither a directory nor a Hugging Face Hub id "
                          "(org/name, or org/name@revision)")
    return from_hub(match["repo"], match["revision"], kind, variant, what)


def with_vae(base: Chosen, vae: Chosen) -> Chosen:
    """The base model with `vae` as its vae/ component, once its architecture is the base VAE's."""
    def config(files: dict[str, Path], name: str) -> dict:
        return json.loads(files[name].read_text())

    theirs, ours = config(base.files, "vae/config.json"), config(vae.files, "config.json")
    if ours.get("_class_name") != "AutoencoderKL":
        raise SourceError(f"vae {vae.description}: its config.json is a {ours.get('_class_name')}, not an "
                          "AutoencoderKL (e.g. madebyollin/sdxl-vae-fp16-fix)")
    differing = [f"{key} {ours.get(key)!r} (the base model's: {theirs.get(key)!r})" for key in VAE_ARCHITECTURE
                 if ours.get(key) != theirs.get(key)]
    if differing:
        raise SourceError(f"vae {vae.description} does not fit the base model's VAE: " + "; ".join(differing))
    files = {name: path for name, path in base.files.items() if not name.startswith("vae/")}
    files.update({f"vae/{name}": path for name, path in vae.files.items()})
    return Chosen(files, base.description, base.hub_id,
                  [*base.notes, *vae.notes, f"vae/: {vae.description}, in place of the base model's own"])
