import os

# Tests never reach the Hugging Face Hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers. Each work unit is a test module, run whole in one worker in file
    order (some tests read what an earlier test of their module left, e.g. a completed job, and module-scoped
    fixtures are built once), and the modules under a real scheduler (test_scheduler_*.py, marked `scheduler`)
    that share one Airflow (tests/e2e/conftest.py `scheduled`) are one unit together and run in turn; the two that
    start an Airflow of their own (xdist_units.OWN_AIRFLOW) are units of their own.

    A scheduler of our own, because --dist loadgroup cannot do it under pytest 9: pytest-xdist 3.8 puts the
    group into `item._nodeid`, which pytest 9 no longer reads, so every test became its own unit (a module's
    tests ran in both workers, and each started its own Airflow)."""
    if config.getvalue("dist") not in ("loadgroup", "loadscope"):
        return None
    # Units in collection order, which pytest_collection_modifyitems makes longest first (xdist_units.FIRST), not
    # xdist's default of most tests first: that put the longest unit, the one test of test_dags_pipeline.py, last.
    config.option.loadscopereorder = False
    from xdist.scheduler import LoadScopeScheduling
    from xdist_units import work_unit

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest work units first (xdist_units.FIRST), each module's tests still together and in file order: a
    stable sort by unit. Every worker collects in this order, so the indexes the controller sends agree."""
    from xdist_units import unit_order, work_unit

    items.sort(key=lambda item: unit_order(work_unit(item.nodeid)))
