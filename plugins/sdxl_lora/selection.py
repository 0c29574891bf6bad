"""Comparing adapters by validation loss: grid trials on a leaderboard and the winner to deploy; a
retrained adapter against the one serving now, both scored on the new version's held-out images.

A trial is whatever the training operator returned (DescribeTrainingJob) or a failure; failed
trials are listed but never chosen, so one bad trial does not stop selection among the rest.

A val_loss is only comparable with another computed on the same held-out images: each version
holds out its own. The serving adapter's recorded val_loss was computed on the version it was
trained on, so a retrain scores it again on the new version (`scoring_request`: a training job
with the `score_adapter` channel, ml/train/evaluate.py, the same split, fixed noise and timesteps and
precision the new job's own val_loss used) and `compare_with_serving` compares those two numbers.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass

METRIC = "val_loss"
SCORE_CHANNEL = "score_adapter"  # ml/train/evaluate.py: a training job with this channel scores the adapter in it


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


def scoring_request(training_request: dict, job_name: str, adapter_uri: str, job_tags: list[dict]) -> dict:
    """A job scoring the adapter at adapter_uri (a model.tar.gz or a prefix holding the LoRA) on the held-out
    images of training_request's train channel, with its hyperparameters (so the same split, resolution and
    precision) and resources: a copy of that CreateTrainingJob request with the `score_adapter` channel and no
    checkpoints (a scoring job restarted after a spot interruption simply scores again)."""
    if not adapter_uri.startswith("s3://"):
        raise ValueError(f"the serving adapter to rescore must be an s3:// URI, got {adapter_uri!r}")
    request = copy.deepcopy(training_request)
    request["TrainingJobName"] = job_name
    request["InputDataConfig"] = [c for c in request["InputDataConfig"] if c["ChannelName"] != SCORE_CHANNEL]
    request["InputDataConfig"].append({"ChannelName": SCORE_CHANNEL, "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": adapter_uri, "S3DataDistributionType": "FullyReplicated"}}})
    request.pop("CheckpointConfig", None)
    request["Tags"] = job_tags
    return request


def compare_with_serving(new: dict, rescored: dict | None, serving: dict | None, endpoint: str,
                         version: str) -> tuple[bool, str]:
    """(deploy?, why). new: the new adapter's {training_job, val_loss}, scored on `version`'s held-out
    images by its own job; rescored: the serving adapter's {training_job, val_loss} from its scoring job on
    the same images (None: not scored); serving: the endpoint's serving record (None: nothing serves)."""
    new_loss = new.get("val_loss")
    if new_loss is None or not math.isfinite(new_loss):
        return False, ("the new adapter has no validation loss (validation_split is 0): not deploying it "
                       "automatically")
    if serving is None:
        return True, f"nothing recorded as serving on {endpoint}: deploying (val_loss {new_loss:.6g})"
    what = serving.get("training_job") or serving.get("model_data_url")
    scored = (rescored or {}).get("val_loss")
    if scored is None or not math.isfinite(scored):
        return False, (f"the adapter serving on {endpoint} ({what}) has no score on version {version}'s "
                       "held-out images, so the two cannot be compared: not deploying automatically")
    recorded = serving.get("val_loss")
    own = f"; on its own training version it scored {recorded:.6g}" if isinstance(recorded, (int, float)) else ""
    verdict = new_loss < scored
    return verdict, (f"both adapters scored on version {version}'s held-out images: new val_loss {new_loss:.6g} "
                     f"({new.get('training_job')}) against {scored:.6g} of the serving adapter ({what}, rescored "
                     f"by {rescored.get('training_job')}{own}), serving on {endpoint}: "
                     f"{'deploying' if verdict else 'keeping what serves'}")
