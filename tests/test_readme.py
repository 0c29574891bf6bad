"""The README stays true: it opens with the two commands and documents every hyperparameter."""

from pathlib import Path

from ml.contract.hyperparameters import SPECS

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    opening = README.split("```")[1]
    assert "make demo" in opening and "make test" in opening


def test_every_hyperparameter_is_documented():
    rows = {line.split("|")[1].strip().strip("`") for line in README.splitlines() if line.startswith("| `")}
    assert {spec.name for spec in SPECS} <= rows
