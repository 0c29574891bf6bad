"""One loopback endpoint for every service: SageMaker here, everything else to moto.

Requests signed for the `sagemaker` service go to this package: the control plane
(JSON protocol, X-Amz-Target: SageMaker.*) and the runtime (POST
/endpoints/<name>/invocations and /async-invocations). Every other request (S3, CloudWatch Logs, IAM, STS)
goes to moto's server application, in this process.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import uuid
from pathlib import Path

from local_stack.aws import SNAPSHOT_DIR, Clients, restore_s3, save_s3
from local_stack.errors import ApiError
from local_stack.hosting import HostingService
from local_stack.jobs import JobService, Options
from local_stack.registry import RegistryService
from local_stack.tuning import TuningService

INVOCATIONS = re.compile(r"^/endpoints/([^/]+)/invocations$")
ASYNC_INVOCATIONS = re.compile(r"^/endpoints/([^/]+)/async-invocations$")


class SageMaker:
    """The control plane's operations by X-Amz-Target name."""

    def __init__(self, workdir: Path, endpoint_url: str, options: Options):
        clients = Clients(endpoint_url)
        self.jobs = JobService(workdir, clients, endpoint_url, options)
        self.registry = RegistryService()
        self.hosting = HostingService(workdir, clients, endpoint_url, self.registry)
        self.tuning = TuningService(self.jobs)
        jobs, hosting, tuning, registry = self.jobs, self.hosting, self.tuning, self.registry
        self.operations = {
            "CreateTrainingJob": jobs.create_training_job,
            "DescribeTrainingJob": lambda r: jobs.describe("training", r.get("TrainingJobName")),
            "ListTrainingJobs": lambda r: jobs.list("training", r),
            "StopTrainingJob": lambda r: jobs.stop("training", r.get("TrainingJobName")),
            "CreateProcessingJob": jobs.create_processing_job,
            "DescribeProcessingJob": lambda r: jobs.describe("processing", r.get("ProcessingJobName")),
            "ListProcessingJobs": lambda r: jobs.list("processing", r),
            "StopProcessingJob": lambda r: jobs.stop("processing", r.get("ProcessingJobName")),
            "CreateHyperParameterTuningJob": tuning.create,
            "DescribeHyperParameterTuningJob": tuning.describe,
            "ListHyperParameterTuningJobs": tuning.list,
            "ListTrainingJobsForHyperParameterTuningJob": tuning.list_training_jobs,
            "StopHyperParameterTuningJob": tuning.stop,
            "CreateModel": hosting.create_model,
            "DescribeModel": hosting.describe_model,
            "DeleteModel": hosting.delete_model,
            "ListModels": hosting.list_models,
            "CreateEndpointConfig": hosting.create_endpoint_config,
            "DescribeEndpointConfig": hosting.describe_endpoint_config,
            "DeleteEndpointConfig": hosting.delete_endpoint_config,
            "ListEndpointConfigs": hosting.list_endpoint_configs,
            "CreateEndpoint": hosting.create_endpoint,
            "DescribeEndpoint": hosting.describe_endpoint,
            "UpdateEndpoint": hosting.update_endpoint,
            "UpdateEndpointWeightsAndCapacities": hosting.update_endpoint_weights_and_capacities,
            "DeleteEndpoint": hosting.delete_endpoint,
            "ListEndpoints": hosting.list_endpoints,
            "CreateModelPackageGroup": registry.create_group,
            "DescribeModelPackageGroup": registry.describe_group,
            "ListModelPackageGroups": registry.list_groups,
            "DeleteModelPackageGroup": registry.delete_group,
            "CreateModelPackage": registry.create_package,
            "DescribeModelPackage": registry.describe_package,
            "ListModelPackages": registry.list_packages,
            "UpdateModelPackage": registry.update_package,
        }

    def call(self, operation: str, request: dict) -> dict:
        handler = self.operations.get(operation)
        if handler is None:
            raise ApiError("UnknownOperationException", f"the local stack does not implement SageMaker.{operation}")
        return handler(request)

    def shutdown(self) -> None:
        self.tuning.shutdown()  # first: a tuning job must not launch trials while the jobs stop
        self.jobs.shutdown()
        self.hosting.shutdown()


def _signed_for_sagemaker(environ: dict) -> bool:
    return "/sagemaker/aws4_request" in environ.get("HTTP_AUTHORIZATION", "")


def _respond(start_response, status: int, body: bytes, headers: dict[str, str]) -> list[bytes]:
    reason = {200: "OK", 202: "Accepted", 400: "Bad Request", 424: "Failed Dependency", 500: "Internal Server Error"}.get(status, "")
    start_response(f"{status} {reason}", [*headers.items(), ("Content-Length", str(len(body))),
                                          ("x-amzn-RequestId", str(uuid.uuid4()))])
    return [body]


def _error(start_response, error: ApiError) -> list[bytes]:
    body = json.dumps({"__type": error.code, "message": error.message}).encode()
    return _respond(start_response, error.status, body, {"Content-Type": "application/x-amz-json-1.1",
                                                         "x-amzn-ErrorType": error.code})


class Gateway:
    """The WSGI application behind the stack's endpoint."""

    def __init__(self, sagemaker: SageMaker, moto_app):
        self.sagemaker, self.moto_app = sagemaker, moto_app

    def __call__(self, environ, start_response):
        if _signed_for_sagemaker(environ):
            target = environ.get("HTTP_X_AMZ_TARGET", "")
            if target.startswith("SageMaker."):
                return self._control(environ, start_response, target.split(".", 1)[1])
            match = INVOCATIONS.match(environ.get("PATH_INFO", ""))
            if match and environ["REQUEST_METHOD"] == "POST":
                return self._invoke(environ, start_response, match.group(1))
            match = ASYNC_INVOCATIONS.match(environ.get("PATH_INFO", ""))
            if match and environ["REQUEST_METHOD"] == "POST":
                return self._invoke_async(environ, start_response, match.group(1))
        return self.moto_app(environ, start_response)

    @staticmethod
    def _body(environ) -> bytes:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        return environ["wsgi.input"].read(length) if length else b""

    def _control(self, environ, start_response, operation: str):
        try:
            request = json.loads(self._body(environ) or b"{}")
            result = self.sagemaker.call(operation, request)
        except ApiError as error:
            return _error(start_response, error)
        except ValueError as error:
            return _error(start_response, ApiError("SerializationException", str(error)))
        return _respond(start_response, 200, json.dumps(result).encode(),
                        {"Content-Type": "application/x-amz-json-1.1"})

    def _invoke(self, environ, start_response, endpoint: str):
        try:
            status, body, content_type, variant, attributes = self.sagemaker.hosting.invoke(
                endpoint, self._body(environ), environ.get("CONTENT_TYPE", ""), environ.get("HTTP_ACCEPT", ""),
                environ.get("HTTP_X_AMZN_SAGEMAKER_TARGET_VARIANT"))
        except ApiError as error:
            return _error(start_response, error)
        headers = {"Content-Type": content_type, "x-Amzn-Invoked-Production-Variant": variant}
        if attributes:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = attributes
        return _respond(start_response, status, body, headers)

    def _invoke_async(self, environ, start_response, endpoint: str):
        """InvokeEndpointAsync: 202 with the InferenceId; where the answer will be in the headers."""
        try:
            inference_id, output, failure = self.sagemaker.hosting.invoke_async(
                endpoint, environ.get("HTTP_X_AMZN_SAGEMAKER_INPUTLOCATION"),
                environ.get("HTTP_X_AMZN_SAGEMAKER_CONTENT_TYPE", ""), environ.get("HTTP_X_AMZN_SAGEMAKER_ACCEPT", ""),
                environ.get("HTTP_X_AMZN_SAGEMAKER_INFERENCE_ID"))
        except ApiError as error:
            return _error(start_response, error)
        headers = {"Content-Type": "application/json", "X-Amzn-SageMaker-OutputLocation": output}
        if failure:
            headers["X-Amzn-SageMaker-FailureLocation"] = failure
        return _respond(start_response, 202, json.dumps({"InferenceId": inference_id}).encode(), headers)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SystemExit(f"local stack: cannot listen on {host}:{port}: {error.strerror or error} "
                             "(is another local stack running? choose another --port)") from None


class LocalStack:
    """The server: start() binds the port (a clear error when taken), stop() ends jobs and endpoints.

    With persist, start() puts back the S3 objects a previous stop() saved under the same workdir."""

    def __init__(self, workdir: Path, port: int = 4566, host: str = "127.0.0.1", options: Options | None = None,
                 persist: bool = False):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.endpoint_url = f"http://{host}:{port}"
        self.sagemaker = SageMaker(self.workdir, self.endpoint_url, options or Options())
        gateway = Gateway(self.sagemaker, DomainDispatcherApplication(create_backend_app))
        _check_port_free(host, port)  # werkzeug would print its own message and exit
        self.server = make_server(host, port, gateway, threaded=True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="local-stack", daemon=True)
        # --persist: S3 objects are saved under <workdir>/s3/ on stop and put back on start (jobs and
        # endpoints are not: they end with the stack).
        self.snapshot = self.workdir / SNAPSHOT_DIR if persist else None
        self.restored = 0

    def start(self) -> "LocalStack":
        self.thread.start()
        if self.snapshot is not None:
            self.restored = restore_s3(Clients(self.endpoint_url).s3, self.snapshot)
        return self

    def stop(self) -> None:
        self.sagemaker.shutdown()  # first: jobs that end upload their outputs, which the snapshot keeps
        if self.snapshot is not None:
            save_s3(Clients(self.endpoint_url).s3, self.snapshot)
        self.server.shutdown()
        self.server.server_close()
