"""Comparing grid trials: a leaderboard by validation loss and the winner to deploy.

A trial is whatever the training operator returned (DescribeTrainingJob) or a failure; failed
trials are listed but never chosen, so one bad trial does not stop selection among the rest.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

METRIC = "val_loss"


@dataclass
class Result:
    job_name: str
    learning_rate: float
    max_train_steps: int
    rank: int
    status: str
    val_loss: float | None = None
    train_loss: float | None = None
    baseline_val_loss: float | None = None
    model_artifacts: str | None = None
    training_seconds: int | None = None
    failure_reason: str | None = None

    @property
    def usable(self) -> bool:
        return self.status == "Completed" and self.val_loss is not None and math.isfinite(self.val_loss)


def final_metrics(description: dict) -> dict[str, float]:
    """A DescribeTrainingJob's FinalMetricDataList as {name: value}."""
    return {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList", [])}


def from_description(description: dict, learning_rate: float, max_train_steps: int, rank: int) -> Result:
    metrics = final_metrics(description)
    return Result(
        job_name=description["TrainingJobName"], learning_rate=learning_rate, max_train_steps=max_train_steps,
        rank=rank, status=description["TrainingJobStatus"], val_loss=metrics.get(METRIC),
        train_loss=metrics.get("train_loss"), baseline_val_loss=metrics.get("baseline_val_loss"),
        model_artifacts=(description.get("ModelArtifacts") or {}).get("S3ModelArtifacts") or None,
        training_seconds=description.get("TrainingTimeInSeconds"), failure_reason=description.get("FailureReason"))


def rank_results(results: list[Result]) -> list[Result]:
    """Usable trials by validation loss (ties: fewer steps, then lower rank), then the rest."""
    usable = sorted((r for r in results if r.usable), key=lambda r: (r.val_loss, r.max_train_steps, r.rank))
    return usable + [r for r in results if not r.usable]


def winner(results: list[Result]) -> Result | None:
    ranked = rank_results(results)
    return ranked[0] if ranked and ranked[0].usable else None


def leaderboard_json(results: list[Result]) -> str:
    ranked = rank_results(results)
    best = winner(results)
    return json.dumps({"metric": METRIC, "winner": best.job_name if best else None,
                       "trials": [asdict(r) for r in ranked]}, indent=2)


def leaderboard_markdown(results: list[Result], title: str) -> str:
    ranked = rank_results(results)
    lines = [f"# {title}", "", f"Ranked by {METRIC} on the held-out images (lower is better).", "",
             "| # | job | learning rate | steps | rank | val_loss | base val_loss | train loss | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for place, r in enumerate(ranked, start=1):
        lines.append(f"| {place if r.usable else '-'} | {r.job_name} | {r.learning_rate:g} | {r.max_train_steps} | "
                     f"{r.rank} | {_fmt(r.val_loss)} | {_fmt(r.baseline_val_loss)} | {_fmt(r.train_loss)} | "
                     f"{r.status}{': ' + r.failure_reason if r.failure_reason else ''} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"
