"""What a training job cost: billable seconds at the instance type's on-demand price.

SageMaker bills managed spot training for BillableTimeInSeconds only, so the spot discount a job
actually got is 1 - billable / training seconds, and its cost is the billable hours at the
on-demand rate. Prices are SageMaker *training* on-demand list prices in US East (N. Virginia),
USD per instance-hour; other regions differ by a few percent, and AWS changes them: the
leaderboard calls the figure an estimate and names the price it used. An instance type missing
here gets no cost rather than a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

PRICE_REGION = "us-east-1"
ON_DEMAND_USD_PER_HOUR = {
    "ml.g4dn.xlarge": 0.736, "ml.g4dn.2xlarge": 0.94, "ml.g4dn.4xlarge": 1.505, "ml.g4dn.8xlarge": 2.72,
    "ml.g4dn.12xlarge": 4.89, "ml.g4dn.16xlarge": 5.44,
    "ml.g5.xlarge": 1.408, "ml.g5.2xlarge": 1.515, "ml.g5.4xlarge": 2.03, "ml.g5.8xlarge": 3.06,
    "ml.g5.12xlarge": 7.09, "ml.g5.16xlarge": 4.10, "ml.g5.24xlarge": 10.18, "ml.g5.48xlarge": 20.36,
    "ml.p3.2xlarge": 3.825, "ml.p3.8xlarge": 14.688, "ml.p3.16xlarge": 28.152,
    "ml.p4d.24xlarge": 37.688,
}


@dataclass(frozen=True)
class Cost:
    instance_type: str | None
    instance_count: int
    spot: bool
    training_seconds: int | None
    billable_seconds: int | None
    usd_per_hour: float | None  # on-demand, per instance

    @property
    def spot_discount(self) -> float | None:
        """The share of training time not billed (0 for on-demand jobs)."""
        if not self.training_seconds or self.billable_seconds is None:
            return None
        return max(0.0, 1 - self.billable_seconds / self.training_seconds)

    @property
    def usd(self) -> float | None:
        if self.usd_per_hour is None or self.billable_seconds is None:
            return None
        return self.billable_seconds / 3600 * self.usd_per_hour * self.instance_count


def of_job(description: dict) -> Cost:
    """The cost of a DescribeTrainingJob answer (a job that never started: no seconds, no cost)."""
    resources = description.get("ResourceConfig") or {}
    instance_type = resources.get("InstanceType")
    count = int(resources.get("InstanceCount", 1))
    if count < 1:
        raise ValueError(f"InstanceCount must be at least 1, got {count}")
    for key in ("TrainingTimeInSeconds", "BillableTimeInSeconds"):
        value = description.get(key)
        if value is not None and value < 0:
            raise ValueError(f"{key} of {description.get('TrainingJobName')} is negative: {value}")
    return Cost(instance_type=instance_type, instance_count=count,
                spot=bool(description.get("EnableManagedSpotTraining")),
                training_seconds=description.get("TrainingTimeInSeconds"),
                billable_seconds=description.get("BillableTimeInSeconds"),
                usd_per_hour=ON_DEMAND_USD_PER_HOUR.get(instance_type or ""))
