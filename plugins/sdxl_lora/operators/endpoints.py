"""The endpoint's three steps as operators a retried task can run again: Model, EndpointConfig and Endpoint.

Names are deterministic per DAG run and model (sdxl_lora.deploy plans them), so a retry finds what its earlier
try created: the Model and EndpointConfig operators reuse a resource of their name when it is the one asked for
(and refuse, naming the difference, when it is not); the Endpoint operator waits for a creation or update of its
config already under way and accepts an endpoint already serving it. A Failed endpoint or a rolled-back update
fails the task at once with its FailureReason: retrying a deployment that failed cannot fix it.
"""

from __future__ import annotations

import datetime
import logging

from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerEndpointConfigOperator,
    SageMakerEndpointOperator,
    SageMakerModelOperator,
    serialize,
)
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from sdxl_lora.missing import describe_or_none

log = logging.getLogger(__name__)

CHANGING = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


def model_differences(existing: dict, wanted: dict) -> list[str]:
    """How DescribeModel's answer differs from the CreateModel request this deployment would send."""
    have, want = existing.get("PrimaryContainer") or {}, wanted.get("PrimaryContainer") or {}
    keys = ("Image", "ModelDataUrl", "Environment", "ModelPackageName")
    return [f"{key} is {have.get(key)!r}, not {want[key]!r}" for key in keys if key in want and have.get(key) != want[key]]


def endpoint_config_differences(existing: dict, wanted: dict) -> list[str]:
    """How DescribeEndpointConfig's answer differs from the CreateEndpointConfig request of this deployment."""
    def variants(config: dict) -> dict:
        return {v["VariantName"]: (v["ModelName"], float(v.get("InitialVariantWeight", 1.0)))
                for v in config.get("ProductionVariants", [])}

    found = []
    if variants(existing) != variants(wanted):
        found.append(f"its variants (name: model, weight) are {variants(existing)}, not {variants(wanted)}")
    if bool(existing.get("AsyncInferenceConfig")) != bool(wanted.get("AsyncInferenceConfig")):
        found.append(f"it is {'real-time' if wanted.get('AsyncInferenceConfig') else 'asynchronous'}, not "
                     f"{'asynchronous' if wanted.get('AsyncInferenceConfig') else 'real-time'}")
    return found


class ReusableSageMakerModelOperator(SageMakerModelOperator):
    """CreateModel, or the model of the same (deterministic) name that an earlier try of this task created:
    the provider's operator fails on a retry because the name exists. A model of that name that differs from
    the request (model_differences) fails the task, naming the differences.

    :param config: the CreateModel request (sagemaker_requests.model_request). (templated)
    :param aws_conn_id: the Airflow connection to AWS.
    :return: ``{"Model": DescribeModel}`` or the provider's CreateModel answer.
    """

    def execute(self, context) -> dict:
        name = self.config["ModelName"]
        existing = describe_or_none(self.hook.conn.describe_model, ModelName=name)
        if existing is None:
            return super().execute(context)
        differences = model_differences(existing, self.config)
        if differences:
            raise AirflowFailException(f"a model named {name} exists but is not the one this deployment creates: "
                                       f"{'; '.join(differences)}. Delete it or deploy from another run.")
        self.log.info("model %s already exists (an earlier try of this task created it): using it", name)
        return {"Model": serialize(existing)}


class ReusableSageMakerEndpointConfigOperator(SageMakerEndpointConfigOperator):
    """CreateEndpointConfig, or the config of the same name that an earlier try of this task created; one of
    that name that differs (its variants, real-time or asynchronous) fails the task, naming the differences.

    :param config: the CreateEndpointConfig request (sagemaker_requests.endpoint_config_request). (templated)
    :param aws_conn_id: the Airflow connection to AWS.
    :return: ``{"EndpointConfig": DescribeEndpointConfig}`` or the provider's answer.
    """

    def execute(self, context) -> dict:
        name = self.config["EndpointConfigName"]
        existing = describe_or_none(self.hook.conn.describe_endpoint_config, EndpointConfigName=name)
        if existing is None:
            return super().execute(context)
        differences = endpoint_config_differences(existing, self.config)
        if differences:
            raise AirflowFailException(f"an endpoint config named {name} exists but is not the one this deployment "
                                       f"creates: {'; '.join(differences)}. Delete it or deploy from another run.")
        self.log.info("endpoint config %s already exists (an earlier try of this task created it): using it", name)
        return {"EndpointConfig": serialize(existing)}


def endpoint_step(name: str, described: dict | None, config: str, config_created=None,
                  updated: bool = False) -> tuple[str, str]:
    """What create_or_update_endpoint does next, and why: "create", "update", "wait" (a change is under
    way), "done" (the endpoint serves `config`) or "failed". described: DescribeEndpoint (None: no endpoint);
    config_created: the config's CreationTime; updated: this try asked for the update itself.
    A Failed endpoint on `config`, or an endpoint InService on another config with a FailureReason set
    after `config` was created (SageMaker rolled our update back), is a failed deployment: a retry would
    only deploy the same thing again."""
    if described is None:
        return "create", f"creating endpoint {name} with config {config}"
    status = described["EndpointStatus"]
    serving = described.get("EndpointConfigName")
    pending = (described.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
    reason = described.get("FailureReason") or "no FailureReason given"
    if status in CHANGING:
        target = pending or (serving if status == "Creating" else None)
        if target == config:
            return "wait", (f"endpoint {name} is already {status} with config {config} (an earlier try started "
                            "it): waiting for it")
        return "wait", f"endpoint {name} is {status} (config {target or serving}): waiting for that to end first"
    if status == "Failed":
        if serving == config:
            return "failed", f"endpoint {name} failed with config {config}: {reason}"
        return "failed", (f"endpoint {name} is Failed (config {serving}: {reason}) and cannot be updated: delete it "
                          "or deploy to another endpoint")
    if status != "InService":
        return "failed", f"endpoint {name} is {status} and cannot take config {config}: {reason}"
    if serving == config:
        return "done", f"endpoint {name} is InService with config {config}"
    modified = described.get("LastModifiedTime")
    rolled_back = updated or (modified is not None and config_created is not None and modified >= config_created)
    if described.get("FailureReason") and rolled_back:
        return "failed", (f"the update of endpoint {name} to config {config} failed and SageMaker rolled it back: "
                          f"the endpoint serves its previous config {serving}. FailureReason: {reason}")
    if updated:
        return "failed", f"endpoint {name} is InService with config {serving}, not {config}, after the update"
    return "update", f"updating endpoint {name} from config {serving} to {config}"


class ResumableSageMakerEndpointOperator(SageMakerEndpointOperator):
    """CreateEndpoint, or UpdateEndpoint when the endpoint exists, then wait for it to serve the config.

    A retried try looks first (endpoint_step): it waits for a creation or update of its config that an earlier
    try started, and accepts an endpoint already serving it; the provider's operator would try to update an
    endpoint that is still Creating and fail. An update that SageMaker rolled back ends InService on the old
    config, which the provider's waiter takes for success: here it fails the task with the FailureReason.

    :param config: ``{"Endpoint": {"EndpointName", "EndpointConfigName"}}`` (deploy.plan_deployment's
        ``endpoint``) or that inner dict. (templated)
    :param aws_conn_id: the Airflow connection to AWS.
    :param wait_for_completion: accepted as the provider's; this operator always waits for the endpoint.
    :param check_interval: seconds between DescribeEndpoint calls while waiting.
    :param max_ingestion_time: fail when the endpoint has not settled after this many seconds.
    :param deferrable: wait in the triggerer (the provider's SageMakerTrigger) between looks.
    :return: ``{"EndpointConfig": DescribeEndpointConfig, "Endpoint": DescribeEndpoint}`` once it serves config.
    """

    def execute(self, context) -> dict:
        self.preprocess_config()
        return self._converge(updated=False, resumed=False)

    def execute_complete(self, context, event: dict | None = None, updated: bool = False) -> dict:
        if event and event.get("status") == "timeout":
            raise AirflowException(f"the endpoint did not settle within {self.max_ingestion_time} s: {event}")
        return self._converge(updated, resumed=True)

    def _converge(self, updated: bool, resumed: bool) -> dict:
        """Act on what DescribeEndpoint shows (endpoint_step) until the endpoint serves the config or the
        deployment failed. updated: this task asked for an update to the config (or found one under way);
        resumed: back from a deferral, so an endpoint serving the config is this try's doing."""
        import time

        from botocore.exceptions import ClientError

        request = self.config.get("Endpoint", self.config)
        name, config = request["EndpointName"], request["EndpointConfigName"]
        client = self.hook.conn
        created = client.describe_endpoint_config(EndpointConfigName=config)["CreationTime"]
        deadline, first_look = time.monotonic() + self.max_ingestion_time, not resumed
        while True:
            described = describe_or_none(client.describe_endpoint, EndpointName=name)
            step, why = endpoint_step(name, described, config, created, updated)
            if step == "failed":
                self.log.error("%s", why)  # the task log shows it as a line, not only in the traceback
                raise AirflowFailException(why)
            if step == "done":
                self.log.info("%s", f"{why} (an earlier try deployed it)" if first_look else why)
                return {"EndpointConfig": serialize(client.describe_endpoint_config(EndpointConfigName=config)),
                        "Endpoint": serialize(described)}
            self.log.info("%s", why)
            first_look = False
            try:
                if step == "create":
                    self.hook.create_endpoint(request, wait_for_completion=False)
                elif step == "update":
                    self.hook.update_endpoint(request, wait_for_completion=False)
                    updated = True
                elif (described.get("PendingDeploymentSummary") or {}).get("EndpointConfigName") == config:
                    updated = True  # an earlier try's update to this config: how it ends is this deployment's
            except ClientError as error:  # another client changed it since DescribeEndpoint: look again
                if not error.response["Error"]["Message"].startswith(("Cannot create already existing endpoint",
                                                                     "Cannot update in-progress endpoint")):
                    raise
                self.log.warning("%s: looking again", error.response["Error"]["Message"])
            if self.deferrable:
                from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

                trigger = SageMakerTrigger(job_name=name, job_type="endpoint", waiter_delay=self.check_interval,
                                           aws_conn_id=self.aws_conn_id, region_name=self.region_name,
                                           verify=self.verify, botocore_config=self.botocore_config)
                self.defer(trigger=trigger, method_name="execute_complete", kwargs={"updated": updated},
                           timeout=datetime.timedelta(seconds=self.max_ingestion_time))
            settle(client, name, self.check_interval, deadline - time.monotonic(), self.log)


def settle(client, endpoint: str, check_interval: float, timeout: float, logger=log) -> dict | None:
    """DescribeEndpoint once no change is under way (None once there is no endpoint); each status logged."""
    import time

    deadline, last = time.monotonic() + timeout, None
    while True:
        described = describe_or_none(client.describe_endpoint, EndpointName=endpoint)
        status = described and described["EndpointStatus"]
        if status != last:
            logger.info("endpoint %s: %s", endpoint, status or "none")
            last = status
        if status not in CHANGING:
            return described
        if time.monotonic() > deadline:
            raise AirflowException(f"endpoint {endpoint} is still {status} after {timeout:.0f} s")
        time.sleep(check_interval)
