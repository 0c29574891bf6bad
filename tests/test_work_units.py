"""How `make test` splits the suite between its two workers (tests/conftest.py)."""

import re
from pathlib import Path

from xdist_units import FIRST, OWN_AIRFLOW, unit_order, work_unit

TESTS = Path(__file__).parent


def test_a_module_is_one_unit_and_the_real_scheduler_modules_are_one_together():
    assert work_unit("tests/e2e/test_tuning_jobs.py::test_grid_runs") == "tests/e2e/test_tuning_jobs.py"
    assert work_unit("tests/e2e/test_tuning_jobs.py::test_bad[Random-x]") == "tests/e2e/test_tuning_jobs.py"
    assert work_unit("tests/e2e/test_scheduler_local.py::test_pool") == work_unit(
        "tests/e2e/test_scheduler_params.py::test_x") == "scheduler"


def test_the_modules_with_an_airflow_of_their_own_are_units_of_their_own_and_the_longest_go_first():
    for name in OWN_AIRFLOW:
        assert work_unit(f"tests/e2e/{name}::test_x") == f"tests/e2e/{name}"
    assert [unit_order(unit) for unit in FIRST] == list(range(len(FIRST)))
    assert unit_order("tests/plugins/test_grid.py") == len(FIRST)
    units = {work_unit(f"{path.relative_to(TESTS.parent).as_posix()}::test") for path in TESTS.rglob("test_*.py")}
    assert set(FIRST) <= units  # no stale name


def test_every_module_marked_scheduler_is_in_the_scheduler_unit_or_starts_its_own_airflow():
    """The unit is read from the file name, in the controller, which does not collect: the marker, the name and
    the fixture a module uses must agree."""
    for path in sorted(TESTS.rglob("test_*.py")):
        text = path.read_text()
        marked = re.search(r"^pytestmark = pytest\.mark\.scheduler$", text, re.MULTILINE) is not None
        shared = re.search(r"\bdef \w+\([^)]*\bscheduled\b", text) is not None  # takes the shared Airflow
        nodeid = f"{path.relative_to(TESTS.parent).as_posix()}::test"
        if path.name in OWN_AIRFLOW:
            assert marked and not shared, path
        else:
            assert (work_unit(nodeid) == "scheduler") == marked == shared, path
