"""How `make test` splits the suite between its two workers (tests/conftest.py)."""

import re
from pathlib import Path

from xdist_units import work_unit

TESTS = Path(__file__).parent


def test_a_module_is_one_unit_and_the_real_scheduler_modules_are_one_together():
    assert work_unit("tests/e2e/test_tuning_jobs.py::test_grid_runs") == "tests/e2e/test_tuning_jobs.py"
    assert work_unit("tests/e2e/test_tuning_jobs.py::test_bad[Random-x]") == "tests/e2e/test_tuning_jobs.py"
    assert work_unit("tests/e2e/test_scheduler_local.py::test_pool") == work_unit(
        "tests/e2e/test_scheduler_params.py::test_x") == "scheduler"


def test_every_module_marked_scheduler_is_in_the_scheduler_unit():
    """The unit is read from the file name, in the controller, which does not collect: the marker and the name
    must agree."""
    for path in sorted(TESTS.rglob("test_*.py")):
        marked = re.search(r"^pytestmark = pytest\.mark\.scheduler$", path.read_text(), re.MULTILINE) is not None
        nodeid = f"{path.relative_to(TESTS.parent).as_posix()}::test"
        assert (work_unit(nodeid) == "scheduler") == marked, path
