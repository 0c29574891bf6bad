"""The job's report: loss curve PNG, validation images from fixed seeds, the model card, output/data/report/."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ml.contract.hyperparameters import parse
from ml.train import reporting


def _pixels_of(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return sum(1 for pixel in image.convert("RGB").getdata() if pixel == colour)


def test_nice_ticks_cover_the_range_with_round_steps():
    assert reporting.nice_ticks(0, 40, 5) == [0, 10, 20, 30, 40]
    ticks = reporting.nice_ticks(0.1234, 0.1387, 5)
    assert ticks[0] <= 0.1234 and ticks[-1] >= 0.1387
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1
    assert reporting.nice_ticks(0.5, 0.5)[0] < 0.5 < reporting.nice_ticks(0.5, 0.5)[-1]  # flat data still gets an axis
    with pytest.raises(ValueError, match="finite"):
        reporting.nice_ticks(0, float("nan"))


def test_loss_curve_draws_both_series_and_refuses_empty_data():
    losses = [{"step": s, "loss": 0.5 - s / 100} for s in range(1, 41)]
    validation = [{"step": 0, "val_loss": 0.6}, {"step": 20, "val_loss": 0.45}, {"step": 40, "val_loss": 0.4}]
    image = reporting.draw_loss_curve(losses, validation, "lr 0.001, rank 4")
    assert image.size == (800, 480)
    assert _pixels_of(image, (31, 119, 180)) > 300  # the training line
    assert _pixels_of(image, (255, 127, 14)) > 100  # the validation points and dashes
    only_train = reporting.draw_loss_curve(losses, [], "t")
    legend_only = _pixels_of(only_train, (255, 127, 14))  # just the legend's swatch
    assert _pixels_of(image, (255, 127, 14)) > legend_only + 100
    with pytest.raises(ValueError, match="nothing to plot"):
        reporting.draw_loss_curve([{"step": 1, "loss": float("nan")}], [], "t")


def test_validation_points_put_the_base_model_at_step_0_and_the_end_last():
    summary = {"baseline_val_loss": 0.6, "validation_losses": [{"step": 10, "val_loss": 0.5}], "val_loss": 0.4,
               "global_step": 20}
    assert reporting.validation_points(summary) == [{"step": 0, "val_loss": 0.6}, {"step": 10, "val_loss": 0.5},
                                                     {"step": 20, "val_loss": 0.4}]
    assert reporting.validation_points({"baseline_val_loss": None, "val_loss": None, "global_step": 3}) == []


def test_sample_seeds_do_not_depend_on_the_trial():
    assert [reporting.sample_seed(i) for i in range(3)] == [1000, 1001, 1002]
    with pytest.raises(ValueError):
        reporting.sample_seed(-1)


def test_dataset_version_comes_from_the_prepared_manifest(tmp_path):
    assert reporting.dataset_version(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"version": "2026-11-26"}))
    assert reporting.dataset_version(tmp_path) == "2026-11-26"
    (tmp_path / "manifest.json").write_text("not json")
    assert reporting.dataset_version(tmp_path) is None


def test_a_job_writes_curve_samples_card_and_the_output_data_report(make_job, dataset, tmp_path):
    hyperparameters = {"max_train_steps": 8, "checkpointing_steps": 4, "validation_split": 0.3,
                       "validation_prompt": "storyboard frame, a red circle", "num_validation_images": 2,
                       "num_validation_inference_steps": 2}
    (dataset / "manifest.json").write_text(json.dumps({"version": "v-test"}))
    try:
        job = make_job(hyperparameters).run()
        other = make_job({**hyperparameters, "seed": 99, "max_train_steps": 4}).run()
    finally:
        (dataset / "manifest.json").unlink()
    assert job.returncode == 0, job.stdout
    summary = job.summary()
    assert [p["step"] for p in summary["validation_losses"]] == [4]  # checkpoints before the end
    assert summary["dataset_version"] == "v-test" and summary["loss_curve"] == "loss_curve.png"
    assert summary["sample_seeds"] == [1000, 1001] == other.summary()["sample_seeds"]
    curve = Image.open(job.model / "loss_curve.png")
    assert curve.size == (800, 480) and _pixels_of(curve, (255, 127, 14)) > 200  # 3 validation points: 0, 4, 8
    card = (job.model / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n")
    assert "input/data/base_model" not in card  # the container path means nothing outside the job
    for expected in ("base_model:", 'datasets: ["v-test"]', "widget:", "url: samples/sample-0.png",
                     "![loss curve](loss_curve.png)", "load_lora_weights", "| learning_rate | 0.001 |",
                     f"| validation loss (held-out images) | {summary['val_loss']:.6g} |", "dataset version `v-test`"):
        assert expected in card, expected
    report = job.base / "output" / "data" / "report"
    assert sorted(p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file()) == [
        "README.md", "loss_curve.png", "samples/sample-0.png", "samples/sample-1.png", "training_summary.json"]
    assert json.loads((report / "training_summary.json").read_text()) == summary
    Image.open(io.BytesIO((report / "samples" / "sample-0.png").read_bytes())).verify()


def test_validation_images_at_checkpoints_when_asked_without_changing_the_training(make_job):
    settings = {"max_train_steps": 4, "checkpointing_steps": 2, "validation_prompt": "a red circle",
                "num_validation_images": 1, "num_validation_inference_steps": 2}
    asked = make_job({**settings, "validation_images_at_checkpoints": "true"}).run()
    plain = make_job(settings).run()
    for job in (asked, plain):
        assert job.returncode == 0, job.stdout
    summary = asked.summary()
    assert summary["checkpoint_samples"] == {"2": ["samples/step-2/sample-0.png"]}
    with Image.open(asked.model / "samples" / "step-2" / "sample-0.png") as image:
        assert image.size == (32, 32)
    assert plain.summary()["checkpoint_samples"] == {}
    assert not (plain.model / "samples" / "step-2").exists()
    # Rendering at a checkpoint leaves the training models alone: the same losses and the same final LoRA.
    assert [r["loss"] for r in summary["losses"]] == pytest.approx([r["loss"] for r in plain.summary()["losses"]])
    assert (asked.model / "samples" / "sample-0.png").read_bytes() == (plain.model / "samples" / "sample-0.png").read_bytes()


def test_the_card_names_the_hub_id_the_base_model_came_from(tmp_path):
    channel = tmp_path / "input" / "data" / "base_model"
    (channel / "unet").mkdir(parents=True)
    index, unet = channel / "model_index.json", channel / "unet" / "config.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    unet.write_text(json.dumps({"_name_or_path": "/root/.cache/sdxl/unet"}))  # a path is never a Hub id
    # Nothing staged names it: the folder's name, never the container path.
    assert reporting.base_model_name(str(channel), parse({})) == "base_model"
    unet.write_text(json.dumps({"_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0"}))
    assert reporting.base_model_name(str(channel), parse({})) == "stabilityai/stable-diffusion-xl-base-1.0"
    index.write_text(json.dumps({"_name_or_path": "org/pipeline"}))
    assert reporting.base_model_name(str(channel), parse({})) == "org/pipeline"
    # The hyperparameter wins over what the files record.
    assert reporting.base_model_name(str(channel), parse({"base_model_id": "org/given"})) == "org/given"
    # Loaded from the Hub, with no channel: the id it was loaded by.
    assert reporting.base_model_name("org/sdxl", parse({"pretrained_model_name_or_path": "org/sdxl"})) == "org/sdxl"
