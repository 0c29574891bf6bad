import json
from types import SimpleNamespace

import pytest

from sdxl_lora.selection import (
    Result,
    SelectionError,
    from_description,
    grid_results,
    leaderboard_json,
    leaderboard_markdown,
    select_tuning_winner,
    select_winner,
    tuning_results,
    winner,
)


def _description(name, status, val_loss=None):
    d = {"TrainingJobName": name, "TrainingJobStatus": status, "ModelArtifacts": {"S3ModelArtifacts": f"s3://b/{name}"}}
    if val_loss is not None:
        d["FinalMetricDataList"] = [{"MetricName": "val_loss", "Value": val_loss},
                                    {"MetricName": "train_loss", "Value": 0.2}]
    if status == "Failed":
        d["FailureReason"] = "rank: must be at least 1"
    return d


def test_the_lowest_validation_loss_wins_and_failures_are_listed_not_chosen():
    results = [from_description(_description("a", "Completed", 0.30), 1e-4, 500, 4),
               from_description(_description("b", "Failed"), 2e-4, 500, 4),
               from_description(_description("c", "Completed", 0.25), 2e-4, 1000, 4),
               from_description(_description("d", "Stopped"), 2e-4, 1000, 8)]
    assert winner(results).job_name == "c"
    board = json.loads(leaderboard_json(results))
    assert board["winner"] == "c"
    assert [t["job_name"] for t in board["trials"]] == ["c", "a", "b", "d"]
    markdown = leaderboard_markdown(results, "grid run r1")
    assert "| 1 | c |" in markdown and "rank: must be at least 1" in markdown


def test_no_usable_trial_means_no_winner():
    assert winner([Result("a", 1e-4, 5, 4, "Failed")]) is None
    assert winner([Result("a", 1e-4, 5, 4, "Completed", val_loss=float("nan"))]) is None


def _training_request():
    from sdxl_lora import sagemaker_requests
    from sdxl_lora.settings import Settings

    settings = Settings(bucket="b", prefix="p", base_model_uri="s3://b/p/base_model/")
    return sagemaker_requests.training_request(settings, "sdxl-lora-train-abc-v2", settings.processed_dataset("v2"),
                                     {"resolution": 32, "validation_split": 0.25}, sagemaker_requests.tags(version="v2"))


def test_the_scoring_job_is_the_training_request_with_the_serving_adapter_and_no_checkpoints():
    import pytest

    from sdxl_lora.selection import scoring_request

    training = _training_request()
    request = scoring_request(training, "sdxl-lora-score-abc-v2", "s3://b/p/models/old/output/model.tar.gz",
                              [{"Key": "sdxl-lora:scores", "Value": "old"}])
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    assert channels == {"train": "s3://b/p/proc_dataset/v2/", "base_model": "s3://b/p/base_model/",
                        "score_adapter": "s3://b/p/models/old/output/model.tar.gz"}
    assert request["HyperParameters"] == training["HyperParameters"]  # the same split, resolution and precision
    assert request["TrainingJobName"] == "sdxl-lora-score-abc-v2" and "CheckpointConfig" not in request
    assert request["Tags"] == [{"Key": "sdxl-lora:scores", "Value": "old"}]
    assert "score_adapter" not in {c["ChannelName"] for c in training["InputDataConfig"]}  # a copy
    with pytest.raises(ValueError, match="must be an s3:// URI"):
        scoring_request(training, "n", "models/old", [])


SERVING = {"model_data_url": "s3://b/p/models/old/output/model.tar.gz", "training_job": "old", "val_loss": 0.2}


def test_the_comparison_uses_both_scores_on_the_new_version_not_the_recorded_one():
    from sdxl_lora.selection import compare_with_serving

    new = {"training_job": "new", "val_loss": 0.30}
    rescored = {"training_job": "score-old", "val_loss": 0.35}
    # The record's 0.2 (another version's images) would keep the old adapter; on v2's images the new one wins.
    deploy, reason = compare_with_serving(new, rescored, SERVING, "ep", "v2")
    assert deploy
    assert reason == ("both adapters scored on version v2's held-out images: new val_loss 0.3 (new) against 0.35 of "
                      "the serving adapter (old, rescored by score-old; on its own training version it scored 0.2), "
                      "serving on ep: deploying")
    deploy, reason = compare_with_serving({**new, "val_loss": 0.4}, rescored, SERVING, "ep", "v2")
    assert not deploy and reason.endswith("keeping what serves")


def test_the_comparison_without_a_serving_adapter_or_a_score():
    from sdxl_lora.selection import compare_with_serving

    new = {"training_job": "new", "val_loss": 0.3}
    assert compare_with_serving(new, None, None, "ep", "v2") == (
        True, "nothing recorded as serving on ep: deploying (val_loss 0.3)")
    deploy, reason = compare_with_serving(new, None, SERVING, "ep", "v2")
    assert not deploy and "has no score on version v2's held-out images" in reason
    deploy, reason = compare_with_serving({"training_job": "new", "val_loss": None}, None, SERVING, "ep", "v2")
    assert not deploy and "validation_split is 0" in reason


# The decisions the DAG tasks call (select_winner, candidate, build_scoring_request, better_than_serving).

def _writer():
    written = {}
    return written, lambda text, uri: written.__setitem__(uri, text)


def _grid_config(name, learning_rate, steps, rank):
    return {"TrainingJobName": name, "HyperParameters": {"learning_rate": str(learning_rate),
                                                         "max_train_steps": str(steps), "rank": str(rank)}}


def test_grid_results_take_each_trials_latest_attempt_and_its_request_values():
    described = {"g-1": _description("g-1-a2", "Completed", 0.3)}
    results = grid_results([_grid_config("g-1", 1e-4, 500, 4), _grid_config("g-2", 2e-4, 1000, 8)], described.get)
    assert [(r.job_name, r.status, r.learning_rate, r.max_train_steps, r.rank) for r in results] == [
        ("g-1-a2", "Completed", 1e-4, 500, 4), ("g-2", "NotStarted", 2e-4, 1000, 8)]


def test_select_winner_writes_the_leaderboard_and_returns_the_record_the_deploy_group_reads(caplog):
    results = [from_description(_description("a", "Completed", 0.30), 1e-4, 500, 4),
               from_description(_description("b", "Failed"), 2e-4, 500, 4)]
    written, write = _writer()
    with caplog.at_level("INFO"):
        record = select_winner(results, "grid r1", "s3://b/p/grid_search/r1", write)
    assert record == {"winner": "a", "val_loss": 0.30, "model_artifacts": "s3://b/a",
                      "leaderboard": "s3://b/p/grid_search/r1/leaderboard.md", "trials": 2, "failed_trials": 1,
                      "training": {"training_job": "a", "val_loss": 0.30}}
    assert set(written) == {"s3://b/p/grid_search/r1/leaderboard.json", "s3://b/p/grid_search/r1/leaderboard.md"}
    assert json.loads(written["s3://b/p/grid_search/r1/leaderboard.json"])["winner"] == "a"
    assert written[record["leaderboard"]].startswith(
        "# grid r1: 1 of 2 trials failed (the winner is the best of the others)\n")
    assert "trial b failed (Failed): rank: must be at least 1" in caplog.text


def test_no_winner_is_a_clear_error_after_the_leaderboard_is_written():
    written, write = _writer()
    results = [from_description(_description("b", "Failed"), 2e-4, 500, 4)]
    with pytest.raises(SelectionError, match=r"^no trial of tj completed with a validation loss \(1 of 1 failed\): "
                                             r"the run fails; leaderboard at s3://f/leaderboard.md$"):
        select_winner(results, "tune r1", "s3://f", write, trials_of="tj")
    assert "none succeeded: the run failed" in written["s3://f/leaderboard.md"]
    with pytest.raises(SelectionError, match=r"^no trial completed"):
        select_winner([], "grid r1", "s3://f", write)


class _TuningClient:
    """ListTrainingJobsForHyperParameterTuningJob (two pages) and DescribeTrainingJob of a tuning job's trials."""

    def __init__(self, trials: dict[str, tuple[dict, dict]]):
        self.trials = trials

    def get_paginator(self, operation):
        assert operation == "list_training_jobs_for_hyper_parameter_tuning_job"
        summaries = [summary for summary, _ in self.trials.values()]
        return SimpleNamespace(paginate=lambda HyperParameterTuningJobName: [
            {"TrainingJobSummaries": summaries[:1]}, {"TrainingJobSummaries": summaries[1:]}])

    def describe_training_job(self, TrainingJobName):
        return self.trials[TrainingJobName][1]


TUNING_CONFIG = {"HyperParameterTuningJobName": "tj", "HyperParameterTuningJobConfig": {"Strategy": "Bayesian"},
                 "TrainingJobDefinition": {"StaticHyperParameters": {"learning_rate": "0.1", "max_train_steps": "9",
                                                                     "rank": "2"}}}


def _tuning_trial(name, val_loss, rank):
    summary = {"TrainingJobName": name, "TunedHyperParameters": {"learning_rate": "0.0002", "rank": f'"{rank}"'}}
    return summary, _description(name, "Completed", val_loss)


def test_a_tuning_jobs_trials_are_every_job_it_launched_with_tuned_over_static_values():
    client = _TuningClient({"t-1": _tuning_trial("t-1", 0.3, 4), "t-2": _tuning_trial("t-2", 0.2, 16)})
    job = {"HyperParameterTuningJobName": "tj-a2", "HyperParameterTuningJobStatus": "Completed",
           "BestTrainingJob": {"TrainingJobName": "t-2"}}
    tuning_job, results = tuning_results(client, TUNING_CONFIG, lambda client_, base: job)
    assert tuning_job is job
    assert [(r.job_name, r.learning_rate, r.max_train_steps, r.rank) for r in results] == [
        ("t-1", 2e-4, 9, 4), ("t-2", 2e-4, 9, 16)]
    written, write = _writer()
    record = select_tuning_winner(job, TUNING_CONFIG, results, "tune r1", "s3://f", write)
    assert record["winner"] == "t-2" and record["tuning_job"] == "tj-a2" and record["sagemaker_best"] == "t-2"
    assert {"winner", "val_loss", "model_artifacts", "leaderboard", "trials", "failed_trials",
            "training"} <= set(record)
    assert written["s3://f/leaderboard.md"].startswith("# tune r1: tuning job tj-a2 (Bayesian, Completed): 2 trials\n")
    with pytest.raises(SelectionError, match="^tuning job tj was never created$"):
        tuning_results(client, TUNING_CONFIG, lambda client_, base: None)


def test_the_candidate_is_the_models_artifacts_its_job_and_val_loss():
    from sdxl_lora.selection import candidate, trained

    assert candidate(_description("job-1", "Completed", 0.25)) == {
        "model_artifacts": "s3://b/job-1", "training": {"training_job": "job-1", "val_loss": 0.25}}
    assert trained(_description("job-2", "Completed")) == {"training_job": "job-2", "val_loss": None}


def test_the_serving_adapter_is_scored_only_when_something_serves_and_deploying_is_wanted():
    from sdxl_lora.selection import scoring_skip_reason

    assert scoring_skip_reason(True, SERVING) is None
    assert "deploy_if_better is off" in scoring_skip_reason(False, SERVING)
    assert "nothing is recorded as serving" in scoring_skip_reason(True, None)


def test_the_deploy_decision_refuses_when_not_wanted_or_when_what_serves_changed_else_compares():
    from sdxl_lora.selection import deploy_decision

    new = {"training_job": "new", "val_loss": 0.30}
    scoring = _description("score-old", "Completed", 0.35)
    assert deploy_decision(new, scoring, SERVING, SERVING, "ep", "v2", deploy_if_better=False) == (
        False, "deploy_if_better is off: not deploying")
    moved = {**SERVING, "model_data_url": "s3://b/p/models/other/output/model.tar.gz"}
    deploy, reason = deploy_decision(new, scoring, SERVING, moved, "ep", "v2")
    assert not deploy and reason.startswith("what serves on ep changed while this run trained")
    deploy, reason = deploy_decision(new, scoring, SERVING, SERVING, "ep", "v2")
    assert deploy and "rescored by score-old" in reason
    assert deploy_decision(new, None, None, None, "ep", "v2") == (
        True, "nothing recorded as serving on ep: deploying (val_loss 0.3)")
