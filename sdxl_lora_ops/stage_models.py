"""`sdxl-lora-ops stage-models`: the SDXL base model and the InstructBLIP captioner into S3, checked first.

The base model goes to `<prefix>/base_model/` (the setting base_model_uri: the training jobs' base_model
channel, prepare's --base-model, the endpoints' BASE_MODEL), the captioner to `<prefix>/captioner/`
(captioner_uri: prepare's captioner input), on the target of sdxl_lora_ops/target.py: the running local
stack of `make airflow` or `make demo`, else S3 on AWS. A fixed VAE (--vae, e.g. madebyollin/sdxl-vae-fp16-fix)
is staged as the base model's `vae/`, in place of its own: every job and endpoint reads the VAE from there,
so no other setting changes.

In this order: the target's bucket is reached (before a download of gigabytes); each model's files are chosen
and, from the Hub, fetched (sdxl_lora_ops/model_sources.py); each is loaded as the jobs load it
(sdxl_lora_ops/model_checks.py). Only when every model passes is anything written. Each prefix then becomes
exactly the staged files: an object of the same size and sha256 (recorded in its metadata when it was
uploaded; ETags are not content hashes under SSE-KMS or multipart uploads) is left as it is, the others are
uploaded, and objects that are not part of the model are deleted, since a file of an earlier layout (the
full-precision weights, after a stage with --variant fp16) would be loaded in place of the new one.
At the end it prints the settings that point the jobs at what it staged.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from sdxl_lora_ops import model_checks, model_sources
from sdxl_lora_ops import target as targets

BASE_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"  # the training default (ml/contract/hyperparameters.py)
CAPTIONER_ID = "Salesforce/instructblip-vicuna-7b"  # prepare's default (plugins/sdxl_lora/datasets.py)
FOLDERS = {"base model": "base_model", "captioner": "captioner"}  # under the settings' prefix
SETTINGS = {"base_model": "SDXL_LORA_BASE_MODEL_URI", "captioner": "SDXL_LORA_CAPTIONER_URI"}
BASE_MODEL_ID_SETTING = "SDXL_LORA_BASE_MODEL_ID"
SHA256, STAGED_BY = "sha256", "staged-by"  # the objects' user metadata
STAGED_BY_VALUE = "sdxl-lora-ops stage-models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def human(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def existing_sizes(s3, bucket: str, prefix: str) -> dict[str, int]:
    sizes = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        sizes.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return sizes


def is_staged(s3, bucket: str, prefix: str) -> bool:
    """Whether `prefix` holds a model this command staged (its objects carry its metadata)."""
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", MaxKeys=1).get("Contents", [])
    return bool(listed) and s3.head_object(Bucket=bucket, Key=listed[0]["Key"]).get("Metadata", {}).get(
        STAGED_BY) == STAGED_BY_VALUE


def sync(target: targets.Target, folder: str, files: dict[str, Path], out) -> dict:
    """Make `<prefix>/<folder>/` exactly `files`: unchanged objects kept, the others uploaded, the rest deleted."""
    prefix = target.key(folder) + "/"
    existing = existing_sizes(target.s3, target.bucket, prefix)
    uploaded, unchanged = [], []
    for name in sorted(files):
        path, key = files[name], prefix + name
        size, digest = path.stat().st_size, sha256_of(path)
        if existing.get(key) == size and target.s3.head_object(Bucket=target.bucket, Key=key).get(
                "Metadata", {}).get(SHA256) == digest:
            unchanged.append(name)
            continue
        print(f"  uploading {name} ({human(size)})", file=out, flush=True)
        target.s3.upload_file(str(path), target.bucket, key,
                              ExtraArgs={"Metadata": {SHA256: digest, STAGED_BY: STAGED_BY_VALUE}})
        uploaded.append(name)
    stale = sorted(set(existing) - {prefix + name for name in files})
    for start in range(0, len(stale), 1000):
        target.s3.delete_objects(Bucket=target.bucket, Delete={
            "Objects": [{"Key": key} for key in stale[start:start + 1000]], "Quiet": True})
    return {"uri": f"s3://{target.bucket}/{prefix}", "uploaded": uploaded, "unchanged": unchanged,
            "deleted": [key[len(prefix):] for key in stale]}


def plan(base_model: str | None, captioner: str | None, vae: str | None, variant: str | None) -> list[tuple]:
    """(what, folder, chosen files, check) of each model to stage; fetches from the Hub what comes from there."""
    plans = []
    if base_model:
        chosen = model_sources.resolve(base_model, model_sources.PIPELINE, variant, "base model")
        if vae:
            chosen = model_sources.with_vae(chosen, model_sources.resolve(vae, model_sources.MODEL, variant, "vae"))
        plans.append(("base model", FOLDERS["base model"], chosen, model_checks.check_base_model))
    if captioner:
        chosen = model_sources.resolve(captioner, model_sources.MODEL, variant, "captioner")
        plans.append(("captioner", FOLDERS["captioner"], chosen, model_checks.check_captioner))
    return plans


def stage(target: targets.Target, base_model: str | None, captioner: str | None, vae: str | None = None,
          variant: str | None = None, out=None) -> dict:
    """Choose, fetch and check every model, then upload them; returns each folder's sync() result and, for the
    base model, its Hub id (None from a directory). Raises SourceError or CheckError before any upload."""
    out = out or sys.stdout
    plans = plan(base_model, captioner, vae, variant)
    with tempfile.TemporaryDirectory(prefix="stage-models-") as scratch:
        for what, folder, chosen, check in plans:
            print(f"{what}: {len(chosen.files)} files, {human(chosen.size())}, from {chosen.description}",
                  file=out, flush=True)
            for note in chosen.notes:
                print(f"  {note}", file=out)
            laid_out = model_checks.view(chosen.files, Path(scratch) / folder)
            try:
                checked = check(laid_out)
            except model_checks.CheckError as error:  # name the files as staged, not as linked in the scratch folder
                text = str(error)
                for place in {str(laid_out.resolve()), str(laid_out)}:
                    text = text.replace(place + "/", "")
                raise model_checks.CheckError(f"{text} (from {chosen.description})") from None
            for line in checked:
                print(f"  checked: {line}", file=out, flush=True)
    results = {}
    for what, folder, chosen, _ in plans:
        print(f"{what}: to s3://{target.bucket}/{target.key(folder)}/ on {target.where}", file=out, flush=True)
        done = results[folder] = sync(target, folder, chosen.files, out)
        print(f"{what}: {len(done['uploaded'])} uploaded, {len(done['unchanged'])} unchanged (same size and "
              f"sha256), {len(done['deleted'])} deleted (not part of it)", file=out, flush=True)
        if folder == FOLDERS["base model"]:
            done["hub_id"] = chosen.hub_id
    return results


def settings_lines(results: dict) -> list[str]:
    """The settings (plugins/sdxl_lora/settings.py) that point the jobs at what was staged."""
    lines = []
    for folder, name in SETTINGS.items():
        if folder in results:
            lines.append(f"export {name}={results[folder]['uri']}")
            if folder == FOLDERS["base model"]:
                hub_id = results[folder].get("hub_id")
                lines.append(f"export {BASE_MODEL_ID_SETTING}={hub_id}" if hub_id else
                             f"# {BASE_MODEL_ID_SETTING}=<the Hub id the folder came from, if any: the trained "
                             "LoRA's model card names it as its base_model>")
    return lines


def _source(value: str | None, default: str) -> str | None:
    return None if value == "none" else (value or default)


def main(args) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    base_model, captioner = _source(args.base_model, BASE_MODEL_ID), _source(args.captioner, CAPTIONER_ID)
    try:
        if not base_model and not captioner:
            raise model_sources.SourceError("--base-model none and --captioner none: nothing to stage")
        if args.vae and not base_model:
            raise model_sources.SourceError("--vae is staged as the base model's vae/: give --base-model too")
        target = targets.resolve(args.workdir, args.aws)
        try:  # before any download: a missing bucket or credentials are found in a second, not after gigabytes
            target.s3.list_objects_v2(Bucket=target.bucket, Prefix=target.key(FOLDERS["base model"]) + "/", MaxKeys=1)
        except (BotoCoreError, ClientError) as error:
            raise targets.TargetError(f"s3://{target.bucket}/{target.key()} on {target.where} cannot be listed "
                                      f"({error}): create the bucket (docs/aws.md, step 1), set SDXL_LORA_BUCKET and "
                                      "SDXL_LORA_PREFIX, or use credentials that may list it") from None
        results = stage(target, base_model, captioner, args.vae, args.variant)
    except (model_sources.SourceError, model_checks.CheckError, targets.TargetError) as error:
        print(f"stage-models: {error}. Nothing was uploaded.", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as error:
        print(f"stage-models: S3 refused: {error}. Run it again: what was uploaded is kept and skipped.",
              file=sys.stderr)
        return 1
    print("\nStaged. The settings that point the jobs at it (in the environment of every Airflow component, or as "
          "Airflow Variables sdxl_lora_<name>):")
    for line in settings_lines(results):
        print(line)
    if target.local:
        print("The Airflow of `make airflow` and `make demo` reads <prefix>/base_model/ and <prefix>/captioner/ "
              "of its stack already: its next task uses what was staged.")
    return 0
