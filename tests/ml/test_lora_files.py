"""The LoRA file checks both the scoring job and the endpoints use (ml/contract/lora_files.py)."""

from __future__ import annotations

import builtins
import io
import json
import struct
import tarfile

import pytest

from ml.contract.container import LORA_WEIGHTS
from ml.contract.lora_files import (
    MAX_HEADER_BYTES,
    LoraFileError,
    LoraMemberMissing,
    check_safetensors,
    lora_from_archive,
    refuse_pickle,
)


def _safetensors(header: dict, payload: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + payload


GOOD = _safetensors({"unet.a.lora.down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                    b"\0\0\0\0")


def test_a_good_file_is_accepted(tmp_path):
    path = tmp_path / LORA_WEIGHTS
    path.write_bytes(GOOD)
    check_safetensors(path, "adapter default")


def test_a_pickle_is_refused_by_its_name_without_being_opened(tmp_path, monkeypatch):
    path = tmp_path / "adapter.ckpt"
    path.write_bytes(b"\x80\x04K\x01.")
    monkeypatch.setattr(builtins, "open", lambda *a, **k: pytest.fail("a pickle file was opened"))
    monkeypatch.setattr(io, "open", lambda *a, **k: pytest.fail("a pickle file was opened"))
    with pytest.raises(LoraFileError, match=r"adapter x is a pickle file \(adapter.ckpt\): only safetensors"):
        refuse_pickle(str(path), "adapter x")
    refuse_pickle("weights.safetensors", "adapter x")  # anything else passes


@pytest.mark.parametrize(("data", "reason"), [
    (b"{}", r"only 2 bytes"),
    (GOOD[:-10], r"its header length \(\d+ bytes\) is more than the \d+ bytes after it \(a truncated file\?\)"),
    (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", r"its header length \(\d+ bytes\) is over the 100 MiB limit"),
    (struct.pack("<Q", 4) + b"[1] ", r"its header is not a JSON object"),
    (struct.pack("<Q", 2) + b"\xff\xfe", r"its header is not a JSON object"),
], ids=["short", "truncated", "oversized", "not-an-object", "not-text"])
def test_a_bad_header_is_refused_with_its_reason(tmp_path, data, reason):
    path = tmp_path / LORA_WEIGHTS
    path.write_bytes(data)
    with pytest.raises(LoraFileError, match=f"^adapter a is not a safetensors file: {reason}"):
        check_safetensors(path, "adapter a")


def test_an_oversized_header_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / LORA_WEIGHTS
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{" + b" " * 64)
    reads = []
    real_open = type(path).open

    def recording_open(self, *args, **kwargs):
        file = real_open(self, *args, **kwargs)
        read = file.read
        file.read = lambda size=-1: reads.append(size) or read(size)
        return file

    monkeypatch.setattr(type(path), "open", recording_open)
    with pytest.raises(LoraFileError, match="over the 100 MiB limit"):
        check_safetensors(path, "adapter a")
    assert reads == [8]


def _archive(members: dict[str, bytes], symlink: str | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(link)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def test_only_the_regular_file_at_the_archives_top_is_taken():
    assert lora_from_archive(_archive({"README.md": b"hi", f"./{LORA_WEIGHTS}": GOOD}), "model.tar.gz") == GOOD
    for elsewhere in (f"../{LORA_WEIGHTS}", f"sub/{LORA_WEIGHTS}", f"/{LORA_WEIGHTS}"):
        with pytest.raises(LoraMemberMissing, match=f"model.tar.gz holds no {LORA_WEIGHTS} at its top level"):
            lora_from_archive(_archive({elsewhere: GOOD}), "model.tar.gz")
    with pytest.raises(LoraMemberMissing):
        lora_from_archive(_archive({}, symlink=LORA_WEIGHTS), "model.tar.gz")
    with pytest.raises(LoraFileError, match="model.tar.gz is not a readable .tar.gz"):
        lora_from_archive(io.BytesIO(b"\x1f\x8b broken"), "model.tar.gz")
