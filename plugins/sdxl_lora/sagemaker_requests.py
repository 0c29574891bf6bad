"""boto3 request dicts for the SageMaker operators, built by plain functions tests call directly."""

from __future__ import annotations

import re

from ml.contract.container import BASE_MODEL_CHANNEL, TRAIN_CHANNEL
from ml.contract.hyperparameters import to_sagemaker
from ml.contract.metrics import METRIC_DEFINITIONS
from sdxl_lora.naming import slug
from sdxl_lora.settings import Settings


def tags(**values: str) -> list[dict[str, str]]:
    """Cost-allocation tags; SageMaker allows [\\w\\s.:/=+\\-@] in values, at most 256 characters."""
    return [{"Key": f"sdxl-lora:{key}", "Value": slug(str(value))[:256] or "-"} for key, value in values.items()]


def _require_local_base_model(settings: Settings) -> None:
    if settings.network_isolation and not settings.base_model_uri:
        raise ValueError("setting network_isolation needs base_model_uri: an isolated container cannot fetch "
                         "SDXL from the Hugging Face Hub, so stage it in S3 first (docs/aws.md)")


def _security(settings: Settings, request: dict) -> dict:
    """VpcConfig and the isolation/encryption flags, added only when set (the local stack has neither)."""
    vpc = settings.vpc_config()
    if vpc:
        request["VpcConfig"] = vpc
    if settings.network_isolation:
        request["EnableNetworkIsolation"] = True
    if settings.inter_container_encryption:
        request["EnableInterContainerTrafficEncryption"] = True
    return request


def training_request(settings: Settings, job_name: str, dataset_uri: str, hyperparameters: dict,
                     job_tags: list[dict] | None = None) -> dict:
    _require_local_base_model(settings)
    channels = [(TRAIN_CHANNEL, dataset_uri)]
    if settings.base_model_uri:
        channels.append((BASE_MODEL_CHANNEL, settings.base_model_uri))
        if settings.base_model_id:  # the model card names the Hub id, not the channel's container path
            hyperparameters = {"base_model_id": settings.base_model_id, **hyperparameters}
    request = {
        "TrainingJobName": job_name,
        "AlgorithmSpecification": {"TrainingImage": settings.training_image, "TrainingInputMode": "File",
                                   "MetricDefinitions": METRIC_DEFINITIONS},
        "RoleArn": settings.role_arn,
        "HyperParameters": to_sagemaker(hyperparameters),
        "InputDataConfig": [
            {"ChannelName": name, "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}
            for name, uri in channels
        ],
        "OutputDataConfig": {"S3OutputPath": settings.models()},
        "ResourceConfig": {"InstanceType": settings.training_instance_type, "InstanceCount": 1,
                           "VolumeSizeInGB": 100},
        "StoppingCondition": {"MaxRuntimeInSeconds": settings.max_runtime_seconds},
        "CheckpointConfig": {"S3Uri": settings.checkpoints(job_name), "LocalPath": "/opt/ml/checkpoints"},
        "Tags": job_tags or [],
    }
    if settings.use_spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = max(settings.max_wait_seconds,
                                                                   settings.max_runtime_seconds)
    if settings.volume_kms_key_id:
        request["ResourceConfig"]["VolumeKmsKeyId"] = settings.volume_kms_key_id
    if settings.output_kms_key_id:
        request["OutputDataConfig"]["KmsKeyId"] = settings.output_kms_key_id
    return _security(settings, request)


def processing_request(settings: Settings, job_name: str, inputs: list[tuple[str, str, str]], processed_uri: str,
                       job_tags: list[dict] | None = None, arguments: list[str] | None = None,
                       instance_count: int = 1) -> dict:
    """inputs: (name, S3 URI, local path). Every instance gets every input (FullyReplicated): prepare
    shards its work itself, because sidecar captions must travel with their images."""
    request = {
        "ProcessingJobName": job_name,
        "RoleArn": settings.role_arn,
        "AppSpecification": {"ImageUri": settings.processing_image, "ContainerEntrypoint": ["sdxl-lora", "prepare"],
                             "ContainerArguments": list(arguments or [])},
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": instance_count,
                                                  "InstanceType": settings.processing_instance_type,
                                                  "VolumeSizeInGB": 100}},
        "ProcessingInputs": [{"InputName": name, "S3Input": {
            "S3Uri": uri, "LocalPath": local, "S3DataType": "S3Prefix", "S3InputMode": "File",
            "S3DataDistributionType": "FullyReplicated"}} for name, uri, local in inputs],
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "dataset", "S3Output": {
            "S3Uri": processed_uri, "LocalPath": "/opt/ml/processing/output/dataset", "S3UploadMode": "EndOfJob"}}]},
        "StoppingCondition": {"MaxRuntimeInSeconds": settings.max_runtime_seconds},
        "Tags": job_tags or [],
    }
    if settings.volume_kms_key_id:
        request["ProcessingResources"]["ClusterConfig"]["VolumeKmsKeyId"] = settings.volume_kms_key_id
    if settings.output_kms_key_id:
        request["ProcessingOutputConfig"]["KmsKeyId"] = settings.output_kms_key_id
    network = _security(settings, {})  # processing jobs carry the same fields in NetworkConfig
    if network:
        request["NetworkConfig"] = network
    return request


def model_request(settings: Settings, model_name: str, model_data_url: str) -> dict:
    _require_local_base_model(settings)
    environment = {"BASE_MODEL": settings.base_model_uri} if settings.base_model_uri else {}
    container = {"Image": settings.inference_image, "ModelDataUrl": model_data_url, "Environment": environment}
    if settings.network_isolation:
        # An isolated container cannot read s3:// itself: SageMaker downloads the base model beside the LoRA.
        container["AdditionalModelDataSources"] = [{"ChannelName": BASE_MODEL_CHANNEL, "S3DataSource": {
            "S3Uri": settings.base_model_uri.rstrip("/") + "/", "S3DataType": "S3Prefix", "CompressionType": "None"}}]
        environment["BASE_MODEL"] = f"/opt/ml/additional-model-data-sources/{BASE_MODEL_CHANNEL}"
    request = {"ModelName": model_name, "PrimaryContainer": container, "ExecutionRoleArn": settings.role_arn}
    request = _security(settings, request)
    request.pop("EnableInterContainerTrafficEncryption", None)  # not a CreateModel field
    return request


ASYNC_OUTPUT_PATTERN = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?$")
MAX_ASYNC_CONCURRENCY = 1000  # AsyncInferenceClientConfig.MaxConcurrentInvocationsPerInstance: 1 to 1000


def async_inference_config(settings: Settings, output_path: str, max_concurrent_invocations: int = 1) -> dict:
    """AsyncInferenceConfig: responses under output_path (`<output_path>/<inference id>.out`), failures
    under `<output_path>/failures/`, encrypted with output_kms_key_id when set."""
    if not ASYNC_OUTPUT_PATTERN.match(output_path or ""):
        raise ValueError(f"async output path must be an s3://bucket/prefix URI, got {output_path!r}")
    if isinstance(max_concurrent_invocations, bool) or not isinstance(max_concurrent_invocations, int) \
            or not 1 <= max_concurrent_invocations <= MAX_ASYNC_CONCURRENCY:
        raise ValueError(f"max concurrent async invocations per instance must be an integer from 1 to "
                         f"{MAX_ASYNC_CONCURRENCY}, got {max_concurrent_invocations!r}")
    output_path = output_path.rstrip("/")
    output = {"S3OutputPath": output_path, "S3FailurePath": f"{output_path}/failures"}
    if settings.output_kms_key_id:
        output["KmsKeyId"] = settings.output_kms_key_id
    return {"OutputConfig": output, "ClientConfig": {"MaxConcurrentInvocationsPerInstance": max_concurrent_invocations}}


def endpoint_config_request(settings: Settings, config_name: str, variants: dict[str, tuple[str, float]],
                            async_output_path: str = "", max_concurrent_invocations: int = 1) -> dict:
    """variants: variant name -> (model name, traffic weight); several make an A/B test.
    async_output_path: an asynchronous endpoint (InvokeEndpointAsync) writing its responses there. It
    takes one variant: InvokeEndpointAsync has no TargetVariant, so nothing could smoke-test a candidate
    beside the serving variants or address one variant of an A/B test."""
    request = {
        "EndpointConfigName": config_name,
        "ProductionVariants": [
            {"VariantName": variant, "ModelName": model, "InitialInstanceCount": 1,
             "InstanceType": settings.inference_instance_type, "InitialVariantWeight": float(weight)}
            for variant, (model, weight) in variants.items()
        ],
    }
    if async_output_path:
        if len(variants) != 1:
            raise ValueError(f"an asynchronous endpoint takes one production variant, got {len(variants)} "
                             f"({', '.join(variants)}): InvokeEndpointAsync has no TargetVariant, so a candidate "
                             "cannot be smoke-tested beside serving variants, nor an A/B variant addressed")
        request["AsyncInferenceConfig"] = async_inference_config(settings, async_output_path,
                                                                 max_concurrent_invocations)
    if settings.endpoint_kms_key_id:
        request["KmsKeyId"] = settings.endpoint_kms_key_id
    return request
