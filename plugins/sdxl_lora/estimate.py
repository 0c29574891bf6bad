"""What a run's training jobs will cost, estimated before any of them starts, and the cap that refuses a run above it.

Per job: its optimizer steps (max_train_steps, else num_train_epochs over the training images, counted as the job
counts them: ml/train/stream.py total_steps) x seconds per optimizer step, plus a fixed start-up, times its instances,
at the on-demand price of sdxl_lora.costs (us-east-1). A spot job gets that on-demand figure, an upper bound: its
discount is known only once it has run (the grid report shows it).

Seconds per step come from measurements only (FIGURES, each with its source) or from the setting seconds_per_step.
An instance type with neither, or with no price, gets no cost ("unknown"): it is logged, and a run with a cap is
refused, because its cap cannot be checked. Pure Python: the DAGs' first tasks call it before launching anything.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from ml.contract.hyperparameters import PRESETS, Hyperparameters, parse
from sdxl_lora.costs import ON_DEMAND_USD_PER_HOUR, PRICE_REGION
from sdxl_lora.settings import Settings

_ONE_GPU = ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")
# GPU and GPUs per instance (AWS's accelerated-computing instance pages). The job runs one process per GPU
# (ml/train/launch.py), which divides an epoch's micro-batches between them.
INSTANCE_GPUS: dict[str, tuple[str, int]] = {
    **{f"ml.g4dn.{size}": ("T4", 1) for size in _ONE_GPU}, "ml.g4dn.12xlarge": ("T4", 4),
    **{f"ml.g5.{size}": ("A10G", 1) for size in _ONE_GPU}, "ml.g5.12xlarge": ("A10G", 4),
    "ml.g5.24xlarge": ("A10G", 4), "ml.g5.48xlarge": ("A10G", 8),
    "ml.p3.2xlarge": ("V100", 1), "ml.p3.8xlarge": ("V100", 4), "ml.p3.16xlarge": ("V100", 8),
    "ml.p4d.24xlarge": ("A100", 8), "ml.p5.48xlarge": ("H100", 8),
}
# Used when num_train_epochs counts the steps and the dataset's manifest gave no image count.
ASSUMED_IMAGES = 100


@dataclasses.dataclass(frozen=True)
class Figure:
    """Seconds per optimizer step at the preset's hyperparameters, seconds billed per job besides its steps, and
    where both come from."""

    seconds_per_step: float
    startup_seconds: float
    source: str


# Assumed, not measured: SageMaker bills from TrainingStartTime, which includes downloading the training image and
# the channels (the staged SDXL is ~7 GB in fp16) before the job's own start-up, which the H100 run below measured
# at 25 s (its 100 s job less 10 steps of 7.5 s).
SAGEMAKER_STARTUP_SECONDS = 300.0
# Keyed by (preset, GPU). Only what this project measured (docs/benchmarks.md); other GPUs have no figure: a
# throughput ratio to the H100 would be a guess, so they take the setting seconds_per_step instead.
FIGURES: dict[tuple[str, str], Figure] = {
    ("production", "H100"): Figure(7.5, SAGEMAKER_STARTUP_SECONDS, (
        "measured: the production preset on one H100 80GB HBM3, 1024 px, 4 micro-batches per step "
        "(docs/benchmarks.md, H100 2026-11-27); on an 8-GPU instance each GPU runs its own micro-batches, "
        "assumed at the same time per step; start-up assumed")),
}
# The local stack runs every job on its own machine's CPU, whatever instance type the request names.
LOCAL_FIGURE = Figure(0.29, 5.5, (
    "measured: the local preset's configuration (tiny model, 64 px, batch 2, fp32) on a 2-core CPU, 3.45 steps/s "
    "and 22.9 s for a 60-step job (docs/benchmarks.md, CPU 2026-11-26)"))


class CostCapError(ValueError):
    """A run whose estimated cost is above its max_cost_usd, or cannot be estimated while a cap is set."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """One training job about to be launched."""

    steps: int
    gradient_accumulation_steps: int
    instance_type: str
    instance_count: int
    spot: bool


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The cost of a run's training jobs; billable_seconds (per instance, every job) is None when unknown."""

    jobs: int
    steps: int
    instance_type: str
    instance_count: int
    figure: Figure | None
    billable_seconds: float | None
    unknown: str | None  # why there is no cost
    notes: tuple[str, ...] = ()

    @property
    def instance_hours(self) -> float | None:
        return None if self.billable_seconds is None else self.billable_seconds * self.instance_count / 3600

    @property
    def gpu_hours(self) -> float | None:
        gpus = INSTANCE_GPUS.get(self.instance_type, (None, None))[1]
        return None if self.instance_hours is None or gpus is None else self.instance_hours * gpus

    @property
    def usd_per_hour(self) -> float | None:
        return ON_DEMAND_USD_PER_HOUR.get(self.instance_type)

    @property
    def usd(self) -> float | None:
        if self.instance_hours is None or self.usd_per_hour is None:
            return None
        return self.instance_hours * self.usd_per_hour

    def describe(self) -> str:
        """The task log's lines: jobs, steps, hours, USD, the figure and its source, the assumptions."""
        head = (f"cost estimate: {self.jobs} training job(s), {self.steps} optimizer steps in all, on "
                f"{self.instance_count} x {self.instance_type}")
        if self.instance_hours is None:
            return "\n".join([f"{head}: unknown: {self.unknown}", *self.notes])
        gpu_hours = "" if self.gpu_hours is None else f" ({_amount(self.gpu_hours)} GPU-hours)"
        usd = (f"unknown USD: {self.unknown}" if self.usd is None else
               f"{_amount(self.usd)} USD at {self.usd_per_hour} USD per instance-hour on demand ({PRICE_REGION})")
        return "\n".join([f"{head}: {_amount(self.instance_hours)} instance-hours{gpu_hours}, {usd}",
                          f"  {self.figure.seconds_per_step:g} s per optimizer step and "
                          f"{self.figure.startup_seconds:g} s start-up per job ({self.figure.source})", *self.notes])


def _amount(value: float) -> str:
    """Hours or USD: cents above one, four decimals below (a local run's fraction of a cent)."""
    return f"{value:,.2f}" if value >= 1 else f"{value:.4f}"


def figure(preset: str, instance_type: str, seconds_per_step: float = 0.0) -> Figure | None:
    """Seconds per step on an instance type under a preset: the setting's when given, else FIGURES', else None."""
    startup = LOCAL_FIGURE.startup_seconds if preset == "local" else SAGEMAKER_STARTUP_SECONDS
    if seconds_per_step > 0:
        return Figure(seconds_per_step, startup, "the setting seconds_per_step")
    if preset == "local":
        return LOCAL_FIGURE
    gpu = INSTANCE_GPUS.get(instance_type, (None, 0))[0]
    return FIGURES.get((preset, gpu))


def training_images(images: int, validation_split: float) -> int:
    """Images left to train on after the held-out ones (as ml/dataset/imagefolder.py split_validation holds out)."""
    held = max(1, round(images * validation_split)) if validation_split > 0 else 0
    return max(1, images - held)


def steps(hp: Hyperparameters, images: int, processes: int) -> int:
    """Optimizer steps of a job, as ml/train/stream.py total_steps counts them (its buckets taken as one)."""
    if hp.max_train_steps is not None:
        return hp.max_train_steps
    per_epoch = math.ceil(math.ceil(training_images(images, hp.validation_split) / hp.train_batch_size) / processes)
    return math.ceil(hp.num_train_epochs * per_epoch / hp.gradient_accumulation_steps)


def estimate(plans: list[Plan], settings: Settings, notes: list[str] | None = None) -> Estimate:
    """The cost of these jobs (launched from one settings: one instance type) under the settings' preset.

    A table figure holds for the preset's gradient_accumulation_steps; a job with more micro-batches per step takes
    proportionally longer. The setting seconds_per_step is taken as it is.
    """
    notes = list(notes or [])
    first = plans[0]
    found = figure(settings.preset, first.instance_type, settings.seconds_per_step)
    total_steps = sum(plan.steps for plan in plans)
    billable, unknown = None, None
    if found is None:
        gpu = INSTANCE_GPUS.get(first.instance_type, ("an unknown GPU", 0))[0]
        unknown = (f"no measured seconds per optimizer step for {first.instance_type} ({gpu}) under the "
                   f"{settings.preset} preset (docs/dags.md#cost); give seconds_per_step: the Airflow Variable "
                   "sdxl_lora_seconds_per_step or SDXL_LORA_SECONDS_PER_STEP, 1 / steps_per_second of a finished job's "
                   "model/training_summary.json")
    else:
        billable = sum(plan.steps * _step_seconds(plan, found, settings, notes) + found.startup_seconds
                       for plan in plans)
        if first.instance_type not in ON_DEMAND_USD_PER_HOUR:
            unknown = (f"no on-demand price for {first.instance_type} in sdxl_lora.costs.ON_DEMAND_USD_PER_HOUR; "
                       "choose a priced instance type (setting training_instance_type) or add its price there")
    if any(plan.spot for plan in plans):
        notes.append("  spot: the figure is the on-demand price, an upper bound (the discount is known only after "
                     "a job ran)")
    return Estimate(jobs=len(plans), steps=total_steps, instance_type=first.instance_type,
                    instance_count=first.instance_count, figure=found, billable_seconds=billable, unknown=unknown,
                    notes=tuple(notes))


def _step_seconds(plan: Plan, found: Figure, settings: Settings, notes: list[str]) -> float:
    """A table figure scaled from the preset's micro-batches per step to the job's; the setting's as it is."""
    if settings.seconds_per_step > 0:
        return found.seconds_per_step
    measured = PRESETS[settings.preset].get("gradient_accumulation_steps", 1)
    if plan.gradient_accumulation_steps != measured:
        _note(notes, f"  scaled from the figure's {measured} to {plan.gradient_accumulation_steps} micro-batches "
                     "per step")
    return found.seconds_per_step * plan.gradient_accumulation_steps / measured


def _plan(hp: Hyperparameters, request: dict, images: int | None, notes: list[str]) -> Plan:
    """The plan of a CreateTrainingJob request (or a tuning job's training definition) with these hyperparameters."""
    resources = request.get("ResourceConfig") or {}
    instance_type, count = resources.get("InstanceType", ""), int(resources.get("InstanceCount", 1))
    gpus = INSTANCE_GPUS.get(instance_type, (None, None))[1]
    if hp.max_train_steps is None:
        if images is None:
            images = ASSUMED_IMAGES
            _note(notes, f"  assumes {ASSUMED_IMAGES} images: num_train_epochs counts the steps and the dataset's "
                         "manifest gave no image count")
        if gpus is None:
            _note(notes, f"  assumes one process per instance: GPUs of {instance_type} unknown (more would mean fewer "
                         "steps per epoch)")
    return Plan(steps=steps(hp, images or 0, (gpus or 1) * count),
                gradient_accumulation_steps=hp.gradient_accumulation_steps, instance_type=instance_type,
                instance_count=count, spot=bool(request.get("EnableManagedSpotTraining")))


def _note(notes: list[str], note: str) -> None:
    if note not in notes:
        notes.append(note)


def of_training_requests(requests: list[dict], settings: Settings, images: int | None = None) -> Estimate:
    """The cost of CreateTrainingJob requests (a grid's trials, a training run's job).

    :param requests: the requests (sdxl_lora.sagemaker_requests.training_request), at least one.
    :param settings: the run's settings (preset, seconds_per_step).
    :param images: the dataset's image count (its manifest), needed only when num_train_epochs counts the steps.
    """
    notes: list[str] = []
    plans = [_plan(parse(request["HyperParameters"]), request, images, notes) for request in requests]
    return estimate(plans, settings, notes)


def of_tuning_request(request: dict, settings: Settings, images: int | None = None) -> Estimate:
    """The cost of a CreateHyperParameterTuningJob request: MaxNumberOfTrainingJobs trials, each at the top of the
    max_train_steps range, an upper bound (SageMaker chooses each trial's steps; early stopping ends some sooner).

    :param request: the request (sdxl_lora.tuning.tuning_request).
    :param settings: the run's settings (preset, seconds_per_step).
    :param images: the dataset's image count, needed only when max_train_steps is not tuned.
    """
    config, definition = request["HyperParameterTuningJobConfig"], request["TrainingJobDefinition"]
    trials = int(config["ResourceLimits"]["MaxNumberOfTrainingJobs"])
    values = dict(definition.get("StaticHyperParameters") or {})
    notes: list[str] = []
    for tuned in config["ParameterRanges"].get("IntegerParameterRanges", []):
        if tuned["Name"] == "max_train_steps":
            values["max_train_steps"] = tuned["MaxValue"]
            notes.append(f"  upper bound: every trial at max_train_steps {tuned['MaxValue']}, the top of its range")
    plan = _plan(parse(values), definition, images, notes)
    return estimate([plan] * trials, settings, notes)


def manifest_images(manifest: dict) -> int | None:
    """The image count a processed dataset's manifest.json gives (ml.contract.manifest), or None."""
    return (manifest.get("counts") or {}).get("images_written")


def check(found: Estimate, max_cost_usd: float | None) -> None:
    """Refuse a run above its cap, or whose cap cannot be checked; no cap (None): nothing to refuse.

    :raises CostCapError: naming the estimate, the cap and what to change.
    """
    if max_cost_usd is None:
        return
    if found.usd is None:
        raise CostCapError(f"max_cost_usd is {_amount(max_cost_usd)} USD, but the cost of {found.jobs} training job(s) "
                           f"on {found.instance_type} cannot be estimated: {found.unknown}. Nothing was launched.")
    if found.usd > max_cost_usd:
        raise CostCapError(
            f"estimated cost {_amount(found.usd)} USD ({found.jobs} training job(s), {found.steps} optimizer steps, "
            f"{_amount(found.instance_hours)} instance-hours on {found.instance_type}, on-demand price) is above "
            f"max_cost_usd {_amount(max_cost_usd)} USD. Nothing was launched. Run fewer trials, fewer steps "
            "(max_train_steps, num_train_epochs), a cheaper instance type (setting training_instance_type), or "
            "raise max_cost_usd.")


def enforce(found: Estimate, max_cost_usd: float | None, logger: logging.Logger) -> None:
    """Log the estimate, then check it against the cap (check). Call it before launching any job.

    :param found: the estimate (of_training_requests, of_tuning_request).
    :param max_cost_usd: the run's cap in USD; None: no cap.
    :param logger: the task's logger.
    :raises CostCapError: as check.
    """
    logger.info("%s", found.describe())
    if max_cost_usd is None:
        logger.info("no max_cost_usd: no cap")
    check(found, max_cost_usd)
    if max_cost_usd is not None:
        logger.info("within max_cost_usd %s USD", _amount(max_cost_usd))
