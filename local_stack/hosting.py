"""Models, endpoint configs and endpoints: `sdxl-lora serve` processes behind InvokeEndpoint.

CreateEndpoint starts one serving process per production variant on a free loopback
port (model data downloaded and unpacked as SageMaker does) and goes InService when
every /ping answers. UpdateEndpoint brings the new variants up beside the old ones and
switches traffic only then, so no request is dropped. As on AWS, while a deployment is under way
DescribeEndpoint names the config serving (EndpointConfigName) and the one being deployed
(PendingDeploymentSummary); a variant whose container exits or whose /ping never answers 200 (model
artifacts that do not load, say) fails the deployment with a FailureReason naming it: a new endpoint
ends Failed, an update is rolled back (InService on the old config, its variants serving throughout,
FailureReason set).

A model whose container names a ModelPackageName (a version in the model registry, local_stack/registry.py)
serves that version's image and model data; only an Approved version can make one, as on AWS.

An endpoint whose config has AsyncInferenceConfig answers InvokeEndpointAsync: the request body is
read from InputLocation in S3 and sent to a variant in a background thread (at most
MaxConcurrentInvocationsPerInstance at once), and the answer goes to `<S3OutputPath>/<inference id>.out`,
or an error to `<S3FailurePath>/<inference id>-error.out`.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from local_stack.aws import ACCOUNT, REGION, Clients, client_environment, untar
from local_stack.errors import ApiError, check_name, not_found, require, validation
from local_stack.registry import RegistryService
from local_stack.runner import ContainerProcess, LogSink, command_for
from ml.contract.container import split_s3_uri

PING_TIMEOUT_SECONDS = 300.0
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"  # passed between caller and container both ways


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Variant:
    name: str
    weight: float
    port: int
    process: ContainerProcess
    instance_count: int
    image: str


@dataclass
class Endpoint:
    name: str
    config_name: str
    description: dict
    variants: list[Variant] = field(default_factory=list)
    generation: int = 0
    async_config: dict | None = None  # the serving config's AsyncInferenceConfig
    async_slots: threading.Semaphore | None = None  # MaxConcurrentInvocationsPerInstance per instance


class HostingService:
    def __init__(self, workdir: Path, clients: Clients, endpoint_url: str, registry: RegistryService | None = None):
        self.workdir, self.clients, self.endpoint_url = workdir, clients, endpoint_url
        self.registry = registry or RegistryService()
        self.models: dict[str, dict] = {}
        self.containers: dict[str, dict] = {}  # model name -> the container it serves (a package's, resolved)
        self.configs: dict[str, dict] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.lock = threading.RLock()

    # -- models and configs -------------------------------------------------------------

    def create_model(self, request: dict) -> dict:
        require(request, "ModelName")
        name = check_name(request["ModelName"], "modelName")
        container = request.get("PrimaryContainer") or (request.get("Containers") or [None])[0]
        if container and container.get("ModelPackageName"):
            if container.get("Image") or container.get("ModelDataUrl"):
                raise validation("A container definition that names a ModelPackageName takes its Image and "
                                 "ModelDataUrl from the model package: give neither")
            serves = self.registry.serving_container(container["ModelPackageName"], container)
        elif not container or not container.get("Image"):
            raise validation("PrimaryContainer.Image is required")
        else:
            serves = container
        with self.lock:
            if name in self.models:
                raise validation(f'Cannot create already existing model "{self._arn("model", name)}".')
            self.containers[name] = serves
            self.models[name] = {
                "ModelName": name, "ModelArn": self._arn("model", name), "PrimaryContainer": container,
                "ExecutionRoleArn": request.get("ExecutionRoleArn", ""), "CreationTime": time.time(),
            }
        return {"ModelArn": self._arn("model", name)}

    def describe_model(self, request: dict) -> dict:
        return dict(self._model(request.get("ModelName")))

    def list_models(self, request: dict) -> dict:
        return {"Models": self._listed(self.models, request, "ModelName", "ModelArn")}

    def delete_model(self, request: dict) -> dict:
        name = request.get("ModelName")
        with self.lock:
            self._model(name)
            del self.models[name], self.containers[name]
        return {}

    def create_endpoint_config(self, request: dict) -> dict:
        require(request, "EndpointConfigName", "ProductionVariants")
        name = check_name(request["EndpointConfigName"], "endpointConfigName")
        variants = request["ProductionVariants"]
        if not variants:
            raise validation("ProductionVariants must have at least 1 item")
        seen = set()
        for variant in variants:
            require(variant, "VariantName", "ModelName")
            if variant["VariantName"] in seen:
                raise validation(f"Variant name {variant['VariantName']} is used more than once")
            seen.add(variant["VariantName"])
            self._model(variant["ModelName"])
        async_config = request.get("AsyncInferenceConfig")
        if async_config is not None:
            _check_async_config(async_config)
        with self.lock:
            if name in self.configs:
                raise validation(f'Cannot create already existing endpoint configuration "{self._arn("endpoint-config", name)}".')
            self.configs[name] = {
                "EndpointConfigName": name, "EndpointConfigArn": self._arn("endpoint-config", name),
                "ProductionVariants": variants, "CreationTime": time.time(),
            }
            if async_config is not None:
                self.configs[name]["AsyncInferenceConfig"] = async_config
        return {"EndpointConfigArn": self._arn("endpoint-config", name)}

    def describe_endpoint_config(self, request: dict) -> dict:
        return dict(self._config(request.get("EndpointConfigName")))

    def list_endpoint_configs(self, request: dict) -> dict:
        return {"EndpointConfigs": self._listed(self.configs, request, "EndpointConfigName", "EndpointConfigArn")}

    def delete_endpoint_config(self, request: dict) -> dict:
        name = request.get("EndpointConfigName")
        with self.lock:
            self._config(name)
            del self.configs[name]
        return {}

    # -- endpoints --------------------------------------------------------------------------

    def create_endpoint(self, request: dict) -> dict:
        require(request, "EndpointName", "EndpointConfigName")
        name = check_name(request["EndpointName"], "endpointName")
        config = self._config(request["EndpointConfigName"])
        now = time.time()
        with self.lock:
            if name in self.endpoints:
                raise validation(f'Cannot create already existing endpoint "{self._arn("endpoint", name)}".')
            endpoint = Endpoint(name, config["EndpointConfigName"], {
                "EndpointName": name, "EndpointArn": self._arn("endpoint", name),
                "EndpointConfigName": config["EndpointConfigName"], "EndpointStatus": "Creating",
                "CreationTime": now, "LastModifiedTime": now, "ProductionVariants": [],
                "PendingDeploymentSummary": _pending(config, now),
            })
            self.endpoints[name] = endpoint
        threading.Thread(target=self._deploy, args=(endpoint, config, False), daemon=True).start()
        return {"EndpointArn": endpoint.description["EndpointArn"]}

    def update_endpoint(self, request: dict) -> dict:
        require(request, "EndpointName", "EndpointConfigName")
        endpoint = self._endpoint(request["EndpointName"])
        config = self._config(request["EndpointConfigName"])
        with self.lock:
            status = endpoint.description["EndpointStatus"]
            if status != "InService":
                raise validation(f"Cannot update in-progress endpoint \"{endpoint.description['EndpointArn']}\" "
                                 f"(status {status}).")
            now = time.time()
            endpoint.description.update({"EndpointStatus": "Updating", "LastModifiedTime": now,
                                         "PendingDeploymentSummary": _pending(config, now)})
        threading.Thread(target=self._deploy, args=(endpoint, config, True), daemon=True).start()
        return {"EndpointArn": endpoint.description["EndpointArn"]}

    def update_endpoint_weights_and_capacities(self, request: dict) -> dict:
        """New traffic weights for running variants: no process restarts, InService again at once."""
        require(request, "EndpointName", "DesiredWeightsAndCapacities")
        endpoint = self._endpoint(request["EndpointName"])
        desired = request["DesiredWeightsAndCapacities"]
        with self.lock:
            status = endpoint.description["EndpointStatus"]
            if status != "InService":
                raise validation(f"Cannot update in-progress endpoint \"{endpoint.description['EndpointArn']}\" "
                                 f"(status {status}).")
            variants = {variant.name: variant for variant in endpoint.variants}
            for change in desired:
                require(change, "VariantName")
                if change["VariantName"] not in variants:
                    raise validation(f"The variant name(s) [{change['VariantName']}] is/are not present in "
                                     f"endpoint \"{endpoint.name}\".")
                if float(change.get("DesiredWeight", 0)) < 0:
                    raise validation("DesiredWeight must be at least 0")
            weights = {name: variant.weight for name, variant in variants.items()}
            weights.update({c["VariantName"]: float(c["DesiredWeight"]) for c in desired if "DesiredWeight" in c})
            if not sum(weights.values()):
                raise validation("At least one variant must have a weight greater than 0.")
            for name, weight in weights.items():
                variants[name].weight = weight
            endpoint.description.update({"LastModifiedTime": time.time(), "ProductionVariants": [
                _variant_summary(variant) for variant in endpoint.variants]})
        return {"EndpointArn": endpoint.description["EndpointArn"]}

    def describe_endpoint(self, request: dict) -> dict:
        endpoint = self._endpoint(request.get("EndpointName"))
        with self.lock:
            return dict(endpoint.description)

    def list_endpoints(self, request: dict) -> dict:
        with self.lock:
            found = [
                {k: e.description[k] for k in ("EndpointName", "EndpointArn", "CreationTime", "LastModifiedTime",
                                               "EndpointStatus")}
                for e in self.endpoints.values()
                if (not request.get("NameContains") or request["NameContains"] in e.name)
                and (not request.get("StatusEquals") or e.description["EndpointStatus"] == request["StatusEquals"])
            ]
        return {"Endpoints": sorted(found, key=lambda e: e["CreationTime"], reverse=True)}

    def delete_endpoint(self, request: dict) -> dict:
        endpoint = self._endpoint(request.get("EndpointName"))
        with self.lock:
            del self.endpoints[endpoint.name]
            variants, endpoint.variants = endpoint.variants, []
            endpoint.generation += 1  # a deployment still running for it will stop what it started
        _stop_variants(variants)
        return {}

    def shutdown(self) -> None:
        with self.lock:
            endpoints = list(self.endpoints.values())
            self.endpoints.clear()
        for endpoint in endpoints:
            endpoint.generation += 1
            _stop_variants(endpoint.variants)

    # -- runtime ------------------------------------------------------------------------------

    def invoke(self, name: str, body: bytes, content_type: str, accept: str,
               target_variant: str | None) -> tuple[int, bytes, str, str, str | None]:
        """Route to a variant by weight (or TargetVariant); returns status, body, content type, variant and the
        container's custom attributes."""
        with self.lock:
            endpoint = self.endpoints.get(name)
            if endpoint is None:
                raise _runtime_validation(f"Endpoint {name} of account {ACCOUNT} not found.")
            if endpoint.description["EndpointStatus"] not in ("InService", "Updating"):
                raise _runtime_validation(f"Endpoint {name} is not in service (status "
                                          f"{endpoint.description['EndpointStatus']}).")
            variants = list(endpoint.variants)
        if target_variant:
            chosen = next((v for v in variants if v.name == target_variant), None)
            if chosen is None:
                raise _runtime_validation(f"Target variant {target_variant} not found for Endpoint {name}")
        else:
            chosen = _choose(name, variants)
        status, answer, answer_type, attributes = _invoke_variant(chosen, body, content_type, accept)
        return status, answer, answer_type, chosen.name, attributes

    def invoke_async(self, name: str, input_location: str | None, content_type: str, accept: str,
                     inference_id: str | None) -> tuple[str, str, str | None]:
        """InvokeEndpointAsync: queue the request in InputLocation; (inference id, output and failure
        locations) at once, the answer in S3 later."""
        with self.lock:
            endpoint = self.endpoints.get(name)
            if endpoint is None:
                raise _runtime_validation(f"Endpoint {name} of account {ACCOUNT} not found.")
            if endpoint.async_config is None and endpoint.description["EndpointStatus"] != "Creating":
                raise _runtime_validation(f"Endpoint {name} of account {ACCOUNT} is not an asynchronous inference "
                                          "endpoint: its endpoint config has no AsyncInferenceConfig. Use "
                                          "InvokeEndpoint.")
            if endpoint.description["EndpointStatus"] not in ("InService", "Updating"):
                raise _runtime_validation(f"Endpoint {name} is not in service (status "
                                          f"{endpoint.description['EndpointStatus']}).")
            variants, output, slots = list(endpoint.variants), endpoint.async_config["OutputConfig"], \
                endpoint.async_slots
        if not input_location:
            raise _runtime_validation("1 validation error detected: Value null at 'inputLocation' failed to satisfy "
                                      "constraint: Member must not be null")
        if not input_location.startswith("s3://"):
            raise _runtime_validation(f"InputLocation {input_location} is not an s3:// URI.")
        inference_id = inference_id or str(uuid.uuid4())
        output_uri = f"{output['S3OutputPath'].rstrip('/')}/{inference_id}.out"
        failure_uri = (f"{output['S3FailurePath'].rstrip('/')}/{inference_id}-error.out"
                       if output.get("S3FailurePath") else None)
        chosen = _choose(name, variants)
        threading.Thread(target=self._run_async, name=f"async-{inference_id}", daemon=True,
                         args=(chosen, slots, input_location, content_type, accept, output_uri, failure_uri)).start()
        return inference_id, output_uri, failure_uri

    def _run_async(self, variant: Variant, slots: threading.Semaphore, input_location: str, content_type: str,
                   accept: str, output_uri: str, failure_uri: str | None) -> None:
        s3 = self.clients.s3
        with slots:
            try:
                bucket, key = split_s3_uri(input_location)
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                _, answer, answer_type, _ = _invoke_variant(variant, body, content_type, accept)
            except Exception as error:  # noqa: BLE001 - every failure goes to the failure location
                message = error.message if isinstance(error, ApiError) else f"{type(error).__name__}: {error}"
                if failure_uri:
                    bucket, key = split_s3_uri(failure_uri)
                    s3.put_object(Bucket=bucket, Key=key, Body=message.encode(), ContentType="text/plain")
                return
            bucket, key = split_s3_uri(output_uri)
            s3.put_object(Bucket=bucket, Key=key, Body=answer, ContentType=answer_type)

    # -- internals ----------------------------------------------------------------------------

    def _deploy(self, endpoint: Endpoint, config: dict, updating: bool) -> None:
        generation = endpoint.generation
        started: list[Variant] = []
        try:
            for spec in config["ProductionVariants"]:
                started.append(self._start_variant(endpoint, spec))
            for variant in started:
                _wait_for_ping(variant)
        except Exception as error:  # noqa: BLE001 - any failure becomes the endpoint's FailureReason
            _stop_variants(started)
            with self.lock:
                d = endpoint.description
                d.pop("PendingDeploymentSummary", None)
                d["FailureReason"] = str(error)[:1024]
                d["EndpointStatus"] = "InService" if updating else "Failed"  # an update rolls back
                d["LastModifiedTime"] = time.time()
            return
        with self.lock:
            if endpoint.generation != generation:  # deleted while deploying
                retired = started
            else:
                retired, endpoint.variants = endpoint.variants, started
                endpoint.generation += 1
                endpoint.config_name = config["EndpointConfigName"]
                endpoint.async_config = config.get("AsyncInferenceConfig")
                if endpoint.async_config:
                    per_instance = endpoint.async_config.get("ClientConfig", {}).get(
                        "MaxConcurrentInvocationsPerInstance", 1)
                    endpoint.async_slots = threading.BoundedSemaphore(
                        per_instance * sum(v.instance_count for v in started))
                d = endpoint.description
                d.pop("FailureReason", None)
                d.pop("PendingDeploymentSummary", None)
                d.update({"EndpointConfigName": config["EndpointConfigName"], "EndpointStatus": "InService",
                          "LastModifiedTime": time.time(), "ProductionVariants": [_variant_summary(v) for v in started]})
                d.pop("AsyncInferenceConfig", None)
                if endpoint.async_config:
                    d["AsyncInferenceConfig"] = endpoint.async_config
        _stop_variants(retired)  # after the switch: requests in flight to them finish first

    def _start_variant(self, endpoint: Endpoint, spec: dict) -> Variant:
        self._model(spec["ModelName"])
        container = self.containers[spec["ModelName"]]
        base = self.workdir / "endpoints" / endpoint.name / f"{spec['VariantName']}-{time.time_ns()}"
        model_dir = base / "model"
        model_dir.mkdir(parents=True)
        if container.get("ModelDataUrl"):
            bucket, key = split_s3_uri(container["ModelDataUrl"])
            archive = base / "model.tar.gz"
            try:
                self.clients.s3.download_file(bucket, key, str(archive))
            except Exception as error:  # noqa: BLE001
                raise RuntimeError(f"Failed to download model data {container['ModelDataUrl']}: {error}") from None
            untar(archive, model_dir)
        port = free_port()
        env = {**container.get("Environment", {}), **client_environment(self.endpoint_url),
               "SAGEMAKER_BIND_TO_PORT": str(port)}
        sink = LogSink(self.clients.logs, f"/aws/sagemaker/Endpoints/{endpoint.name}",
                       f"{spec['VariantName']}/{base.name}")
        process = ContainerProcess(command_for(container["Image"], default_verb_args=["--host", "127.0.0.1"]),
                                   base, env, sink, lambda line: None)
        return Variant(spec["VariantName"], float(spec.get("InitialVariantWeight", 1.0)), port, process,
                       int(spec.get("InitialInstanceCount", 1)), container["Image"])

    def _listed(self, items: dict[str, dict], request: dict, name_key: str, arn_key: str) -> list[dict]:
        """ListModels / ListEndpointConfigs: name, ARN and CreationTime, NameContains applied, newest first."""
        with self.lock:
            found = [{k: item[k] for k in (name_key, arn_key, "CreationTime")} for name, item in items.items()
                     if not request.get("NameContains") or request["NameContains"] in name]
        return sorted(found, key=lambda item: item["CreationTime"], reverse=True)

    def _model(self, name) -> dict:
        with self.lock:
            if name not in self.models:
                raise not_found(f'Could not find model "{self._arn("model", name)}".')
            return self.models[name]

    def _config(self, name) -> dict:
        with self.lock:
            if name not in self.configs:
                raise not_found(f'Could not find endpoint configuration "{self._arn("endpoint-config", name)}".')
            return self.configs[name]

    def _endpoint(self, name) -> Endpoint:
        with self.lock:
            if name not in self.endpoints:
                raise not_found(f'Could not find endpoint "{self._arn("endpoint", name)}".')
            return self.endpoints[name]

    @staticmethod
    def _arn(kind: str, name) -> str:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{kind}/{str(name).lower()}"


def _pending(config: dict, now: float) -> dict:
    return {"EndpointConfigName": config["EndpointConfigName"], "StartTime": now,
            "ProductionVariants": [{"VariantName": v["VariantName"]} for v in config["ProductionVariants"]]}


def _runtime_validation(message: str) -> ApiError:
    return ApiError("ValidationError", message)  # sagemaker-runtime's name for it


def _check_async_config(config) -> None:
    """CreateEndpointConfig's checks of AsyncInferenceConfig (SNS notifications are not emulated: the
    local stack needs S3OutputPath)."""
    output = config.get("OutputConfig") if isinstance(config, dict) else None
    if not isinstance(output, dict):
        raise validation("1 validation error detected: Value null at 'asyncInferenceConfig.outputConfig' failed to "
                         "satisfy constraint: Member must not be null")
    for key in ("S3OutputPath", "S3FailurePath"):
        value = output.get(key)
        if value is not None and (not isinstance(value, str) or not value.startswith("s3://")
                                  or not value[5:].split("/", 1)[0]):
            raise validation(f"AsyncInferenceConfig.OutputConfig.{key} {value!r} is not an s3://bucket/prefix URI")
    if not output.get("S3OutputPath"):
        raise validation("AsyncInferenceConfig.OutputConfig.S3OutputPath is required on the local stack (SNS "
                         "notifications are not emulated)")
    concurrency = (config.get("ClientConfig") or {}).get("MaxConcurrentInvocationsPerInstance", 1)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 1000:
        raise validation(f"1 validation error detected: Value '{concurrency}' at "
                         "'asyncInferenceConfig.clientConfig.maxConcurrentInvocationsPerInstance' failed to satisfy "
                         "constraint: Member must have value between 1 and 1000")


def _choose(name: str, variants: list[Variant]) -> Variant:
    weighted = [v for v in variants if v.weight > 0]  # a variant at weight 0 gets no traffic
    if not weighted:
        raise _runtime_validation(f"Endpoint {name} has no variant with traffic weight above 0.")
    return random.choices(weighted, weights=[v.weight for v in weighted])[0]


def _invoke_variant(variant: Variant, body: bytes, content_type: str,
                    accept: str) -> tuple[int, bytes, str, str | None]:
    """POST /invocations to a variant's serving process: status, body, content type, custom attributes."""
    request = urllib.request.Request(f"http://127.0.0.1:{variant.port}/invocations", data=body, method="POST",
                                     headers={"Content-Type": content_type or "application/json",
                                              "Accept": accept or "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return (response.status, response.read(), response.headers.get_content_type(),
                    response.headers.get(CUSTOM_ATTRIBUTES))
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        raise ApiError("ModelError", f"Received client error ({error.code}) from primary with message "
                       f'"{detail}". See https://{REGION}.console.aws.amazon.com/cloudwatch/ in account '
                       f"{ACCOUNT} for more information.", status=424) from None
    except (urllib.error.URLError, OSError) as error:
        raise ApiError("ModelError", f"variant {variant.name} did not answer: {error}", status=424) from None


def _wait_for_ping(variant: Variant) -> None:
    deadline = time.monotonic() + PING_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        code = variant.process.poll()
        if code is not None:
            last = " | ".join(list(variant.process.tail)[-3:])
            raise RuntimeError(f"The primary container for production variant {variant.name} did not pass the ping "
                               f"health check: it exited with status {code}; its last lines: {last}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{variant.port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:  # 503: still loading, or the model failed to load
            state = _json_or_empty(_read_or_empty(error))
            if state.get("status") == "failed":
                raise RuntimeError(f"The primary container for production variant {variant.name} did not pass the "
                                   f"ping health check: {state.get('error')}") from None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"The primary container for production variant {variant.name} did not pass the ping health "
                       f"check: /ping did not answer 200 within {PING_TIMEOUT_SECONDS:.0f} s")


def _read_or_empty(response) -> bytes:
    """The body of a /ping answer, or nothing when it does not come in time (a busy container): asked again."""
    try:
        return response.read()
    except OSError:
        return b""


def _json_or_empty(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop_variants(variants: list[Variant]) -> None:
    for variant in variants:
        variant.process.terminate(grace=30)
    for variant in variants:
        shutil.rmtree(variant.process.base, ignore_errors=True)


def _variant_summary(variant: Variant) -> dict:
    return {"VariantName": variant.name, "CurrentWeight": variant.weight, "DesiredWeight": variant.weight,
            "CurrentInstanceCount": variant.instance_count, "DesiredInstanceCount": variant.instance_count,
            "DeployedImages": [{"SpecifiedImage": variant.image, "ResolvedImage": variant.image}]}
