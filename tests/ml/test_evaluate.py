"""Scoring jobs (ml/train/evaluate.py): a training job with a `score_adapter` channel scores that LoRA, trains nothing."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

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
    with pytest.raises(JobError, match="neither pytorch_lora_weights.safetensors nor one model.tar.gz .found: notes.txt"):
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
