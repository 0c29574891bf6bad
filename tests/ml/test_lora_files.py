"""The LoRA file checks both the scoring job and the endpoints use (ml/contract/lora_files.py): safetensors only,
and which layout a file is in, from its header alone."""

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
    LoraFormat,
    LoraMemberMissing,
    check_safetensors,
    detect_format,
    file_format,
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


# ---------------------------------------------------------------------------------------
# Layouts

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def _header(*keys: str, metadata: dict | None = None) -> dict:
    header = {key: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for key in keys}
    return {**header, "__metadata__": metadata} if metadata else header


@pytest.mark.parametrize("keys, expected", [
    (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
      "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight",
      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"],
     LoraFormat("diffusers", ("LoRA",), 2)),
    (["unet.a.lora_A.weight", "unet.a.lora_B.weight", "unet.a.lora_magnitude_vector"],  # diffusers reads its DoRA
     LoraFormat("diffusers", ("LoRA",), 1)),
    ([f"{Q}.lora_down.weight", f"{Q}.lora_up.weight", f"{Q}.alpha", f"{TE}.lora_down.weight", f"{TE}.lora_up.weight"],
     LoraFormat("kohya", ("LoRA",), 2, frozenset({"lora_down.weight", "lora_up.weight", "alpha"}))),
    ([f"lora_unet_down_blocks_1_resnets_0_conv1.{kind}.weight" for kind in ("lora_down", "lora_up", "lora_mid")],
     LoraFormat("kohya", ("LoRA",), 1, frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"}))),
    ([f"{Q}.hada_w1_a", f"{Q}.hada_w1_b", f"{Q}.hada_w2_a", f"{Q}.hada_w2_b", f"{Q}.alpha",
      f"{TE}.lokr_w1", f"{TE}.lokr_w2_a", f"{TE}.lokr_w2_b", f"{TE}.lokr_t2"],
     LoraFormat("kohya", ("LoHa", "LoKr"), 2, frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha",
                                                         "lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}))),
], ids=["diffusers", "diffusers-dora", "kohya", "locon-tucker", "loha-and-lokr"])
def test_each_accepted_layout_is_told_from_the_names_alone(keys, expected):
    assert detect_format(_header(*keys), "adapter a") == expected
    # What every LoRA loader (diffusers' included) reads: down and up matrices, alphas; no Tucker core, LoHa or LoKr.
    assert expected.plain_lora is (expected.kind == "diffusers" or expected.tensors == {"lora_down.weight",
                                                                                        "lora_up.weight", "alpha"})


@pytest.mark.parametrize("keys, metadata, reason", [
    ([], None, "adapter a holds no tensors"),
    (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", f"{Q}.lora_down.weight"],
     {"ss_base_model_version": "sd_v1"},
     r"adapter a is not an SDXL LoRA: it names lora_te_, the one text encoder of SD 1.x and 2.x .* "
     r"\(its metadata says ss_base_model_version=sd_v1\)"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], {"modelspec.architecture": "flux-1-dev/lora"},
     r"is not an SDXL LoRA: its tensors name no part of the SDXL pipeline \(e.g. transformer.transformer_blocks.0"
     r".*\(its metadata says modelspec.architecture=flux-1-dev/lora\). Accepted: diffusers/PEFT LoRA"),
    (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], None, "not an SDXL LoRA"),
    ([f"{Q}.lora_down.weight", "unet.a.lora_A.weight"], None, "mixes kohya names .* with diffusers ones"),
    ([f"{Q}.oft_blocks", f"{Q}.alpha"], None, r"kinds that are not read here: .oft_blocks \(LyCORIS OFT\) "
                                              rf"\(e.g. {Q}.oft_blocks\). Accepted: .*LyCORIS LoKr"),
    ([f"{Q}.lora_down.weight", f"{Q}.lora_up.weight", f"{Q}.scale"], None, r"kinds that are not read here: .scale \(e"),
    ([f"{Q}.lora_down.weight", f"{Q}.lora_up.weight", f"{Q}.dora_scale"], None, f"is a DoRA file .*e.g. {Q}"),
    ([f"{Q}.lora_down.weight"], None, f"LoRA module {Q} is incomplete: it needs lora_up.weight .it has lora_down"),
    ([f"{Q}.hada_w1_a", f"{Q}.hada_w1_b", f"{Q}.hada_w2_a", f"{Q}.hada_w2_b", f"{Q}.hada_t1"], None,
     "needs hada_t1 and hada_t2 together"),
    ([f"{Q}.lokr_w1", f"{Q}.lokr_w1_a", f"{Q}.lokr_w2"], None, "needs lokr_w1 or else lokr_w1_a and lokr_w1_b"),
    ([f"{Q}.lokr_w1", f"{Q}.lokr_w2_a"], None, "needs lokr_w2 or else lokr_w2_a and lokr_w2_b"),
    ([f"{Q}.lokr_w1", f"{Q}.lokr_w2", f"{Q}.lokr_t2"], None, r"lokr_w2_a and lokr_w2_b \(not lokr_w2\) beside lokr_t2"),
    ([f"{Q}.lora_down.weight", f"{Q}.lora_up.weight", f"{Q}.hada_w1_a"], None, "has tensors of LoHa and LoRA at once"),
    ([f"{Q}.alpha"], None, "has only an alpha"),
    (["unet.a.weight"], None, r"not LoRA ones under diffusers names \(e.g. unet.a.weight\)"),
], ids=["empty", "sd15", "flux-diffusers", "flux-comfy", "mixed", "oft", "unknown", "dora", "no-up", "loha-one-core",
        "lokr-both", "lokr-half", "lokr-core-whole", "two-methods", "alpha-only", "diffusers-non-lora"])
def test_other_files_are_refused_naming_what_they_hold(keys, metadata, reason):
    with pytest.raises(LoraFileError, match=reason):
        detect_format(_header(*keys, metadata=metadata), "adapter a")


def test_a_files_format_comes_from_its_header(tmp_path):
    path = tmp_path / "style.safetensors"
    path.write_bytes(_safetensors(_header(f"{Q}.lora_down.weight", f"{Q}.lora_up.weight"), b"\0" * 4))
    assert file_format(path, "adapter a").describe() == "kohya LoRA, 1 modules"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(LoraFileError, match="not a safetensors file"):
        file_format(path, "adapter a")
