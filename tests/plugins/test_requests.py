import json

from ml.contract.hyperparameters import parse, preset
from ml.contract.metrics import METRIC_DEFINITIONS
from sdxl_lora import datasets, sagemaker_requests
from sdxl_lora.settings import Settings


def test_training_request_carries_strings_metrics_spot_checkpoints_and_tags():
    settings = Settings(bucket="my-bucket", prefix="team/sdxl", use_spot=True, max_runtime_seconds=3600,
                        max_wait_seconds=7200, base_model_uri="s3://my-bucket/team/sdxl/base/")
    request = sagemaker_requests.training_request(settings, "job-1", "s3://my-bucket/team/sdxl/proc_dataset/v1/",
                                        {**preset("production"), "max_train_steps": 1500},
                                        sagemaker_requests.tags(dag="sdxl_lora_grid_search", run="r1", trial="lr=2e-4"))
    assert all(isinstance(v, str) for v in request["HyperParameters"].values())
    assert parse(request["HyperParameters"]).learning_rate == 2e-4
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert request["CheckpointConfig"]["S3Uri"] == "s3://my-bucket/team/sdxl/checkpoints/job-1"
    assert request["OutputDataConfig"]["S3OutputPath"] == "s3://my-bucket/team/sdxl/models"
    assert {c["ChannelName"] for c in request["InputDataConfig"]} == {"train", "base_model"}
    assert {t["Key"] for t in request["Tags"]} == {"sdxl-lora:dag", "sdxl-lora:run", "sdxl-lora:trial"}
    json.dumps(request)  # a boto3 request is plain data


def test_on_demand_training_has_no_spot_fields():
    request = sagemaker_requests.training_request(Settings(use_spot=False), "job-2", "s3://b/d/", {"rank": 8})
    assert "EnableManagedSpotTraining" not in request
    assert "MaxWaitTimeInSeconds" not in request["StoppingCondition"]
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train"]


def test_processing_request_runs_prepare_between_the_dataset_versions():
    settings = Settings(bucket="b1", prefix="p", captioner_uri="s3://b1/p/captioner/")
    inputs = datasets.prepare_inputs(settings, settings.raw_dataset("2026-11-26"), latent_cache=False)
    arguments = datasets.prepare_arguments(settings, {"caption_prefix": "sbstyle"}, "2026-11-26", "k1")
    request = sagemaker_requests.processing_request(settings, "prep-1", inputs, settings.processed_dataset("2026-11-26"),
                                          arguments=arguments, instance_count=2)
    assert request["AppSpecification"]["ContainerEntrypoint"] == ["sdxl-lora", "prepare"]
    assert request["AppSpecification"]["ContainerArguments"] == arguments
    assert request["ProcessingResources"]["ClusterConfig"]["InstanceCount"] == 2
    assert [(i["InputName"], i["S3Input"]["S3Uri"], i["S3Input"]["S3DataDistributionType"])
            for i in request["ProcessingInputs"]] == [
        ("raw", "s3://b1/p/raw_dataset/2026-11-26/", "FullyReplicated"),
        ("captioner", "s3://b1/p/captioner/", "FullyReplicated")]
    assert request["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"] == "s3://b1/p/proc_dataset/2026-11-26/"


def test_endpoint_config_with_two_variants_is_an_ab_test():
    config = sagemaker_requests.endpoint_config_request(Settings(), "cfg", {"champion": ("m1", 0.9), "challenger": ("m2", 0.1)})
    assert [(v["VariantName"], v["InitialVariantWeight"]) for v in config["ProductionVariants"]] == \
        [("champion", 0.9), ("challenger", 0.1)]


def test_a_staged_base_model_names_its_hub_id_to_the_job_for_the_model_card():
    import dataclasses

    from ml.contract.container import BASE_MODEL_CHANNEL
    from sdxl_lora import sagemaker_requests
    from sdxl_lora.settings import Settings

    staged = dataclasses.replace(Settings(), base_model_uri="s3://b/models/sdxl/",
                                 base_model_id="stabilityai/stable-diffusion-xl-base-1.0")
    request = sagemaker_requests.training_request(staged, "job", "s3://b/proc_dataset/v1/", {"rank": 4})
    assert BASE_MODEL_CHANNEL in [c["ChannelName"] for c in request["InputDataConfig"]]
    assert request["HyperParameters"]["base_model_id"] == "stabilityai/stable-diffusion-xl-base-1.0"
    given = sagemaker_requests.training_request(staged, "job", "s3://b/p/", {"base_model_id": "me/my-sdxl"})
    assert given["HyperParameters"]["base_model_id"] == "me/my-sdxl"  # the user's own word wins
    hub = sagemaker_requests.training_request(Settings(), "job", "s3://b/p/", {"rank": 4})
    assert "base_model_id" not in hub["HyperParameters"]  # no channel: the job names pretrained_model itself
