"""The prepare DAG's arguments, inputs and change key."""

import pytest

from sdxl_lora import datasets
from sdxl_lora.settings import Settings

RAW = "s3://b/p/raw_dataset/v1/"
OBJECTS = [{"Key": "p/raw_dataset/v1/a.png", "ETag": '"e1"', "Size": 10},
           {"Key": "p/raw_dataset/v1/a.txt", "ETag": '"e2"', "Size": 3}]


def test_arguments_name_the_staged_models_and_every_option():
    settings = Settings(base_model_uri="s3://b/base/", captioner_uri="s3://b/captioner/")
    arguments = datasets.prepare_arguments(settings, {"resolution": 64, "min_size": 32, "recaption": True,
                                                      "latent_cache": True, "caption_prompt": "Describe it."},
                                           "v1", "key")
    flags = dict(zip(arguments, arguments[1:]))
    assert flags["--captioner"] == datasets.CAPTIONER_LOCAL and flags["--base-model"] == datasets.BASE_MODEL_LOCAL
    assert flags["--resolution"] == "64" and flags["--min-size"] == "32" and flags["--prompt"] == "Describe it."
    assert flags["--version"] == "v1" and flags["--input-key"] == "key"
    assert "--recaption" in arguments and "--latent-cache" in arguments
    without = datasets.prepare_arguments(Settings(), {}, "v1", "key")
    assert dict(zip(without, without[1:]))["--captioner"] == "Salesforce/instructblip-vicuna-7b"
    assert "--base-model" not in without and "--latent-cache" not in without
    with pytest.raises(ValueError, match="unknown prepare options: \\['resolutoin'\\]"):
        datasets.prepare_arguments(settings, {"resolutoin": 64}, "v1", "key")


def test_the_latent_cache_needs_a_staged_base_model():
    with pytest.raises(ValueError, match="base_model_uri"):
        datasets.prepare_inputs(Settings(), RAW, latent_cache=True)
    names = [n for n, _, _ in datasets.prepare_inputs(Settings(base_model_uri="s3://b/base/"), RAW, True)]
    assert names == ["raw", "base_model"]


def test_the_key_changes_with_content_options_and_image_but_not_instance_count():
    settings = Settings()
    key = datasets.input_key(settings, RAW, OBJECTS, {})
    assert key == datasets.input_key(settings, RAW, list(reversed(OBJECTS)), {"instance_count": 4})
    edited = [OBJECTS[0], {**OBJECTS[1], "ETag": '"e3"'}]
    assert datasets.input_key(settings, RAW, edited, {}) != key  # a caption was edited
    assert datasets.input_key(settings, RAW, OBJECTS[:1], {}) != key  # a file was removed
    assert datasets.input_key(settings, RAW, OBJECTS, {"resolution": 512}) != key
    assert datasets.input_key(Settings(processing_image="x:2"), RAW, OBJECTS, {}) != key
    # The same files under another version's prefix are the same content.
    moved = [{**o, "Key": o["Key"].replace("/v1/", "/v2/")} for o in OBJECTS]
    assert datasets.input_key(settings, "s3://b/p/raw_dataset/v2/", moved, {}) == key


@pytest.mark.parametrize("previous, force, run, words", [
    ("k1", False, False, "s3://b/p/proc_dataset/v1/ is prepared from these 3 files with these options already (key "
                         "k1): skipping; set force to prepare it again"),
    ("k0", False, True, "the inputs or options of version v1 changed since it was prepared: preparing it again"),
    (None, False, True, "version v1 has no preparation recorded: preparing its 3 files"),
    ("k1", True, True, "force is set: preparing version v1 (3 files) again"),
])
def test_a_version_is_prepared_again_only_when_forced_or_changed(previous, force, run, words):
    from sdxl_lora.datasets import preparation_needed

    assert preparation_needed("v1", "s3://b/p/proc_dataset/v1/", 3, "k1", previous, force) == (run, words)
