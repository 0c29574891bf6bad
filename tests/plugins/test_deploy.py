"""Deployment planning, traffic weights, retried tasks and rollback (plugins/sdxl_lora/deploy.py), without AWS."""

from __future__ import annotations

import datetime
from unittest import mock

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from botocore.exceptions import ClientError

from sdxl_lora import deploy, naming
from sdxl_lora.operators import endpoints
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


class FakeSageMaker:
    """SageMaker's hosting API as far as the deployment uses it: models, configs and endpoints by name, an unknown
    name a ValidationException as on AWS. Each DescribeEndpoint advances the endpoint along `script` (statuses
    with their description) so a test plays a deployment's course; every call is recorded."""

    def __init__(self):
        self.models, self.configs, self.endpoints, self.calls = {}, {}, {}, []
        self.script: dict[str, list[dict]] = {}
        self.clock = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

    def _now(self):
        self.clock += datetime.timedelta(seconds=1)
        return self.clock

    def _new(self, table: dict, kind: str, name: str, operation: str) -> None:
        self.calls.append((operation, name))
        if name in table:
            raise ClientError({"Error": {"Code": "ValidationException",
                                         "Message": f'Cannot create already existing {kind} "{name}".'}}, operation)

    @staticmethod
    def _missing(kind: str, name: str, operation: str) -> ClientError:
        return ClientError({"Error": {"Code": "ValidationException", "Message": f'Could not find {kind} "{name}".'}},
                           operation)

    def _get(self, table: dict, kind: str, name: str, operation: str) -> dict:
        self.calls.append((operation, name))
        if name not in table:
            raise self._missing(kind, name, operation)
        return table[name]

    def create_model(self, **request):
        self._new(self.models, "model", request["ModelName"], "CreateModel")
        self.models[request["ModelName"]] = {**request, "CreationTime": self._now()}

    def describe_model(self, ModelName):
        return dict(self._get(self.models, "model", ModelName, "DescribeModel"))

    def delete_model(self, ModelName):
        self._get(self.models, "model", ModelName, "DeleteModel")
        del self.models[ModelName]

    def create_endpoint_config(self, **request):
        self._new(self.configs, "endpoint configuration", request["EndpointConfigName"], "CreateEndpointConfig")
        self.configs[request["EndpointConfigName"]] = {**request, "CreationTime": self._now()}

    def describe_endpoint_config(self, EndpointConfigName):
        return dict(self._get(self.configs, "endpoint configuration", EndpointConfigName, "DescribeEndpointConfig"))

    def delete_endpoint_config(self, EndpointConfigName):
        self._get(self.configs, "endpoint configuration", EndpointConfigName, "DeleteEndpointConfig")
        del self.configs[EndpointConfigName]

    def endpoint(self, name: str, status: str, config: str, **more) -> None:
        self.endpoints[name] = {"EndpointName": name, "EndpointStatus": status, "EndpointConfigName": config,
                                "LastModifiedTime": self._now(), "ProductionVariants": [], **more}

    def describe_endpoint(self, EndpointName):
        described = self._get(self.endpoints, "endpoint", EndpointName, "DescribeEndpoint")
        if self.script.get(EndpointName):
            described.update(self.script[EndpointName].pop(0), LastModifiedTime=self._now())
        return dict(described)

    def create_endpoint(self, EndpointName, EndpointConfigName):
        self._new(self.endpoints, "endpoint", EndpointName, "CreateEndpoint")
        self.endpoint(EndpointName, "Creating", EndpointConfigName)

    def update_endpoint(self, EndpointName, EndpointConfigName):
        self.calls.append(("UpdateEndpoint", EndpointConfigName))
        self.endpoints[EndpointName].update(EndpointStatus="Updating", PendingDeploymentSummary={
            "EndpointConfigName": EndpointConfigName})

    def delete_endpoint(self, EndpointName):
        self._get(self.endpoints, "endpoint", EndpointName, "DeleteEndpoint")
        del self.endpoints[EndpointName]

    def update_endpoint_weights_and_capacities(self, EndpointName, DesiredWeightsAndCapacities):
        self.calls.append(("UpdateEndpointWeightsAndCapacities", EndpointName))
        self.endpoints[EndpointName]["ProductionVariants"] = [
            {"VariantName": w["VariantName"], "CurrentWeight": w["DesiredWeight"]} for w in DesiredWeightsAndCapacities]

    def made(self, operation: str) -> list[str]:
        return [name for op, name in self.calls if op == operation]


class FakeHook:
    """What the provider's operators call on SageMakerHook, answered by a FakeSageMaker."""

    def __init__(self, client: FakeSageMaker):
        self.conn = client

    def configure_s3_resources(self, config):
        pass

    def create_model(self, config):
        self.conn.create_model(**config)
        return {"ResponseMetadata": {"HTTPStatusCode": 200}}

    def create_endpoint_config(self, config):
        self.conn.create_endpoint_config(**config)
        return {"ResponseMetadata": {"HTTPStatusCode": 200}}

    def describe_model(self, name):
        return self.conn.describe_model(ModelName=name)

    def describe_endpoint_config(self, name):
        return self.conn.describe_endpoint_config(EndpointConfigName=name)

    def create_endpoint(self, config, wait_for_completion=True):
        self.conn.create_endpoint(**config)

    def update_endpoint(self, config, wait_for_completion=True):
        self.conn.update_endpoint(**config)


def operator(cls, client: FakeSageMaker, config: dict, **kwargs):
    """A deploy_group operator whose hook answers from `client`, waiting without sleeping."""
    task = cls(task_id="t", config=config, **kwargs)
    hook = FakeHook(client)
    return task, mock.patch.object(type(task), "hook", new=property(lambda self: hook))


@pytest.fixture(autouse=True)
def no_sleeping():
    with mock.patch("time.sleep"):
        yield


def planned(run_id: str = "run-3", current: dict | None = None) -> dict:
    return deploy.plan_deployment(Settings(), ARTIFACTS, "ep", run_id, current)


def test_a_retried_create_model_or_config_uses_what_the_first_try_created():
    plan, client = planned(), FakeSageMaker()
    model, patched = operator(endpoints.ReusableSageMakerModelOperator, client, plan["model"])
    with patched:
        first = model.execute({})
        again = model.execute({})
    assert client.made("CreateModel") == [plan["model"]["ModelName"]]  # the retry created nothing
    assert again["Model"]["ModelName"] == first["Model"]["ModelName"]
    config, patched = operator(endpoints.ReusableSageMakerEndpointConfigOperator, client, plan["endpoint_config"])
    with patched:
        config.execute({})
        config.execute({})
    assert client.made("CreateEndpointConfig") == [plan["endpoint_config"]["EndpointConfigName"]]


def test_a_model_or_config_of_the_same_name_but_other_content_is_refused_naming_the_difference():
    plan, client = planned(), FakeSageMaker()
    client.create_model(**{**plan["model"], "PrimaryContainer": {**plan["model"]["PrimaryContainer"],
                                                                   "ModelDataUrl": "s3://bucket/other.tar.gz"}})
    model, patched = operator(endpoints.ReusableSageMakerModelOperator, client, plan["model"])
    with patched, pytest.raises(AirflowFailException, match="ModelDataUrl is 's3://bucket/other.tar.gz', not"):
        model.execute({})
    variant = plan["endpoint_config"]["ProductionVariants"][0]
    client.create_endpoint_config(**{**plan["endpoint_config"], "ProductionVariants": [{**variant, "ModelName": "x"}]})
    config, patched = operator(endpoints.ReusableSageMakerEndpointConfigOperator, client, plan["endpoint_config"])
    with patched, pytest.raises(AirflowFailException, match="variants .* are .*'x'"):
        config.execute({})


NOW = datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.timezone.utc)
EARLIER, LATER = NOW - datetime.timedelta(minutes=5), NOW + datetime.timedelta(minutes=5)


def described(status: str, config: str, **more) -> dict:
    return {"EndpointName": "ep", "EndpointStatus": status, "EndpointConfigName": config, "LastModifiedTime": LATER,
            **more}


@pytest.mark.parametrize("endpoint, updated, step, says", [
    (None, False, "create", "creating endpoint ep with config new"),
    (described("Creating", "new"), False, "wait", "already Creating with config new (an earlier try"),
    (described("Updating", "old", PendingDeploymentSummary={"EndpointConfigName": "new"}), False, "wait",
     "already Updating with config new"),
    (described("Updating", "old", PendingDeploymentSummary={"EndpointConfigName": "other"}), False, "wait",
     "(config other): waiting for that to end first"),
    (described("InService", "new"), False, "done", "InService with config new"),
    (described("InService", "old"), False, "update", "from config old to new"),
    # A FailureReason left by an older deployment (before this config existed) does not stop this one.
    (described("InService", "old", FailureReason="old news", LastModifiedTime=EARLIER), False, "update", "to new"),
    (described("InService", "old", FailureReason="ping failed"), False, "failed",
     "rolled it back: the endpoint serves its previous config old. FailureReason: ping failed"),
    (described("InService", "old"), True, "failed", "InService with config old, not new, after the update"),
    (described("Failed", "new", FailureReason="ping failed"), False, "failed", "failed with config new: ping failed"),
    (described("Failed", "old", FailureReason="x"), False, "failed", "cannot be updated: delete it"),
])
def test_the_endpoint_task_creates_updates_waits_or_fails_by_what_it_finds(endpoint, updated, step, says):
    found, why = endpoints.endpoint_step("ep", endpoint, "new", NOW, updated)
    assert found == step and says in why, why


def test_a_retried_endpoint_task_waits_for_the_creation_its_first_try_started():
    plan, client = planned(), FakeSageMaker()
    config = plan["endpoint_config"]["EndpointConfigName"]
    client.create_endpoint_config(**plan["endpoint_config"])
    client.create_endpoint(EndpointName="ep", EndpointConfigName=config)  # the killed first try's call
    client.script["ep"] = [{"EndpointStatus": "Creating"}] * 3 + [{"EndpointStatus": "InService"}]
    task, patched = operator(endpoints.ResumableSageMakerEndpointOperator, client, plan["endpoint"], check_interval=1)
    with patched:
        result = task.execute({})
    assert client.made("CreateEndpoint") == ["ep"] and client.made("UpdateEndpoint") == []  # the first try's only
    assert result["Endpoint"]["EndpointStatus"] == "InService" and result["Endpoint"]["EndpointConfigName"] == config


def test_deferred_the_endpoint_task_resumes_with_what_it_did_and_checks_the_config_it_serves():
    plan, client = planned(), FakeSageMaker()
    client.create_endpoint_config(**plan["endpoint_config"])
    task, patched = operator(endpoints.ResumableSageMakerEndpointOperator, client, plan["endpoint"], deferrable=True)
    with patched, pytest.raises(TaskDeferred) as deferred:
        task.execute({})
    assert client.made("CreateEndpoint") == ["ep"] and deferred.value.kwargs == {"updated": False}
    assert deferred.value.trigger.job_type == "endpoint"
    client.script["ep"] = [{"EndpointStatus": "InService"}]
    with patched:
        result = task.execute_complete({}, {"status": "success", "job_name": "ep"}, **deferred.value.kwargs)
    assert result["Endpoint"]["EndpointConfigName"] == plan["endpoint_config"]["EndpointConfigName"]


def test_an_update_that_sagemaker_rolls_back_fails_the_task_with_its_failure_reason_and_no_retry():
    plan, client = planned(current=serving(("blue", "m-blue", 1.0))), FakeSageMaker()
    client.create_endpoint_config(**plan["endpoint_config"])
    client.endpoint("ep", "InService", "config-0")
    reason = "The primary container for production variant v did not pass the ping health check"
    client.script["ep"] = [{}, {"EndpointStatus": "Updating"},
                           {"EndpointStatus": "InService", "FailureReason": reason, "PendingDeploymentSummary": None}]
    task, patched = operator(endpoints.ResumableSageMakerEndpointOperator, client, plan["endpoint"], check_interval=1)
    with patched, pytest.raises(AirflowFailException, match="rolled it back.*config-0. FailureReason: The primary"):
        task.execute({})
    assert client.made("UpdateEndpoint") == [plan["endpoint_config"]["EndpointConfigName"]]  # one update


def test_a_failed_new_endpoint_is_deleted_with_its_config_and_model_each_named_in_the_log(caplog):
    plan, client = planned(), FakeSageMaker()
    client.create_model(**plan["model"])
    client.create_endpoint_config(**plan["endpoint_config"])
    client.endpoint("ep", "Failed", plan["endpoint_config"]["EndpointConfigName"], FailureReason="ping failed")
    with caplog.at_level("INFO", logger="sdxl_lora.deploy"):
        done = deploy.undo_deployment(client, plan, check_interval=0)
    assert client.endpoints == client.configs == client.models == {}
    assert done == ["deleted endpoint ep (Failed: ping failed)",
                    f"deleted endpoint config {plan['endpoint_config']['EndpointConfigName']}",
                    f"deleted model {plan['model']['ModelName']}"]
    assert all(line in caplog.text for line in done)


def test_after_a_rolled_back_update_the_endpoint_and_its_old_config_stay_and_the_new_ones_go():
    plan, client = planned(current=serving(("blue", "m-blue", 1.0))), FakeSageMaker()
    for request in ({"ModelName": "m-blue"}, plan["model"]):
        client.create_model(**request)
    for request in ({"EndpointConfigName": "config-0"}, plan["endpoint_config"]):
        client.create_endpoint_config(**request)
    client.endpoint("ep", "InService", "config-0", FailureReason="ping failed")
    done = deploy.undo_deployment(client, plan, check_interval=0)
    assert done[0] == ("endpoint ep left as it is: InService with config config-0 (its previous one: SageMaker "
                       "rolled the failed update back)")
    assert client.made("UpdateEndpoint") == []
    assert set(client.endpoints) == {"ep"} and set(client.configs) == {"config-0"} and set(client.models) == {"m-blue"}


def test_rollback_restores_the_previous_config_and_its_weights_and_removes_what_the_run_created():
    plan, client = planned(current=serving(("blue", "m-blue", 0.7), ("green", "m-green", 0.3))), FakeSageMaker()
    client.create_endpoint_config(**plan["endpoint_config"])  # created; the model never was
    client.endpoint("ep", "InService", plan["endpoint_config"]["EndpointConfigName"])  # the smoke test failed
    client.script["ep"] = [{}, {"EndpointStatus": "Updating"}, {
        "EndpointStatus": "InService", "EndpointConfigName": "config-0", "PendingDeploymentSummary": None,
        "ProductionVariants": [{"VariantName": "blue", "CurrentWeight": 1.0},
                               {"VariantName": "green", "CurrentWeight": 1.0}]}]
    with mock.patch("airflow.providers.amazon.aws.hooks.sagemaker.SageMakerHook") as hook, \
            mock.patch.object(Settings, "resolve", return_value=Settings()):
        hook.return_value.conn = client
        with pytest.raises(AirflowFailException, match="rolled back to config-0: endpoint ep back on its previous "
                                                       "config config-0 with weights"):
            deploy.rollback.function(plan)
    assert client.made("UpdateEndpoint") == ["config-0"]
    assert client.endpoints["ep"]["ProductionVariants"] == [{"VariantName": "blue", "CurrentWeight": 0.7},
                                                            {"VariantName": "green", "CurrentWeight": 0.3}]
    assert client.configs == {} and client.models == {}
