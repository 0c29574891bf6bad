"""The trigger forms' defaults, one preset for every DAG: `production` or `local`.

The parse-time setting `preset` (SDXL_LORA_PRESET) chooses it: `production` (the default; AWS, GPU
instances, the original system's recipe) or `local` (the local stack, whose jobs run on a CPU with the
tiny SDXL and the staged synthetic frames; `make airflow`, `make demo`, the Compose stack and the
scheduler tests set it). Its training hyperparameters are ml.contract.hyperparameters' preset of the
same name; this module adds what only the forms hold: the grid's lists, the tuning ranges and limits,
the prepare options and the deployment's smoke request. A run triggered with only its dataset version
runs with these where its preset says it is deployed.

Pure Python, read when the DAG files are parsed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ml.contract import hyperparameters
from sdxl_lora.datasets import OPTIONS
from sdxl_lora.settings import Settings

# The local stack stages ml/fixtures/synthetic.py's frames (128x72 by default: `make airflow`, `make demo`):
# prepare keeps an image whose short side is at least this.
LOCAL_MIN_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Preset:
    """What the forms offer by default under one preset.

    :param name: the preset's name, also its training hyperparameters' in ml.contract.hyperparameters.PRESETS.
    :param grid: the grid's lists: learning_rates, max_train_steps, ranks.
    :param tuning: the tuning DAG's ranges and limits: learning_rate_min/_max, max_train_steps_min/_max, ranks,
        max_jobs, max_parallel_jobs.
    :param prepare: the prepare DAG's options the preset sets (keys of sdxl_lora.datasets.OPTIONS); the others
        keep the payload's defaults.
    :param smoke_request: the deployment's smoke-test invocation.
    """

    name: str
    grid: dict[str, list]
    tuning: dict[str, Any]
    prepare: dict[str, Any]
    smoke_request: dict[str, Any]

    def prepare_options(self) -> dict[str, Any]:
        """Every prepare option's default: the payload's, updated with the preset's."""
        return {**OPTIONS, **self.prepare}

    def hyperparameters(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The training hyperparameters (a copy) without the excluded keys (a trial's swept ones)."""
        return hyperparameters.preset(self.name, exclude)

    @property
    def note(self) -> str:
        """What a Param's description says of its default."""
        return f"Defaults: the {self.name} preset (SDXL_LORA_PRESET={self.name})."

    def describe(self, description: str) -> str:
        """A Param's description, followed by where its default comes from."""
        return f"{description} {self.note}"


def _prepare(name: str, min_size: int) -> dict[str, Any]:
    """Buckets at the preset's training resolution, so that a latent cache matches it; images below min_size
    rejected."""
    return {"resolution": hyperparameters.PRESETS[name]["resolution"], "min_size": min_size}


PRESETS: dict[str, Preset] = {
    "production": Preset(
        name="production",
        grid={"learning_rates": [1e-4, 2e-4], "max_train_steps": [500, 1000], "ranks": [4]},
        tuning={"learning_rate_min": 1e-5, "learning_rate_max": 1e-3, "max_train_steps_min": 500,
                "max_train_steps_max": 3000, "ranks": [4, 16, 64], "max_jobs": 12, "max_parallel_jobs": 4},
        prepare=_prepare("production", OPTIONS["min_size"]),
        smoke_request={"prompt": "storyboard frame, ink outline, a red circle on the left", "width": 512,
                       "height": 512, "num_inference_steps": 4, "seed": 0, "lora_scale": 0.8},
    ),
    # Seconds per job on a CPU: 4 grid trials and 2 tuning trials of tens of steps, 64-pixel images.
    "local": Preset(
        name="local",
        grid={"learning_rates": [1e-3, 3e-3], "max_train_steps": [20, 40], "ranks": [4]},
        tuning={"learning_rate_min": 5e-4, "learning_rate_max": 5e-3, "max_train_steps_min": 10,
                "max_train_steps_max": 40, "ranks": [4, 8], "max_jobs": 2, "max_parallel_jobs": 2},
        prepare=_prepare("local", LOCAL_MIN_SIZE),
        smoke_request={"prompt": hyperparameters.PRESETS["local"]["validation_prompt"], "width": 64, "height": 64,
                       "num_inference_steps": 8, "seed": 7, "lora_scale": 0.8},
    ),
}


def active(settings: Settings) -> Preset:
    """The preset the settings name (Settings refuses an unknown name)."""
    return PRESETS[settings.preset]
