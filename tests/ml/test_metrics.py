import re

from ml.contract.metrics import METRIC_DEFINITIONS, final_metrics, step_line, val_loss_line

LOG = "\n".join([
    "2026-01-01 INFO ml.train.job: " + val_loss_line(0.9, baseline=True),
    "2026-01-01 INFO ml.train.job: " + step_line(1, 0.5, 2e-4),
    "2026-01-01 INFO ml.train.job: " + step_line(2, 0.25, 1e-4),
    "2026-01-01 INFO ml.train.job: " + val_loss_line(0.125),
])


def test_final_metrics_take_the_last_value_of_each():
    assert final_metrics(LOG) == {"train_loss": 0.25, "learning_rate": 1e-4, "step": 2.0, "val_loss": 0.125,
                                  "baseline_val_loss": 0.9}


def test_val_loss_does_not_match_baseline_or_train_lines():
    (val,) = [d for d in METRIC_DEFINITIONS if d["Name"] == "val_loss"]
    assert re.findall(val["Regex"], LOG) == ["0.125"]
    (train,) = [d for d in METRIC_DEFINITIONS if d["Name"] == "train_loss"]
    assert re.findall(train["Regex"], LOG) == ["0.5", "0.25"]


def test_scientific_notation_parses():
    assert final_metrics(step_line(3, 1.5e-7, 3e-6)) == {"train_loss": 1.5e-7, "learning_rate": 3e-6, "step": 3.0}


def test_definitions_fit_sagemaker_limits():
    # CreateTrainingJob: at most 40 definitions, Name up to 255 chars, Regex up to 500 chars.
    assert len(METRIC_DEFINITIONS) <= 40
    assert all(len(d["Name"]) <= 255 and len(d["Regex"]) <= 500 for d in METRIC_DEFINITIONS)
