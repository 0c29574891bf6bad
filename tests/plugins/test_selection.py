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
