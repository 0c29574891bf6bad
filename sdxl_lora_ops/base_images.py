"""The Hugging Face Deep Learning Containers each job image builds on, looked up per region.

The SageMaker Python SDK's `image_uris.retrieve` knows which ECR registry serves each region (most
use AWS's DLC account, some have their own). containers/*/Dockerfile take the base as a build
argument with no default; `containers/build_and_push.sh` builds on the URI of the target region.
"""

from __future__ import annotations

# The processing image captions with InstructBLIP, so it needs the GPU training stack too.
TRAINING_BASE = {"framework": "huggingface", "version": "5.3.0", "base_framework_version": "pytorch2.9.0",
                 "py_version": "py312", "image_scope": "training", "instance_type": "ml.g5.2xlarge"}
INFERENCE_BASE = {"framework": "huggingface", "version": "5.5.3", "base_framework_version": "pytorch2.6.0",
                  "py_version": "py312", "image_scope": "inference", "instance_type": "ml.g5.2xlarge"}
BASES: dict[str, dict[str, str]] = {
    "sdxl-lora-processing": TRAINING_BASE,
    "sdxl-lora-training": TRAINING_BASE,
    "sdxl-lora-inference": INFERENCE_BASE,
}


def retrieve(image: str, region: str) -> str:
    from sagemaker.core import image_uris

    if image not in BASES:
        raise ValueError(f"{image} is not one of this project's images ({', '.join(sorted(BASES))})")
    spec = dict(BASES[image])
    try:
        return image_uris.retrieve(spec.pop("framework"), region=region, **spec)
    except ValueError as error:
        raise ValueError(f"no {spec['image_scope']} base image for {image} in region {region!r}: {error}") from None


def retrieve_all(region: str) -> dict[str, str]:
    return {image: retrieve(image, region) for image in sorted(BASES)}
