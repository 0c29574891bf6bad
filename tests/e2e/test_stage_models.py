"""`sdxl-lora-ops stage-models` against a real local stack, offline: the tiny SDXL and the tiny InstructBLIP from
folders and from a Hugging Face cache, checked before upload, then loaded by a real training job and a real
prepare job through the DAGs' own request builders and the settings the command printed."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for_processing, wait_for_training
from safetensors.torch import load_file, save_file

from ml.fixtures import synthetic, tiny_captioner, tiny_model
from sdxl_lora_ops import cli, stage_models
from sdxl_lora_ops import target as targets

OWN = "sdxl-lora-stage"  # a bucket of this file's own
PREFIX = "stage-prefix"
WEIGHTS = ("unet", "vae", "text_encoder", "text_encoder_2")
ROOT = Path(__file__).parents[2]


def record(stack, workdir: Path, prefix: str, bucket: str = OWN) -> Path:
    """A work dir whose local-stack.json names the session's stack, as `make airflow` writes it."""
    workdir.mkdir(parents=True, exist_ok=True)
    targets.write_record(workdir, stack.url, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                         "us-east-1", bucket, prefix, stack.process.pid)
    return workdir


def objects(s3, prefix: str) -> dict[str, bytes]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=OWN, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix):]] = s3.get_object(Bucket=OWN, Key=item["Key"])["Body"].read()
    return found


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def fp16_names(folder: Path, components=WEIGHTS) -> None:
    """The .fp16 variant's file names for the weights of `components` (the tiny weights stay fp32: only the
    names tell a variant, and the names are what the loaders ask for)."""
    for component in components:
        for weights in (folder / component).glob("*.safetensors"):
            weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))


def add_what_a_full_download_holds(folder: Path) -> Path:
    """Beside what the loaders read, the Hub repo's other files: pickles, an ONNX export, the single-file
    checkpoint, a README, a folder model_index.json does not list, git's attributes."""
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle")
    (folder / "sd_xl_base_1.0.safetensors").write_bytes(b"single-file checkpoint")
    (folder / "README.md").write_text("# SDXL\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / "vae_decoder").mkdir()
    (folder / "vae_decoder" / "config.json").write_text("{}")
    (folder / "vae_decoder" / "model.onnx").write_bytes(b"onnx")
    return folder


# The Hub repositories as they list their files (abridged), and what of them the loaders read.
SDXL_BASE_FILES = """.gitattributes 01.png LICENSE.md README.md model_index.json scheduler/scheduler_config.json
sd_xl_base_1.0.safetensors sd_xl_base_1.0_0.9vae.safetensors sd_xl_offset_example-lora_1.0.safetensors
text_encoder/config.json text_encoder/flax_model.msgpack text_encoder/model.fp16.safetensors text_encoder/model.onnx
text_encoder/model.safetensors text_encoder/openvino_model.bin text_encoder/openvino_model.xml
text_encoder_2/config.json text_encoder_2/model.fp16.safetensors text_encoder_2/model.onnx
text_encoder_2/model.onnx_data text_encoder_2/model.safetensors tokenizer/merges.txt tokenizer/special_tokens_map.json
tokenizer/tokenizer_config.json tokenizer/vocab.json tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json
tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json unet/config.json unet/diffusion_flax_model.msgpack
unet/diffusion_pytorch_model.fp16.safetensors unet/diffusion_pytorch_model.onnx unet/diffusion_pytorch_model.safetensors
unet/model.onnx_data unet/openvino_model.bin vae/config.json vae/diffusion_flax_model.msgpack
vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors vae_1_0/config.json
vae_1_0/diffusion_pytorch_model.fp16.safetensors vae_1_0/diffusion_pytorch_model.safetensors vae_decoder/config.json
vae_decoder/model.onnx vae_encoder/config.json vae_encoder/model.onnx""".split()
SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "add_watermarker": None, "force_zeros_for_empty_prompt": True,
              **{name: ["diffusers", "x"] for name in ("scheduler", "unet", "vae")},
              **{name: ["transformers", "x"] for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}}
INSTRUCTBLIP_FILES = """.gitattributes README.md config.json generation_config.json model-00001-of-00004.safetensors
model-00002-of-00004.safetensors model-00003-of-00004.safetensors model-00004-of-00004.safetensors
model.safetensors.index.json preprocessor_config.json processor_config.json pytorch_model-00001-of-00002.bin
pytorch_model-00002-of-00002.bin pytorch_model.bin.index.json qformer_tokenizer/special_tokens_map.json
qformer_tokenizer/tokenizer.json qformer_tokenizer/tokenizer_config.json qformer_tokenizer/vocab.txt
special_tokens_map.json tokenizer.json tokenizer.model tokenizer_config.json""".split()
VAE_FIX_FILES = """.gitattributes README.md config.json diffusion_pytorch_model.bin diffusion_pytorch_model.safetensors
images/activation-magnitudes.jpg sdxl.vae.safetensors sdxl_vae.safetensors""".split()


def test_of_the_hub_repositories_only_what_the_loaders_read_is_chosen():
    from sdxl_lora_ops.model_sources import select

    support = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
               "text_encoder_2/config.json", *(f"{t}/{n}" for t in ("tokenizer", "tokenizer_2") for n in (
                   "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")),
               "unet/config.json", "vae/config.json"]
    weights = ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
               "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert select(SDXL_BASE_FILES, SDXL_INDEX, None, "base model") == (sorted(support + weights), [])
    fp16 = [name.replace(".safetensors", ".fp16.safetensors") for name in weights]
    assert select(SDXL_BASE_FILES, SDXL_INDEX, "fp16", "base model") == (sorted(support + fp16), [])

    chosen, notes = select(INSTRUCTBLIP_FILES, None, "fp16", "captioner")
    assert chosen == sorted(name for name in INSTRUCTBLIP_FILES if not name.startswith((".", "README", "pytorch_model")))
    assert notes == ["captioner folder: no fp16 variant, full precision staged"]
    assert select(VAE_FIX_FILES, None, None, "vae") == (["config.json", "diffusion_pytorch_model.safetensors"], [])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clean = tiny_model.build(root / "clean")  # exactly what the full-precision stage holds
    full = add_what_a_full_download_holds(Path(shutil.copytree(clean, root / "full")))
    fp16 = Path(shutil.copytree(clean, root / "fp16"))  # `--include '*/*.fp16.safetensors'`: the variant alone
    fp16_names(fp16)
    # Both precisions and the rest, as the Hub repo holds them (for the cache).
    hub = add_what_a_full_download_holds(Path(shutil.copytree(clean, root / "hub")))
    for component in WEIGHTS:
        for weights in list((hub / component).glob("*.safetensors")):
            shutil.copy(weights, weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    captioner = tiny_captioner.build(root / "instructblip")
    # A VAE of the same architecture with other weights: the fixed-fp16 VAE's stand-in.
    vae = Path(shutil.copytree(clean / "vae", root / "vae-fix"))
    tensors = load_file(vae / "diffusion_pytorch_model.safetensors")
    save_file({name: tensor * 0.5 for name, tensor in tensors.items()}, vae / "diffusion_pytorch_model.safetensors")
    return {"clean": clean, "full": full, "fp16": fp16, "hub": hub, "captioner": captioner, "vae": vae, "root": root}


@pytest.fixture(scope="module")
def recorded(stack, s3, tmp_path_factory):
    s3.create_bucket(Bucket=OWN)
    return record(stack, tmp_path_factory.mktemp("airflow-workdir"), PREFIX)


def exports(printed: str) -> dict[str, str]:
    return dict(line[len("export "):].split("=", 1) for line in printed.splitlines() if line.startswith("export "))


@pytest.fixture(scope="module")
def full_staged(recorded, models):
    """A full-precision folder (and everything else a full download holds) and the captioner, staged."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = cli.main(["stage-models", "--base-model", str(models["full"]), "--captioner",
                           str(models["captioner"]), "--workdir", str(recorded)])
    return status, out.getvalue()


def test_a_folder_is_staged_as_the_loaders_read_it_and_the_settings_are_printed(full_staged, s3, models):
    status, printed = full_staged
    assert status == 0, printed
    assert objects(s3, f"{PREFIX}/base_model/") == files_under(models["clean"])  # no pickle, ONNX, README, ...
    assert objects(s3, f"{PREFIX}/captioner/") == files_under(models["captioner"])
    assert exports(printed) == {"SDXL_LORA_BASE_MODEL_URI": f"s3://{OWN}/{PREFIX}/base_model/",
                                "SDXL_LORA_CAPTIONER_URI": f"s3://{OWN}/{PREFIX}/captioner/"}
    assert "SDXL_LORA_BASE_MODEL_ID=<the Hub id" in printed  # a folder's Hub id is not known: said so
    assert "unet: UNet2DConditionModel" in printed and "InstructBlipForConditionalGeneration" in printed


def test_the_printed_names_are_the_settings(full_staged):
    import dataclasses

    from sdxl_lora.datasets import DEFAULT_CAPTIONER
    from sdxl_lora.settings import Settings

    from ml.contract.hyperparameters import SPEC_BY_NAME

    fields = {f"SDXL_LORA_{field.name.upper()}" for field in dataclasses.fields(Settings)}
    assert {*stage_models.SETTINGS.values(), stage_models.BASE_MODEL_ID_SETTING} <= fields
    assert stage_models.CAPTIONER_ID == DEFAULT_CAPTIONER
    assert stage_models.BASE_MODEL_ID == SPEC_BY_NAME["pretrained_model_name_or_path"].default


def test_a_second_run_uploads_nothing(full_staged, recorded, models):
    target = targets.resolve(str(recorded))
    again = stage_models.stage(target, str(models["full"]), str(models["captioner"]), out=open(os.devnull, "w"))
    for folder, source in (("base_model", models["clean"]), ("captioner", models["captioner"])):
        assert again[folder]["uploaded"] == [] and again[folder]["deleted"] == []
        assert sorted(again[folder]["unchanged"]) == sorted(files_under(source))


@pytest.fixture(scope="module")
def fp16_staged(full_staged, recorded, models, s3):
    """Over the full-precision stage: the fp16 variant alone, with the fixed VAE as vae/; the captioner kept."""
    captioner_before = objects(s3, f"{PREFIX}/captioner/")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = cli.main(["stage-models", "--base-model", str(models["fp16"]), "--variant", "fp16", "--vae",
                           str(models["vae"]), "--captioner", "none", "--workdir", str(recorded)])
    return status, out.getvalue(), captioner_before


def test_the_fp16_variant_alone_with_a_fixed_vae_replaces_the_full_precision_stage(fp16_staged, s3, models):
    status, printed, captioner_before = fp16_staged
    assert status == 0, printed
    expected = {name: body for name, body in files_under(models["fp16"]).items() if not name.startswith("vae/")}
    expected.update({f"vae/{name}": body for name, body in files_under(models["vae"]).items()})
    staged = objects(s3, f"{PREFIX}/base_model/")
    assert staged == expected  # the full-precision weights are gone: they would be loaded instead
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in staged
    assert "unet/diffusion_pytorch_model.safetensors" not in staged
    assert objects(s3, f"{PREFIX}/captioner/") == captioner_before  # --captioner none: left as it was
    assert "SDXL_LORA_CAPTIONER_URI" not in exports(printed)


def _pickle_only(folder: Path, weights: str, pickled: str, trace: Path) -> None:
    (folder / weights).unlink()
    with (folder / pickled).open("wb") as stream:
        pickle.dump(_LeavesATrace(trace), stream)


class _LeavesATrace:
    """Unpickling this writes the file it names: proof that something ran a pickle."""

    def __init__(self, trace: Path):
        self.trace = trace

    def __reduce__(self):
        return (Path.write_text, (self.trace, "unpickled"))


def _drop_a_tensor(folder: Path) -> None:
    tensors = load_file(folder / "text_encoder" / "model.safetensors")
    del tensors[sorted(tensors)[3]]
    save_file(tensors, folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})


def _other_vae(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))


REFUSED = {
    # a layout, how it is broken, the arguments to stage it, what the error must name
    "a pickle-only unet": ("clean", lambda f, t: _pickle_only(f, "unet/diffusion_pytorch_model.safetensors",
                                                              "unet/diffusion_pytorch_model.bin", t),
                           ["--captioner", "none"], ["base model unet/", "only pickle weights",
                                                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"]),
    "a pickle-only captioner": ("captioner", lambda f, t: _pickle_only(f, "model.safetensors", "pytorch_model.bin", t),
                                ["--base-model", "none"], ["captioner", "only pickle weights", "pytorch_model.bin",
                                                           "model.safetensors"]),
    "a text encoder short of a tensor": ("clean", lambda f, t: _drop_a_tensor(f), ["--captioner", "none"],
                                         ["base model text_encoder/", "lacks 1 tensor"]),
    "no second text encoder": ("clean", lambda f, t: shutil.rmtree(f / "text_encoder_2"), ["--captioner", "none"],
                               ["base model text_encoder_2/", "holds no weights", "model.safetensors"]),
    "a VAE of another architecture": ("vae", lambda f, t: _other_vae(f), ["--captioner", "none"],
                                      ["latent_channels 16", "the base model's: 4"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_layout_the_jobs_cannot_load_is_refused_by_name_and_nothing_is_uploaded(case, fp16_staged, recorded,
                                                                                   models, s3, tmp_path, capsys):
    source, damage, arguments, named = REFUSED[case]
    folder = Path(shutil.copytree(models[source], tmp_path / source))
    trace = tmp_path / "trace"
    damage(folder, trace)
    before = objects(s3, f"{PREFIX}/")
    if source == "vae":
        arguments = ["--base-model", str(models["fp16"]), "--vae", str(folder), *arguments]
    elif source == "clean":
        arguments = ["--base-model", str(folder), *arguments]
    else:
        arguments = ["--captioner", str(folder), *arguments]
    assert cli.main(["stage-models", *arguments, "--workdir", str(recorded)]) == 2
    error = capsys.readouterr().err
    assert all(text in error for text in named), error
    assert "Nothing was uploaded" in error and "stage-models-" not in error  # named as staged, not as checked
    assert objects(s3, f"{PREFIX}/") == before
    assert not trace.exists()


def _into_cache(hub: Path, repo: str, folder: Path, commit: str) -> None:
    """The Hugging Face cache's layout (huggingface_hub's file_download): blobs named by content, a snapshot
    of relative links per commit, refs/main naming the commit."""
    storage = hub / f"models--{repo.replace('/', '--')}"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)


def test_from_the_hugging_face_cache_offline_by_hub_id(stack, s3, recorded, models, tmp_path):
    """The defaults (the Hub ids) from a cache, with HF_HUB_OFFLINE=1: the fp16 variant only, the Hub id printed."""
    home = tmp_path / "hf-home"
    _into_cache(home / "hub", stage_models.BASE_MODEL_ID, models["hub"], "a" * 40)
    captioner = Path(shutil.copytree(models["captioner"], tmp_path / "captioner-repo"))
    (captioner / "pytorch_model.bin").write_bytes(b"a pickle")  # the Hub repo holds both
    (captioner / "pytorch_model.bin.index.json").write_text("{}")
    _into_cache(home / "hub", stage_models.CAPTIONER_ID, captioner, "b" * 40)
    workdir = record(stack, tmp_path / "workdir", "from-cache")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "sdxl_lora_ops.cli", "stage-models", "--variant", "fp16",
                           "--workdir", str(workdir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert objects(s3, "from-cache/base_model/") == files_under(models["fp16"])
    assert objects(s3, "from-cache/captioner/") == files_under(models["captioner"])
    assert exports(done.stdout) == {"SDXL_LORA_BASE_MODEL_URI": f"s3://{OWN}/from-cache/base_model/",
                                    "SDXL_LORA_BASE_MODEL_ID": stage_models.BASE_MODEL_ID,
                                    "SDXL_LORA_CAPTIONER_URI": f"s3://{OWN}/from-cache/captioner/"}
    assert f"{stage_models.BASE_MODEL_ID} at commit aaaaaaaaaaaa" in done.stdout
    assert "captioner folder: no fp16 variant, full precision staged" in done.stdout


def test_offline_a_hub_id_missing_from_the_cache_is_named_with_the_fix(recorded, capsys):
    assert cli.main(["stage-models", "--base-model", "nobody/absent-sdxl", "--captioner", "none",
                     "--workdir", str(recorded)]) == 2
    error = capsys.readouterr().err
    assert "nobody/absent-sdxl is not in the Hugging Face cache" in error and "HF_HUB_OFFLINE=1" in error


def test_a_bucket_that_cannot_be_listed_is_named_before_any_download(stack, tmp_path, capsys):
    workdir = record(stack, tmp_path / "workdir", "p", bucket="sdxl-lora-absent")
    assert cli.main(["stage-models", "--workdir", str(workdir)]) == 2  # the Hub ids: not in the cache, never asked
    error = capsys.readouterr().err
    assert "s3://sdxl-lora-absent/p" in error and "NoSuchBucket" in error and "create the bucket" in error


def test_a_source_that_is_neither_a_folder_nor_a_hub_id_is_refused(recorded, tmp_path, capsys):
    assert cli.main(["stage-models", "--base-model", str(tmp_path / "absent"), "--captioner", "none",
                     "--workdir", str(recorded)]) == 2
    assert "neither a directory nor a Hugging Face Hub id" in capsys.readouterr().err


def test_the_jobs_load_what_was_staged(fp16_staged, stack, sagemaker, s3, models, tmp_path, monkeypatch):
    """A training job and a prepare job (latent cache on, uncaptioned frames) from the DAGs' own request
    builders, with the settings stage-models printed: the fp16 variant, the fixed VAE and the captioner load."""
    from sdxl_lora import datasets, sagemaker_requests
    from sdxl_lora.settings import Settings

    from ml.dataset import latents

    status, printed, _ = fp16_staged
    for name, value in exports(printed).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SDXL_LORA_BUCKET", OWN)
    monkeypatch.setenv("SDXL_LORA_PREFIX", PREFIX)
    monkeypatch.setenv("SDXL_LORA_CAPTIONER_URI", f"s3://{OWN}/{PREFIX}/captioner/")  # staged by full_staged
    monkeypatch.setenv("SDXL_LORA_USE_SPOT", "false")
    settings = Settings.from_environment()
    assert settings.base_model_uri == f"s3://{OWN}/{PREFIX}/base_model/"

    frames = synthetic.write_dataset(tmp_path / "frames", count=4)
    for path in frames.iterdir():
        s3.upload_file(str(path), OWN, f"{PREFIX}/train/{path.name}")
        if path.suffix == ".png":  # uncaptioned raw frames: the staged captioner captions them
            s3.upload_file(str(path), OWN, f"{PREFIX}/raw_dataset/staged/{path.name}")

    training = sagemaker_requests.training_request(
        settings, "stage-models-train", settings.uri("train") + "/",
        {"resolution": 32, "train_batch_size": 2, "max_train_steps": 2, "validation_split": 0,
         "checkpointing_steps": 100})
    sagemaker.create_training_job(**training)
    options = {"resolution": 32, "min_size": 32, "caption_batch_size": 4, "latent_cache": True}
    inputs = datasets.prepare_inputs(settings, settings.raw_dataset("staged"), latent_cache=True)
    arguments = datasets.prepare_arguments(settings, options, "staged", "key")
    arguments += ["--max-length", "8", "--min-length", "1", "--num-beams", "1"]  # short captions: a tiny model
    sagemaker.create_processing_job(**sagemaker_requests.processing_request(
        settings, "stage-models-prepare", inputs, settings.processed_dataset("staged"), arguments=arguments))

    job = wait_for_training(sagemaker, "stage-models-train")
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    channel = stack.workdir / "training" / "stage-models-train" / "input" / "data" / "base_model"
    assert files_under(channel) == objects(s3, f"{PREFIX}/base_model/")  # it trained on the fp16 files alone
    processing = wait_for_processing(sagemaker, "stage-models-prepare")
    assert processing["ProcessingJobStatus"] == "Completed", processing.get("FailureReason")
    manifest = json.loads(s3.get_object(Bucket=OWN, Key=f"{PREFIX}/proc_dataset/staged/manifest.json")["Body"].read())
    assert manifest["counts"]["latents_cached"] == 4
    assert manifest["counts"]["captions_from"] == {"instructblip": 4}
    fixed = tmp_path / "fixed"
    shutil.copytree(models["vae"], fixed / "vae")
    assert manifest["latent_cache"]["vae_fingerprint"] == latents.vae_fingerprint(str(fixed))  # the staged VAE


def test_make_airflow_keeps_a_staged_model_where_it_would_stage_the_tiny_one(fp16_staged, s3, models, tmp_path,
                                                                            monkeypatch):
    """`make airflow` stages the tiny models into its (persisted) S3 at each start, but not over stage-models'."""
    from sdxl_lora_ops import demo

    monkeypatch.setattr(demo, "BUCKET", OWN)
    monkeypatch.setattr(demo, "PREFIX", PREFIX)
    before = objects(s3, f"{PREFIX}/")
    assert demo._stage(s3, tmp_path / "kept") == (f"s3://{OWN}/{PREFIX}/base_model/",
                                                  f"s3://{OWN}/{PREFIX}/captioner/")
    assert {k: v for k, v in objects(s3, f"{PREFIX}/").items() if not k.startswith("raw_dataset/demo/")} == before
    assert not (tmp_path / "kept" / "tiny-sdxl").exists()  # nothing built for it

    monkeypatch.setattr(demo, "PREFIX", "nothing-staged")
    shutil.copytree(models["clean"], tmp_path / "fresh" / "tiny-sdxl")  # what an earlier start built
    shutil.copytree(models["captioner"], tmp_path / "fresh" / "tiny-instructblip")
    demo._stage(s3, tmp_path / "fresh")
    assert objects(s3, "nothing-staged/base_model/") == files_under(models["clean"])
    assert objects(s3, "nothing-staged/captioner/") == files_under(models["captioner"])
