"""Comparing adapters by validation loss: grid trials on a leaderboard and the winner to deploy; a
retrained adapter against the one serving now, both scored on the new version's held-out images.

A trial is whatever the training operator returned (DescribeTrainingJob) or a failure; failed
trials are listed but never chosen, so one bad trial does not stop selection among the rest.

A val_loss is only comparable with another computed on the same held-out images: each version
holds out its own. The serving adapter's recorded val_loss was computed on the version it was
trained on, so a retrain scores it again on the new version (`scoring_request`: a training job
with the `score_adapter` channel, ml/train/evaluate.py, the same split, fixed noise and timesteps and
precision the new job's own val_loss used) and `compare_with_serving` compares those two numbers: the
recorded val_loss is reported, never compared (its docstring states the whole rule).

The DAGs call these functions from their tasks (select_winner, better_than_serving); the decisions are here, so
they are tested without Airflow.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from ml.contract.container import SCORE_CHANNEL  # a training job with this channel scores the adapter in it
from sdxl_lora import grid, serving
from sdxl_lora.tuning import trial_values

METRIC = "val_loss"
log = logging.getLogger(__name__)


class SelectionError(RuntimeError):
    """No winner can be chosen (no trial succeeded, the tuning job was never created): a retry finds the same."""


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


def trained(description: dict) -> dict:
    """A training (or scoring) job's {training_job, val_loss}: what the comparison reads and the serving
    record keeps (serving.training); val_loss None when the job logged none (validation_split 0)."""
    return serving.training(description["TrainingJobName"], final_metrics(description).get(METRIC))


def candidate(description: dict) -> dict:
    """The model a training job made, for the deploy group: {model_artifacts, training}."""
    return {"model_artifacts": description["ModelArtifacts"]["S3ModelArtifacts"], "training": trained(description)}


def grid_results(configs: Iterable[dict], latest: Callable[[str], dict | None]) -> list[Result]:
    """The grid's trials, one per CreateTrainingJob request: the latest attempt at each (latest: base job name ->
    DescribeTrainingJob or None) with the request's swept values; a trial never started is "NotStarted"."""
    results = []
    for config in configs:
        base = config["TrainingJobName"]
        description = latest(base) or {"TrainingJobName": base, "TrainingJobStatus": "NotStarted"}
        values = config["HyperParameters"]
        results.append(from_description(description, float(values["learning_rate"]), int(values["max_train_steps"]),
                                        int(values["rank"])))
    return results


def tuning_results(client, config: dict, latest: Callable[[object, str], dict | None]) -> tuple[dict, list[Result]]:
    """The tuning job a run made (latest: (client, base name) -> its last attempt's description or None) and
    every trial it launched, each described, with its tuned values over the static ones.

    :raises SelectionError: when the tuning job was never created.
    """
    tuning_job = latest(client, config["HyperParameterTuningJobName"])
    if tuning_job is None:
        raise SelectionError(f"tuning job {config['HyperParameterTuningJobName']} was never created")
    static = config["TrainingJobDefinition"]["StaticHyperParameters"]
    results = []
    for page in client.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job").paginate(
            HyperParameterTuningJobName=tuning_job["HyperParameterTuningJobName"]):
        for summary in page["TrainingJobSummaries"]:
            description = client.describe_training_job(TrainingJobName=summary["TrainingJobName"])
            results.append(from_description(description, *trial_values(summary, static)))
    return tuning_job, results


def select_winner(results: list[Result], heading: str, folder: str, write: Callable[[str, str], None],
                  trials_of: str = "", logger: logging.Logger = log) -> dict:
    """Write the leaderboard (``folder/leaderboard.json`` and ``.md``, its title counting the failed trials), log
    each failed trial with its reason and return the winner's record, the XCom the deploy group reads.

    :param results: every trial, failed ones included (they are listed, never chosen).
    :param heading: the leaderboard's title before its counts, e.g. ``"<dag> <run id>"``.
    :param folder: the s3:// prefix the leaderboard goes to.
    :param write: ``write(text, uri)`` stores one object (S3Hook.load_string with replace, say: s3_writer).
    :param trials_of: what the trials belong to (a tuning job's name), named when none succeeded.
    :param logger: where the failed trials and the winner are logged.
    :return: ``{winner, val_loss, model_artifacts, leaderboard, trials, failed_trials, training}``.
    :raises SelectionError: when no trial completed with a finite validation loss (the leaderboard is written first).
    """
    failed = [r for r in results if not r.usable]
    for result in failed:
        logger.warning("trial %s failed (%s): %s", result.job_name, result.status,
                       result.failure_reason or "no validation loss")
    board = f"{folder}/leaderboard.md"
    write(leaderboard_json(results), f"{folder}/leaderboard.json")
    write(leaderboard_markdown(results, grid.leaderboard_title(heading, len(results), len(failed))), board)
    best = winner(results)
    if best is None:
        of = f" of {trials_of}" if trials_of else ""
        raise SelectionError(f"no trial{of} completed with a validation loss ({len(failed)} of {len(results)} "
                             f"failed): the run fails; leaderboard at {board}")
    logger.info("winner %s (val_loss %.6g) among %d trials, %d failed; leaderboard at %s", best.job_name,
                best.val_loss, len(results), len(failed), board)
    return {"winner": best.job_name, "val_loss": best.val_loss, "model_artifacts": best.model_artifacts,
            "leaderboard": board, "trials": len(results), "failed_trials": len(failed),
            "training": serving.training(best.job_name, best.val_loss)}


def select_tuning_winner(tuning_job: dict, config: dict, results: list[Result], run: str, folder: str,
                         write: Callable[[str, str], None], logger: logging.Logger = log) -> dict:
    """select_winner for a tuning job's trials: the title names the job, its strategy and status, and the record
    adds ``tuning_job`` and ``sagemaker_best`` (SageMaker's BestTrainingJob, logged beside the winner).

    :param tuning_job: DescribeHyperParameterTuningJob of the run's tuning job (tuning_results).
    :param config: the CreateHyperParameterTuningJob request (its strategy).
    :param results: the job's trials (tuning_results).
    :param run: the leaderboard's heading before the job, e.g. ``"<dag> <run id>"``.
    :param folder: the s3:// prefix the leaderboard goes to.
    :param write: ``write(text, uri)`` stores one object.
    :param logger: where the failed trials and the winner are logged.
    :raises SelectionError: when no trial completed with a finite validation loss.
    """
    name = tuning_job["HyperParameterTuningJobName"]
    heading = (f"{run}: tuning job {name} ({config['HyperParameterTuningJobConfig']['Strategy']}, "
               f"{tuning_job['HyperParameterTuningJobStatus']})")
    record = select_winner(results, heading, folder, write, trials_of=name, logger=logger)
    sagemaker_best = (tuning_job.get("BestTrainingJob") or {}).get("TrainingJobName")
    logger.info("SageMaker's BestTrainingJob of %s: %s", name, sagemaker_best)
    return {**record, "tuning_job": name, "sagemaker_best": sagemaker_best}


def s3_writer(s3) -> Callable[[str, str], None]:
    """select_winner's ``write`` over an S3Hook: each object replaced if it exists (a retried task writes again)."""
    def write(text: str, uri: str) -> None:
        s3.load_string(text, uri, replace=True)
    return write


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
    """(deploy?, why): whether a new adapter replaces the one serving on the endpoint. The one rule:

    - the new adapter has no finite val_loss (validation_split 0): not deployed automatically;
    - nothing is recorded as serving: deployed;
    - otherwise only the two scores on `version`'s held-out images are compared, the new adapter's and the
      serving adapter's from its scoring job; lower wins, a tie keeps what serves. The serving record's own
      val_loss (measured on another version's images, and absent for a model deployed outside a training run)
      is reported, never compared: a record without one is rescored like any other, and when the serving
      adapter has no score on these images the two cannot be compared and nothing is deployed automatically.

    :param new: the new adapter's ``{training_job, val_loss}`` (trained), scored by its own job on `version`.
    :param rescored: the serving adapter's ``{training_job, val_loss}`` from its scoring job (None: not scored).
    :param serving: the endpoint's serving record (serving.record; None: nothing serves).
    :param endpoint: the endpoint's name, for the reason.
    :param version: the dataset version both were scored on, for the reason.
    """
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


def scoring_skip_reason(deploy_if_better: bool, serving: dict | None) -> str | None:
    """Why the serving adapter is not scored on the new version (None: it is): nothing will be compared.

    :param deploy_if_better: the run's Param; off, nothing is deployed, so nothing is compared.
    :param serving: the endpoint's serving record (None: nothing serves, so no adapter to score).
    """
    if not deploy_if_better:
        return "deploy_if_better is off: nothing is compared, so the serving adapter is not scored"
    if serving is None:
        return "nothing is recorded as serving on the endpoint: no adapter to score"
    return None


def deploy_decision(new: dict, scoring: dict | None, serving_before: dict | None, serving_now: dict | None,
                    endpoint: str, version: str, deploy_if_better: bool = True) -> tuple[bool, str]:
    """(deploy?, why) at the end of a retraining run: not when the run was told not to, not when what serves
    changed while the run trained (its scores were taken against another adapter), else compare_with_serving.

    :param new: the new adapter's ``{training_job, val_loss}`` (trained).
    :param scoring: DescribeTrainingJob of the serving adapter's scoring job (None: skipped, nothing to score).
    :param serving_before: the serving record read before scoring (None: nothing served).
    :param serving_now: the serving record read now.
    :param endpoint: the endpoint's name.
    :param version: the dataset version trained and scored on.
    :param deploy_if_better: the run's Param.
    """
    if not deploy_if_better:
        return False, "deploy_if_better is off: not deploying"
    before, now = (serving_before or {}).get("model_data_url"), (serving_now or {}).get("model_data_url")
    if before != now:
        return False, (f"what serves on {endpoint} changed while this run trained ({before}, now {now}): not "
                       "deploying automatically")
    rescored = trained(scoring) if scoring is not None else None
    return compare_with_serving(new, rescored, serving_before, endpoint, version)
