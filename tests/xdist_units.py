"""How `make test` splits the suite into work units for its pytest-xdist workers (tests/conftest.py)."""


def work_unit(nodeid: str) -> str:
    """The work unit of a test: its module, or "scheduler" for the modules under a real scheduler."""
    path = nodeid.split("::", 1)[0]
    return "scheduler" if path.rsplit("/", 1)[-1].startswith("test_scheduler_") else path
