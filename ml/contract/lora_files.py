"""The checks every LoRA file passes before anything parses it: safetensors only, by name and by header.

A training job scoring an adapter (ml.train.evaluate) and an endpoint loading one (ml.serve.adapters)
read files that came from elsewhere, so both refuse pickles by their name without opening them, read
no more of a .safetensors file than its 8-byte header length and its JSON header (capped), and take
from a model.tar.gz only the regular file at its top level named LORA_WEIGHTS. Pure Python.
"""

from __future__ import annotations

import json
import struct
import tarfile
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
