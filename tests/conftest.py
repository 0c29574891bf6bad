import os

# Tests never reach the Hugging Face Hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """`make test` runs two pytest-xdist workers (--dist loadgroup). The tests under a real scheduler go to one of
    them together, so they share one Airflow (tests/e2e/conftest.py `scheduled`) and run in turn. Every other
    test runs in its module's group: a module's tests run in one worker, in file order (some read what an
    earlier test of their module left, e.g. a completed job), and its module-scoped fixtures are built once."""
    import pytest

    for item in items:
        group = "scheduler" if item.get_closest_marker("scheduler") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
