"""Deployment planning, traffic weights and rollback (plugins/sdxl_lora/deploy.py), without AWS."""

from __future__ import annotations

from unittest import mock

import pytest
from botocore.exceptions import ClientError

from sdxl_lora import deploy, naming
from sdxl_lora.settings import Settings

ARTIFACTS = "s3://bucket/prefix/models/job-1/output/model.tar.gz"


def serving(*variants: tuple[str, str, float]) -> dict:
    return {"config": "config-0", "variants": [{"VariantName": v, "ModelName": m, "CurrentWeight": w}
                                               for v, m, w in variants]}


def test_a_first_deployment_is_one_variant_taking_all_traffic():
    plan = deploy.plan_deployment(Settings(), ARTIFACTS, "ep", "run-1", None)
    (variant,) = plan["endpoint_config"]["ProductionVariants"]
    assert variant["VariantName"] == plan["candidate"] and variant["InitialVariantWeight"] == 1.0
    assert variant["ModelName"] == plan["model"]["ModelName"]
    assert plan["weights"] == {plan["candidate"]: 1.0} and plan["previous_config"] is None
    assert naming.is_valid(plan["candidate"]) and plan["candidate"] == deploy.variant_name(ARTIFACTS, "run-1")


def test_a_candidate_joins_the_serving_variants_at_weight_0_and_an_ab_share_follows_the_smoke_test():
    plan = deploy.plan_deployment(Settings(), ARTIFACTS, "ep", "run-2",
                                  serving(("blue", "m-blue", 3.0), ("green", "m-green", 1.0), ("old", "m-old", 0.0)),
                                  candidate_weight=0.2)
    variants = {v["VariantName"]: (v["ModelName"], v["InitialVariantWeight"])
                for v in plan["endpoint_config"]["ProductionVariants"]}
    # The weight-0 variant (promoted away from earlier) is dropped; the candidate starts without traffic.
    assert variants == {"blue": ("m-blue", 3.0), "green": ("m-green", 1.0),
                        plan["candidate"]: (plan["model"]["ModelName"], 0.0)}
    assert plan["weights"] == {"blue": 0.6, "green": 0.2, plan["candidate"]: 0.2}
    assert plan["previous_config"] == "config-0"


@pytest.mark.parametrize("weight", [0, -0.5, 1.5])
def test_a_candidate_weight_outside_0_to_1_is_refused(weight):
    with pytest.raises(ValueError, match="candidate_weight"):
        deploy.target_weights({"blue": 1.0}, "new", weight)


def test_full_replacement_leaves_the_old_variants_at_0_for_an_instant_rollback():
    assert deploy.target_weights({"blue": 1.0}, "new", 1.0) == {"blue": 0.0, "new": 1.0}


def test_set_weights_checks_variants_and_waits_for_in_service():
    client = mock.Mock()
    described = {"EndpointStatus": "InService", "ProductionVariants": [
        {"VariantName": "blue", "CurrentWeight": 1.0}, {"VariantName": "new", "CurrentWeight": 0.0}]}
    after = {"EndpointStatus": "InService", "ProductionVariants": [
        {"VariantName": "blue", "CurrentWeight": 0.0}, {"VariantName": "new", "CurrentWeight": 1.0}]}
    client.describe_endpoint.side_effect = [described, {**after, "EndpointStatus": "Updating"}, after]
    assert deploy.set_weights(client, "ep", {"blue": 0.0, "new": 1.0}, check_interval=0) == {"blue": 0.0, "new": 1.0}
    client.update_endpoint_weights_and_capacities.assert_called_once_with(EndpointName="ep", DesiredWeightsAndCapacities=[
        {"VariantName": "blue", "DesiredWeight": 0.0}, {"VariantName": "new", "DesiredWeight": 1.0}])

    client.describe_endpoint.side_effect = None
    client.describe_endpoint.return_value = described
    with pytest.raises(ValueError, match="no variant.*nobody"):
        deploy.set_weights(client, "ep", {"nobody": 1.0}, check_interval=0)
    with pytest.raises(ValueError, match="not all 0"):
        deploy.set_weights(client, "ep", {"blue": 0.0}, check_interval=0)
    client.reset_mock()
    assert deploy.set_weights(client, "ep", {"blue": 1.0}, check_interval=0) == {"blue": 1.0, "new": 0.0}
    client.update_endpoint_weights_and_capacities.assert_not_called()  # nothing to change


def test_rollback_with_nothing_deployed_does_nothing():
    with mock.patch("airflow.providers.amazon.aws.hooks.sagemaker.SageMakerHook") as hook:
        deploy.rollback.function(None)
    hook.assert_not_called()


def test_rollback_restores_the_previous_config_and_removes_what_the_run_created():
    plan = deploy.plan_deployment(Settings(), ARTIFACTS, "ep", "run-3", serving(("blue", "m-blue", 1.0)))
    client = mock.Mock()
    missing = ClientError({"Error": {"Code": "ValidationException", "Message": "not found"}}, "DeleteModel")
    client.delete_model.side_effect = missing  # never created: ignored
    with mock.patch("airflow.providers.amazon.aws.hooks.sagemaker.SageMakerHook") as hook, \
            mock.patch.object(Settings, "resolve", return_value=Settings()):
        hook.return_value.conn = client
        with pytest.raises(RuntimeError, match="rolled back to config-0"):
            deploy.rollback.function(plan)
    hook.return_value.update_endpoint.assert_called_once()
    assert hook.return_value.update_endpoint.call_args.args[0] == {"EndpointName": "ep",
                                                                   "EndpointConfigName": "config-0"}
    client.delete_endpoint_config.assert_called_once_with(
        EndpointConfigName=plan["endpoint_config"]["EndpointConfigName"])
    client.delete_endpoint.assert_not_called()
