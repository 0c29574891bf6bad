import os

# Tests never reach the Hugging Face Hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers. Each work unit is a test module, run whole in one worker in file
    order (some tests read what an earlier test of their module left, e.g. a completed job, and module-scoped
    fixtures are built once), and the modules under a real scheduler (test_scheduler_*.py, marked `scheduler`)
    are one unit together, so they share one Airflow (tests/e2e/conftest.py `scheduled`) and run in turn.

    A scheduler of our own, because --dist loadgroup cannot do it under pytest 9: pytest-xdist 3.8 puts the
    group into `item._nodeid`, which pytest 9 no longer reads, so every test became its own unit (a module's
    tests ran in both workers, and each started its own Airflow)."""
    if config.getvalue("dist") not in ("loadgroup", "loadscope"):
        return None
    # Units in collection order, not xdist's default of most tests first: that put the longest unit, the one
    # test of tests/e2e/test_dags_pipeline.py (about 6 min), last, and the suite's last 6 minutes were it alone.
    config.option.loadscopereorder = False
    from xdist.scheduler import LoadScopeScheduling
    from xdist_units import work_unit

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModuleScheduling(config, log)

