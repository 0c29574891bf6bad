import pytest

from sdxl_lora.grid import GridError, Trial, expand


def test_the_original_grid_expands_to_60_trials():
    trials = expand([0.0001, 0.00015, 0.0002], [500, 1000, 2000, 3000], [4, 150, 256, 512, 1024])
    assert len(trials) == 60 and len(set(trials)) == 60
    assert trials[0] == Trial(0.0001, 500, 4) and trials[-1] == Trial(0.0002, 3000, 1024)


def test_grids_larger_than_the_mapping_limit_are_refused_with_the_numbers():
    with pytest.raises(GridError, match=r"the grid has 1100 trials \(10 learning rates x 11 step counts x 10 ranks\)"
                                        r".*max_map_length = 1024"):
        expand([i / 1e4 for i in range(1, 11)], list(range(100, 1200, 100)), list(range(1, 11)))


@pytest.mark.parametrize("args, words", [(([], [1], [1]), "learning_rate needs at least one value"),
                                         (([1e-4], [5, 5], [1]), "max_train_steps lists a value twice")])
def test_bad_grids(args, words):
    with pytest.raises(GridError, match=words):
        expand(*args)


def test_values_read_the_forms_text_and_the_apis_numbers_alike():
    from sdxl_lora.grid import values

    assert values("learning_rates", ["0.0001", " 2e-4", "", "3E-4 ", ""], "learning_rate") == [1e-4, 2e-4, 3e-4]
    assert values("learning_rates", [0.0001, "0.0002"], "learning_rate") == [1e-4, 2e-4]
    ranks = values("ranks", ["4", "16"], "rank")
    assert ranks == [4, 16] and all(type(r) is int for r in ranks)


@pytest.mark.parametrize("param, raw, hyperparameter, words", [
    ("learning_rates", ["0.0001", "0.5"], "learning_rate",
     r"^Param learning_rates: '0.5' is not a valid learning_rate: must be in \(0, 0.1\]$"),
    ("learning_rates", [0.2], "learning_rate", r"^Param learning_rates: 0.2 is not a valid learning_rate: must be"),
    ("learning_rates", ["abc"], "learning_rate", r"^Param learning_rates: 'abc' is not a valid learning_rate: expected "
                                                 r"a number$"),
    ("ranks", ["4", "4.5"], "rank", r"^Param ranks: '4.5' is not a valid rank: expected an integer$"),
    ("ranks", [True], "rank", r"^Param ranks: True is not a valid rank: expected a number$"),
    ("max_train_steps", ["none"], "max_train_steps", r"^Param max_train_steps: 'none' is not a valid max_train_steps: "
                                                     r"a value is required$"),
    ("learning_rates", ["1e-4", 0.0001], "learning_rate", r"^Param learning_rates lists 0.0001 twice"),
    ("ranks", ["", " "], "rank", r"^Param ranks needs at least one value"),
    ("ranks", [str(r) for r in range(1, 12)], "rank", r"^Param ranks has 11 values, at most 10$"),
    ("ranks", "4", "rank", r"^Param ranks: expected a list of values, got '4'$"),
])
def test_values_name_the_param_and_the_value_they_refuse(param, raw, hyperparameter, words):
    from sdxl_lora.grid import values

    with pytest.raises(GridError, match=words):
        values(param, raw, hyperparameter)


def test_a_runs_trials_come_from_its_params_as_the_form_sends_them():
    from sdxl_lora.grid import from_params

    trials = from_params({"learning_rates": ["1e-4", "2e-4", ""], "max_train_steps": ["500"], "ranks": [4, "8"]})
    assert trials == [Trial(1e-4, 500, 4), Trial(1e-4, 500, 8), Trial(2e-4, 500, 4), Trial(2e-4, 500, 8)]
    with pytest.raises(GridError, match="Param max_train_steps: '0' is not a valid max_train_steps"):
        from_params({"learning_rates": [1e-4], "max_train_steps": ["0"], "ranks": [4]})


def test_the_leaderboard_title_counts_the_failed_trials():
    from sdxl_lora.grid import leaderboard_title

    assert leaderboard_title("grid run-1", 4, 0) == "grid run-1: 4 trials"
    assert leaderboard_title("grid run-1", 4, 1) == \
        "grid run-1: 1 of 4 trials failed (the winner is the best of the others)"
    assert leaderboard_title("grid run-1", 2, 2) == "grid run-1: 2 of 2 trials failed (none succeeded: the run failed)"
