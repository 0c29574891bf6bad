import os

# Tests never reach the Hugging Face Hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """`make test` runs two pytest-xdist workers (--dist loadgroup): the tests under a real scheduler go to
    one of them together, so they share one Airflow (tests/e2e/conftest.py `scheduled`) and run in turn."""
    import pytest

    for item in items:
        if item.get_closest_marker("scheduler"):
            item.add_marker(pytest.mark.xdist_group("scheduler"))
