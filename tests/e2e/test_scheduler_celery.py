"""The grid under the CeleryExecutor (a worker on Redis), the setup for more than one machine: the pool
still caps running jobs and keeps its slots busy.

Not with `deferrable` on: the provider's triggers need aiobotocore, and no aiobotocore release accepts
the pinned botocore (1.44.8); a trigger that fails frees its pool slot while its job keeps running.
"""

from __future__ import annotations

import pytest
from scheduler import GRID, check_the_pool_limit, deployment, skip_without_services

pytestmark = pytest.mark.scheduler


def test_the_celery_executor_keeps_the_pool_limit(tmp_path):
    skip_without_services(redis=True)
    with deployment(tmp_path, executor="CeleryExecutor") as airflow:
        airflow.wait_for_dags(GRID)
        airflow.unpause(GRID)
        check_the_pool_limit(airflow, "CeleryExecutor")
