import itertools

import pytest

from sdxl_lora import naming
from sdxl_lora.grid import expand

ORIGINAL_GRID = ([0.0001, 0.00015, 0.0002], [500, 1000, 2000, 3000], [4, 150, 256, 512, 1024])
RUN_IDS = ["manual__2026-11-26T10:00:00.123456+00:00", "scheduled__2026-11-23T03:00:00+00:00",
           "backfill__2026-01-01T00:00:00+00:00"]


def test_original_style():
    name = naming.trial_job_name("sdxl-lora-gridsearch", "run-16", 0.0002, 1500, 4)
    assert name.startswith("sdxl-lora-gridsearch-") and name.endswith("-lr-0-0002-mts-1500-r-4")


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_names_over_the_original_grid_are_valid_unique_and_stable(run_id):
    trials = expand(*ORIGINAL_GRID)
    names = [naming.trial_job_name("sdxl-lora-gridsearch", run_id, t.learning_rate, t.max_train_steps, t.rank)
             for t in trials]
    assert len(trials) == 60
    assert all(naming.is_valid(n) and len(n) <= 63 for n in names)
    assert len(set(names)) == 60
    again = [naming.trial_job_name("sdxl-lora-gridsearch", run_id, t.learning_rate, t.max_train_steps, t.rank)
             for t in trials]
    assert names == again


def test_runs_and_attempts_get_different_names():
    a, b = (naming.trial_job_name("sdxl-lora-gridsearch", r, 2e-4, 1500, 4) for r in RUN_IDS[:2])
    assert a != b
    retry = naming.trial_job_name("sdxl-lora-gridsearch", RUN_IDS[0], 2e-4, 1500, 4, attempt=2)
    assert retry == a + "-a2"


def test_long_names_are_shortened_with_a_hash_and_stay_distinct():
    names = {naming.job_name("a-very-long-prefix-for-a-training-pipeline", RUN_IDS[0], f"variant-{i}" * 3)
             for i in range(20)}
    assert len(names) == 20 and all(len(n) <= 63 and naming.is_valid(n) for n in names)


@pytest.mark.parametrize("value, text", [(0.0002, "0-0002"), (1500, "1500"), (1e-05, "1e-05"), (0.00015, "0-00015")])
def test_numbers(value, text):
    assert naming.number(value) == text


def test_every_pair_of_grid_values_differs_in_the_name():
    for (lr1, lr2) in itertools.combinations(ORIGINAL_GRID[0], 2):
        assert naming.number(lr1) != naming.number(lr2)
