"""The forms' presets: the same names as the training hyperparameters' presets, every default within what the
Params and the jobs accept, and the local one small enough for the local stack's CPU and its staged frames."""

import pytest

from ml.contract import hyperparameters
from sdxl_lora import grid, tuning
from sdxl_lora.datasets import OPTIONS
from sdxl_lora.presets import LOCAL_MIN_SIZE, PRESETS, active
from sdxl_lora.settings import Settings


def test_each_setting_value_names_a_preset_with_its_training_hyperparameters():
    assert set(PRESETS) == set(hyperparameters.PRESETS)
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.hyperparameters() == hyperparameters.PRESETS[name]
        assert active(Settings(preset=name)) is preset
    assert active(Settings()).name == "production"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_default_is_one_the_dags_first_tasks_accept(name):
    preset = PRESETS[name]
    trials = grid.from_params({**preset.grid, "dataset_version": "v1"})
    assert len(trials) == len(preset.grid["learning_rates"]) * len(preset.grid["max_train_steps"]) * len(
        preset.grid["ranks"])
    ranks = grid.values("ranks", preset.tuning["ranks"], "rank", tuning.MAX_CATEGORICAL_VALUES)
    assert tuning.parameter_ranges(preset.tuning["learning_rate_min"], preset.tuning["learning_rate_max"],
                                   preset.tuning["max_train_steps_min"], preset.tuning["max_train_steps_max"], ranks)
    assert preset.tuning["max_parallel_jobs"] <= preset.tuning["max_jobs"]
    assert set(preset.prepare) <= set(OPTIONS) and preset.prepare_options().keys() == OPTIONS.keys()
    # Bucketed at the training resolution, so that a latent cache matches what the preset trains.
    assert preset.prepare["resolution"] == preset.hyperparameters()["resolution"]
    hyperparameters.to_sagemaker(preset.hyperparameters())


def test_the_local_preset_finishes_in_seconds_on_a_cpu():
    local = PRESETS["local"]
    assert len(grid.from_params({**local.grid, "dataset_version": "v1"})) <= 4
    assert max(local.grid["max_train_steps"]) <= 50 and local.tuning["max_train_steps_max"] <= 50
    assert local.tuning["max_jobs"] <= 2
    assert local.smoke_request["width"] <= 64 and local.smoke_request["height"] <= 64
    assert local.smoke_request["prompt"] == local.hyperparameters()["validation_prompt"]


def test_the_frames_the_local_stack_stages_pass_the_local_prepare_defaults(tmp_path):
    """`make airflow` and `make demo` stage ml/fixtures/synthetic.py's frames at their default size: prepare's local
    min_size keeps every one (it rejected all 16 as too_small with the production preset's 256)."""
    from PIL import Image

    from ml.fixtures import synthetic

    folder = synthetic.write_dataset(tmp_path, count=1)
    with Image.open(next(folder.glob("*.png"))) as frame:
        assert min(frame.size) >= LOCAL_MIN_SIZE == PRESETS["local"].prepare["min_size"]
        assert min(frame.size) < PRESETS["production"].prepare["min_size"]  # what the production defaults refuse


def test_make_airflow_and_the_demo_parse_the_dags_with_the_local_preset_and_use_its_defaults(tmp_path):
    """sdxl_lora_ops/demo.py: one Airflow environment for `make airflow` and `make demo`; the demo's runs leave every
    default of the preset alone (no hand-written copy of its hyperparameters, grid or smoke request)."""
    from sdxl_lora_ops import demo

    env = demo._airflow_env(tmp_path, "http://127.0.0.1:1", "s3://bucket/base_model/")
    assert env["SDXL_LORA_PRESET"] == "local" and demo._preset() is PRESETS["local"]
    assert not {"hyperparameters", "learning_rates", "max_train_steps", "ranks", "smoke_request"} & set(demo.GRID)
    assert not set(PRESETS["local"].prepare) & set(demo.PREPARE)
