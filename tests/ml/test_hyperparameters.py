import json
import logging

import jsonschema
import pytest

from ml.contract.hyperparameters import (
    PRESETS,
    PRODUCTION,
    SPEC_BY_NAME,
    SPECS,
    SWEPT,
    HyperparameterError,
    coerce,
    hyperparameters_schema,
    list_item_schema,
    parse,
    preset,
    to_sagemaker,
    value_schema,
)


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
        ("learning_rate", "-1", "learning_rate: must be in (0, 0.1]"),
        ("rank", "4.5", "rank: expected an integer"),
        ("rank", "0", "rank: must be in [1, 1024]"),
        ("train_batch_size", "0", "train_batch_size: must be at least 1"),
        ("train_text_encoder", "maybe", "train_text_encoder: expected true or false"),
        ("mixed_precision", "fp8", "mixed_precision: expected one of no, fp16, bf16"),
        ("resolution", "1000.5", "resolution: expected an integer"),
        ("resolution", "1001", "resolution: must be a multiple of 8, in [8, 4096]"),
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
    assert {k: v for k, v in PRODUCTION.items() if k != "validation_split"} == \
        {k: v for k, v in original.items() if k != "pretrained_model_name_or_path"}


# Airflow's Param validates with jsonschema.validate, which picks the newest draft for a schema without $schema.
FORM = jsonschema.validators.validator_for({})(hyperparameters_schema())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_passes_the_form_and_the_job(name):
    FORM.validate(preset(name))
    values = parse(to_sagemaker(preset(name))).as_dict()
    assert {key: values[key] for key in PRESETS[name]} == PRESETS[name]


def test_a_trial_trains_its_presets_configuration_minus_the_swept_keys():
    assert {"learning_rate", "rank"} <= set(PRODUCTION) and "max_train_steps" not in PRODUCTION  # epochs instead
    for name in PRESETS:
        assert preset(name, exclude=SWEPT) == {key: value for key, value in PRESETS[name].items() if key not in SWEPT}
    assert {"train_text_encoder", "use_8bit_adam", "enable_xformers_memory_efficient_attention"} <= \
        set(preset("production", exclude=SWEPT))
    with pytest.raises(HyperparameterError, match="unknown hyperparameters: learning_rat"):
        preset("production", exclude=("learning_rat",))


def test_the_local_preset_runs_on_a_cpu_and_reports_val_loss():
    """What the local stack's CPU jobs refuse or cannot afford is off: mixed precision, 8-bit Adam (CUDA only),
    xformers, 1024 pixels, epochs of steps; a held-out share makes every run report val_loss."""
    local = parse(to_sagemaker(preset("local"))).as_dict()
    assert local["mixed_precision"] == "no" and not local["use_8bit_adam"]
    assert not local["enable_xformers_memory_efficient_attention"] and not local["gradient_checkpointing"]
    assert local["resolution"] <= 64 and local["max_train_steps"] <= 50 and local["validation_split"] > 0


def test_preset_returns_a_copy_and_names_unknown_presets():
    preset("production")["rank"] = 64
    assert PRESETS["production"]["rank"] == 4
    with pytest.raises(HyperparameterError, match="unknown preset 'prod'; presets: production, local"):
        preset("prod")


# JSON values as the trigger form sends them. Good: the form accepts them and the job reads the same value
# from their SageMaker string form. Bad: the form refuses them and so does the job.
GOOD = [
    ("resolution", 8), ("resolution", 1024), ("resolution", 4096), ("resolution", 1024.0),
    ("learning_rate", 1e-6), ("learning_rate", 0.1), ("learning_rate", 1e-3), ("text_encoder_lr", None),
    ("rank", 1), ("rank", 1024), ("max_train_steps", None), ("max_train_steps", 100000),
    ("validation_split", 0), ("validation_split", 0.99), ("mixed_precision", "bf16"), ("lr_scheduler", "cosine"),
    ("train_text_encoder", True), ("use_8bit_adam", False), ("snr_gamma", 5.0), ("noise_offset", 0),
    ("validation_prompt", "a storyboard frame"), ("validation_prompt", None), ("seed", -3), ("lora_alpha", 8),
    ("num_validation_images", 0), ("pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0"),
]
BAD = [
    ("resolution", 1001), ("resolution", 0), ("resolution", 4104), ("resolution", 1024.5), ("resolution", True),
    ("resolution", None), ("learning_rate", 0), ("learning_rate", -1e-4), ("learning_rate", 0.2),
    ("learning_rate", "fast"), ("text_encoder_lr", 0), ("rank", 0), ("rank", 1025), ("rank", 4.5),
    ("max_train_steps", 0), ("max_train_steps", 100001), ("validation_split", 1), ("validation_split", -0.1),
    ("mixed_precision", "fp8"), ("lr_scheduler", "exponential"), ("train_text_encoder", "maybe"),
    ("train_batch_size", 0), ("gradient_accumulation_steps", 0), ("max_grad_norm", 0), ("snr_gamma", 0),
    ("noise_offset", -0.1), ("lora_alpha", 0), ("num_validation_inference_steps", 0), ("logging_steps", 0),
    ("lr_warmup_steps", -1), ("checkpointing_steps", 0), ("pretrained_model_name_or_path", ""),
    ("caption_column", None),
]


@pytest.mark.parametrize("key, value", GOOD)
def test_form_and_job_accept_the_same_good_values(key, value):
    FORM.validate({key: value})
    if value is None:  # unset: the default, or what it derives from (text_encoder_lr: learning_rate)
        expected = parse({}).values[key]
    else:
        expected = float(value) if SPEC_BY_NAME[key].kind is float else value
    assert parse(to_sagemaker({key: value})).values[key] == expected


@pytest.mark.parametrize("key, value", BAD)
def test_form_and_job_refuse_the_same_bad_values(key, value):
    assert not FORM.is_valid({key: value})
    with pytest.raises(HyperparameterError, match=key):
        parse({key: value})
    with pytest.raises(HyperparameterError, match=key):
        to_sagemaker({key: value})


def test_every_default_passes_the_form_and_unknown_keys_do_not():
    FORM.validate({spec.name: spec.default for spec in SPECS})
    assert not FORM.is_valid({"learning_rat": 1e-4})


def test_grid_items_take_their_bounds_from_the_table():
    assert value_schema("rank") == {"type": "integer", "minimum": 1, "maximum": 1024}
    assert value_schema("learning_rate") == {"type": "number", "exclusiveMinimum": 0, "maximum": 0.1}
    with pytest.raises(HyperparameterError, match="unknown hyperparameter: rnak"):
        value_schema("rnak")


def test_a_schema_can_leave_out_the_swept_keys():
    schema = hyperparameters_schema(exclude=SWEPT)
    assert not set(SWEPT) & set(schema["properties"])
    assert not jsonschema.validators.validator_for({})(schema).is_valid({"rank": 4})


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


# A list Param's items (the grid's lists, the tuning ranks) as the API sends them (numbers) and as the trigger
# form's one-value-per-line box sends them (text). The form (jsonschema, at trigger time) and the DAG's first task
# (coerce, as the job reads a value) must agree: what both accept is the number the job trains with; numbers out of
# bounds are refused by the form already, text out of bounds by coerce (JSON schema cannot bound a string's number).
LISTED = ("learning_rate", "max_train_steps", "rank")
ITEM = {name: jsonschema.validators.validator_for({})(list_item_schema(name)) for name in LISTED}
GOOD_ITEMS = [("learning_rate", 1e-6, ("1e-6", "0.000001", " 1E-06 ", "+1e-6")), ("learning_rate", 0.1, ("0.1", ".1")),
              ("max_train_steps", 1, ("1", " 1")), ("max_train_steps", 100000, ("100000",)),
              ("rank", 4, ("4", "4 ", "004")), ("rank", 1024, ("1024",))]
BAD_NUMBERS = [("learning_rate", 0), ("learning_rate", 0.2), ("learning_rate", -1e-4), ("max_train_steps", 0),
               ("max_train_steps", 100001), ("rank", 0), ("rank", 1025), ("rank", 4.5), ("rank", True)]
BAD_TEXT = [("learning_rate", "0.2"), ("learning_rate", "0"), ("learning_rate", "-1e-4"), ("learning_rate", "abc"),
            ("learning_rate", "1,5"), ("learning_rate", "1e-4e"), ("learning_rate", "nan"), ("learning_rate", "inf"),
            ("max_train_steps", "0"), ("max_train_steps", "100001"), ("rank", "1025"),
            ("rank", "4.5"), ("rank", "four"), ("rank", "1 2")]


@pytest.mark.parametrize("name, number, texts", GOOD_ITEMS)
def test_list_items_are_numbers_or_their_text_and_read_as_the_job_reads_them(name, number, texts):
    ITEM[name].validate(number)
    assert coerce(name, number) == number
    for text in texts:
        ITEM[name].validate(text)
        value = coerce(name, text)
        assert value == number and type(value) is SPEC_BY_NAME[name].kind, text
        assert parse(to_sagemaker({name: value})).values[name] == number  # and the job trains with it


@pytest.mark.parametrize("name, value", BAD_NUMBERS)
def test_list_items_refuse_numbers_the_job_refuses_at_trigger_time(name, value):
    assert not ITEM[name].is_valid(value)
    with pytest.raises(HyperparameterError, match=name):
        coerce(name, value)


@pytest.mark.parametrize("name, text", BAD_TEXT)
def test_text_items_the_job_refuses_are_refused_by_the_form_or_by_coerce(name, text):
    with pytest.raises(HyperparameterError, match=name) as refused:
        coerce(name, text)
    assert refused.value.reason and name not in refused.value.reason  # the reason alone, for the Param's message
    if not any(c.isalpha() and c not in "eE" for c in text) and "," not in text:
        return  # digits and signs: the form's pattern lets them through, coerce bounds them
    assert not ITEM[name].is_valid(text), text  # letters, commas: refused at trigger time already


def test_list_items_render_as_a_one_value_per_line_box_and_say_what_they_take():
    # Airflow 3's trigger form (ui/dist: the field for an array) shows a text box, one value per line, when the
    # items have no "type" or "string", a JSON editor otherwise; enum or examples would make it a multi-select.
    for name in LISTED:
        schema = list_item_schema(name)
        assert "type" not in schema and "enum" not in schema and "examples" not in schema
        assert schema["title"] == name and SPEC_BY_NAME[name].words() in schema["description"]
    assert list_item_schema("rank")["pattern"] == "^[0-9 ]*$"  # short: the HTTP 400 quotes it
    assert SPEC_BY_NAME["learning_rate"].words() == "a number in (0, 0.1]"
    assert SPEC_BY_NAME["rank"].words() == "an integer in [1, 1024]"
    assert ITEM["rank"].is_valid("")  # a blank line from the form; the DAG's first task drops it
    assert not ITEM["rank"].is_valid(None) and not ITEM["max_train_steps"].is_valid("none")  # never "unset"
    with pytest.raises(HyperparameterError, match="only numeric hyperparameters"):
        list_item_schema("mixed_precision")
    with pytest.raises(HyperparameterError, match="unknown hyperparameter: rnak"):
        coerce("rnak", 4)


def test_a_refusal_keeps_its_reason_apart_from_the_key():
    with pytest.raises(HyperparameterError) as refused:
        coerce("learning_rate", "0.5")
    assert str(refused.value) == "learning_rate: must be in (0, 0.1], got '0.5'"
    assert refused.value.reason == "must be in (0, 0.1]"
