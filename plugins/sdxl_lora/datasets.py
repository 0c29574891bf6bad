"""The prepare DAG's library: the processing job's arguments and inputs, and the key that tells
whether a dataset version's inputs or settings changed since it was last prepared.

Pure functions over plain values (S3 listings, option dicts), so tests call them without Airflow.
"""

from __future__ import annotations

import hashlib
import json

from sdxl_lora.settings import Settings

RAW_LOCAL = "/opt/ml/processing/input/raw"
CAPTIONER_LOCAL = "/opt/ml/processing/input/captioner"
BASE_MODEL_LOCAL = "/opt/ml/processing/input/base_model"
DATASET_LOCAL = "/opt/ml/processing/output/dataset"
DEFAULT_CAPTIONER = "Salesforce/instructblip-vicuna-7b"  # used from the Hub when no captioner_uri is staged

# The prepare DAG's options, as Params and as `sdxl-lora prepare` flags. Defaults are the payload's.
OPTIONS = {
    "resolution": 1024, "min_size": 256, "min_images": 1, "recaption": False, "caption_prefix": "",
    "caption_prompt": "", "caption_batch_size": 8, "latent_cache": False, "instance_count": 1,
}


def prepare_inputs(settings: Settings, raw_uri: str, latent_cache: bool) -> list[tuple[str, str, str]]:
    """(name, S3 URI, local path) of the processing job's inputs: the raw images, the staged captioner,
    and the base model (its tokenizer counts long captions; its VAE fills the latent cache)."""
    inputs = [("raw", raw_uri, RAW_LOCAL)]
    if settings.captioner_uri:
        inputs.append(("captioner", settings.captioner_uri, CAPTIONER_LOCAL))
    if settings.base_model_uri:
        inputs.append(("base_model", settings.base_model_uri, BASE_MODEL_LOCAL))
    elif latent_cache:
        raise ValueError("latent_cache needs the base model staged in S3: set the base_model_uri setting")
    return inputs


def prepare_arguments(settings: Settings, options: dict, version: str, key: str) -> list[str]:
    """`sdxl-lora prepare` flags (ContainerArguments) for the DAG's options."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown prepare options: {sorted(unknown)}")
    values = {**OPTIONS, **options}
    arguments = [
        "--input", RAW_LOCAL, "--output", DATASET_LOCAL,
        "--captioner", CAPTIONER_LOCAL if settings.captioner_uri else DEFAULT_CAPTIONER,
        "--resolution", str(values["resolution"]), "--min-size", str(values["min_size"]),
        "--min-images", str(values["min_images"]), "--caption-batch-size", str(values["caption_batch_size"]),
        "--version", version, "--input-key", key,
    ]
    if values["caption_prefix"]:
        arguments += ["--caption-prefix", values["caption_prefix"]]
    if values["caption_prompt"]:
        arguments += ["--prompt", values["caption_prompt"]]
    if values["recaption"]:
        arguments.append("--recaption")
    if settings.base_model_uri:
        arguments += ["--base-model", BASE_MODEL_LOCAL]
    if values["latent_cache"]:
        arguments.append("--latent-cache")
    return arguments


def input_key(settings: Settings, raw_uri: str, objects: list[dict], options: dict) -> str:
    """A content key of one version's preparation: every raw object's name, ETag (S3's content hash) and
    size, the options, and what processes them (image, captioner, base model). Unchanged key: the
    version is prepared already."""
    prefix = raw_uri.split("/", 3)[3] if raw_uri.count("/") >= 3 else ""
    listing = sorted((o["Key"][len(prefix):], o["ETag"].strip('"'), o["Size"]) for o in objects)
    # The instance count is left out: a sharded run writes exactly what one instance does.
    settled = {k: v for k, v in {**OPTIONS, **options}.items() if k != "instance_count"}
    content = json.dumps({"objects": listing, "options": settled,
                          "image": settings.processing_image, "captioner": settings.captioner_uri,
                          "base_model": settings.base_model_uri}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:32]


def preparation_needed(version: str, location: str, files: int, key: str, previous_key: str | None,
                       force: bool = False) -> tuple[bool, str]:
    """(prepare?, why): a version is prepared again only when forced or when its inputs or options changed
    (its content key differs from the one its manifest recorded); a version never prepared is prepared.

    :param version: the dataset version.
    :param location: its processed dataset's s3:// prefix, for the reason.
    :param files: how many raw files it has, for the reason.
    :param key: the content key of these files and options (input_key).
    :param previous_key: the key its processed manifest recorded (None: never prepared, or no key recorded).
    :param force: the run's Param: prepare again whatever the keys.
    """
    if force:
        return True, f"force is set: preparing version {version} ({files} files) again"
    if previous_key is None:
        return True, f"version {version} has no preparation recorded: preparing its {files} files"
    if previous_key != key:
        return True, f"the inputs or options of version {version} changed since it was prepared: preparing it again"
    return False, (f"{location} is prepared from these {files} files with these options already (key {key}): "
                   "skipping; set force to prepare it again")
