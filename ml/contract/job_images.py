"""Which `sdxl-lora` verb each job image runs: the one registry of image names.

SageMaker runs `docker run IMAGE train` for training and `docker run IMAGE serve` for
endpoints, and processing jobs name their entrypoint. The Dockerfiles and the local
stack both follow this table, keyed by the image's repository name. Pure Python.
"""

from __future__ import annotations

IMAGE_VERBS: dict[str, str] = {
    "sdxl-lora-processing": "prepare",
    "sdxl-lora-training": "train",
    "sdxl-lora-inference": "serve",
}


def repository(image_uri: str) -> str:
    """'123456789012.dkr.ecr.us-east-1.amazonaws.com/team/sdxl-lora-training:1.2' -> 'sdxl-lora-training'."""
    last = image_uri.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[0]


def verb_for(image_uri: str) -> str:
    """The subcommand an image runs; a clear error for an image this project does not build."""
    name = repository(image_uri)
    try:
        return IMAGE_VERBS[name]
    except KeyError:
        known = ", ".join(sorted(IMAGE_VERBS))
        raise ValueError(f"image {image_uri} is not one of this project's images ({known})") from None
