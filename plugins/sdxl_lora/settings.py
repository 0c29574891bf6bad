"""Deployment settings: an Airflow Variable, else an environment variable, else a local default.

The defaults serve the local stack (`sdxl-lora-ops local-stack`); on AWS set at least the bucket,
the execution role and the image URIs. Variables are named `sdxl_lora_<field>` and environment
variables `SDXL_LORA_<FIELD>`. DAG files read settings at parse time only from the environment
(`Settings.from_environment()`), so parsing never queries the metadata database; tasks read them
with Variables too (`Settings.resolve()`).

The fields in PARSE_TIME shape what the DAG files build when they are parsed (Asset URIs, the
schedule, operator arguments, the trigger forms' defaults): a Variable cannot reach those, so
`resolve()` refuses a Variable that contradicts one of them instead of letting it split a run
between two values.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

from ml.contract.hyperparameters import PRESETS

Getter = Callable[[str], "str | None"]

# Read when the DAG files are parsed: the processed-dataset Asset (bucket, prefix), the retraining
# schedule, the operators' connection, polling and status-check limits, and the preset behind every
# trigger form's defaults.
PARSE_TIME = ("bucket", "prefix", "aws_conn_id", "check_interval_seconds", "deferrable", "retrain_schedule",
              "max_runtime_seconds", "max_wait_seconds", "retry_delay_seconds", "preset", "registry_watch_schedule")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    bucket: str = "sdxl-lora-local"
    prefix: str = "sdxl-finetune-lora"
    role_arn: str = "arn:aws:iam::123456789012:role/sdxl-lora-local"  # moto's account: local only
    processing_image: str = "sdxl-lora-processing:latest"
    training_image: str = "sdxl-lora-training:latest"
    inference_image: str = "sdxl-lora-inference:latest"
    processing_instance_type: str = "ml.g4dn.12xlarge"  # the original system's captioning instance
    training_instance_type: str = "ml.g5.2xlarge"  # its best price/performance for training
    inference_instance_type: str = "ml.g5.2xlarge"
    use_spot: bool = True
    max_runtime_seconds: int = 4 * 3600
    max_wait_seconds: int = 8 * 3600  # spot: waiting for capacity plus running
    training_pool_size: int = 4
    # Seconds per optimizer step of your training jobs, for the cost estimate (sdxl_lora.estimate); 0: its table's
    # figure for the instance type, where it has one.
    seconds_per_step: float = 0.0
    retrain_schedule: str = "0 3 * * 1"  # Mondays 03:00
    base_model_uri: str = ""  # s3:// prefix of a diffusers SDXL pipeline; empty: the training default
    base_model_id: str = ""  # the Hub id base_model_uri was staged from: the model card's base_model
    captioner_uri: str = ""  # s3:// prefix of a staged InstructBLIP; empty: Salesforce/instructblip-vicuna-7b from the Hub
    endpoint_name: str = "sdxl-lora"
    # The SageMaker model package group each trained or chosen adapter is registered in (sdxl_lora.registry);
    # `none` registers nothing (an empty value means the default, as for every setting).
    model_package_group: str = "sdxl-lora"
    # How often sdxl_lora_registry_watch looks for a newly Approved version to deploy (a cron); `none`: never.
    registry_watch_schedule: str = "*/5 * * * *"
    aws_conn_id: str = "aws_default"
    check_interval_seconds: int = 30  # how often a waiting task asks SageMaker for the job's status
    deferrable: bool = False  # wait in the triggerer instead of a worker slot
    retry_delay_seconds: int = 60  # between a failed task's tries (the DAGs' default_args)
    # The forms' defaults (sdxl_lora.presets): production (GPU instances on AWS), or local (the local stack's CPU
    # jobs on the tiny SDXL: `make airflow`, `make demo` and the Compose stack set it).
    preset: str = "production"
    # Security on AWS (docs/aws.md). Empty or false by default: the local stack has no VPC or KMS.
    subnet_ids: str = ""  # comma-separated private subnets: jobs and endpoints run in your VPC
    security_group_ids: str = ""  # comma-separated; required together with subnet_ids
    network_isolation: bool = False  # no network in the containers; needs base_model_uri (nothing from the Hub)
    inter_container_encryption: bool = False  # encrypt traffic between the instances of a multi-host job
    volume_kms_key_id: str = ""  # storage volumes of training and processing (not for local-NVMe instances)
    output_kms_key_id: str = ""  # model artifacts, processed datasets and checkpoints written to S3
    endpoint_kms_key_id: str = ""  # the endpoint's storage volume (not for local-NVMe instances)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SettingsError(f"setting preset (SDXL_LORA_PRESET): expected one of {', '.join(PRESETS)}, "
                                f"got {self.preset!r}")

    @classmethod
    def from_environment(cls) -> "Settings":
        return cls.load(lambda name: None)

    @classmethod
    def resolve(cls) -> "Settings":
        """Inside a task: Airflow Variables first; a Variable contradicting a parse-time setting is refused."""
        from airflow.sdk import Variable

        return cls.load(lambda name: Variable.get(name, default=None)).consistent_with(cls.from_environment())

    def consistent_with(self, parsed: "Settings") -> "Settings":
        """self, when it agrees with the settings the DAG files were parsed with on every PARSE_TIME field."""
        differing = [name for name in PARSE_TIME if getattr(self, name) != getattr(parsed, name)]
        if differing:
            found = "; ".join(f"sdxl_lora_{name}={getattr(self, name)!r} but the DAGs were parsed with "
                              f"{getattr(parsed, name)!r}" for name in differing)
            raise SettingsError(
                f"Airflow Variable(s) contradict settings the DAG files read at parse time: {found}. Set these "
                f"through the environment (SDXL_LORA_<NAME>) of every Airflow component and delete the Variable(s)")
        return self

    @classmethod
    def load(cls, variable: Getter) -> "Settings":
        values = {}
        for field in dataclasses.fields(cls):
            raw = variable(f"sdxl_lora_{field.name}")
            if raw is None:
                raw = os.environ.get(f"SDXL_LORA_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            values[field.name] = _convert(field.name, field.type, raw)
        return cls(**values)

    def uri(self, *parts: str) -> str:
        """s3://bucket/prefix/parts..."""
        path = "/".join(p.strip("/") for p in (self.prefix, *parts) if p)
        return f"s3://{self.bucket}/{path}"

    def raw_dataset(self, version: str) -> str:
        return self.uri("raw_dataset", version) + "/"

    def processed_dataset(self, version: str) -> str:
        return self.uri("proc_dataset", version) + "/"

    def models(self) -> str:
        return self.uri("models")

    def checkpoints(self, job: str) -> str:
        return self.uri("checkpoints", job)

    def vpc_config(self) -> dict | None:
        """SageMaker's VpcConfig, or None to run outside a VPC; half a configuration is an error."""
        subnets = _split(self.subnet_ids)
        groups = _split(self.security_group_ids)
        if bool(subnets) != bool(groups):
            raise SettingsError("settings subnet_ids and security_group_ids: set both (a VPC needs subnets and "
                             f"security groups) or neither; got subnets {subnets} and security groups {groups}")
        return {"Subnets": subnets, "SecurityGroupIds": groups} if subnets else None

    def max_status_checks(self) -> int:
        """Enough status checks to outlast the longest job (spot: waiting plus running)."""
        longest = max(self.max_wait_seconds, self.max_runtime_seconds)
        return -(-longest // self.check_interval_seconds) + 1


def _split(values: str) -> list[str]:
    return [value.strip() for value in values.split(",") if value.strip()]


def _convert(name: str, kind, raw: str):
    kind = kind if isinstance(kind, type) else {"bool": bool, "int": int, "float": float, "str": str}[kind]
    if kind is bool:
        lowered = str(raw).strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise SettingsError(f"setting {name}: expected true or false, got {raw!r}")
        return lowered in ("true", "1", "yes")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"setting {name}: expected an integer, got {raw!r}") from None
    if kind is float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise SettingsError(f"setting {name}: expected a number of at least 0, got {raw!r}")
        return value
    return str(raw)
