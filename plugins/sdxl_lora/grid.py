"""The hyperparameter grid: learning rate x steps x rank, one trial per combination."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# Airflow's [core] max_map_length default: a mapped task may expand to at most this many instances.
DEFAULT_MAX_MAP_LENGTH = 1024


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
