"""Scoring jobs (ml/train/evaluate.py): a training job with a `score_adapter` channel scores that LoRA, trains nothing;
diffusers, kohya and LyCORIS files alike."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from ml.contract.container import KOHYA_LORA_WEIGHTS
from ml.contract.metrics import final_metrics

SCORED = {"max_train_steps": 4, "validation_split": 0.3, "learning_rate": 5e-3}


def _scoring_job(make_job, adapter_dir, hyperparameters, **kw):
    job = make_job(hyperparameters, **kw)
    (job.base / "input" / "data" / "score_adapter").symlink_to(adapter_dir, target_is_directory=True)
    return job


def _tarred(job, tmp_path):
    """The trained model/ as the model.tar.gz SageMaker uploads (and a SageMaker channel downloads)."""
    folder = tmp_path / f"tar-{job.base.name}"
    folder.mkdir()
    with tarfile.open(folder / "model.tar.gz", "w:gz") as archive:
        archive.add(job.model, arcname=".")
    return folder


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_scoring_a_jobs_adapter_on_its_own_version_gives_that_jobs_val_loss(make_job, tmp_path, train_text_encoder):
    trained = make_job({**SCORED, "train_text_encoder": train_text_encoder}).run()
    assert trained.returncode == 0, trained.stdout
    expected = trained.summary()["val_loss"]
    assert expected != pytest.approx(trained.summary()["baseline_val_loss"], rel=1e-4)  # the LoRA changed it

    # Other hyperparameters that do not decide the split or the scoring (steps, learning rate, seed) are ignored.
    scoring = _scoring_job(make_job, _tarred(trained, tmp_path), {**SCORED, "max_train_steps": 1, "seed": 9}).run()
    assert scoring.returncode == 0, scoring.stdout
    score = json.loads((scoring.model / "score.json").read_text())
    assert score["val_loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert score["text_encoders_adapted"] is train_text_encoder and score["validation_images"] == 3
    assert final_metrics(scoring.stdout)["val_loss"] == pytest.approx(expected, rel=1e-5)  # what SageMaker reports
    assert " step=" not in scoring.stdout and not (scoring.model / "pytorch_lora_weights.safetensors").exists()


def test_the_channel_must_hold_a_safetensors_lora_and_pickles_are_refused_unopened(tmp_path):
    from safetensors.torch import save_file

    from ml.contract.container import JobError
    from ml.train import evaluate

    def channel(name: str, files: dict[str, bytes]):
        folder = tmp_path / name
        folder.mkdir()
        for file, data in files.items():
            (folder / file).write_bytes(data)
        return folder

    with pytest.raises(JobError, match=r"pickle file \(adapter.bin\)"):
        evaluate.adapter_file(channel("pickled", {"adapter.bin": b"\x80\x04K\x01."}))
    with pytest.raises(JobError, match=r"neither pytorch_lora_weights.safetensors \(or another .safetensors LoRA\) nor "
                                       r"one model.tar.gz .found: notes.txt"):
        evaluate.adapter_file(channel("other", {"notes.txt": b"hi"}))
    with pytest.raises(JobError, match="pytorch_lora_weights.safetensors is not a safetensors file"):
        evaluate.adapter_file(channel("fake", {"pytorch_lora_weights.safetensors": b"not a safetensors file"}))
    readme = io.BytesIO()
    with tarfile.open(fileobj=readme, mode="w:gz") as archive:
        info = tarfile.TarInfo("README.md")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(JobError, match="model.tar.gz holds no pytorch_lora_weights.safetensors"):
        evaluate.adapter_file(channel("no-lora", {"model.tar.gz": readme.getvalue()}))
    with pytest.raises(JobError, match="not a readable .tar.gz"):
        evaluate.adapter_file(channel("broken", {"model.tar.gz": b"\x1f\x8b broken"}))

    real = tmp_path / "real"
    real.mkdir()
    save_file({"unet.a.lora.down.weight": __import__("torch").zeros(2, 2)}, str(real / "pytorch_lora_weights.safetensors"))
    assert evaluate.adapter_file(real) == real / "pytorch_lora_weights.safetensors"
    # A downloaded file, by any name; beside pytorch_lora_weights.safetensors (a job's model/), that one is scored.
    save_file({"lora_unet_a.lora_down.weight": __import__("torch").zeros(2, 2)}, str(real / "pixelArt_v2.safetensors"))
    assert evaluate.adapter_file(real) == real / "pytorch_lora_weights.safetensors"
    (real / "pytorch_lora_weights.safetensors").unlink()
    assert evaluate.adapter_file(real) == real / "pixelArt_v2.safetensors"
    (real / "other.safetensors").write_bytes((real / "pixelArt_v2.safetensors").read_bytes())
    with pytest.raises(JobError, match=r"holds 2 .safetensors files \(other.safetensors, pixelArt_v2.safetensors\) and "
                                       "no pytorch_lora_weights.safetensors: which one to score is not clear"):
        evaluate.adapter_file(real)


def _lycoris_file(base_model, folder, init_weights: bool):
    """A LoHa on the tiny UNet and first text encoder in LyCORIS' naming (tests/ml/test_community_lora.py);
    PEFT's own init (init_weights) leaves hada_w2_b at zero: a LoHa that changes nothing."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoHaConfig, inject_adapter_in_model
    from safetensors.torch import save_file
    from test_community_lora import _lycoris_state, _sgm_name

    from ml.contract import kohya_names

    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)
    torch.manual_seed(0)
    inject_adapter_in_model(LoHaConfig(r=2, alpha=32, init_weights=init_weights, use_effective_conv2d=True,
                                       target_modules=["to_q", "to_v", "conv1", "proj_in"]), pipeline.unet)
    inject_adapter_in_model(LoHaConfig(r=2, alpha=32, init_weights=init_weights, target_modules=["q_proj", "fc1"]),
                            pipeline.text_encoder)
    state = _lycoris_state(pipeline.unet, _sgm_name(pipeline.unet))
    state.update(_lycoris_state(pipeline.text_encoder, lambda path: kohya_names.text_encoder_name(
        "text_encoder", path, hasattr(pipeline.text_encoder, "text_model"))))
    folder.mkdir()
    save_file(state, str(folder / "loha.safetensors"))
    return folder


def test_kohya_and_lycoris_files_are_scored_as_the_endpoint_reads_them(make_job, tmp_path, base_model):
    trained = make_job({**SCORED, "train_text_encoder": True}).run()
    assert trained.returncode == 0, trained.stdout
    summary = trained.summary()

    # The job's own kohya file, as a user downloads it: the val_loss its diffusers file has.
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "myStyle_v1.safetensors").write_bytes((trained.model / KOHYA_LORA_WEIGHTS).read_bytes())
    scoring = _scoring_job(make_job, downloaded, SCORED).run()
    assert scoring.returncode == 0, scoring.stdout + scoring.failure
    score = json.loads((scoring.model / "score.json").read_text())
    assert score["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5, abs=1e-7)
    assert score["lora_format"] == "kohya LoRA, 56 modules" and score["text_encoders_adapted"] and not score["fused"]

    # LyCORIS files are fused: one that changes nothing scores the base model, one that does scores otherwise.
    for init_weights, name in ((True, "noop"), (False, "loha")):
        scoring = _scoring_job(make_job, _lycoris_file(base_model, tmp_path / name, init_weights), SCORED).run()
        assert scoring.returncode == 0, scoring.stdout + scoring.failure
        score = json.loads((scoring.model / "score.json").read_text())
        assert score["fused"] and score["text_encoders_adapted"] and score["lora_format"].startswith("kohya LoHa")
        if init_weights:
            assert score["val_loss"] == pytest.approx(summary["baseline_val_loss"], rel=1e-5, abs=1e-7)
        else:
            assert score["val_loss"] != pytest.approx(summary["baseline_val_loss"], rel=1e-3)


def test_a_file_for_another_model_fails_the_scoring_job_naming_it(make_job, tmp_path):
    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "sd15"
    folder.mkdir()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2)},
              str(folder / "sd15_style.safetensors"))
    scoring = _scoring_job(make_job, folder, SCORED).run()
    assert scoring.returncode != 0
    assert ("score_adapter channel: sd15_style.safetensors is not a LoRA for this SDXL model: 1 of the 1 modules it "
            f"adapts are not in the pipeline (e.g. {name})") in scoring.failure


def test_nothing_held_out_fails_clearly(tmp_path, dataset):
    from safetensors.torch import save_file

    from ml.contract.container import ContainerPaths, JobError
    from ml.contract.hyperparameters import parse
    from ml.train import evaluate
    from ml.train.interruption import StopFlag

    paths = ContainerPaths(tmp_path / "job")
    paths.channel("score_adapter").mkdir(parents=True)
    save_file({"unet.a.lora.down.weight": __import__("torch").zeros(2, 2)},
              str(paths.channel("score_adapter") / "pytorch_lora_weights.safetensors"))
    paths.channel("train").symlink_to(dataset, target_is_directory=True)
    with pytest.raises(JobError, match="validation_split is 0: there are no held-out images to score the adapter on"):
        evaluate.score(paths, parse({"validation_split": "0"}), StopFlag())
