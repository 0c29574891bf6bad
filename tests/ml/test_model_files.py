"""Base models load as users stage them (every file, or the fp16 variant alone), from safetensors only: a
component that holds only pickles is refused by name, and nothing is ever unpickled."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml.contract.model_files import ModelFilesError, load_options, pipeline_options, variant_of
from ml.fixtures import synthetic
from ml.serve import inference

WEIGHTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _layout(base_model: Path, target: Path, fp16: tuple[str, ...] = ()) -> Path:
    """The tiny SDXL with the components in `fp16` renamed to the .fp16 variant's file names (the guide's
    `--include '*/*.fp16.safetensors'` download holds only those)."""
    shutil.copytree(base_model, target)
    for component in fp16:
        for weights in (target / component).glob("*.safetensors"):
            weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    return target


class _LeavesATrace:
    """Unpickling this writes the file it names: proof that a loader ran a pickle."""

    def __init__(self, trace: Path):
        self.trace = trace

    def __reduce__(self):
        return (Path.write_text, (self.trace, "unpickled"))


def _plant_pickle(folder: Path, name: str, trace: Path) -> None:
    with (folder / name).open("wb") as stream:
        pickle.dump(_LeavesATrace(trace), stream)


def test_the_variant_is_read_from_the_file_names(base_model, tmp_path):
    full = _layout(base_model, tmp_path / "full")
    fp16 = _layout(base_model, tmp_path / "fp16", fp16=WEIGHTS)
    mixed = _layout(base_model, tmp_path / "mixed", fp16=("unet",))
    assert variant_of(full / "unet") is None and pipeline_options(full) == {"use_safetensors": True}
    assert variant_of(fp16 / "unet") == "fp16" and pipeline_options(fp16) == {"use_safetensors": True, "variant": "fp16"}
    assert pipeline_options(mixed) == {"use_safetensors": True, "variant": "fp16"}
    assert load_options(mixed, "unet") == {"use_safetensors": True, "variant": "fp16"}
    assert load_options(mixed, "vae") == {"use_safetensors": True}
    assert load_options("stabilityai/stable-diffusion-xl-base-1.0", "unet") == {"use_safetensors": True}


@pytest.mark.parametrize("fp16", [(), WEIGHTS, ("unet",)], ids=["full precision", "fp16 variant alone", "mixed"])
def test_the_serving_pipeline_loads_every_layout(base_model, tmp_path, fp16):
    layout = _layout(base_model, tmp_path / "sdxl", fp16=fp16)
    pipeline = inference.load_base_pipeline(str(layout), torch.float32)
    reference = inference.load_base_pipeline(str(base_model), torch.float32)
    for name in WEIGHTS:
        mine, theirs = getattr(pipeline, name).state_dict(), getattr(reference, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_component_with_only_pickles_is_refused_by_name_and_never_unpickled(base_model, tmp_path):
    layout = _layout(base_model, tmp_path / "sdxl")
    trace = tmp_path / "trace"
    (layout / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _plant_pickle(layout / "unet", "diffusion_pytorch_model.bin", trace)
    with pytest.raises(ModelFilesError, match=r"unet holds only pickle weights \(diffusion_pytorch_model.bin\).*"
                                              r"diffusion_pytorch_model.safetensors"):
        pipeline_options(layout)
    with pytest.raises(inference.ModelLoadError, match="only pickle weights"):
        inference.load_base_pipeline(str(layout), torch.float32)
    assert not trace.exists()


def test_a_pickle_beside_the_safetensors_is_never_read(base_model, tmp_path):
    layout = _layout(base_model, tmp_path / "sdxl", fp16=WEIGHTS)
    trace = tmp_path / "trace"
    for component, name in (("unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin")):
        _plant_pickle(layout / component, name, trace)
    inference.load_base_pipeline(str(layout), torch.float32)
    assert not trace.exists()


def test_a_folder_without_weights_says_what_it_expected(base_model, tmp_path):
    layout = _layout(base_model, tmp_path / "sdxl")
    (layout / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ModelFilesError, match=r"text_encoder holds no weights: expected model.safetensors"):
        pipeline_options(layout)


def test_the_prepare_job_caches_latents_with_the_fp16_variant_alone(base_model, tmp_path):
    layout = _layout(base_model, tmp_path / "sdxl", fp16=WEIGHTS)
    raw = tmp_path / "job" / "processing" / "input" / "raw"
    synthetic.write_dataset(raw, count=2, width=64, height=36)
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path / "job")}
    done = subprocess.run([sys.executable, "-m", "ml.cli", "prepare", "--resolution", "64", "--min-size", "32",
                           "--captioner", "none", "--base-model", str(layout), "--latent-cache"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    latents = list((tmp_path / "job" / "processing" / "output" / "dataset" / "latents").rglob("*.safetensors"))
    assert len(latents) == 2


def test_a_training_job_trains_on_the_fp16_variant_alone_and_refuses_pickles(make_job, base_model, tmp_path):
    fp16 = _layout(base_model, tmp_path / "fp16", fp16=WEIGHTS)
    job = make_job({"max_train_steps": 2, "train_text_encoder": True, "num_validation_images": 1}, base=fp16).run()
    assert job.lora.exists(), job.failure

    pickled = _layout(base_model, tmp_path / "pickled")
    trace = tmp_path / "trace"
    (pickled / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    _plant_pickle(pickled / "vae", "diffusion_pytorch_model.bin", trace)
    job = make_job({"max_train_steps": 2}, base=pickled).run()
    assert not job.lora.exists()
    assert "vae holds only pickle weights (diffusion_pytorch_model.bin)" in job.failure
    assert not trace.exists()
