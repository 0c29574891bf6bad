"""Training and processing jobs: the SageMaker API over local processes that really run.

Each job runs on a thread of its own: inputs are downloaded from S3 (File mode), the
container process runs with its own SAGEMAKER_BASE_DIR, its output streams to CloudWatch
Logs, and outputs go back to S3 where SageMaker puts them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from local_stack.aws import (
    ACCOUNT,
    REGION,
    Clients,
    client_environment,
    download_prefix,
    tar_directory,
    upload_directory,
)
from local_stack.errors import ApiError, check_name, not_found, require, resource_not_found, validation
from local_stack.runner import ContainerProcess, LogSink, command_for, container_path, rewrite_arguments
from ml.contract.container import split_s3_uri
from ml.contract.metrics import final_metrics

log = logging.getLogger(__name__)

CHECKPOINT_SYNC_SECONDS = 2.0
METRICS_PUBLISH_SECONDS = 2.0  # SageMaker publishes about once a minute; tests should not wait that long
METRICS_NAMESPACE = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")


@dataclass
class Options:
    """Behaviour of the stack that tests and users choose."""

    max_concurrent_jobs: int = 4  # instances per job type, like an account's instance quota
    # Smaller quotas of single instance types (per job type), as AWS keeps one quota per instance type:
    # "ml.g5.2xlarge for training job usage".
    instance_quotas: dict[str, int] = field(default_factory=dict)
    spot_interruption_pattern: str | None = None  # interrupt each spot job once at the first matching log line
    stop_grace_seconds: float = 120.0


@dataclass
class Job:
    kind: str  # "training" or "processing"
    name: str
    request: dict
    description: dict
    base: Path
    stop_requested: threading.Event = field(default_factory=threading.Event)
    process: ContainerProcess | None = None
    log_lines: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None
    metrics: "_MetricPublisher | None" = None


class JobService:
    """CreateTrainingJob, CreateProcessingJob and their Describe, List and Stop."""

    def __init__(self, workdir: Path, clients: Clients, endpoint_url: str, options: Options):
        self.workdir, self.clients, self.endpoint_url, self.options = workdir, clients, endpoint_url, options
        self.jobs: dict[tuple[str, str], Job] = {}
        self.lock = threading.RLock()

    # -- API -----------------------------------------------------------------------------

    def create_training_job(self, request: dict, tuning_job_arn: str | None = None,
                            starting_message: str = "Preparing the instances for training") -> dict:
        """tuning_job_arn and starting_message: a trial that a tuning job (local_stack/tuning.py) launches."""
        require(request, "TrainingJobName", "AlgorithmSpecification", "AlgorithmSpecification.TrainingInputMode",
                "RoleArn", "OutputDataConfig", "OutputDataConfig.S3OutputPath", "ResourceConfig",
                "ResourceConfig.InstanceType", "ResourceConfig.InstanceCount", "StoppingCondition")
        name = check_name(request["TrainingJobName"], "trainingJobName")
        image = request["AlgorithmSpecification"].get("TrainingImage")
        if not image:
            raise validation("AlgorithmSpecification.TrainingImage is required (algorithm names are not supported)")
        _check_image(image)
        if request.get("EnableManagedSpotTraining"):
            stopping = request["StoppingCondition"]
            if "MaxWaitTimeInSeconds" not in stopping:
                raise validation("MaxWaitTimeInSeconds must be set when EnableManagedSpotTraining is true")
            if stopping["MaxWaitTimeInSeconds"] < stopping.get("MaxRuntimeInSeconds", 86400):
                raise validation("MaxWaitTimeInSeconds must be greater than or equal to MaxRuntimeInSeconds")
        for channel in request.get("InputDataConfig", []):
            uri = channel.get("DataSource", {}).get("S3DataSource", {}).get("S3Uri", "")
            if not uri.startswith("s3://"):
                raise validation(f"channel {channel.get('ChannelName')}: only S3DataSource with an s3:// S3Uri is "
                                 "supported")
        now = time.time()
        description = {
            "TrainingJobName": name,
            "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{name}",
            "AlgorithmSpecification": request["AlgorithmSpecification"],
            "RoleArn": request["RoleArn"],
            "InputDataConfig": request.get("InputDataConfig", []),
            "OutputDataConfig": request["OutputDataConfig"],
            "ResourceConfig": request["ResourceConfig"],
            "StoppingCondition": request["StoppingCondition"],
            "HyperParameters": request.get("HyperParameters", {}),
            "EnableManagedSpotTraining": bool(request.get("EnableManagedSpotTraining", False)),
            "TrainingJobStatus": "InProgress",
            "SecondaryStatus": "Starting",
            "SecondaryStatusTransitions": [],
            "CreationTime": now,
            "LastModifiedTime": now,
            "ModelArtifacts": {"S3ModelArtifacts": ""},
        }
        for optional in ("CheckpointConfig", "Environment", "Tags", "VpcConfig"):
            if optional in request:
                description[optional] = request[optional]
        if tuning_job_arn:
            description["TuningJobArn"] = tuning_job_arn
        job = self._admit("training", name, request, description)
        self._transition(job, "Starting", starting_message)
        self._start(job, self._run_training)
        return {"TrainingJobArn": description["TrainingJobArn"]}

    def create_processing_job(self, request: dict) -> dict:
        require(request, "ProcessingJobName", "ProcessingResources", "AppSpecification",
                "AppSpecification.ImageUri", "RoleArn")
        name = check_name(request["ProcessingJobName"], "processingJobName")
        if not request["AppSpecification"].get("ContainerEntrypoint"):
            _check_image(request["AppSpecification"]["ImageUri"])
        for item in request.get("ProcessingInputs", []):
            if "S3Input" not in item:
                raise validation(f"processing input {item.get('InputName')}: only S3Input is supported")
        now = time.time()
        description = {
            "ProcessingJobName": name,
            "ProcessingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:processing-job/{name}",
            "ProcessingInputs": request.get("ProcessingInputs", []),
            "ProcessingOutputConfig": request.get("ProcessingOutputConfig", {"Outputs": []}),
            "ProcessingResources": request["ProcessingResources"],
            "StoppingCondition": request.get("StoppingCondition", {"MaxRuntimeInSeconds": 86400}),
            "AppSpecification": request["AppSpecification"],
            "Environment": request.get("Environment", {}),
            "RoleArn": request["RoleArn"],
            "ProcessingJobStatus": "InProgress",
            "CreationTime": now,
            "LastModifiedTime": now,
        }
        job = self._admit("processing", name, request, description)
        self._start(job, self._run_processing)
        return {"ProcessingJobArn": description["ProcessingJobArn"]}

    def describe(self, kind: str, name: str) -> dict:
        job = self._get(kind, name, resource_not_found_code=False)
        with self.lock:
            return json.loads(json.dumps(job.description))

    def list(self, kind: str, request: dict) -> dict:
        status_key = _status_key(kind)
        with self.lock:
            jobs = [j for (k, _), j in self.jobs.items() if k == kind]
            summaries = []
            for job in jobs:
                d = job.description
                if request.get("NameContains") and request["NameContains"] not in job.name:
                    continue
                if request.get("StatusEquals") and d[status_key] != request["StatusEquals"]:
                    continue
                if request.get("CreationTimeAfter") and d["CreationTime"] <= float(request["CreationTimeAfter"]):
                    continue
                if request.get("CreationTimeBefore") and d["CreationTime"] >= float(request["CreationTimeBefore"]):
                    continue
                summary = {f"{_prefix(kind)}Name": job.name, f"{_prefix(kind)}Arn": d[f"{_prefix(kind)}Arn"],
                           "CreationTime": d["CreationTime"], "LastModifiedTime": d["LastModifiedTime"],
                           status_key: d[status_key]}
                for key in (f"{_prefix(kind)}EndTime" if kind == "processing" else "TrainingEndTime", "FailureReason"):
                    if key in d:
                        summary[key] = d[key]
                summaries.append(summary)
        summaries.sort(key=lambda s: s["CreationTime"], reverse=request.get("SortOrder", "Descending") == "Descending")
        start = int(request.get("NextToken") or 0)
        limit = int(request.get("MaxResults") or 10)
        page = summaries[start:start + limit]
        result = {f"{_prefix(kind)}Summaries": page}
        if start + limit < len(summaries):
            result["NextToken"] = str(start + limit)
        return result

    def stop(self, kind: str, name: str) -> dict:
        job = self._get(kind, name, resource_not_found_code=True)
        with self.lock:
            status = job.description[_status_key(kind)]
            if status in TERMINAL:
                raise validation(f"The job {name} has already reached a terminal state ({status}) and cannot be "
                                 "stopped.")
            job.stop_requested.set()
            job.description[_status_key(kind)] = "Stopping"
            if kind == "training":
                self._transition(job, "Stopping", "Stopping the training job")
            job.description["LastModifiedTime"] = time.time()
        return {}

    def shutdown(self) -> None:
        """Stop every running job and wait for its process to end."""
        with self.lock:
            running = [j for j in self.jobs.values() if j.description[_status_key(j.kind)] not in TERMINAL]
        for job in running:
            job.stop_requested.set()
        for job in running:
            if job.thread is not None:
                job.thread.join(timeout=self.options.stop_grace_seconds + 10)

    # -- internals -----------------------------------------------------------------------

    def _admit(self, kind: str, name: str, request: dict, description: dict) -> Job:
        with self.lock:
            if (kind, name) in self.jobs:
                raise validation(f"Job name must be unique within an AWS account and region, and a job with this "
                                 f"name already exists ({self.jobs[(kind, name)].description[f'{_prefix(kind)}Arn']})")
            instance, count = _instances(request)
            running = [_instances(j.request) for (k, _), j in self.jobs.items()
                       if k == kind and j.description[_status_key(kind)] in ("InProgress", "Stopping")]
            _check_quota(f"{instance} for {kind} job usage", self.options.instance_quotas.get(instance),
                         sum(n for other, n in running if other == instance), count)
            _check_quota(f"{instance} for {kind} job usage", self.options.max_concurrent_jobs,
                         sum(n for _, n in running), count)
            base = self.workdir / kind / name
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            job = Job(kind, name, request, description, base)
            self.jobs[(kind, name)] = job
            return job

    def _start(self, job: Job, target) -> None:
        job.thread = threading.Thread(target=self._guarded, args=(job, target), name=f"{job.kind}-{job.name}",
                                      daemon=True)
        job.thread.start()

    def _guarded(self, job: Job, target) -> None:
        try:
            target(job)
        except Exception as error:  # the stack's own failure still ends the job, with a reason
            self._finish(job, "Failed", f"local stack: {type(error).__name__}: {error}")

    def _get(self, kind: str, name: str, resource_not_found_code: bool) -> Job:
        with self.lock:
            job = self.jobs.get((kind, name))
        if job is None:
            message = f"Requested resource not found: {kind} job {name}"
            raise resource_not_found(message) if resource_not_found_code else not_found(message)
        return job

    def _transition(self, job: Job, status: str, message: str) -> None:
        now = time.time()
        with self.lock:
            transitions = job.description["SecondaryStatusTransitions"]
            if transitions:
                transitions[-1].setdefault("EndTime", now)
            transitions.append({"Status": status, "StartTime": now, "StatusMessage": message})
            job.description["SecondaryStatus"] = status
            job.description["LastModifiedTime"] = now

    def _finish(self, job: Job, status: str, failure: str | None = None) -> None:
        now = time.time()
        with self.lock:
            d = job.description
            d[_status_key(job.kind)] = status
            d["LastModifiedTime"] = now
            if failure:
                d["FailureReason"] = failure[:1024]
            if job.kind == "training":
                if d["SecondaryStatus"] != "MaxRuntimeExceeded":  # AWS keeps that one as the last word
                    self._transition(job, status, _final_message(status, failure))
                last = d["SecondaryStatusTransitions"][-1]
                last["EndTime"] = max(now, last["StartTime"])
                d.setdefault("TrainingStartTime", d["CreationTime"])
                d["TrainingEndTime"] = now
                seconds = max(1, int(round(now - d["TrainingStartTime"])))
                d["TrainingTimeInSeconds"] = seconds
                d["BillableTimeInSeconds"] = seconds
                definitions = d["AlgorithmSpecification"].get("MetricDefinitions", [])
                if definitions:
                    found = final_metrics("\n".join(job.log_lines), definitions)
                    d["FinalMetricDataList"] = [{"MetricName": k, "Value": v, "Timestamp": now}
                                                for k, v in found.items()]
            else:
                d["ProcessingEndTime"] = now
                # As AWS does: the first KB of the container's /opt/ml/output/message, in any final status.
                message = job.base / "output" / "message"
                d["ExitMessage"] = message.read_text(errors="replace")[:1024] if message.is_file() else ""

    def _environment(self, job: Job) -> dict[str, str]:
        env = dict(job.request.get("Environment", {}))
        env.update(client_environment(self.endpoint_url))
        return env

    def _watch(self, job: Job, process: ContainerProcess, max_runtime: float, started: float,
               interrupt: re.Pattern | None, on_tick=None) -> tuple[int, str]:
        """Wait for the process; returns (exit code, why it ended: exited/stopped/timeout/interrupted)."""
        while process.poll() is None:
            if job.stop_requested.wait(timeout=0.2):
                return process.terminate(self.options.stop_grace_seconds), "stopped"
            if time.time() - started > max_runtime:
                return process.terminate(self.options.stop_grace_seconds), "timeout"
            if interrupt is not None and any(interrupt.search(line) for line in job.log_lines[-50:]):
                return process.terminate(self.options.stop_grace_seconds), "interrupted"
            if on_tick is not None:
                on_tick()
        return process.wait(), "exited"

    # -- training --------------------------------------------------------------------------

    def _run_training(self, job: Job) -> None:
        d, s3 = job.description, self.clients.s3
        config = job.base / "input" / "config"
        config.mkdir(parents=True)
        (config / "hyperparameters.json").write_text(json.dumps(d["HyperParameters"]))
        (config / "resourceconfig.json").write_text(json.dumps(
            {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}))
        (config / "inputdataconfig.json").write_text(json.dumps(
            {c["ChannelName"]: {"TrainingInputMode": c.get("InputMode", "File")} for c in d["InputDataConfig"]}))
        self._transition(job, "Downloading", "Downloading input data")
        for channel in d["InputDataConfig"]:
            download_prefix(s3, channel["DataSource"]["S3DataSource"]["S3Uri"],
                            job.base / "input" / "data" / channel["ChannelName"])
        checkpoint = d.get("CheckpointConfig")
        local_checkpoints = container_path(job.base, checkpoint.get("LocalPath", "/opt/ml/checkpoints")) \
            if checkpoint else None
        if checkpoint:
            download_prefix(s3, checkpoint["S3Uri"], local_checkpoints)
        with self.lock:
            d["TrainingStartTime"] = time.time()
        self._transition(job, "Training", "Training image download completed. Training in progress.")
        command = command_for(d["AlgorithmSpecification"]["TrainingImage"],
                              d["AlgorithmSpecification"].get("ContainerEntrypoint"),
                              d["AlgorithmSpecification"].get("ContainerArguments"))
        stopping = d["StoppingCondition"]
        definitions = d["AlgorithmSpecification"].get("MetricDefinitions", [])
        job.metrics = _MetricPublisher(self.clients.cloudwatch, job.name, definitions) if definitions else None
        spot = d["EnableManagedSpotTraining"] and self.options.spot_interruption_pattern
        interrupt = re.compile(self.options.spot_interruption_pattern) if spot else None
        started = time.time()
        attempt = 0
        while True:
            sink = LogSink(self.clients.logs, "/aws/sagemaker/TrainingJobs", f"{job.name}/algo-1-{int(time.time())}")
            process = ContainerProcess(command, job.base, self._environment(job), sink,
                                       lambda line: self._observe(job, line))
            job.process = process
            sync = _CheckpointSync(s3, local_checkpoints, checkpoint["S3Uri"]) if checkpoint else None
            ticks = [t.maybe for t in (sync, job.metrics) if t is not None]
            code, why = self._watch(job, process, stopping.get("MaxRuntimeInSeconds", 86400), started,
                                    interrupt if attempt == 0 else None, lambda: [tick() for tick in ticks])
            if sync:
                sync.now()
            if job.metrics:
                job.metrics.now()
            if why != "interrupted":
                break
            attempt += 1
            # A spot interruption: the instance is gone, a new one restores the checkpoints from S3
            # (without a CheckpointConfig it starts from scratch).
            self._transition(job, "Interrupted", "Spot capacity was reclaimed; the job will restart")
            job.log_lines.clear()
            shutil.rmtree(local_checkpoints or container_path(job.base, "/opt/ml/checkpoints"), ignore_errors=True)
            if checkpoint:
                download_prefix(s3, checkpoint["S3Uri"], local_checkpoints)
            self._transition(job, "Restarting", "Restarting the training job from its last checkpoint" if checkpoint
                             else "Restarting the training job from the start (no CheckpointConfig)")
            self._transition(job, "Training", "Training in progress.")
        if why == "timeout":
            self._transition(job, "MaxRuntimeExceeded", "Job stopped: MaxRuntimeInSeconds exceeded")
        self._transition(job, "Uploading", "Uploading generated training model")
        artifacts = self._upload_model(job)
        if artifacts:
            with self.lock:
                d["ModelArtifacts"] = {"S3ModelArtifacts": artifacts}
        if why in ("stopped", "timeout"):
            self._finish(job, "Stopped")
        elif code == 0:
            self._finish(job, "Completed")
        else:
            self._finish(job, "Failed", _failure_reason(job.base, code))

    @staticmethod
    def _observe(job: Job, line: str) -> None:
        job.log_lines.append(line)
        if job.metrics is not None:
            job.metrics.observe(line, time.time())

    def _upload_model(self, job: Job) -> str | None:
        """model/ as model.tar.gz and, as SageMaker does, output/data/ (when not empty) as output.tar.gz."""
        self._upload_tar(job, job.base / "output" / "data", "output.tar.gz")
        return self._upload_tar(job, job.base / "model", "model.tar.gz")

    def _upload_tar(self, job: Job, folder: Path, name: str) -> str | None:
        if not folder.is_dir() or not any(folder.iterdir()):
            return None
        archive = job.base / name
        tar_directory(folder, archive)
        bucket, prefix = split_s3_uri(job.description["OutputDataConfig"]["S3OutputPath"])
        key = f"{prefix.rstrip('/') + '/' if prefix else ''}{job.name}/output/{name}"
        self.clients.s3.upload_file(str(archive), bucket, key)
        return f"s3://{bucket}/{key}"

    # -- processing ------------------------------------------------------------------------

    def _run_processing(self, job: Job) -> None:
        d, s3 = job.description, self.clients.s3
        for item in d["ProcessingInputs"]:
            source = item["S3Input"]
            download_prefix(s3, source["S3Uri"], container_path(job.base, source["LocalPath"]))
        for output in d["ProcessingOutputConfig"].get("Outputs", []):
            container_path(job.base, output["S3Output"]["LocalPath"]).mkdir(parents=True, exist_ok=True)
        app = d["AppSpecification"]
        command = rewrite_arguments(job.base, command_for(app["ImageUri"], app.get("ContainerEntrypoint"),
                                                          app.get("ContainerArguments", [])))
        sink = LogSink(self.clients.logs, "/aws/sagemaker/ProcessingJobs", f"{job.name}/algo-1-{int(time.time())}")
        process = ContainerProcess(command, job.base, self._environment(job), sink, job.log_lines.append)
        job.process = process
        code, why = self._watch(job, process, d["StoppingCondition"].get("MaxRuntimeInSeconds", 86400),
                                time.time(), None)
        if why in ("stopped", "timeout"):
            self._finish(job, "Stopped")
            return
        if code != 0:
            self._finish(job, "Failed", _failure_reason(job.base, code))
            return
        for output in d["ProcessingOutputConfig"].get("Outputs", []):
            target = output["S3Output"]
            upload_directory(s3, container_path(job.base, target["LocalPath"]), target["S3Uri"])
        self._finish(job, "Completed")


class _CheckpointSync:
    """Mirrors the local checkpoint directory to CheckpointConfig.S3Uri while the job runs."""

    def __init__(self, s3, local: Path, uri: str):
        self.s3, self.local, self.uri = s3, local, uri
        self.uploaded: dict[str, float] = {}
        self.last = 0.0

    def maybe(self) -> None:
        if time.monotonic() - self.last >= CHECKPOINT_SYNC_SECONDS:
            self.now()

    def now(self) -> None:
        self.last = time.monotonic()
        bucket, prefix = split_s3_uri(self.uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        present = {}
        if self.local.is_dir():
            for path in self.local.rglob("*"):
                try:
                    if path.is_file() and ".partial" not in path.as_posix():
                        present[path.relative_to(self.local).as_posix()] = path.stat().st_mtime
                except FileNotFoundError:  # pruned by the job while this looked (a checkpoint past the limit)
                    continue
        for relative, mtime in list(present.items()):
            if self.uploaded.get(relative) != mtime:
                try:
                    self.s3.upload_file(str(self.local / relative), bucket, prefix + relative)
                except FileNotFoundError:  # pruned since the listing: as if never there
                    del present[relative]
                    continue
                self.uploaded[relative] = mtime
        for relative in set(self.uploaded) - set(present):
            self.s3.delete_object(Bucket=bucket, Key=prefix + relative)
            del self.uploaded[relative]


class _MetricPublisher:
    """MetricDefinitions applied to each log line as it comes, each value a CloudWatch metric (namespace
    /aws/sagemaker/TrainingJobs, dimension TrainingJobName, the log line's time), as SageMaker publishes them."""

    def __init__(self, cloudwatch, job_name: str, definitions: list[dict]):
        self.cloudwatch, self.job_name = cloudwatch, job_name
        self.patterns = [(d["Name"], re.compile(d["Regex"])) for d in definitions]
        self.pending: list[dict] = []
        self.lock = threading.Lock()
        self.last = 0.0

    def observe(self, line: str, timestamp: float) -> None:
        for name, pattern in self.patterns:
            match = pattern.search(line)
            if match is None:
                continue
            try:
                value = float(match.group(1) if pattern.groups else match.group(0))
            except ValueError:
                continue
            if math.isfinite(value):  # CloudWatch refuses NaN and infinities
                with self.lock:
                    self.pending.append({"MetricName": name, "Timestamp": timestamp, "Value": value, "Unit": "None",
                                         "Dimensions": [{"Name": "TrainingJobName", "Value": self.job_name}]})

    def maybe(self) -> None:
        if time.monotonic() - self.last >= METRICS_PUBLISH_SECONDS:
            self.now()

    def now(self) -> None:
        self.last = time.monotonic()
        with self.lock:
            data, self.pending = self.pending, []
        try:
            for start in range(0, len(data), 1000):  # PutMetricData takes at most 1000 values a call
                self.cloudwatch.put_metric_data(Namespace=METRICS_NAMESPACE, MetricData=data[start:start + 1000])
        except Exception:  # the job's own outcome does not depend on its metrics
            log.exception("training job %s: could not publish its metrics", self.job_name)


def _instances(request: dict) -> tuple[str, int]:
    """The instance type and count a training or processing request asks for."""
    resources = request.get("ResourceConfig") or request.get("ProcessingResources", {}).get("ClusterConfig", {})
    return resources.get("InstanceType", "ml.m5.large"), int(resources.get("InstanceCount", 1))


def _check_quota(limit: str, quota: int | None, used: int, delta: int) -> None:
    """AWS's answer when a job would take the instances in use past the account's quota: ResourceLimitExceeded
    (HTTP 400), no job created."""
    if quota is not None and used + delta > quota:
        raise ApiError("ResourceLimitExceeded",
                       f"The account-level service limit '{limit}' is {quota} Instances, with current utilization "
                       f"of {used} Instances and a request delta of {delta} Instances. Please use AWS Service "
                       "Quotas to request an increase for this quota.")


def _check_image(image: str) -> None:
    from ml.contract.job_images import verb_for

    try:
        verb_for(image)
    except ValueError as error:
        raise validation(str(error)) from None


def _failure_reason(base: Path, code: int) -> str:
    failure = base / "output" / "failure"
    if failure.exists() and failure.read_text().strip():
        return failure.read_text().strip().splitlines()[0]
    return f"AlgorithmError: the process exited with status {code} and wrote no output/failure"


def _final_message(status: str, failure: str | None) -> str:
    return {"Completed": "Training job completed", "Stopped": "Training job stopped"}.get(
        status, f"Training job failed. Reason: {failure}")


def _prefix(kind: str) -> str:
    return "TrainingJob" if kind == "training" else "ProcessingJob"


def _status_key(kind: str) -> str:
    return f"{_prefix(kind)}Status"

