"""
### SDXL dataset preparation

Turns raw images at `raw_dataset/<version>/` into a training dataset at `proc_dataset/<version>/`
with a SageMaker Processing job running `sdxl-lora prepare`: every file checked (each rejected one
reported with its reason), uncaptioned images captioned by InstructBLIP, each image fitted to its
SDXL aspect-ratio bucket, optionally the VAE latents cached. The result is an imagefolder with
metadata.jsonl and `manifest.json`, whose summary this DAG prints in the `publish` task's log.

`version` defaults to the run's logical date (`YYYY-MM-DD`), so a backfill over dates prepares one
version per date. The schedule is daily: after each day, that day's raw version is prepared when one
landed; a scheduled or backfill run whose date has no raw files is skipped, saying so in its log.
A version is skipped when its raw files (their S3 ETags) and the options are unchanged since it was
last prepared; `force` prepares it again. With `instance_count` above 1 the instances share
the captioning and `publish` merges their parts into one manifest. The processed dataset is an
outlet Asset (its event names the version), so `sdxl_lora_train` can run when a new version lands.
"""

from __future__ import annotations

import json
import logging

from airflow.sdk import CronDataIntervalTimetable, Param, chain, dag, task

from ml.contract.container import split_s3_uri
from sdxl_lora.assets import processed_dataset
from sdxl_lora.dag_common import dag_arguments, job_kwargs, run_date, version_param
from sdxl_lora.datasets import OPTIONS
from sdxl_lora.operators.jobs import ResumableSageMakerProcessingOperator
from sdxl_lora.presets import active
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_dataset_prepare"
SETTINGS = Settings.from_environment()
PROCESSED_DATASET = processed_dataset(SETTINGS)
PRESET = active(SETTINGS)
DEFAULTS = PRESET.prepare_options()
log = logging.getLogger(__name__)


def _option(name: str, description: str, **schema) -> Param:
    """A prepare option's Param: the preset's default where it sets one (the description says so), else the
    payload's."""
    return Param(DEFAULTS[name], description=PRESET.describe(description) if name in PRESET.prepare else description,
                 **schema)


@dag(
    **dag_arguments(DAG_ID, __doc__, "data"),
    # After each day, that day's version (logical date = the day): what a backfill over dates prepares.
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    params={
        "version": version_param("Dataset version (raw_dataset/<version>/); empty: the run's logical date."),
        "force": Param(False, type="boolean", description="Prepare again even when inputs and options are unchanged."),
        "resolution": _option("resolution", "Bucket scale: SDXL's 1024-pixel aspect-ratio buckets scaled to this. "
                                            "Use the training resolution, so the latent cache matches.",
                              type="integer", minimum=32, maximum=4096, multipleOf=8),
        "min_size": _option("min_size", "Reject images whose short side is smaller (pixels).",
                            type="integer", minimum=0, maximum=4096),
        "min_images": _option("min_images", "Fail when fewer usable images remain.", type="integer", minimum=1),
        "recaption": _option("recaption", "Caption every image with InstructBLIP, ignoring sidecar and metadata "
                                          "captions.", type="boolean"),
        "caption_prefix": _option("caption_prefix", "Prepended to every caption, e.g. a trigger word.",
                                  type="string", maxLength=100),
        "caption_prompt": _option("caption_prompt", "InstructBLIP's instruction; empty: composition, style and "
                                                    "narrative.", type="string", maxLength=1000),
        "caption_batch_size": _option("caption_batch_size", "Images per InstructBLIP generate() call.",
                                      type="integer", minimum=1, maximum=64),
        "latent_cache": _option("latent_cache", "Store each image's VAE latents with the dataset (needs "
                                                "base_model_uri).", type="boolean"),
        "instance_count": _option("instance_count", "Processing instances sharing the captioning.",
                                  type="integer", minimum=1, maximum=20),
    },
)
def sdxl_dataset_prepare():
    @task
    def plan(**context) -> dict:
        """The version, its options and their content key; whether it must be prepared (datasets.preparation_needed)."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from sdxl_lora import assets, datasets

        settings = Settings.resolve()
        params = context["params"]
        version = params["version"] or run_date(context)
        options = {name: params[name] for name in OPTIONS}
        raw = settings.raw_dataset(version)
        s3 = S3Hook(aws_conn_id=settings.aws_conn_id).get_conn()
        bucket, prefix = split_s3_uri(raw)
        objects = [o for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                   for o in page.get("Contents", [])]
        assets.require_raw_files(version, context["dag_run"].run_type, raw, len(objects))
        key = datasets.input_key(settings, raw, objects, options)
        previous = None
        bucket, manifest_key = split_s3_uri(settings.processed_dataset(version) + "manifest.json")
        try:
            previous = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()).get("input_key")
        except s3.exceptions.NoSuchKey:
            pass
        run, why = datasets.preparation_needed(version, settings.processed_dataset(version), len(objects), key,
                                               previous, params["force"])
        log.info("%s", why)
        return {"version": version, "key": key, "options": options, "run": run, "files": len(objects)}

    @task.short_circuit
    def changed(planned: dict) -> bool:
        return planned["run"]

    @task
    def build_request(planned: dict, **context) -> dict:
        """The processing job's request; what an earlier preparation of this version left is removed
        first, so the version holds one preparation's files and parts only."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from sdxl_lora import datasets, naming, sagemaker_requests

        settings = Settings.resolve()
        run_id, version, options = context["run_id"], planned["version"], planned["options"]
        s3 = S3Hook(aws_conn_id=settings.aws_conn_id)
        bucket, prefix = split_s3_uri(settings.processed_dataset(version))
        stale = s3.list_keys(bucket_name=bucket, prefix=prefix)
        if stale:
            log.info("removing %d files of the earlier preparation of version %s", len(stale), version)
            s3.delete_objects(bucket, stale)
        name = naming.job_name("sdxl-lora-prepare", run_id, naming.slug(version))
        inputs = datasets.prepare_inputs(settings, settings.raw_dataset(version), options["latent_cache"])
        arguments = datasets.prepare_arguments(settings, {k: v for k, v in options.items() if k != "instance_count"},
                                               version, planned["key"])
        return sagemaker_requests.processing_request(settings, name, inputs, settings.processed_dataset(version),
                                           sagemaker_requests.tags(dag=DAG_ID, run=run_id, version=version), arguments,
                                           instance_count=options["instance_count"])

    @task(outlets=[PROCESSED_DATASET])
    def publish(planned: dict, outlet_events=None) -> dict:
        """Merge the instances' parts (several instances) and print the manifest's summary."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from ml.contract import manifest

        settings = Settings.resolve()
        s3 = S3Hook(aws_conn_id=settings.aws_conn_id)
        bucket, prefix = split_s3_uri(settings.processed_dataset(planned["version"]))
        if planned["options"]["instance_count"] > 1:
            keys = s3.list_keys(bucket_name=bucket, prefix=prefix + manifest.PARTS + "/")
            rows, merged = manifest.merge([json.loads(s3.read_key(key, bucket_name=bucket)) for key in keys])
            s3.load_string(manifest.metadata_text(rows), prefix + manifest.METADATA, bucket, replace=True)
            s3.load_string(json.dumps(merged, indent=2) + "\n", prefix + manifest.MANIFEST, bucket, replace=True)
        merged = json.loads(s3.read_key(prefix + manifest.MANIFEST, bucket_name=bucket))
        log.info("manifest s3://%s/%s%s\n%s", bucket, prefix, manifest.MANIFEST, manifest.summary(merged))
        outlet_events[PROCESSED_DATASET].extra = {"version": planned["version"]}
        return merged["counts"]

    planned = plan()
    request = build_request(planned)
    # The job's name is per run and version: a retry finds the job its first try started (no second job).
    prepare = ResumableSageMakerProcessingOperator(task_id="prepare", config=request, **job_kwargs(SETTINGS))
    chain(planned, changed(planned), request, prepare, publish(planned))


sdxl_dataset_prepare()
