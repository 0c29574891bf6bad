import dataclasses

import pytest

from sdxl_lora.settings import PARSE_TIME, Settings, SettingsError


def test_defaults_serve_the_local_stack(monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("SDXL_LORA_")]:
        monkeypatch.delenv(key)
    settings = Settings.from_environment()
    assert settings.bucket == "sdxl-lora-local" and settings.training_pool_size == 4


def test_variables_win_over_environment_over_defaults(monkeypatch):
    monkeypatch.setenv("SDXL_LORA_BUCKET", "from-env")
    monkeypatch.setenv("SDXL_LORA_USE_SPOT", "false")
    monkeypatch.setenv("SDXL_LORA_TRAINING_POOL_SIZE", "2")
    variables = {"sdxl_lora_bucket": "from-variable"}
    settings = Settings.load(variables.get)
    assert settings.bucket == "from-variable"
    assert settings.use_spot is False and settings.training_pool_size == 2


def test_bad_values_name_the_setting(monkeypatch):
    monkeypatch.setenv("SDXL_LORA_TRAINING_POOL_SIZE", "many")
    with pytest.raises(ValueError, match="setting training_pool_size: expected an integer, got 'many'"):
        Settings.from_environment()


def test_s3_layout_follows_the_original_system():
    settings = Settings(bucket="b1", prefix="sdxl-finetune-lora/mvp")
    assert settings.raw_dataset("v1") == "s3://b1/sdxl-finetune-lora/mvp/raw_dataset/v1/"
    assert settings.processed_dataset("v1") == "s3://b1/sdxl-finetune-lora/mvp/proc_dataset/v1/"
    assert settings.models() == "s3://b1/sdxl-finetune-lora/mvp/models"


def _variables(monkeypatch, values: dict) -> None:
    from airflow.sdk import Variable

    monkeypatch.setattr(Variable, "get", staticmethod(lambda key, default=None: values.get(key, default)))


def test_a_variable_cannot_split_a_run_between_two_buckets(monkeypatch):
    monkeypatch.setenv("SDXL_LORA_BUCKET", "parsed-bucket")
    _variables(monkeypatch, {"sdxl_lora_bucket": "other-bucket", "sdxl_lora_check_interval_seconds": "5"})
    with pytest.raises(SettingsError) as refused:
        Settings.resolve()
    message = str(refused.value)
    assert "sdxl_lora_bucket='other-bucket' but the DAGs were parsed with 'parsed-bucket'" in message
    assert "sdxl_lora_check_interval_seconds=5 but the DAGs were parsed with 30" in message
    assert "SDXL_LORA_<NAME>" in message


def test_variables_still_set_what_tasks_alone_read(monkeypatch):
    monkeypatch.setenv("SDXL_LORA_BUCKET", "parsed-bucket")
    _variables(monkeypatch, {"sdxl_lora_bucket": "parsed-bucket", "sdxl_lora_role_arn": "arn:aws:iam::1:role/r",
                             "sdxl_lora_training_image": "acct.dkr.ecr/sdxl-lora-training:1"})
    settings = Settings.resolve()
    assert settings.bucket == "parsed-bucket" and settings.role_arn == "arn:aws:iam::1:role/r"
    assert settings.training_image == "acct.dkr.ecr/sdxl-lora-training:1"


def test_parse_time_fields_are_settings():
    assert set(PARSE_TIME) <= {field.name for field in dataclasses.fields(Settings)}


def test_the_preset_is_production_unless_the_environment_names_another(monkeypatch):
    monkeypatch.delenv("SDXL_LORA_PRESET", raising=False)
    assert Settings.from_environment().preset == "production"
    monkeypatch.setenv("SDXL_LORA_PRESET", "local")
    assert Settings.from_environment().preset == "local"
    monkeypatch.setenv("SDXL_LORA_PRESET", "prod")
    with pytest.raises(SettingsError, match="setting preset \\(SDXL_LORA_PRESET\\): expected one of production, "
                                            "local, got 'prod'"):
        Settings.from_environment()


def test_a_preset_variable_cannot_contradict_the_forms_the_dags_were_parsed_with(monkeypatch):
    monkeypatch.setenv("SDXL_LORA_PRESET", "local")
    _variables(monkeypatch, {"sdxl_lora_preset": "production"})
    with pytest.raises(SettingsError, match="sdxl_lora_preset='production' but the DAGs were parsed with 'local'"):
        Settings.resolve()
