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
