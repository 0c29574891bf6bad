"""The hyperparameter grid: learning rate x steps x rank, one trial per combination.

Its Params arrive as the API sends them (JSON numbers) or as the trigger form's one-value-per-line
box sends them (text, perhaps with a blank line); `values` reads either as the job reads a
hyperparameter and names the Param and the value it refuses.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ml.contract.hyperparameters import HyperparameterError, coerce

# Airflow's [core] max_map_length default: a mapped task may expand to at most this many instances.
DEFAULT_MAX_MAP_LENGTH = 1024
MAX_GRID_VALUES = 10  # per list: 10 x 10 x 10 = 1000 trials, within max_map_length
# The grid's Params and the hyperparameter each one lists.
GRID_PARAMS = (("learning_rates", "learning_rate"), ("max_train_steps", "max_train_steps"), ("ranks", "rank"))


class GridError(ValueError):
    pass


@dataclass(frozen=True)
class Trial:
    learning_rate: float
    max_train_steps: int
    rank: int

    @property
    def label(self) -> str:
        return f"lr={self.learning_rate:g} steps={self.max_train_steps} rank={self.rank}"


def expand(learning_rates: list[float], max_train_steps: list[int], ranks: list[int],
           max_map_length: int = DEFAULT_MAX_MAP_LENGTH) -> list[Trial]:
    """Every combination, in a stable order; duplicates and oversized grids are refused."""
    for name, values in (("learning_rate", learning_rates), ("max_train_steps", max_train_steps), ("rank", ranks)):
        if not values:
            raise GridError(f"{name} needs at least one value")
        if len(set(values)) != len(values):
            raise GridError(f"{name} lists a value twice: {values}")
    size = len(learning_rates) * len(max_train_steps) * len(ranks)
    if size > max_map_length:
        raise GridError(f"the grid has {size} trials ({len(learning_rates)} learning rates x {len(max_train_steps)} "
                        f"step counts x {len(ranks)} ranks), more than Airflow maps in one task "
                        f"([core] max_map_length = {max_map_length}); split it into several runs")
    return [Trial(float(lr), int(steps), int(rank))
            for lr, steps, rank in itertools.product(learning_rates, max_train_steps, ranks)]


def values(param: str, raw: Any, hyperparameter: str, max_values: int = MAX_GRID_VALUES) -> list:
    """A list Param's values as numbers, each checked as the job checks the hyperparameter; blank text
    (the form's empty lines) is skipped; a refusal names the Param and the value."""
    if not isinstance(raw, list):
        raise GridError(f"Param {param}: expected a list of values, got {raw!r}")
    found: list = []
    for item in raw:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            if isinstance(item, bool) or not isinstance(item, (int, float, str)):
                raise HyperparameterError(f"{hyperparameter}: expected a number", "expected a number")
            value = coerce(hyperparameter, item)
            if value is None:
                raise HyperparameterError(f"{hyperparameter}: a value is required", "a value is required")
        except HyperparameterError as error:
            raise GridError(f"Param {param}: {item!r} is not a valid {hyperparameter}: {error.reason}") from None
        if value in found:
            raise GridError(f"Param {param} lists {value:g} twice: {raw!r}")
        found.append(value)
    if not found:
        raise GridError(f"Param {param} needs at least one value, got {raw!r}")
    if len(found) > max_values:
        raise GridError(f"Param {param} has {len(found)} values, at most {max_values}")
    return found


def from_params(params: dict, max_map_length: int = DEFAULT_MAX_MAP_LENGTH) -> list[Trial]:
    """The trials a grid run's Params ask for."""
    return expand(*(values(param, params[param], name) for param, name in GRID_PARAMS),
                  max_map_length=max_map_length)


def leaderboard_title(run: str, trials: int, failed: int) -> str:
    """A leaderboard's heading, which counts the failed trials: they do not fail a run that found a winner."""
    if not failed:
        return f"{run}: {trials} trials"
    verdict = "none succeeded: the run failed" if failed == trials else "the winner is the best of the others"
    return f"{run}: {failed} of {trials} trials failed ({verdict})"
