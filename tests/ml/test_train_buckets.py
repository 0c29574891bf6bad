"""Training on a prepared dataset: aspect-ratio buckets with their recorded time ids, and the latent cache."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ml.contract.hyperparameters import parse
from ml.dataset.imagefolder import load_imagefolder
from ml.fixtures import synthetic
from ml.prepare import job as prepare
from ml.train.frozen import cache_frozen, latent_source
from ml.train.interruption import StopFlag
from ml.train.models import load_encoders


def prepared_dataset(root: Path, base_model: Path, resolution: int, latent_cache: bool) -> Path:
    """Wide 16:9 frames and two portrait frames, fitted to buckets by the prepare job."""
    raw = synthetic.write_dataset(root / "raw", count=6, width=96, height=54, sidecar_captions=True)
    for index in (1, 4):  # portrait frames: a second bucket
        frame = raw / f"frame-{index:04d}.png"
        with Image.open(frame) as image:
            image.transpose(Image.Transpose.ROTATE_90).save(frame)
    output = root / "dataset"
    prepare.prepare(prepare.Options(raw, output, resolution=resolution, min_size=32, captioner="none",
                                    base_model=str(base_model), latent_cache=latent_cache))
    return output


def rows(dataset: Path) -> dict[str, dict]:
    return {r["file_name"]: r for r in map(json.loads, (dataset / "metadata.jsonl").read_text().splitlines())}


def test_time_ids_are_the_recorded_sizes_and_crops(tmp_path, base_model):
    dataset = prepared_dataset(tmp_path, base_model, resolution=32, latent_cache=False)
    examples = load_imagefolder(dataset)
    hp = parse({"resolution": "32", "random_flip": "true"})
    tokenizers, encoders, vae, _ = load_encoders(str(base_model), torch.float32)
    frozen = cache_frozen(examples, hp, vae, tokenizers, encoders, "cpu", 2, StopFlag(), False,
                          latent_source(examples, hp, str(base_model), vae))
    recorded = rows(dataset)
    assert len(set(frozen.buckets)) == 2  # wide and portrait
    for index, example in enumerate(examples):
        row = recorded[example.path.name]
        bucket = tuple(row["bucket"])
        assert frozen.buckets[index] == bucket
        assert frozen.time_ids[index, 0].tolist() == [*row["original_size"], *row["crop"], *bucket]
        # The mirror image's crop is measured from the other edge of the resized image.
        mirrored = frozen.time_ids[index, 1].tolist()
        assert mirrored[:3] == [*row["original_size"], row["crop"][0]]
        assert frozen.latent_mean[index].shape[-2:] == (bucket[0] // 4, bucket[1] // 4)  # the tiny VAE's factor


def test_a_dataset_prepared_at_another_resolution_is_placed_again(tmp_path, base_model):
    dataset = prepared_dataset(tmp_path, base_model, resolution=64, latent_cache=False)
    examples = load_imagefolder(dataset)
    hp = parse({"resolution": "32"})
    tokenizers, encoders, vae, _ = load_encoders(str(base_model), torch.float32)
    frozen = cache_frozen(examples, hp, vae, tokenizers, encoders, "cpu", 1, StopFlag(), False,
                          latent_source(examples, hp, str(base_model), vae))
    for index, example in enumerate(examples):
        row = rows(dataset)[example.path.name]
        assert max(frozen.buckets[index]) < max(row["bucket"])  # the 32-pixel buckets, not the stored 64 ones
        assert frozen.time_ids[index, 0, :2].tolist() == row["original_size"]


def test_the_latent_cache_gives_the_same_training_as_encoding_on_the_fly(tmp_path, base_model, make_job):
    cached = prepared_dataset(tmp_path, base_model, resolution=32, latent_cache=True)
    assert all("latents" in row for row in rows(cached).values())
    plain = tmp_path / "plain"
    shutil.copytree(cached, plain)
    shutil.rmtree(plain / "latents")
    (plain / "metadata.jsonl").write_text("".join(
        json.dumps({k: v for k, v in row.items() if k != "latents"}) + "\n" for row in rows(cached).values()))
    settings = {"max_train_steps": 4, "random_flip": "true", "validation_split": 0.2, "train_batch_size": 1}
    with_cache, without = make_job(settings, train=cached).run(), make_job(settings, train=plain).run()
    for job in (with_cache, without):
        assert job.returncode == 0, job.stdout
    assert "took the latents of 5 of 5 images from the dataset's cache" in with_cache.stdout
    assert "took the latents of 1 of 1 images" in with_cache.stdout  # the held-out image too
    assert "from the dataset's cache" not in without.stdout
    ours, theirs = with_cache.summary(), without.summary()
    assert [r["loss"] for r in ours["losses"]] == pytest.approx([r["loss"] for r in theirs["losses"]], rel=1e-4)
    assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)


def test_a_cache_made_with_another_vae_is_ignored(tmp_path, base_model, make_job):
    from ml.fixtures import tiny_model

    cached = prepared_dataset(tmp_path, base_model, resolution=32, latent_cache=True)
    other = tiny_model.build(tmp_path / "other-sdxl", seed=1)
    job = make_job({"max_train_steps": 2}, train=cached, base=other).run()
    assert job.returncode == 0, job.stdout
    assert "from the dataset's cache" not in job.stdout
