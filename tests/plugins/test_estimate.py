"""The cost before spend: steps as the job counts them, measured seconds per step or the setting's, the cap."""

from __future__ import annotations

import logging

import pytest
from ml.contract.hyperparameters import SWEPT, parse, preset
from sdxl_lora import costs, estimate, sagemaker_requests, tuning
from sdxl_lora.settings import Settings, SettingsError


def _requests(settings: Settings, count: int = 1, **hyperparameters) -> list[dict]:
    values = {**preset(settings.preset), **hyperparameters}
    return [sagemaker_requests.training_request(settings, f"job-{i}", "s3://b/proc_dataset/v1/", values)
            for i in range(count)]


def test_steps_are_max_train_steps_else_epochs_over_the_training_images_as_the_job_counts_them():
    production = parse(preset("production"))  # 58 epochs, batch 1, 4 micro-batches per step, a tenth held out
    assert production.max_train_steps is None
    assert estimate.steps(production, images=100, processes=1) == 1305  # ceil(58 * 90 / 4)
    assert estimate.steps(production, images=100, processes=4) == 334  # ceil(58 * ceil(90 / 4) / 4)
    assert estimate.steps(parse({**preset("production"), "max_train_steps": 500}), images=100, processes=8) == 500
    assert estimate.training_images(10, 0.25) == 8 and estimate.training_images(3, 0.01) == 2  # at least one held out
    assert estimate.training_images(10, 0.0) == 10


def test_a_priced_instance_with_the_setting_gives_hours_and_usd_spot_as_an_on_demand_upper_bound():
    settings = Settings(seconds_per_step=8.0)
    found = estimate.of_training_requests(_requests(settings, 4, max_train_steps=1000), settings)
    assert (found.jobs, found.steps, found.instance_type) == (4, 4000, "ml.g5.2xlarge")
    assert found.billable_seconds == pytest.approx(4 * (1000 * 8.0 + estimate.SAGEMAKER_STARTUP_SECONDS))
    assert found.usd == pytest.approx(found.billable_seconds / 3600 * costs.ON_DEMAND_USD_PER_HOUR["ml.g5.2xlarge"])
    assert found.gpu_hours == pytest.approx(found.instance_hours)  # one A10G
    text = found.describe()
    assert "4 training job(s), 4000 optimizer steps" in text and f"{found.usd:,.2f} USD" in text
    assert "the setting seconds_per_step" in text and "spot: the figure is the on-demand price, an upper bound" in text
    on_demand = Settings(seconds_per_step=8.0, use_spot=False)
    assert "spot" not in estimate.of_training_requests(_requests(on_demand), on_demand).describe()


def test_the_measured_h100_figure_scales_with_micro_batches_per_step_and_names_its_source():
    settings = Settings(training_instance_type="ml.p5.48xlarge")
    found = estimate.of_training_requests(_requests(settings, max_train_steps=100), settings)
    assert found.billable_seconds == pytest.approx(100 * 7.5 + estimate.SAGEMAKER_STARTUP_SECONDS)
    assert found.gpu_hours == pytest.approx(8 * found.instance_hours)
    assert "docs/benchmarks.md" in found.describe() and "measured" in found.describe()
    eight = estimate.of_training_requests(_requests(settings, max_train_steps=100, gradient_accumulation_steps=8),
                                          settings)
    assert eight.billable_seconds == pytest.approx(100 * 15.0 + estimate.SAGEMAKER_STARTUP_SECONDS)
    assert "scaled from the figure's 4 to 8 micro-batches per step" in eight.describe()
    # No price for it in sdxl_lora.costs: hours, no USD, and a cap cannot be checked.
    assert found.usd is None and "no on-demand price for ml.p5.48xlarge" in found.describe()
    with pytest.raises(estimate.CostCapError, match="cannot be estimated: no on-demand price for ml.p5.48xlarge"):
        estimate.check(found, 100.0)


def test_an_unmeasured_instance_type_is_unknown_and_a_cap_asks_for_seconds_per_step():
    settings = Settings()  # ml.g5.2xlarge: no measurement in this project
    found = estimate.of_training_requests(_requests(settings, max_train_steps=500), settings)
    assert found.usd is None and found.instance_hours is None
    assert "unknown: no measured seconds per optimizer step for ml.g5.2xlarge (A10G)" in found.describe()
    estimate.check(found, None)  # no cap: nothing to refuse
    with pytest.raises(estimate.CostCapError) as refused:
        estimate.check(found, 5.0)
    words = str(refused.value)
    assert "max_cost_usd is 5.00 USD" in words and "give seconds_per_step" in words
    assert "sdxl_lora_seconds_per_step" in words and "Nothing was launched" in words


def test_over_the_cap_is_refused_naming_the_estimate_the_cap_and_the_fixes():
    settings = Settings(seconds_per_step=8.0)
    found = estimate.of_training_requests(_requests(settings, 4, max_train_steps=1000), settings)
    estimate.check(found, found.usd + 0.01)  # within: passes
    with pytest.raises(estimate.CostCapError) as refused:
        estimate.check(found, 1.0)
    words = str(refused.value)
    assert f"estimated cost {found.usd:,.2f} USD (4 training job(s), 4000 optimizer steps" in words
    assert "above max_cost_usd 1.00 USD" in words and "Nothing was launched" in words
    for fix in ("fewer trials", "fewer steps", "cheaper instance type", "raise max_cost_usd"):
        assert fix in words


def test_enforce_logs_the_estimate_before_it_refuses(caplog):
    settings = Settings(seconds_per_step=8.0)
    found = estimate.of_training_requests(_requests(settings, max_train_steps=1000), settings)
    with caplog.at_level(logging.INFO), pytest.raises(estimate.CostCapError):
        estimate.enforce(found, 0.01, logging.getLogger("test"))
    assert "cost estimate: 1 training job(s)" in caplog.text


def test_epochs_without_an_image_count_say_what_they_assume():
    settings = Settings(seconds_per_step=8.0)
    request = _requests(settings)
    assumed = estimate.of_training_requests(request, settings)
    assert assumed.steps == 1305 and f"assumes {estimate.ASSUMED_IMAGES} images" in assumed.describe()
    counted = estimate.of_training_requests(request, settings, estimate.manifest_images({"counts": {
        "images_written": 200}}))
    assert counted.steps == 2610 and "assumes" not in counted.describe()  # ceil(58 * 180 / 4)
    assert estimate.manifest_images({}) is None


def test_the_local_preset_uses_the_cpu_measurement_on_any_instance_type_and_never_crashes():
    settings = Settings(preset="local")
    found = estimate.of_training_requests(_requests(settings, 4), settings)  # 20 steps each
    assert found.billable_seconds == pytest.approx(4 * (20 * 0.29 + 5.5))
    assert found.usd == pytest.approx(found.instance_hours * costs.ON_DEMAND_USD_PER_HOUR["ml.g5.2xlarge"])
    for instance_type in ("local", "ml.m5.large"):  # CPU types: no price, no GPUs
        cpu = Settings(preset="local", training_instance_type=instance_type)
        found = estimate.of_training_requests(_requests(cpu), cpu)
        assert found.usd is None and found.gpu_hours is None and found.instance_hours > 0
        assert f"no on-demand price for {instance_type}" in found.describe()


def test_a_tuning_job_costs_its_max_jobs_trials_at_the_top_of_the_steps_range():
    settings = Settings(seconds_per_step=8.0)
    ranges = tuning.parameter_ranges(1e-5, 1e-3, 500, 3000, [4, 16])
    request = tuning.tuning_request(settings, "tune-1", "s3://b/proc_dataset/v1/",
                                    preset("production", exclude=SWEPT), ranges, "Bayesian", 12, 4)
    found = estimate.of_tuning_request(request, settings)
    assert (found.jobs, found.steps) == (12, 12 * 3000)
    assert found.billable_seconds == pytest.approx(12 * (3000 * 8.0 + estimate.SAGEMAKER_STARTUP_SECONDS))
    assert "upper bound: every trial at max_train_steps 3000" in found.describe()


def test_the_seconds_per_step_setting_is_a_non_negative_number(monkeypatch):
    monkeypatch.setenv("SDXL_LORA_SECONDS_PER_STEP", "7.5")
    assert Settings.from_environment().seconds_per_step == 7.5
    for bad in ("fast", "-1", "nan"):
        monkeypatch.setenv("SDXL_LORA_SECONDS_PER_STEP", bad)
        with pytest.raises(SettingsError, match="setting seconds_per_step: expected a number of at least 0"):
            Settings.from_environment()
