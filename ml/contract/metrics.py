"""The training log's metric lines and the MetricDefinitions that parse them.

The job prints ``step=N loss=X lr=Y`` per logged step and ``val_loss=X`` after
validation. SageMaker applies METRIC_DEFINITIONS to the job's log, publishes CloudWatch
metrics and reports the last value of each in FinalMetricDataList. Pure Python: the DAGs
import it without the torch stack.
"""

from __future__ import annotations

import re

_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

# \b keeps "loss=" from matching inside "val_loss=" and "val_loss=" inside "baseline_val_loss=".
METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": "train_loss", "Regex": rf"\bstep=[0-9]+ loss={_NUMBER}"},
    {"Name": "learning_rate", "Regex": rf"\bstep=[0-9]+ loss=\S+ lr={_NUMBER}"},
    {"Name": "step", "Regex": r"\bstep=([0-9]+) loss="},
    {"Name": "val_loss", "Regex": rf"\bval_loss={_NUMBER}"},
    {"Name": "baseline_val_loss", "Regex": rf"\bbaseline_val_loss={_NUMBER}"},
]


def step_line(step: int, loss: float, lr: float) -> str:
    return f"step={step} loss={loss:.6g} lr={lr:.6g}"


def val_loss_line(val_loss: float, baseline: bool = False) -> str:
    return f"{'baseline_' if baseline else ''}val_loss={val_loss:.6g}"


def final_metrics(log_text: str, definitions: list[dict[str, str]] = METRIC_DEFINITIONS) -> dict[str, float]:
    """Last value of each metric in a log, as SageMaker's FinalMetricDataList reports it."""
    found: dict[str, float] = {}
    for definition in definitions:
        matches = re.findall(definition["Regex"], log_text)
        if matches:
            found[definition["Name"]] = float(matches[-1])
    return found
