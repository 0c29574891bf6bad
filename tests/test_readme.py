"""The README opens with the two commands; the training job's page documents every hyperparameter."""

from pathlib import Path

from ml.contract.hyperparameters import SPECS

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
TRAINING_JOB = (ROOT / "docs" / "training-job.md").read_text()


def test_readme_opens_with_the_two_commands():
    opening = README.split("```")[1]
    assert "make demo" in opening and "make test" in opening


def test_every_hyperparameter_is_documented():
    rows = {line.split("|")[1].strip().strip("`") for line in TRAINING_JOB.splitlines() if line.startswith("| `")}
    assert {spec.name for spec in SPECS} <= rows
