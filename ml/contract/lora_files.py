"""The checks every LoRA file passes before anything parses it: safetensors only, by name and by header.

A training job scoring an adapter (ml.train.evaluate) and an endpoint loading one (ml.serve.adapters)
read files that came from elsewhere, so both refuse pickles by their name without opening them, read
no more of a .safetensors file than its 8-byte header length and its JSON header (capped), and take
from a model.tar.gz only the regular file at its top level named LORA_WEIGHTS. Pure Python.

detect_format tells, from the header's tensor names alone, which of the accepted layouts a file is in: the
diffusers/PEFT one training writes, or the kohya naming (ml.contract.kohya_names) that sd-scripts, LyCORIS and
the files users download (Civitai, ...) use, with its LoRA/LoCon, LoHa and LoKr tensors. Anything else is refused
with the tensor kinds found and the formats accepted.
"""

from __future__ import annotations

import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ml.contract.container import LORA_WEIGHTS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
_LENGTH_BYTES = 8  # a safetensors file opens with its header's length, a little-endian uint64


class LoraFileError(ValueError):
    """A file that is not a safetensors LoRA; the message names it (by the label given) and says why."""


class LoraMemberMissing(LoraFileError):
    """A readable archive without a LORA_WEIGHTS at its top level."""


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickle(name: str, label: str) -> None:
    """Refuses a pickle by its name alone: nothing ever opens one."""
    if is_pickle(name):
        raise LoraFileError(f"{label} is a pickle file ({Path(name).name}): only safetensors adapters are read, "
                            "and pickle files are never opened")


def check_safetensors(path: Path, label: str) -> None:
    """Passes a file whose header is a safetensors one: a length within the file and the cap, then a JSON object."""
    read_header(path, label)


def read_header(path: Path, label: str) -> dict:
    """A safetensors file's JSON header (tensor name -> dtype, shape, offsets; `__metadata__`), after the checks
    check_safetensors makes; no tensor is read."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(_LENGTH_BYTES)
        if len(prefix) < _LENGTH_BYTES:
            raise LoraFileError(f"{label} is not a safetensors file: only {size} bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise LoraFileError(f"{label} is not a safetensors file: its header length ({length} bytes) is over "
                                f"the {MAX_HEADER_BYTES >> 20} MiB limit")
        if length > size - _LENGTH_BYTES:
            raise LoraFileError(f"{label} is not a safetensors file: its header length ({length} bytes) is more "
                                f"than the {size - _LENGTH_BYTES} bytes after it (a truncated file?)")
        header = file.read(length)
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise LoraFileError(f"{label} is not a safetensors file: its header is not a JSON object")
    return parsed


def is_lora_member(member: tarfile.TarInfo) -> bool:
    """A regular file (never a link) named LORA_WEIGHTS at the archive's top level ('./' allowed)."""
    return member.isfile() and PurePosixPath(member.name).parts == (LORA_WEIGHTS,)


def lora_from_archive(stream: BinaryIO, label: str) -> bytes:
    """The LORA_WEIGHTS member of a .tar.gz, read as a stream up to that member; nothing is extracted."""
    try:
        with tarfile.open(fileobj=stream, mode="r|gz") as archive:
            for member in archive:
                if is_lora_member(member):
                    return archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise LoraFileError(f"{label} is not a readable .tar.gz: {error}") from None
    raise LoraMemberMissing(f"{label} holds no {LORA_WEIGHTS} at its top level")


# ---------------------------------------------------------------------------------------
# Which layout a LoRA file is in

DIFFUSERS, KOHYA = "diffusers", "kohya"
LORA, LOHA, LOKR = "LoRA", "LoHa", "LoKr"
DIFFUSERS_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")
SINGLE_TEXT_ENCODER = "lora_te_"  # SD 1.x and 2.x have one text encoder; SDXL files name lora_te1_ and lora_te2_
ALPHA = "alpha"
# A kohya-named module's tensors (`<module>.<tensor>`) and the algorithm each belongs to. LoRA's lora_mid is
# LoCon's Tucker core of a k x k convolution.
KOHYA_TENSORS = {
    "lora_down.weight": LORA, "lora_up.weight": LORA, "lora_mid.weight": LORA,
    "hada_w1_a": LOHA, "hada_w1_b": LOHA, "hada_w2_a": LOHA, "hada_w2_b": LOHA, "hada_t1": LOHA, "hada_t2": LOHA,
    "lokr_w1": LOKR, "lokr_w1_a": LOKR, "lokr_w1_b": LOKR, "lokr_w2": LOKR, "lokr_w2_a": LOKR, "lokr_w2_b": LOKR,
    "lokr_t2": LOKR,
}
# Kohya-named tensors of methods that are not fused here, by what writes them: named in the refusal.
REFUSED_TENSORS = {
    "on_input": "LyCORIS (IA)^3", "weight": "LyCORIS (IA)^3", "oft_blocks": "LyCORIS OFT",
    "oft_diag": "LyCORIS BOFT", "rescale": "LyCORIS OFT", "diff": "LyCORIS full", "diff_b": "LyCORIS full",
    "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm", "a1.weight": "LyCORIS GLoRA", "a2.weight": "LyCORIS GLoRA",
    "b1.weight": "LyCORIS GLoRA", "b2.weight": "LyCORIS GLoRA", "bias_indices": "LyCORIS sparse bias",
    "bias_values": "LyCORIS sparse bias", "bias_size": "LyCORIS sparse bias",
}
ACCEPTED = ("diffusers/PEFT LoRA (unet., text_encoder., text_encoder_2. names; lora_A/lora_B or lora.down/lora.up)",
            "kohya LoRA and LoCon (lora_unet_, lora_te1_, lora_te2_ modules: lora_down, lora_up, lora_mid, alpha)",
            "LyCORIS LoHa (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2, alpha)",
            "LyCORIS LoKr (lokr_w1 or lokr_w1_a and lokr_w1_b, lokr_w2 or lokr_w2_a and lokr_w2_b, lokr_t2, alpha)")
_SHOWN = 3  # example names a refusal quotes


@dataclass(frozen=True)
class LoraFormat:
    kind: str  # DIFFUSERS or KOHYA
    algorithms: tuple[str, ...]  # KOHYA: LORA, LOHA and/or LOKR; DIFFUSERS: (LORA,)
    modules: int  # modules adapted
    tensors: frozenset[str] = frozenset()  # KOHYA: the tensor kinds found (`lora_down.weight`, `alpha`, ...)

    @property
    def plain_lora(self) -> bool:
        """Down and up matrices alone (and alphas): the LoRA every loader, diffusers' included, reads."""
        return self.kind == DIFFUSERS or self.tensors <= {"lora_down.weight", "lora_up.weight", ALPHA}

    def describe(self) -> str:
        return f"{self.kind} {'+'.join(self.algorithms)}, {self.modules} modules"


def _accepted() -> str:
    return "; ".join(ACCEPTED)


def _examples(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def architecture_hint(metadata: dict | None) -> str:
    """What a file's metadata says it was trained on, for a refusal; '' when it says nothing."""
    said = [f"{key}={metadata[key]}" for key in ("ss_base_model_version", "modelspec.architecture")
            if isinstance(metadata, dict) and metadata.get(key)]
    return f" (its metadata says {', '.join(said)})" if said else ""


def split_kohya_key(key: str) -> tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`)."""
    module, _, tensor = key.partition(".")
    return module, tensor


def detect_format(header: dict, label: str) -> LoraFormat:
    """The layout of a LoRA file from its safetensors header (read_header); LoraFileError for any other."""
    metadata = header.get("__metadata__")
    keys = [key for key in header if key != "__metadata__"]
    if not keys:
        raise LoraFileError(f"{label} holds no tensors")
    kohya = [key for key in keys if key.startswith(KOHYA_PREFIXES)]
    diffusers = [key for key in keys if key.startswith(DIFFUSERS_COMPONENTS)]
    if len(kohya) == len(keys):
        return _kohya_format(keys, label)
    if len(diffusers) == len(keys):
        return _diffusers_format(keys, label)
    if kohya and diffusers:
        raise LoraFileError(f"{label} mixes kohya names ({_examples(kohya)}) with diffusers ones "
                            f"({_examples(diffusers)}); a LoRA file uses one of them")
    others = [key for key in keys if key not in kohya and key not in diffusers]
    if any(key.startswith(SINGLE_TEXT_ENCODER) for key in others):
        raise LoraFileError(f"{label} is not an SDXL LoRA: it names {SINGLE_TEXT_ENCODER}, the one text encoder of "
                            f"SD 1.x and 2.x (SDXL files name lora_te1_ and lora_te2_){architecture_hint(metadata)}")
    raise LoraFileError(f"{label} is not an SDXL LoRA: its tensors name no part of the SDXL pipeline "
                        f"(e.g. {_examples(others)}){architecture_hint(metadata)}. Accepted: {_accepted()}")


def _kohya_format(keys: list[str], label: str) -> LoraFormat:
    modules: dict[str, set[str]] = {}
    for key in keys:
        module, tensor = split_kohya_key(key)
        modules.setdefault(module, set()).add(tensor)
    found = set().union(*modules.values())
    if "dora_scale" in found:
        raise LoraFileError(f"{label} is a DoRA file (dora_scale tensors, e.g. "
                            f"{_examples(m for m, t in modules.items() if 'dora_scale' in t)}): its magnitudes "
                            "rescale the base weights, which no LoRA scale reproduces, so it is not fused here; "
                            f"accepted: {_accepted()}")
    unknown = found - KOHYA_TENSORS.keys() - {ALPHA}
    if unknown:
        kinds = ", ".join(f".{t} ({REFUSED_TENSORS[t]})" if t in REFUSED_TENSORS else f".{t}" for t in sorted(unknown))
        examples = _examples(f"{m}.{t}" for m, tensors in modules.items() for t in tensors & unknown)
        raise LoraFileError(f"{label} holds tensors of kinds that are not read here: {kinds} (e.g. {examples}). "
                            f"Accepted: {_accepted()}")
    algorithms = set()
    for module, tensors in modules.items():
        kinds = {KOHYA_TENSORS[t] for t in tensors if t != ALPHA}
        if len(kinds) != 1:
            what = "only an alpha" if not kinds else f"tensors of {' and '.join(sorted(kinds))} at once"
            raise LoraFileError(f"{label}: module {module} has {what} ({', '.join(sorted(tensors))})")
        (kind,) = kinds
        missing = _missing(kind, tensors)
        if missing:
            raise LoraFileError(f"{label}: {kind} module {module} is incomplete: it needs {missing} "
                                f"(it has {', '.join(sorted(tensors))})")
        algorithms.add(kind)
    return LoraFormat(KOHYA, tuple(sorted(algorithms)), len(modules), frozenset(found))


def _missing(kind: str, tensors: set[str]) -> str:
    """What a module of the kind needs and has not, '' when complete."""
    if kind == LORA:
        needed = [t for t in ("lora_down.weight", "lora_up.weight") if t not in tensors]
    elif kind == LOHA:
        needed = [t for t in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if t not in tensors]
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            needed.append("hada_t1 and hada_t2 together")
    else:  # each Kronecker factor whole or as a product, never both
        needed = [f"{full} or else {full}_a and {full}_b" for full in ("lokr_w1", "lokr_w2")
                  if (full in tensors) == ({f"{full}_a", f"{full}_b"} <= tensors)
                  or (full in tensors and {f"{full}_a", f"{full}_b"} & tensors)]
        if "lokr_t2" in tensors and "lokr_w2" in tensors:
            needed.append("lokr_w2_a and lokr_w2_b (not lokr_w2) beside lokr_t2")
    return " and ".join(needed)


def _diffusers_format(keys: list[str], label: str) -> LoraFormat:
    unknown = [key for key in keys if "lora" not in key and not key.endswith(f".{ALPHA}")]
    if unknown:
        raise LoraFileError(f"{label} holds tensors that are not LoRA ones under diffusers names "
                            f"(e.g. {_examples(unknown)}). Accepted: {_accepted()}")
    # One down matrix per module, whichever of diffusers' spellings names it (lora_A, lora.down, lora_linear_layer.down,
    # the old attention processors' to_q_lora.down).
    modules = sum(key.endswith(("lora_A.weight", "down.weight")) for key in keys)
    return LoraFormat(DIFFUSERS, (LORA,), modules)


def file_format(path: Path, label: str) -> LoraFormat:
    """detect_format of a file, after check_safetensors' checks."""
    return detect_format(read_header(path, label), label)
