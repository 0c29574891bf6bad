"""Security settings reach every request the DAGs send: VPC, network isolation, KMS, encryption."""

import pytest

from sdxl_lora import sagemaker_requests
from sdxl_lora.settings import Settings

KEY = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"  # documented example
SECURE = Settings(subnet_ids="subnet-aaa, subnet-bbb", security_group_ids="sg-111", network_isolation=True,
                  inter_container_encryption=True, volume_kms_key_id=KEY, output_kms_key_id=KEY,
                  endpoint_kms_key_id=KEY, base_model_uri="s3://b/p/base_model")
VPC = {"Subnets": ["subnet-aaa", "subnet-bbb"], "SecurityGroupIds": ["sg-111"]}


def test_local_defaults_add_no_security_fields():
    settings = Settings()
    training = sagemaker_requests.training_request(settings, "j", "s3://b/d/", {})
    processing = sagemaker_requests.processing_request(settings, "p", [("raw", "s3://b/r/", "/opt/ml/processing/input/raw")], "s3://b/o/")
    model = sagemaker_requests.model_request(settings, "m", "s3://b/m.tar.gz")
    config = sagemaker_requests.endpoint_config_request(settings, "c", {"v": ("m", 1.0)})
    for request in (training, processing, model):
        assert not {"VpcConfig", "EnableNetworkIsolation", "EnableInterContainerTrafficEncryption",
                    "NetworkConfig"} & set(request)
    assert "KmsKeyId" not in training["OutputDataConfig"] and "VolumeKmsKeyId" not in training["ResourceConfig"]
    assert "KmsKeyId" not in config


def test_training_request_carries_vpc_isolation_encryption_and_keys():
    request = sagemaker_requests.training_request(SECURE, "j", "s3://b/d/", {"rank": 4})
    assert request["VpcConfig"] == VPC
    assert request["EnableNetworkIsolation"] is True
    assert request["EnableInterContainerTrafficEncryption"] is True
    assert request["ResourceConfig"]["VolumeKmsKeyId"] == KEY
    assert request["OutputDataConfig"]["KmsKeyId"] == KEY
    assert {c["ChannelName"] for c in request["InputDataConfig"]} == {"train", "base_model"}


def test_processing_request_carries_them_in_network_config():
    request = sagemaker_requests.processing_request(SECURE, "p", [("raw", "s3://b/r/", "/opt/ml/processing/input/raw")], "s3://b/o/")
    assert request["NetworkConfig"] == {"VpcConfig": VPC, "EnableNetworkIsolation": True,
                                        "EnableInterContainerTrafficEncryption": True}
    assert request["ProcessingResources"]["ClusterConfig"]["VolumeKmsKeyId"] == KEY
    assert request["ProcessingOutputConfig"]["KmsKeyId"] == KEY


def test_isolated_model_gets_the_base_model_from_sagemaker_not_from_s3_itself():
    request = sagemaker_requests.model_request(SECURE, "m", "s3://b/models/j/output/model.tar.gz")
    container = request["PrimaryContainer"]
    assert request["VpcConfig"] == VPC and request["EnableNetworkIsolation"] is True
    assert "EnableInterContainerTrafficEncryption" not in request  # not a CreateModel field
    assert container["AdditionalModelDataSources"] == [{"ChannelName": "base_model", "S3DataSource": {
        "S3Uri": "s3://b/p/base_model/", "S3DataType": "S3Prefix", "CompressionType": "None"}}]
    assert container["Environment"]["BASE_MODEL"] == "/opt/ml/additional-model-data-sources/base_model"
    config = sagemaker_requests.endpoint_config_request(SECURE, "c", {"v": ("m", 1.0)})
    assert config["KmsKeyId"] == KEY


def test_network_isolation_without_a_staged_base_model_is_refused():
    settings = Settings(network_isolation=True)
    with pytest.raises(ValueError, match="network_isolation needs base_model_uri"):
        sagemaker_requests.training_request(settings, "j", "s3://b/d/", {})
    with pytest.raises(ValueError, match="network_isolation needs base_model_uri"):
        sagemaker_requests.model_request(settings, "m", "s3://b/m.tar.gz")


def test_half_a_vpc_is_refused_naming_both_settings():
    with pytest.raises(ValueError, match="subnet_ids and security_group_ids"):
        sagemaker_requests.training_request(Settings(subnet_ids="subnet-aaa"), "j", "s3://b/d/", {})


def test_security_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SDXL_LORA_SUBNET_IDS", "subnet-1,subnet-2")
    monkeypatch.setenv("SDXL_LORA_SECURITY_GROUP_IDS", "sg-1")
    monkeypatch.setenv("SDXL_LORA_NETWORK_ISOLATION", "true")
    settings = Settings.from_environment()
    assert settings.network_isolation is True
    assert settings.vpc_config() == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
