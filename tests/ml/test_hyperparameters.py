import json
import logging

import pytest

from ml.hyperparameters import SPECS, HyperparameterError, parse, to_sagemaker


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("0.0002", 0.0002),
        ('"0.0002"', 0.0002),  # the SageMaker SDK JSON-encodes before SageMaker stringifies
        ("2e-4", 0.0002),
        (0.0002, 0.0002),  # a hand-written hyperparameters.json may hold numbers
    ],
)
def test_float_strings(raw, expected):
    assert parse({"learning_rate": raw}).learning_rate == pytest.approx(expected)


@pytest.mark.parametrize("raw", ["true", "True", "TRUE", '"true"', '"True"', "1", "yes", True])
def test_true_strings(raw):
    assert parse({"train_text_encoder": raw}).train_text_encoder is True


@pytest.mark.parametrize("raw", ["false", "False", '"false"', "0", "no", False])
def test_false_strings(raw):
    assert parse({"train_text_encoder": raw}).train_text_encoder is False


@pytest.mark.parametrize("raw, expected", [("1500", 1500), ('"1500"', 1500), ("1500.0", 1500), (1500, 1500)])
def test_int_strings(raw, expected):
    assert parse({"max_train_steps": raw}).max_train_steps == expected


@pytest.mark.parametrize("raw", ["None", "null", "", '"None"'])
def test_optional_values_accept_none(raw):
    assert parse({"max_train_steps": raw}).max_train_steps is None


@pytest.mark.parametrize("raw, expected", [("a storyboard frame", "a storyboard frame"),
                                           ('"a storyboard frame"', "a storyboard frame"),
                                           ('"\\"quoted\\" words"', '"quoted" words')])
def test_string_values_lose_only_their_json_quotes(raw, expected):
    assert parse({"validation_prompt": raw}).validation_prompt == expected


def test_enum_values_decode_like_strings():
    assert parse({"mixed_precision": '"bf16"', "lr_scheduler": "cosine"}).mixed_precision == "bf16"


def test_sagemaker_keys_are_ignored_silently(caplog):
    with caplog.at_level(logging.WARNING):
        hp = parse({"sagemaker_program": '"train.py"', "sagemaker_submit_directory": '"s3://x"'})
    assert "sagemaker_program" not in hp.as_dict()
    assert caplog.records == []


def test_unknown_keys_warn(caplog):
    with caplog.at_level(logging.WARNING):
        parse({"learning_rat": "0.1"})
    assert "learning_rat" in caplog.text


@pytest.mark.parametrize(
    "key, raw, words",
    [
        ("learning_rate", "fast", "learning_rate: expected a number"),
        ("learning_rate", "-1", "learning_rate: must be positive"),
        ("rank", "4.5", "rank: expected an integer"),
        ("rank", "0", "rank: must be at least 1"),
        ("train_text_encoder", "maybe", "train_text_encoder: expected true or false"),
        ("mixed_precision", "fp8", "mixed_precision: expected one of no, fp16, bf16"),
        ("resolution", "1000.5", "resolution: expected an integer"),
        ("resolution", "1001", "resolution: must be a multiple of 8"),
        ("validation_split", "1.0", "validation_split: must be in [0, 1)"),
        ("learning_rate", "nan", "learning_rate: expected a finite number"),
        ("rank", "None", "rank: a value is required"),
    ],
)
def test_bad_values_name_the_key(key, raw, words):
    with pytest.raises(HyperparameterError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse({key: raw})


def test_derived_defaults():
    hp = parse({"rank": "16", "learning_rate": "0.001"})
    assert hp.lora_alpha == 16
    assert hp.text_encoder_lr == 0.001
    assert parse({"rank": "16", "lora_alpha": "8"}).lora_alpha == 8


def test_original_system_hyperparameters_parse():
    original = {
        "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0", "resolution": 1024,
        "train_batch_size": 1, "learning_rate": 2e-4, "lr_scheduler": "constant", "num_train_epochs": 58,
        "checkpointing_steps": 500, "rank": 4, "train_text_encoder": True, "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True, "enable_xformers_memory_efficient_attention": True, "use_8bit_adam": True,
        "mixed_precision": "fp16",
    }
    as_sent_by_sdk = {key: json.dumps(value) for key, value in original.items()}
    hp = parse(as_sent_by_sdk)
    for key, value in original.items():
        assert hp.values[key] == value


def test_to_sagemaker_round_trips_every_default():
    defaults = {spec.name: spec.default for spec in SPECS}
    strings = to_sagemaker(defaults)
    assert all(isinstance(value, str) for value in strings.values())
    assert {k: v for k, v in parse(strings).as_dict().items() if k in defaults and defaults[k] is not None} == \
        {k: v for k, v in defaults.items() if v is not None}


def test_to_sagemaker_refuses_bad_values():
    with pytest.raises(HyperparameterError, match="unknown hyperparameters: rnak"):
        to_sagemaker({"rnak": 4})
    with pytest.raises(HyperparameterError, match="rank"):
        to_sagemaker({"rank": -1})
