"""Training cost: billable seconds at the on-demand price; the spot discount is what was not billed."""

from __future__ import annotations

import pytest
from sdxl_lora import costs


def _job(**fields) -> dict:
    return {"TrainingJobName": "j", "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1}, **fields}


def test_spot_job_costs_its_billable_hours_at_the_on_demand_price():
    cost = costs.of_job(_job(EnableManagedSpotTraining=True, TrainingTimeInSeconds=3600, BillableTimeInSeconds=1080))
    assert cost.spot and cost.spot_discount == pytest.approx(0.7)
    assert cost.usd == pytest.approx(0.3 * costs.ON_DEMAND_USD_PER_HOUR["ml.g5.2xlarge"])


def test_on_demand_job_has_no_discount_and_instances_multiply():
    cost = costs.of_job(_job(ResourceConfig={"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 2},
                             TrainingTimeInSeconds=1800, BillableTimeInSeconds=1800))
    assert cost.spot_discount == 0 and cost.usd == pytest.approx(37.688)


def test_unknown_instance_type_or_unstarted_job_has_no_cost():
    assert costs.of_job(_job(ResourceConfig={"InstanceType": "ml.x9.huge"}, BillableTimeInSeconds=60)).usd is None
    unstarted = costs.of_job({"TrainingJobName": "j", "TrainingJobStatus": "NotStarted"})
    assert unstarted.usd is None and unstarted.spot_discount is None


def test_impossible_descriptions_are_refused():
    with pytest.raises(ValueError, match="BillableTimeInSeconds of j is negative"):
        costs.of_job(_job(TrainingTimeInSeconds=10, BillableTimeInSeconds=-1))
    with pytest.raises(ValueError, match="InstanceCount"):
        costs.of_job(_job(ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 0}))
