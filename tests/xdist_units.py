"""How `make test` splits the suite into work units for its pytest-xdist workers (tests/conftest.py)."""

# Modules under a real scheduler that start an Airflow of their own (another executor, `make airflow` itself):
# each is a unit of its own, so it runs beside the shared one instead of after it.
OWN_AIRFLOW = ("test_scheduler_celery.py", "test_scheduler_launcher.py")

# The longest units, started first (longest first: the other worker fills in with the short ones, and the run does
# not end with one long unit alone). Any unit not named here runs after these, in collection order. Their lengths:
# the `--durations` list at the end of `make test`.
FIRST = ("scheduler", "tests/ml/test_train.py", "tests/e2e/test_scheduler_celery.py",
         "tests/ship/test_airflow_image.py", "tests/e2e/test_dags_pipeline.py", "tests/e2e/test_scheduler_launcher.py")


def work_unit(nodeid: str) -> str:
    """The work unit of a test: its module, or "scheduler" for the modules that share the real scheduler of
    tests/e2e/conftest.py `scheduled`."""
    path = nodeid.split("::", 1)[0]
    name = path.rsplit("/", 1)[-1]
    return "scheduler" if name.startswith("test_scheduler_") and name not in OWN_AIRFLOW else path


def unit_order(unit: str) -> int:
    """Where a unit goes in the queue: FIRST's in their order, then the rest (a stable sort keeps theirs)."""
    return FIRST.index(unit) if unit in FIRST else len(FIRST)
