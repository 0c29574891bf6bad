"""The deployment tasks, shared by sdxl_lora_deploy and the DAGs that deploy what they trained.

plan -> Model -> EndpointConfig -> Endpoint (create, or update when it exists) -> smoke test
-> traffic shift -> serving record.

An endpoint holds several production variants. A deployment adds the new model as a variant
(the candidate) beside those serving now, at weight 0; the smoke test reaches it directly with
TargetVariant, and only then does traffic shift (UpdateEndpointWeightsAndCapacities): all of it
(candidate_weight 1), or a share for an A/B test. Variants left at weight 0 by an earlier
promotion are dropped by the next deployment. Promote or roll back an A/B test by changing
weights (`traffic_group`, the sdxl_lora_traffic DAG); no instance restarts.
An asynchronous endpoint (async_output_path set: AsyncInferenceConfig, InvokeEndpointAsync) has
one variant, the new model: InvokeEndpointAsync has no TargetVariant, so the smoke test cannot reach a
candidate beside serving variants. Its smoke test uploads the request to S3, invokes it asynchronously
and waits for the response (or the failure) to appear in S3.
If anything after the plan fails, rollback removes what this run created and puts an existing
endpoint back on the config it served before, then fails the run.

Retries. Model, endpoint config and variant names are deterministic per DAG run and model, so a retried
task finds what its earlier try created: create_model and create_endpoint_config reuse an existing
resource of their name when it is the one the plan asked for (and refuse, naming the difference, when
it is not); create_or_update_endpoint waits for a creation or update of its config already under way,
and accepts an endpoint already serving it, instead of failing or starting a second deployment.
An endpoint that goes Failed, or an update that SageMaker rolled back (the endpoint InService on its old
config with a FailureReason), fails the task at once with that FailureReason: retrying a deployment
that failed cannot fix it.
"""

from __future__ import annotations

import logging

from airflow.sdk import TaskGroup, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException

from ml.contract.container import split_s3_uri
from sdxl_lora import serving as serving_record
from sdxl_lora.dag_common import waiting_kwargs
from sdxl_lora.operators.endpoints import (
    ResumableSageMakerEndpointOperator,
    ReusableSageMakerEndpointConfigOperator,
    ReusableSageMakerModelOperator,
    settle,
)
from sdxl_lora.missing import describe_or_none, ignore_missing
from sdxl_lora.settings import Settings

log = logging.getLogger(__name__)

ASYNC_SMOKE_TIMEOUT_SECONDS = 3600  # an async invocation may take up to an hour (InvocationTimeoutSeconds)
# DescribeEndpoint statuses of a change under way: wait for them to settle before acting.

def variant_name(model_data_url: str, run_id: str) -> str:
    """A stable, valid variant name per deployed model and run (what TargetVariant names)."""
    from sdxl_lora import naming

    return f"v-{naming.run_token(run_id)}-{naming.run_token(model_data_url)}"


def target_weights(serving: dict[str, float], candidate: str, candidate_weight: float) -> dict[str, float]:
    """Weights after the shift: the candidate gets its share, the serving variants split the rest
    in their current proportions (all of it when the candidate takes everything: they go to 0)."""
    if not 0 < candidate_weight <= 1:
        raise ValueError(f"candidate_weight must be in (0, 1], got {candidate_weight}")
    total = sum(serving.values())
    weights = {name: round((1 - candidate_weight) * weight / total, 6) if total else 0.0
               for name, weight in serving.items()}
    weights[candidate] = candidate_weight if weights and total else 1.0
    return weights


def plan_deployment(settings: Settings, model_data_url: str, endpoint: str, run_id: str,
                    current: dict | None, candidate_weight: float = 1.0, training: dict | None = None,
                    async_output_path: str = "", max_concurrent_invocations: int = 1,
                    package: dict | None = None) -> dict:
    """The request dicts of one deployment (pure: tests call it). current: DescribeEndpoint and its
    config's variants, {"config": name, "variants": [{"VariantName", "ModelName", "CurrentWeight"}]}, or None.
    training: the job that made the model and its val_loss (serving.training), kept in the serving record.
    async_output_path: deploy an asynchronous endpoint of the new model alone, writing responses there.
    package: ``{arn, rollback_from}`` of an Approved model package version (registry_versions.choose): the model
    is made from it (CreateModel with ModelPackageName), so the endpoint serves exactly that version;
    model_data_url is then the version's, kept in the serving record."""
    from sdxl_lora import naming, sagemaker_requests

    token = naming.run_token(package["arn"] if package else model_data_url)
    model_name = naming.job_name("sdxl-lora-model", run_id, token)
    config_name = naming.job_name("sdxl-lora-config", run_id, token)
    candidate = variant_name(package["arn"] if package else model_data_url, run_id)
    # Variants that serve traffic stay beside the candidate; those at weight 0 (promoted away from) go.
    serving = {v["VariantName"]: (v["ModelName"], float(v["CurrentWeight"]))
               for v in (current or {}).get("variants", []) if float(v["CurrentWeight"]) > 0}
    if async_output_path:
        if candidate_weight != 1:
            raise ValueError(f"candidate_weight {candidate_weight} asks for an A/B test, which an asynchronous "
                             "endpoint cannot run (InvokeEndpointAsync has no TargetVariant to smoke-test the "
                             "candidate before traffic shifts): use candidate_weight 1 or leave async_output_path "
                             "empty")
        serving = {}  # the async config replaces what serves: one variant, smoke-tested once it serves
    variants = {**serving, candidate: (model_name, 0.0 if serving else 1.0)}
    config = sagemaker_requests.endpoint_config_request(settings, config_name, variants, async_output_path,
                                              max_concurrent_invocations)
    model = sagemaker_requests.model_request(settings, model_name, model_data_url)
    if package:
        # The version's own container (image, model data, environment): CreateModel takes no Image beside it.
        model["PrimaryContainer"] = {"ModelPackageName": package["arn"]}
    return {
        "model": model,
        "package": {"arn": package["arn"], "model_data_url": model_data_url,
                    "rollback_from": package.get("rollback_from")} if package else None,
        "endpoint_config": config,
        "endpoint": {"Endpoint": {"EndpointName": endpoint, "EndpointConfigName": config_name}},
        "previous_config": (current or {}).get("config"),
        "previous_weights": {v["VariantName"]: float(v["CurrentWeight"]) for v in (current or {}).get("variants", [])},
        "candidate": candidate,
        "async_input": settings.uri("async-inputs", endpoint, f"{config_name}.json") if async_output_path else None,
        "training": training or serving_record.training(None, None),
        "weights": target_weights({name: weight for name, (_, weight) in serving.items()}, candidate,
                                  candidate_weight),
    }


def current_deployment(client, endpoint: str) -> dict | None:
    """The endpoint's config and variants with their current weights; None when there is no endpoint."""
    described = describe_or_none(client.describe_endpoint, EndpointName=endpoint)
    if described is None:
        return None
    config = client.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
    weights = {v["VariantName"]: v.get("CurrentWeight", 0.0) for v in described.get("ProductionVariants", [])}
    return {"config": described["EndpointConfigName"],
            "variants": [{"VariantName": v["VariantName"], "ModelName": v["ModelName"],
                          "CurrentWeight": weights.get(v["VariantName"], v.get("InitialVariantWeight", 1.0))}
                         for v in config["ProductionVariants"]]}


@task
def plan(model_data_url: str, endpoint_name: str | None, candidate_weight=1.0, training: dict | None = None,
         async_output_path: str | None = None, max_concurrent_invocations=1, model_package_arn: str | None = None,
         model_package_group: str | None = None, roll_back=False, registered: dict | None = None,
         run_id: str | None = None) -> dict:
    """The deployment's requests and names (plan_deployment) against what the endpoint serves now.

    :param model_data_url: the model.tar.gz to deploy; empty when a model package version is deployed.
    :param endpoint_name: the endpoint; empty: the settings' ``endpoint_name``.
    :param candidate_weight: the candidate's share of the traffic after its smoke test.
    :param training: the training job and val_loss behind the model (serving.training).
    :param async_output_path: an s3:// prefix for an asynchronous endpoint; empty: real-time.
    :param max_concurrent_invocations: asynchronous endpoints: requests per instance at once.
    :param model_package_arn: a model package version to deploy (it must be Approved).
    :param model_package_group: a group whose latest Approved version to deploy.
    :param roll_back: deploy the group's Approved version before the one serving (registry_versions.source).
    :param registered: the run's own registration (register_model's answer): when it made an Approved version,
        that version is what deploys (CreateModel from it), in place of model_data_url, so the endpoint serves
        exactly what the registry approved and the serving record names it; None or no version: model_data_url.
    :param run_id: the run's id (Airflow passes it), which fixes the names a retry finds again.
    """
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    from sdxl_lora import registry, registry_versions
    from sdxl_lora.dag_common import no_retry

    settings = Settings.resolve()
    endpoint = endpoint_name or settings.endpoint_name
    client = SageMakerHook(aws_conn_id=settings.aws_conn_id).conn
    package = None
    if registered and registered.get("package_arn") and registered.get("approval_status") == "Approved":
        model_data_url, model_package_arn = "", registered["package_arn"]
    with no_retry(registry.RegistryError):  # a bad Param or a version not Approved: a retry would meet it again
        back = str(roll_back).lower() == "true"
        chosen = registry_versions.source(model_data_url, model_package_arn, model_package_group, back,
                                          registry.group_name(settings) if back else None)
        if chosen["kind"] != "model_data_url":
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            version, model_data_url, training = package_version(client, S3Hook(aws_conn_id=settings.aws_conn_id),
                                                                settings, endpoint, chosen)
            package = {"arn": version["ModelPackageArn"], "rollback_from": version["rollback_from"]}
            log.info("deploying model package %s (%s)%s", package["arn"], model_data_url,
                     f", rolling back from {package['rollback_from']}" if package["rollback_from"] else "")
    return plan_deployment(settings, model_data_url, endpoint, run_id, current_deployment(client, endpoint),
                           float(candidate_weight or 1.0), training, (async_output_path or "").strip(),
                           int(max_concurrent_invocations or 1), package)


def package_version(client, s3, settings: Settings, endpoint: str, chosen: dict) -> tuple[dict, str, dict]:
    """The Approved version a deployment source names (registry_versions.choose, the serving record telling a
    rollback what serves), its model data and the training job behind it (its lineage and metrics document).

    :param client: boto3 SageMaker client.
    :param s3: an S3Hook (check_for_key, read_key): the serving record and the version's metrics document.
    :param settings: where the serving records live.
    :param endpoint: the endpoint deployed to.
    :param chosen: registry_versions.source's answer, of a kind other than model_data_url.
    :return: DescribeModelPackage (with ``rollback_from``), its ModelDataUrl and serving.training's dict.
    """
    import json

    from sdxl_lora import registry_versions

    serving = serving_record.read_record(s3, settings, endpoint) or {}
    version = registry_versions.choose(client, chosen, serving.get("model_package_arn"))
    statistics = version.get("ModelMetrics", {}).get("ModelQuality", {}).get("Statistics", {}).get("S3Uri")
    val_loss = json.loads(s3.read_key(statistics)).get("val_loss") if statistics and s3.check_for_key(statistics) \
        else None
    job = version.get("CustomerMetadataProperties", {}).get("training_job")
    return version, registry_versions.container(version)["ModelDataUrl"], serving_record.training(job, val_loss)


# Registration calls the hook's client rather than the provider's register-model-version operator: that
# operator's `extras` (metrics, lineage, approval: known only when this task runs) is not a template field, it
# files the package description as the group's, and it deletes a group it just created when the version fails.
@task
def register_model(model_data_url: str, training: dict, decision: dict | None = None, params: dict | None = None,
                   run_id: str | None = None, dag=None) -> dict:
    """Register the model a run would deploy as a version in the setting ``model_package_group``
    (sdxl_lora.registry), approved or not by the run's ``approval`` Param and its deployment decision.

    :param model_data_url: the model.tar.gz (ModelArtifacts.S3ModelArtifacts).
    :param training: the training job and val_loss behind it (serving.training).
    :param decision: ``{deploy, reason, serving_val_loss}`` from the run's own rule (the train DAG's
        better_than_serving); None: the run's ``deploy_winner`` Param decides.
    :param params: the run's Params (Airflow passes them): ``approval``, and ``deploy_winner`` without a decision.
    :param run_id: the run's id (Airflow passes it), kept in the version's lineage.
    :param dag: the DAG (Airflow passes it), its id kept in the lineage.
    :return: ``{package_arn, approval_status, deploy, reason}``: deploy_requested reads ``deploy``.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    from sdxl_lora import registry, sagemaker_requests, selection
    from sdxl_lora.dag_common import no_retry

    settings = Settings.resolve()
    if decision is None:
        wanted = bool(params["deploy_winner"])
        decision = {"deploy": wanted, "reason": f"deploy_winner is {'on' if wanted else 'off'}"}
    client = SageMakerHook(aws_conn_id=settings.aws_conn_id).conn
    job = client.describe_training_job(TrainingJobName=training["training_job"])
    container = sagemaker_requests.model_request(settings, "registered", model_data_url)["PrimaryContainer"]
    with no_retry(registry.RegistryError):  # a bad setting or Param: a retry would meet it again
        registered = registry.register(
            client, selection.s3_writer(S3Hook(aws_conn_id=settings.aws_conn_id)), settings, job, container,
            decision.get("serving_val_loss"), training.get("val_loss"), bool(decision["deploy"]), decision["reason"],
            params["approval"], dag.dag_id, run_id)
    if decision["deploy"] and not registered["deploy"]:
        log.info("approval is manual: %s waits for approval and is not deployed", registered["package_arn"])
    return {**registered, "reason": decision["reason"]}


def check_image(name: str, response: dict) -> dict:
    """The smoke test's verdict on one InvokeEndpoint answer: JSON with a decodable PNG."""
    return check_body(name, response["Body"].read())


def check_body(name: str, raw: bytes) -> dict:
    """The smoke test's verdict on one answer's body: JSON with a decodable PNG."""
    import base64
    import json

    body = json.loads(raw)
    image = base64.b64decode(body["images"][0])
    if not image.startswith(b"\x89PNG"):
        raise ValueError(f"endpoint {name} answered without a PNG image")
    return body


def read_s3_object(s3, uri: str) -> bytes | None:
    """The object's bytes, or None while it does not exist."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
            return None
        raise


def wait_for_async_result(read, output_location: str, failure_location: str | None, check_interval: float,
                          timeout: float) -> bytes:
    """Poll S3 (read: uri -> bytes or None) until the response appears at output_location; the failure
    object at failure_location, or nothing within timeout seconds, is an error naming the location."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        body = read(output_location)
        if body is not None:
            return body
        failure = read(failure_location) if failure_location else None
        if failure is not None:
            raise RuntimeError(f"the asynchronous invocation failed ({failure_location}): "
                               f"{failure.decode(errors='replace')[:2000]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no response at {output_location} (nor a failure at {failure_location}) after "
                               f"{timeout:.0f} s")
        time.sleep(check_interval)


def invoke_async_and_wait(runtime, s3, endpoint: str, request: dict, input_uri: str, inference_id: str,
                          check_interval: float, timeout: float = ASYNC_SMOKE_TIMEOUT_SECONDS) -> tuple[bytes, str]:
    """InvokeEndpointAsync with the request uploaded to input_uri; the response body and where it lies."""
    import json

    bucket, key = split_s3_uri(input_uri)
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(request).encode(), ContentType="application/json")
    response = runtime.invoke_endpoint_async(EndpointName=endpoint, ContentType="application/json",
                                             Accept="application/json", InputLocation=input_uri,
                                             InferenceId=inference_id)
    output = response["OutputLocation"]
    return wait_for_async_result(lambda uri: read_s3_object(s3, uri), output, response.get("FailureLocation"),
                                 check_interval, timeout), output


@task
def smoke_test(deployment: dict, request: dict) -> dict:
    """One real invocation of the candidate variant (TargetVariant), before any traffic reaches it; on an
    asynchronous endpoint, one InvokeEndpointAsync of its only variant, waited for in S3."""
    import json

    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    settings = Settings.resolve()
    runtime = AwsBaseHook(aws_conn_id=settings.aws_conn_id, client_type="sagemaker-runtime").conn
    name = deployment["endpoint"]["Endpoint"]["EndpointName"]
    if deployment.get("async_input"):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        raw, output = invoke_async_and_wait(runtime, S3Hook(aws_conn_id=settings.aws_conn_id).conn, name, request,
                                            deployment["async_input"], deployment["candidate"],
                                            settings.check_interval_seconds)
        body = check_body(name, raw)
        return {"endpoint": name, "variant": deployment["candidate"], "seed": body["seed"],
                "inference_seconds": body.get("inference_seconds"), "output_location": output}
    response = runtime.invoke_endpoint(EndpointName=name, ContentType="application/json", Accept="application/json",
                                       TargetVariant=deployment["candidate"], Body=json.dumps(request))
    body = check_image(name, response)
    if response["InvokedProductionVariant"] != deployment["candidate"]:
        raise ValueError(f"the smoke test reached variant {response['InvokedProductionVariant']}, "
                         f"not the candidate {deployment['candidate']}")
    return {"endpoint": name, "variant": response["InvokedProductionVariant"], "seed": body["seed"],
            "inference_seconds": body.get("inference_seconds")}


def set_weights(client, endpoint: str, weights: dict[str, float], check_interval: float, timeout: float = 3600) -> dict:
    """UpdateEndpointWeightsAndCapacities, then wait for InService; the variants' weights after it."""
    import time

    described = client.describe_endpoint(EndpointName=endpoint)
    known = {v["VariantName"]: v.get("CurrentWeight") for v in described.get("ProductionVariants", [])}
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"endpoint {endpoint} has no variant(s) {', '.join(unknown)}; it has {', '.join(sorted(known))}")
    if any(weight < 0 for weight in weights.values()) or not sum({**known, **weights}.values()):
        raise ValueError(f"weights must be at least 0 and not all 0, got {weights}")
    if all(known[name] == weight for name, weight in weights.items()):
        return known
    client.update_endpoint_weights_and_capacities(EndpointName=endpoint, DesiredWeightsAndCapacities=[
        {"VariantName": name, "DesiredWeight": float(weight)} for name, weight in weights.items()])
    deadline = time.monotonic() + timeout
    while True:
        described = client.describe_endpoint(EndpointName=endpoint)
        if described["EndpointStatus"] == "InService":
            return {v["VariantName"]: v.get("CurrentWeight") for v in described["ProductionVariants"]}
        if described["EndpointStatus"] == "Failed" or time.monotonic() > deadline:
            raise RuntimeError(f"endpoint {endpoint} is {described['EndpointStatus']} after the weight change: "
                               f"{described.get('FailureReason', '')}")
        time.sleep(check_interval)


@task
def shift_traffic(deployment: dict, smoke: dict) -> dict:
    """After a passing smoke test: the candidate gets its share of the traffic."""
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    settings = Settings.resolve()
    client = SageMakerHook(aws_conn_id=settings.aws_conn_id).conn
    weights = set_weights(client, smoke["endpoint"], deployment["weights"], settings.check_interval_seconds)
    log.info("traffic on %s: %s", smoke["endpoint"], weights)
    return weights


@task
def record_serving(deployment: dict, smoke: dict, weights: dict) -> None:
    """What the endpoint serves now (model, model package version, training job, val_loss), for later runs to
    compare against; after a rollback, the version rolled back from is Rejected (UpdateModelPackage)."""
    import json

    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    settings = Settings.resolve()
    record = serving_record.record(smoke["endpoint"], deployment, weights)
    S3Hook(aws_conn_id=settings.aws_conn_id).load_string(json.dumps(record),
                                                         serving_record.record_uri(settings, smoke["endpoint"]), replace=True)
    if (deployment.get("package") or {}).get("rollback_from"):
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from sdxl_lora import registry_versions

        registry_versions.reject_replaced(SageMakerHook(aws_conn_id=settings.aws_conn_id).conn,
                                          deployment["package"], smoke["endpoint"])


def undo_deployment(client, deployment: dict, check_interval: float, timeout: float = 3600) -> list[str]:
    """Remove what a failed deployment created, leaving the endpoint on what it served before; what was done,
    one line each (logged as it happens). An existing endpoint on this run's config goes back to the previous
    config and its weights; one that SageMaker already rolled back (or that serves another config) is left as it
    is; a new endpoint this run created is deleted, Failed or not. Then this run's config and model go. A change
    under way is waited for first: a model is not deleted under a deployment still starting it."""
    endpoint = deployment["endpoint"]["Endpoint"]["EndpointName"]
    ours = deployment["endpoint_config"]["EndpointConfigName"]
    previous = deployment.get("previous_config")
    done: list[str] = []

    def note(line: str) -> None:
        log.info("%s", line)
        done.append(line)

    described = settle(client, endpoint, check_interval, timeout)
    serving = described and described["EndpointConfigName"]
    if described is None:
        note(f"endpoint {endpoint}: there is none" + (f" (it served {previous} when this run planned)"
                                                         if previous else " to delete"))
    elif serving != ours:
        note(f"endpoint {endpoint} left as it is: {described['EndpointStatus']} with config {serving}"
             + (" (its previous one: SageMaker rolled the failed update back)" if serving == previous else ""))
    elif previous:
        client.update_endpoint(EndpointName=endpoint, EndpointConfigName=previous)
        after = settle(client, endpoint, check_interval, timeout)
        if not after or after["EndpointStatus"] != "InService" or after["EndpointConfigName"] != previous:
            raise RuntimeError(f"endpoint {endpoint} could not be put back on config {previous}: "
                               f"{after and after['EndpointStatus']} ({after and after.get('FailureReason')})")
        weights = dict(deployment.get("previous_weights") or {})
        if sum(weights.values()) > 0:
            set_weights(client, endpoint, weights, check_interval)
        note(f"endpoint {endpoint} back on its previous config {previous}"
             + (f" with weights {weights}" if weights else ""))
    else:
        client.delete_endpoint(EndpointName=endpoint)
        reason = described.get("FailureReason")
        note(f"deleted endpoint {endpoint} ({described['EndpointStatus']}" + (f": {reason})" if reason else ")"))
    for kind, name, describe, delete, key in (
            ("endpoint config", ours, client.describe_endpoint_config, client.delete_endpoint_config,
             "EndpointConfigName"),
            ("model", deployment["model"]["ModelName"], client.describe_model, client.delete_model, "ModelName")):
        if describe_or_none(describe, **{key: name}) is None:
            note(f"{kind} {name}: none to delete (never created, or already deleted)")
        else:
            ignore_missing(delete, **{key: name})
            note(f"deleted {kind} {name}")
    return done


@task(trigger_rule=TriggerRule.ONE_FAILED)
def rollback(deployment: dict | None) -> None:
    """Undo this run (undo_deployment), then fail: the run is red even though this last task ran.
    Nothing to undo when the plan itself failed (no deployment)."""
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    if not deployment:
        log.info("nothing was deployed: nothing to roll back")
        return
    settings = Settings.resolve()
    endpoint = deployment["endpoint"]["Endpoint"]["EndpointName"]
    done = undo_deployment(SageMakerHook(aws_conn_id=settings.aws_conn_id).conn, deployment,
                           settings.check_interval_seconds)
    raise AirflowFailException(f"deployment to {endpoint} failed and was rolled back"
                               + (f" to {deployment['previous_config']}" if deployment["previous_config"] else "")
                               + ": " + "; ".join(done))


def deploy_group(model_data_url, endpoint_name, smoke_request, group_id: str = "deploy",
                 candidate_weight=1.0, training=None, async_output_path="", max_concurrent_invocations=1,
                 model_package_arn="", model_package_group="", roll_back=False, registered=None) -> TaskGroup:
    """The deployment tasks as a group: plan -> create_model -> create_endpoint_config ->
    create_or_update_endpoint -> smoke_test -> shift_traffic -> record_serving, and rollback (ONE_FAILED) after
    all of them. Arguments may be XComArgs or templated strings (rendered as native objects).

    :param model_data_url: the training job's model.tar.gz (ModelArtifacts.S3ModelArtifacts).
    :param endpoint_name: the endpoint to create or update; empty: the settings' ``endpoint_name``.
    :param smoke_request: the invocation the candidate must answer with an image before traffic shifts.
    :param group_id: the TaskGroup's id (the tasks are ``<group_id>.plan``, ...).
    :param candidate_weight: the candidate's share of the traffic after its smoke test: 1 replaces what serves,
        less runs an A/B test beside it.
    :param training: the training job and val_loss behind the model (serving.training), recorded in the serving
        record for later comparisons; None: none known.
    :param async_output_path: an s3:// prefix deploys an asynchronous endpoint writing its responses there;
        empty: real-time.
    :param max_concurrent_invocations: asynchronous endpoints: requests sent to each instance at once.
    :param model_package_arn: instead of model_data_url, a model package version (Approved) to deploy.
    :param model_package_group: instead of model_data_url, a group whose latest Approved version to deploy.
    :param roll_back: instead of model_data_url, deploy the Approved version before the one serving (of
        model_package_group, else the setting's) and reject the one it replaces.
    :param registered: the run's register_model answer: its Approved version deploys in place of model_data_url.
    :return: the TaskGroup, to chain after the task that chose the model.
    """
    settings = Settings.from_environment()
    with TaskGroup(group_id=group_id) as group:
        deployment = plan(model_data_url, endpoint_name, candidate_weight, training, async_output_path,
                          max_concurrent_invocations, model_package_arn, model_package_group, roll_back, registered)
        model = ReusableSageMakerModelOperator(task_id="create_model", config=deployment["model"],
                                               aws_conn_id=settings.aws_conn_id)
        config = ReusableSageMakerEndpointConfigOperator(task_id="create_endpoint_config",
                                                         config=deployment["endpoint_config"],
                                                         aws_conn_id=settings.aws_conn_id)
        endpoint = ResumableSageMakerEndpointOperator(task_id="create_or_update_endpoint",
                                                      config=deployment["endpoint"], **waiting_kwargs(settings))
        smoke = smoke_test(deployment, smoke_request)
        shifted = shift_traffic(deployment, smoke)
        record = record_serving(deployment, smoke, shifted)
        undo = rollback(deployment)
        deployment >> model >> config >> endpoint >> smoke >> shifted >> record >> undo
        [deployment, model, config, endpoint, smoke, shifted] >> undo
    return group


@task
def change_traffic(endpoint_name: str | None, weights: dict) -> dict:
    """Promote or roll back by weights: {variant: weight} on a running endpoint, no instance restarted.

    :param endpoint_name: the endpoint; empty: the settings' ``endpoint_name``.
    :param weights: variant name -> relative traffic weight (0 stops its traffic).
    :return: the variants' weights once the endpoint has settled.
    """
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    settings = Settings.resolve()
    endpoint = endpoint_name or settings.endpoint_name
    client = SageMakerHook(aws_conn_id=settings.aws_conn_id).conn
    after = set_weights(client, endpoint, {name: float(w) for name, w in weights.items()},
                        settings.check_interval_seconds)
    log.info("traffic on %s: %s", endpoint, after)
    return after
