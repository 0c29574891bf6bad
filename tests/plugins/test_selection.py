import json

from sdxl_lora.selection import Result, from_description, leaderboard_json, leaderboard_markdown, winner


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
