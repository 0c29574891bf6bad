"""The SDK path of `sdxl-lora-ops submit`: sagemaker-core's TrainingJob.create validates the DAGs' request
against its shapes and sends exactly that request, security fields included."""

import pytest
from sagemaker.core.resources import Base

from sdxl_lora_ops import submit


class Sent(Exception):
    pass


class RecordingClient:
    def create_training_job(self, **request):
        self.request = request
        raise Sent  # stop before the SDK describes the job


def test_the_sdk_sends_the_dags_request_unchanged(monkeypatch):
    for name, value in {"BUCKET": "b", "SUBNET_IDS": "subnet-1", "SECURITY_GROUP_IDS": "sg-1",
                        "NETWORK_ISOLATION": "true", "BASE_MODEL_URI": "s3://b/base/",
                        "OUTPUT_KMS_KEY_ID": "alias/sdxl-lora", "INTER_CONTAINER_ENCRYPTION": "true"}.items():
        monkeypatch.setenv(f"SDXL_LORA_{name}", value)
    client = RecordingClient()
    monkeypatch.setattr(Base, "get_sagemaker_client", classmethod(lambda cls, **kw: client))
    request = submit.build_request("s3://b/data/", "sdxl-lora-submit-1", {"max_train_steps": 10})
    assert request["VpcConfig"] and request["EnableNetworkIsolation"] is True
    with pytest.raises(Sent):
        submit.create(request)
    assert client.request == request


def test_the_sdk_rejects_a_malformed_request_before_sending_it(monkeypatch):
    client = RecordingClient()
    monkeypatch.setattr(Base, "get_sagemaker_client", classmethod(lambda cls, **kw: client))
    request = submit.build_request("s3://b/data/", "sdxl-lora-submit-2", {})
    request["ResourceConfig"]["InstanceCount"] = "several"
    with pytest.raises(Exception, match="(?i)instance_count|validation"):
        submit.create(request)
    assert not hasattr(client, "request")


def test_the_request_starts_from_the_settings_preset_as_the_train_dags_form(monkeypatch):
    from ml.contract.hyperparameters import parse, preset

    monkeypatch.setenv("SDXL_LORA_PRESET", "local")
    request = submit.build_request("s3://b/data/", "sdxl-lora-submit-3", {"max_train_steps": 5})
    values = parse(request["HyperParameters"]).as_dict()
    assert {key: values[key] for key in preset("local")} == {**preset("local"), "max_train_steps": 5}
