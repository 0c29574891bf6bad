"""Hyperparameter tuning jobs: SageMaker's automatic model tuning over the stack's training jobs.

A tuning job runs on a thread of its own. It launches every trial as an ordinary training job
(CreateTrainingJob on the JobService, named `<tuning job>-NNN-<hash>` as SageMaker names them),
never more at once than MaxParallelTrainingJobs, and reads each trial's objective from its
FinalMetricDataList. Grid (every combination of the categorical values) and Random (seeded by
RandomSeed) are the real strategies; Bayesian and Hyperband choose like Random here, and every
trial they launch says so in its secondary status message. Early stopping (Auto) is accepted and
not emulated: trials run to their end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field

from local_stack.aws import ACCOUNT, REGION
from local_stack.errors import ApiError, require, resource_not_found, validation
from local_stack.jobs import TERMINAL, JobService

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,31}$")
STRATEGIES = ("Bayesian", "Random", "Hyperband", "Grid")
RUN_AS_RANDOM = ("Bayesian", "Hyperband")
SCALING_TYPES = ("Auto", "Linear", "Logarithmic", "ReverseLogarithmic")
MAX_RANGES = 30  # ParameterRanges: at most 30 hyperparameters in all
POLL_SECONDS = 0.5
# Members of a training job definition that are not CreateTrainingJob members.
DEFINITION_ONLY = ("DefinitionName", "TuningObjective", "HyperParameterRanges", "StaticHyperParameters",
                   "HyperParameterTuningResourceConfig")


@dataclass
class TuningJob:
    name: str
    request: dict
    description: dict
    ranges: list["Range"]
    trials: list[str] = field(default_factory=list)
    tuned: dict[str, dict[str, str]] = field(default_factory=dict)  # trial -> its tuned values
    stop_requested: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


@dataclass(frozen=True)
class Range:
    name: str
    kind: str  # "Continuous", "Integer" or "Categorical"
    low: float = 0.0
    high: float = 0.0
    scaling: str = "Auto"
    values: tuple[str, ...] = ()

    def sample(self, rng: random.Random) -> str:
        if self.kind == "Categorical":
            return rng.choice(self.values)
        if self.scaling == "Logarithmic":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        elif self.scaling == "ReverseLogarithmic":
            value = 1.0 - math.exp(rng.uniform(math.log(1.0 - self.high), math.log(1.0 - self.low)))
        else:  # Linear, and Auto (SageMaker picks a scale; the stack searches linearly)
            value = rng.uniform(self.low, self.high)
        if self.kind == "Integer":
            return str(min(int(self.high), max(int(self.low), round(value))))
        return repr(min(self.high, max(self.low, value)))


class TuningService:
    """CreateHyperParameterTuningJob and its Describe, ListTrainingJobsFor... and Stop."""

    def __init__(self, jobs: JobService):
        self.jobs = jobs
        self.tuning_jobs: dict[str, TuningJob] = {}
        self.lock = threading.RLock()

    # -- API -----------------------------------------------------------------------------

    def create(self, request: dict) -> dict:
        require(request, "HyperParameterTuningJobName", "HyperParameterTuningJobConfig",
                "HyperParameterTuningJobConfig.Strategy", "HyperParameterTuningJobConfig.ResourceLimits",
                "HyperParameterTuningJobConfig.ResourceLimits.MaxParallelTrainingJobs")
        name = request["HyperParameterTuningJobName"]
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise validation(f"1 validation error detected: Value '{name}' at 'hyperParameterTuningJobName' failed "
                             "to satisfy constraint: Member must satisfy regular expression pattern: "
                             "^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,31} and have length at most 32")
        if request.get("TrainingJobDefinitions") or request.get("Autotune") or request.get("WarmStartConfig"):
            raise validation("the local stack supports one TrainingJobDefinition, without Autotune or "
                             "WarmStartConfig")
        require(request, "TrainingJobDefinition", "TrainingJobDefinition.AlgorithmSpecification",
                "TrainingJobDefinition.AlgorithmSpecification.TrainingInputMode", "TrainingJobDefinition.RoleArn",
                "TrainingJobDefinition.OutputDataConfig", "TrainingJobDefinition.OutputDataConfig.S3OutputPath",
                "TrainingJobDefinition.StoppingCondition")
        config, definition = request["HyperParameterTuningJobConfig"], request["TrainingJobDefinition"]
        ranges = check_config(config, definition)
        check_resources(definition)
        with self.lock:
            if name in self.tuning_jobs:
                raise ApiError("ResourceInUse", f"Hyperparameter tuning job name {name} already exists: job names "
                                                "must be unique within an AWS account and region")
            now = time.time()
            arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:hyper-parameter-tuning-job/{name.lower()}"
            description = {
                "HyperParameterTuningJobName": name,
                "HyperParameterTuningJobArn": arn,
                "HyperParameterTuningJobConfig": config,
                "TrainingJobDefinition": definition,
                "HyperParameterTuningJobStatus": "InProgress",
                "CreationTime": now,
                "LastModifiedTime": now,
            }
            job = TuningJob(name, request, description, ranges)
            self.tuning_jobs[name] = job
        if config["Strategy"] in RUN_AS_RANDOM:
            log.warning("tuning job %s: the %s strategy runs as Random on the local stack", name, config["Strategy"])
        job.thread = threading.Thread(target=self._guarded, args=(job,), name=f"tuning-{name}", daemon=True)
        job.thread.start()
        return {"HyperParameterTuningJobArn": arn}

    def describe(self, request: dict) -> dict:
        job = self._get(request.get("HyperParameterTuningJobName"))
        summaries = self._summaries(job)
        counters = {"Completed": 0, "InProgress": 0, "RetryableError": 0, "NonRetryableError": 0, "Stopped": 0}
        objectives = {"Succeeded": 0, "Pending": 0, "Failed": 0}
        for summary in summaries:
            status = summary["TrainingJobStatus"]
            counters[{"Completed": "Completed", "Failed": "NonRetryableError", "Stopped": "Stopped"}.get(
                status, "InProgress")] += 1
            objectives[summary["ObjectiveStatus"]] += 1
        with self.lock:
            description = json.loads(json.dumps(job.description))
        description["TrainingJobStatusCounters"] = counters
        description["ObjectiveStatusCounters"] = objectives
        best = self._best(job, summaries)
        if best is not None:
            description["BestTrainingJob"] = best
        end = description.get("HyperParameterTuningEndTime", time.time())
        description["ConsumedResources"] = {"RuntimeInSeconds": int(end - description["CreationTime"])}
        return description

    def list_training_jobs(self, request: dict) -> dict:
        job = self._get(request.get("HyperParameterTuningJobName"))
        summaries = self._summaries(job)
        if request.get("StatusEquals"):
            summaries = [s for s in summaries if s["TrainingJobStatus"] == request["StatusEquals"]]
        sort_by = request.get("SortBy", "Name")
        descending = request.get("SortOrder", "Descending") == "Descending"
        if sort_by == "FinalObjectiveMetricValue":  # jobs without a value come last either way
            scored = [s for s in summaries if "FinalHyperParameterTuningJobObjectiveMetric" in s]
            scored.sort(key=lambda s: s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"], reverse=descending)
            summaries = scored + [s for s in summaries if s not in scored]
        else:
            key = {"Name": "TrainingJobName", "CreationTime": "CreationTime",
                   "Status": "TrainingJobStatus"}.get(sort_by)
            if key is None:
                raise validation(f"1 validation error detected: Value '{sort_by}' at 'sortBy' failed to satisfy "
                                 "constraint: Member must satisfy enum value set: [Name, CreationTime, Status, "
                                 "FinalObjectiveMetricValue]")
            summaries.sort(key=lambda s: s[key], reverse=descending)
        start = int(request.get("NextToken") or 0)
        limit = int(request.get("MaxResults") or 10)
        result = {"TrainingJobSummaries": summaries[start:start + limit]}
        if start + limit < len(summaries):
            result["NextToken"] = str(start + limit)
        return result

    def list(self, request: dict) -> dict:
        with self.lock:
            names = sorted(self.tuning_jobs)
        summaries = []
        for name in names:
            d = self.describe({"HyperParameterTuningJobName": name})
            if request.get("NameContains") and request["NameContains"] not in name:
                continue
            if request.get("StatusEquals") and d["HyperParameterTuningJobStatus"] != request["StatusEquals"]:
                continue
            summaries.append({key: d[key] for key in (
                "HyperParameterTuningJobName", "HyperParameterTuningJobArn", "HyperParameterTuningJobStatus",
                "CreationTime", "LastModifiedTime", "TrainingJobStatusCounters", "ObjectiveStatusCounters",
                "HyperParameterTuningEndTime") if key in d}
                | {"Strategy": d["HyperParameterTuningJobConfig"]["Strategy"],
                   "ResourceLimits": d["HyperParameterTuningJobConfig"]["ResourceLimits"]})
        summaries.sort(key=lambda s: s["CreationTime"], reverse=request.get("SortOrder", "Descending") == "Descending")
        start, limit = int(request.get("NextToken") or 0), int(request.get("MaxResults") or 100)
        result = {"HyperParameterTuningJobSummaries": summaries[start:start + limit]}
        if start + limit < len(summaries):
            result["NextToken"] = str(start + limit)
        return result

    def stop(self, request: dict) -> dict:
        name = request.get("HyperParameterTuningJobName")
        with self.lock:
            job = self.tuning_jobs.get(name)
            if job is None:
                raise resource_not_found(f"Amazon SageMaker can't find a tuning job with name {name}")
            status = job.description["HyperParameterTuningJobStatus"]
            if status != "InProgress":
                raise validation(f"The hyperparameter tuning job {name} is {status}; only a job that is InProgress "
                                 "can be stopped.")
            job.description["HyperParameterTuningJobStatus"] = "Stopping"
            job.description["LastModifiedTime"] = time.time()
            job.stop_requested.set()
        return {}

    def shutdown(self) -> None:
        """Stop launching trials; the tuning threads stop their running trials and end."""
        with self.lock:
            running = [j for j in self.tuning_jobs.values() if j.thread is not None and j.thread.is_alive()]
        for job in running:
            job.stop_requested.set()
        for job in running:
            job.thread.join(timeout=self.jobs.options.stop_grace_seconds + 10)

    # -- the tuner -------------------------------------------------------------------------

    def _guarded(self, job: TuningJob) -> None:
        try:
            self._run(job)
        except Exception as error:  # the stack's own failure still ends the job, with a reason
            log.exception("tuning job %s failed", job.name)
            self._stop_trials(job)
            self._finish(job, "Failed", f"local stack: {type(error).__name__}: {error}")

    def _run(self, job: TuningJob) -> None:
        config = job.request["HyperParameterTuningJobConfig"]
        limits = config["ResourceLimits"]
        strategy = config["Strategy"]
        if strategy == "Grid":
            candidates = iter(grid_points(job.ranges))
            total = math.prod(len(r.values) for r in job.ranges)
        else:
            rng = random.Random(config.get("RandomSeed", _seed(job.name)))
            candidates = ({r.name: r.sample(rng) for r in job.ranges} for _ in itertools.count())
            total = int(limits["MaxNumberOfTrainingJobs"])
        parallel = int(limits["MaxParallelTrainingJobs"])
        deadline = job.description["CreationTime"] + limits.get("MaxRuntimeInSeconds", math.inf)
        note = (f"Launched by hyperparameter tuning job {job.name} ({strategy}"
                + (", run as Random on the local stack)" if strategy in RUN_AS_RANDOM else ")"))
        values = None
        while len(job.trials) < total and not job.stop_requested.is_set() and time.time() < deadline:
            if self._running(job) >= parallel:
                job.stop_requested.wait(POLL_SECONDS)
                continue
            values = values or next(candidates)
            trial = trial_name(job.name, len(job.trials) + 1)
            if not self._launch(job, trial, values, note):
                job.stop_requested.wait(POLL_SECONDS)  # the account's limit: wait for a slot, as SageMaker does
                continue
            with self.lock:
                job.trials.append(trial)
                job.tuned[trial] = values
                job.description["LastModifiedTime"] = time.time()
            values = None
        while self._running(job):
            stopping = job.stop_requested.is_set() or time.time() >= deadline
            if stopping:
                self._stop_trials(job)
                time.sleep(POLL_SECONDS)
            else:
                job.stop_requested.wait(POLL_SECONDS)
        if job.stop_requested.is_set() or time.time() >= deadline:
            self._finish(job, "Stopped")
            return
        summaries = self._summaries(job)
        if any(s["ObjectiveStatus"] == "Succeeded" for s in summaries):
            self._finish(job, "Completed")
            return
        metric = config["HyperParameterTuningJobObjective"]["MetricName"]
        reasons = [f"{s['TrainingJobName']}: {s['FailureReason']}" for s in summaries if s.get("FailureReason")]
        self._finish(job, "Failed", f"No training job reported the objective metric {metric}"
                     + (f"; {reasons[0]}" if reasons else ""))

    def _launch(self, job: TuningJob, trial: str, values: dict[str, str], note: str) -> bool:
        """Create the trial on the first of the definition's resource configs (InstanceConfigs in their
        Prioritized order) that the account's quotas admit; False when none does now."""
        for resources in resource_configs(job.request["TrainingJobDefinition"]):
            try:
                self.jobs.create_training_job(self._trial_request(job, trial, values, resources),
                                              tuning_job_arn=job.description["HyperParameterTuningJobArn"],
                                              starting_message=note)
                return True
            except ApiError as error:
                if error.code != "ResourceLimitExceeded":
                    raise
        return False

    def _trial_request(self, job: TuningJob, trial: str, values: dict[str, str], resources: dict) -> dict:
        definition = job.request["TrainingJobDefinition"]
        request = {k: v for k, v in definition.items() if k not in DEFINITION_ONLY}
        request = json.loads(json.dumps(request))
        request["TrainingJobName"] = trial
        request["HyperParameters"] = {**definition.get("StaticHyperParameters", {}), **values}
        request["ResourceConfig"] = resources
        request["Tags"] = job.request.get("Tags", [])
        return request

    def _running(self, job: TuningJob) -> int:
        return sum(1 for s in self._summaries(job) if s["TrainingJobStatus"] not in TERMINAL)

    def _stop_trials(self, job: TuningJob) -> None:
        for summary in self._summaries(job):
            if summary["TrainingJobStatus"] == "InProgress":
                try:
                    self.jobs.stop("training", summary["TrainingJobName"])
                except ApiError:
                    pass  # it ended meanwhile

    def _finish(self, job: TuningJob, status: str, failure: str | None = None) -> None:
        now = time.time()
        with self.lock:
            job.description["HyperParameterTuningJobStatus"] = status
            job.description["HyperParameterTuningEndTime"] = now
            job.description["LastModifiedTime"] = now
            if failure:
                job.description["FailureReason"] = failure[:1024]

    # -- views -----------------------------------------------------------------------------

    def _get(self, name) -> TuningJob:
        with self.lock:
            job = self.tuning_jobs.get(name)
        if job is None:
            raise resource_not_found(f"Amazon SageMaker can't find a tuning job with name {name}")
        return job

    def _summaries(self, job: TuningJob) -> list[dict]:
        objective = job.request["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
        with self.lock:
            trials = [(name, dict(job.tuned[name])) for name in job.trials]
        summaries = []
        for name, tuned in trials:
            d = self.jobs.describe("training", name)
            summary = {"TrainingJobName": name, "TrainingJobArn": d["TrainingJobArn"], "TuningJobName": job.name,
                       "CreationTime": d["CreationTime"], "TrainingJobStatus": d["TrainingJobStatus"],
                       "TunedHyperParameters": tuned}
            for key in ("TrainingStartTime", "TrainingEndTime", "FailureReason"):
                if key in d:
                    summary[key] = d[key]
            metrics = {m["MetricName"]: m["Value"] for m in d.get("FinalMetricDataList", [])}
            if objective["MetricName"] in metrics and d["TrainingJobStatus"] in TERMINAL:
                summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
                    "Type": objective["Type"], "MetricName": objective["MetricName"],
                    "Value": metrics[objective["MetricName"]]}
                summary["ObjectiveStatus"] = "Succeeded"
            else:
                summary["ObjectiveStatus"] = "Failed" if d["TrainingJobStatus"] in TERMINAL else "Pending"
            summaries.append(summary)
        return summaries

    def _best(self, job: TuningJob, summaries: list[dict]) -> dict | None:
        scored = [s for s in summaries if s["ObjectiveStatus"] == "Succeeded"]
        if not scored:
            return None
        sign = 1 if job.request["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]["Type"] == \
            "Minimize" else -1
        return min(scored, key=lambda s: (sign * s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"],
                                          s["CreationTime"]))


def trial_name(tuning_job: str, number: int) -> str:
    """SageMaker's style: <tuning job>-<three digits>-<eight hex digits>."""
    digest = hashlib.sha1(f"{tuning_job}/{number}".encode()).hexdigest()[:8]
    return f"{tuning_job}-{number:03d}-{digest}"


def resource_configs(definition: dict) -> list[dict]:
    """The ResourceConfig of each trial the definition may launch, in order of preference: its ResourceConfig,
    else its HyperParameterTuningResourceConfig (one instance type, or InstanceConfigs, Prioritized)."""
    if definition.get("ResourceConfig"):
        return [json.loads(json.dumps(definition["ResourceConfig"]))]
    flexible = definition["HyperParameterTuningResourceConfig"]
    kms = {"VolumeKmsKeyId": flexible["VolumeKmsKeyId"]} if flexible.get("VolumeKmsKeyId") else {}
    if flexible.get("InstanceConfigs"):
        return [{"InstanceType": c["InstanceType"], "InstanceCount": c["InstanceCount"],
                 "VolumeSizeInGB": c["VolumeSizeInGB"], **kms} for c in flexible["InstanceConfigs"]]
    single = {k: flexible[k] for k in ("InstanceType", "InstanceCount", "VolumeSizeInGB") if k in flexible}
    return [{"InstanceCount": 1, **single, **kms}]


def grid_points(ranges: list[Range]) -> list[dict[str, str]]:
    names = [r.name for r in ranges]
    return [dict(zip(names, combination)) for combination in itertools.product(*(r.values for r in ranges))]


def _seed(name: str) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)


# -- request checks, with SageMaker's errors ------------------------------------------------


def check_config(config: dict, definition: dict) -> list[Range]:
    """The tuning job's config and training definition; returns its ranges."""
    from ml.contract.job_images import verb_for

    strategy = config["Strategy"]
    if strategy not in STRATEGIES:
        raise validation(f"1 validation error detected: Value '{strategy}' at 'hyperParameterTuningJobConfig."
                         f"strategy' failed to satisfy constraint: Member must satisfy enum value set: "
                         f"[{', '.join(STRATEGIES)}]")
    objective = config.get("HyperParameterTuningJobObjective") or definition.get("TuningObjective")
    if not objective:
        raise validation("HyperParameterTuningJobObjective is required (the local stack does not run Autotune)")
    if objective.get("Type") not in ("Minimize", "Maximize"):
        raise validation(f"1 validation error detected: Value '{objective.get('Type')}' at "
                         "'hyperParameterTuningJobConfig.hyperParameterTuningJobObjective.type' failed to satisfy "
                         "constraint: Member must satisfy enum value set: [Maximize, Minimize]")
    config.setdefault("HyperParameterTuningJobObjective", objective)
    metrics = [m.get("Name") for m in definition["AlgorithmSpecification"].get("MetricDefinitions", [])]
    if not metrics:  # AWS's words (the SDK's HyperparameterTuner sends none unless given metric_definitions)
        raise validation("A metric is required for this hyperparameter tuning job objective. Provide a metric in the "
                         "metric definitions.")
    if objective.get("MetricName") not in metrics:
        raise validation(f"The objective metric '{objective.get('MetricName')}' is not defined in the "
                         f"MetricDefinitions of the training job definition ({', '.join(map(str, metrics)) or 'none'})")
    image = definition["AlgorithmSpecification"].get("TrainingImage")
    if not image:
        raise validation("AlgorithmSpecification.TrainingImage is required (algorithm names are not supported)")
    try:
        verb_for(image)
    except ValueError as error:
        raise validation(str(error)) from None

    limits = config["ResourceLimits"]
    for key in ("MaxParallelTrainingJobs", "MaxNumberOfTrainingJobs"):
        if key in limits and (not isinstance(limits[key], int) or limits[key] < 1):
            raise validation(f"1 validation error detected: Value '{limits[key]}' at 'hyperParameterTuningJobConfig."
                             f"resourceLimits.{key[0].lower() + key[1:]}' failed to satisfy constraint: Member must "
                             "have value greater than or equal to 1")
    if "MaxRuntimeInSeconds" in limits and not 120 <= limits["MaxRuntimeInSeconds"] <= 15768000:
        raise validation(f"1 validation error detected: Value '{limits['MaxRuntimeInSeconds']}' at "
                         "'hyperParameterTuningJobConfig.resourceLimits.maxRuntimeInSeconds' failed to satisfy "
                         "constraint: Member must have value between 120 and 15768000")

    ranges = check_ranges(config.get("ParameterRanges") or definition.get("HyperParameterRanges") or {})
    tuned = {r.name for r in ranges}
    static = set(definition.get("StaticHyperParameters", {}))
    if tuned & static:
        raise validation(f"Hyperparameters {sorted(tuned & static)} are both tuned (ParameterRanges) and static "
                         "(StaticHyperParameters); a hyperparameter can be only one of them")

    if strategy == "Grid":
        not_categorical = [r.name for r in ranges if r.kind != "Categorical"]
        if not_categorical:
            raise validation(f"The Grid strategy supports only categorical parameter ranges; {not_categorical} "
                             "are continuous or integer ranges")
        combinations = math.prod(len(r.values) for r in ranges)
        if "MaxNumberOfTrainingJobs" in limits and limits["MaxNumberOfTrainingJobs"] != combinations:
            raise validation(f"For the Grid strategy MaxNumberOfTrainingJobs must be the number of distinct "
                             f"combinations of the categorical values ({combinations}) or left out; it is "
                             f"{limits['MaxNumberOfTrainingJobs']}")
    elif "MaxNumberOfTrainingJobs" not in limits:
        raise validation(f"ResourceLimits.MaxNumberOfTrainingJobs is required for the {strategy} strategy")

    early_stopping = config.get("TrainingJobEarlyStoppingType", "Off")
    if early_stopping not in ("Off", "Auto"):
        raise validation(f"1 validation error detected: Value '{early_stopping}' at 'hyperParameterTuningJobConfig."
                         "trainingJobEarlyStoppingType' failed to satisfy constraint: Member must satisfy enum value "
                         "set: [Off, Auto]")
    if strategy == "Hyperband":
        if early_stopping != "Off":
            raise validation("TrainingJobEarlyStoppingType must be Off for the Hyperband strategy, which has its own "
                             "early stopping")
        hyperband = (config.get("StrategyConfig") or {}).get("HyperbandStrategyConfig", {})
        if hyperband.get("MinResource", 1) > hyperband.get("MaxResource", math.inf):
            raise validation("HyperbandStrategyConfig: MinResource must not be greater than MaxResource")
    elif config.get("StrategyConfig"):
        raise validation(f"StrategyConfig applies only to the Hyperband strategy, not {strategy}")
    return ranges


def check_resources(definition: dict) -> None:
    """ResourceConfig or HyperParameterTuningResourceConfig, exactly one, as CreateHyperParameterTuningJob
    requires; the latter with one instance type or InstanceConfigs, not both."""
    path = "trainingJobDefinition.hyperParameterTuningResourceConfig"
    fixed, flexible = definition.get("ResourceConfig"), definition.get("HyperParameterTuningResourceConfig")
    if bool(fixed) == bool(flexible):
        raise validation("TrainingJobDefinition must specify exactly one of ResourceConfig and "
                         f"HyperParameterTuningResourceConfig; {'both are' if fixed else 'neither is'} specified")
    if fixed:
        require(definition, "ResourceConfig.InstanceType", "ResourceConfig.InstanceCount")
        return
    strategy = flexible.get("AllocationStrategy")
    if strategy is not None and strategy != "Prioritized":
        raise validation(f"1 validation error detected: Value '{strategy}' at '{path}.allocationStrategy' failed "
                         "to satisfy constraint: Member must satisfy enum value set: [Prioritized]")
    configs = flexible.get("InstanceConfigs")
    if configs is None:
        if not flexible.get("InstanceType"):
            raise validation(f"1 validation error detected: Value null at '{path}.instanceType' failed to satisfy "
                             "constraint: Member must not be null")
        _check_count(flexible.get("InstanceCount", 1), f"{path}.instanceCount", 0)
        return
    if any(key in flexible for key in ("InstanceType", "InstanceCount", "VolumeSizeInGB")):
        raise validation("HyperParameterTuningResourceConfig: if you use InstanceConfigs, do not provide values for "
                         "InstanceType, VolumeSizeInGB or InstanceCount")
    if not isinstance(configs, list) or not 1 <= len(configs) <= 6:
        raise validation(f"1 validation error detected: Value '{configs}' at '{path}.instanceConfigs' failed to "
                         "satisfy constraint: Member must have length less than or equal to 6 and greater than or "
                         "equal to 1")
    for number, item in enumerate(configs, 1):
        where = f"{path}.instanceConfigs.{number}.member"
        for key in ("InstanceType", "InstanceCount", "VolumeSizeInGB"):
            if item.get(key) in (None, ""):
                raise validation(f"1 validation error detected: Value null at '{where}.{key[0].lower() + key[1:]}' "
                                 "failed to satisfy constraint: Member must not be null")
        _check_count(item["InstanceCount"], f"{where}.instanceCount", 0)
        _check_count(item["VolumeSizeInGB"], f"{where}.volumeSizeInGB", 1)
    types = [item["InstanceType"] for item in configs]
    if len(set(types)) != len(types):
        raise validation(f"HyperParameterTuningResourceConfig.InstanceConfigs lists an instance type more than once: "
                         f"{types}")


def _check_count(value, field: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise validation(f"1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: "
                         f"Member must have value greater than or equal to {minimum}")


def check_ranges(parameter_ranges: dict) -> list[Range]:
    ranges: list[Range] = []
    for kind in ("Continuous", "Integer", "Categorical"):
        for item in parameter_ranges.get(f"{kind}ParameterRanges", []):
            name = item.get("Name")
            if not name:
                raise validation(f"1 validation error detected: Value null at 'name' of a {kind}ParameterRange "
                                 "failed to satisfy constraint: Member must not be null")
            if any(r.name == name for r in ranges):
                raise validation(f"The hyperparameter '{name}' appears in more than one parameter range")
            ranges.append(_categorical(name, item) if kind == "Categorical" else _numeric(kind, name, item))
    if parameter_ranges.get("AutoParameters"):
        raise validation("AutoParameters need Autotune, which the local stack does not run")
    if not ranges:
        raise validation("ParameterRanges must name at least one hyperparameter to tune")
    count = sum(len(r.values) if r.kind == "Categorical" else 1 for r in ranges)
    if count > MAX_RANGES:
        raise validation(f"The tuning job searches {count} hyperparameters (each categorical value counts); the "
                         f"maximum is {MAX_RANGES}")
    return ranges


def _categorical(name: str, item: dict) -> Range:
    values = item.get("Values") or []
    if not values:
        raise validation(f"The categorical parameter range '{name}' must list at least one value")
    if len(values) > 30:
        raise validation(f"The categorical parameter range '{name}' lists {len(values)} values; the maximum is 30")
    if len(set(values)) != len(values):
        raise validation(f"The categorical parameter range '{name}' lists a value more than once: {values}")
    return Range(name, "Categorical", values=tuple(str(v) for v in values))


def _numeric(kind: str, name: str, item: dict) -> Range:
    parse = int if kind == "Integer" else float
    bounds = {}
    for key in ("MinValue", "MaxValue"):
        raw = item.get(key)
        try:
            bounds[key] = parse(raw)
            if not math.isfinite(bounds[key]):
                raise ValueError
        except (TypeError, ValueError):
            raise validation(f"The {key} '{raw}' of the {kind.lower()} parameter range '{name}' is not "
                             f"{'an integer' if kind == 'Integer' else 'a number'}") from None
    low, high = bounds["MinValue"], bounds["MaxValue"]
    if low > high:
        raise validation(f"The MinValue {low} of the {kind.lower()} parameter range '{name}' is greater than its "
                         f"MaxValue {high}")
    scaling = item.get("ScalingType", "Auto")
    if scaling not in SCALING_TYPES:
        raise validation(f"1 validation error detected: Value '{scaling}' at 'scalingType' failed to satisfy "
                         f"constraint: Member must satisfy enum value set: [{', '.join(SCALING_TYPES)}]")
    if scaling == "Logarithmic" and low <= 0:
        raise validation(f"The parameter range '{name}' uses Logarithmic scaling, which works only for ranges whose "
                         f"values are all greater than 0; its MinValue is {low}")
    if scaling == "ReverseLogarithmic":
        if kind == "Integer":
            raise validation(f"The integer parameter range '{name}' cannot use ReverseLogarithmic scaling, which is "
                             "for continuous ranges only")
        if not (0 <= low and high < 1):
            raise validation(f"The parameter range '{name}' uses ReverseLogarithmic scaling, which works only for "
                             f"ranges entirely within 0 <= x < 1.0; it is [{low}, {high}]")
    return Range(name, kind, float(low), float(high), scaling)
