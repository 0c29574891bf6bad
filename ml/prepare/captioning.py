"""Captions for uncaptioned images with InstructBLIP, in batches, as the original system wrote them.

The original system captioned storyboard frames with Salesforce/instructblip-vicuna-7b on
transformers 4.32 with max_length 512, min_length 81, beam sampling (5 beams, temperature 1.0,
top_p 0.9), repetition_penalty 1.5 and length_penalty 1.0. Locally, `sdxl-lora tiny-captioner`
writes a tiny random InstructBLIP that this module loads and runs the same way.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ml.contract.container import JobError
from ml.contract.model_files import load_options

DEFAULT_MODEL = "Salesforce/instructblip-vicuna-7b"
DEFAULT_PROMPT = (
    "Describe this storyboard frame in detail: its composition (framing, camera angle, the placement of "
    "characters and objects), its visual style (medium, lighting, color, mood) and its narrative elements "
    "(who is in the scene, what is happening and what the moment means in the story)."
)


@dataclass(frozen=True)
class CaptionSettings:
    """How captions are generated; the defaults are the original system's.

    `max_length` and `min_length` count generated tokens only, the caption's own tokens, as they did
    for the original system: on transformers 4.32 InstructBLIP generated from input embeddings alone,
    so generate's max_length/min_length saw only new tokens. transformers 5 passes the query-token
    placeholders and the prompt's tokens to the language model's generate as input_ids, so there its
    max_length/min_length would also count those (32 query tokens plus the prompt for the 7B model),
    and min_length 81 would force far fewer than 81 caption tokens. The Captioner therefore passes
    them as max_new_tokens/min_new_tokens. (One difference remains: transformers 5's
    repetition_penalty also sees the prompt's tokens, which 4.32's did not.)

    `seed` seeds each batch from (seed, batch index), so a run's captions depend on the seed, the
    batch size and the images, not on what was captioned before.
    """

    prompt: str = DEFAULT_PROMPT
    max_length: int = 512
    min_length: int = 81
    do_sample: bool = True
    num_beams: int = 5
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.5
    length_penalty: float = 1.0
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise JobError naming the first setting that is out of range or of the wrong type."""
        def bad(field: str, why: str):
            raise JobError(f"caption setting {field}={getattr(self, field)!r} is invalid: {why}")

        for field in fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                bad(field.name, "must be an integer")
            if field.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                   or not math.isfinite(value)):
                bad(field.name, "must be a finite number")
            if field.type in ("bool", bool) and not isinstance(value, bool):
                bad(field.name, "must be true or false")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            bad("prompt", "must be a non-empty string")
        if self.max_length < 1:
            bad("max_length", "must be at least 1")
        if self.min_length < 0:
            bad("min_length", "must be 0 or more")
        if self.min_length > self.max_length:
            bad("min_length", f"must not exceed max_length ({self.max_length})")
        if self.num_beams < 1:
            bad("num_beams", "must be at least 1")
        if self.temperature <= 0:
            bad("temperature", "must be greater than 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be greater than 0 (1.0 means no penalty)")
        if self.batch_size < 1:
            bad("batch_size", "must be at least 1")
        if not 0 <= self.seed < 2**63:
            bad("seed", "must be in [0, 2**63)")

    def generate_kwargs(self) -> dict:
        """The keyword arguments for InstructBlipForConditionalGeneration.generate."""
        kwargs = {"max_new_tokens": self.max_length, "min_new_tokens": self.min_length, "do_sample": self.do_sample,
                  "num_beams": self.num_beams, "repetition_penalty": self.repetition_penalty}
        if self.do_sample:  # only sampling reads these; passing them otherwise makes generate warn
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if self.num_beams > 1:  # likewise, only beam search reads it
            kwargs["length_penalty"] = self.length_penalty
        return kwargs


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _batch_seed(seed: int, batch_index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Captioner:
    """InstructBLIP loaded once; `caption(images)` writes one caption per image."""

    def __init__(self, model: str | Path, settings: CaptionSettings = CaptionSettings(), device: str | None = None):
        import torch
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        if not isinstance(settings, CaptionSettings):
            raise JobError(f"caption settings must be a CaptionSettings, not {type(settings).__name__}")
        settings.validate()
        self.settings = settings
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as error:
            raise JobError(f"captioning device {device!r} is invalid: {_first_line(error)}") from None
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model_name = str(model)
        try:
            self.processor = InstructBlipProcessor.from_pretrained(self.model_name)
            self.model = InstructBlipForConditionalGeneration.from_pretrained(self.model_name, dtype=self.dtype,
                                                                              **load_options(self.model_name))
        except Exception as error:  # OSError, ValueError, KeyError...: any of them means "cannot use this model"
            raise JobError(f"captioning model {self.model_name!r} could not be loaded: {_first_line(error)}") \
                from error
        self.model.to(self.device).eval()
        limit = self.model.config.qformer_config.max_position_embeddings
        prompt_tokens = len(self.processor.qformer_tokenizer(settings.prompt).input_ids)
        if prompt_tokens > limit:
            raise JobError(f"caption setting prompt is {prompt_tokens} Q-Former tokens long; "
                           f"{self.model_name} takes at most {limit}")

    def caption(self, images: list, first_batch: int = 0) -> list[str]:
        """One caption per PIL RGB image, in order; "" where the model wrote nothing.

        Images go through generate() settings.batch_size at a time, the prompt repeated for each.
        Captions are stripped and collapsed to one line. Batch k is seeded as batch first_batch + k, so
        a caller captioning a larger sequence in pieces gets what one call would give.
        """
        from PIL import Image

        images = list(images)
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise JobError(f"image {index} to caption is a {type(image).__name__}, not a PIL image")
            if image.mode != "RGB":
                raise JobError(f"image {index} to caption is in mode {image.mode}, expected RGB")
        size = self.settings.batch_size
        captions: list[str] = []
        for batch_index, start in enumerate(range(0, len(images), size)):
            captions.extend(self._caption_batch(images[start:start + size], first_batch + batch_index))
        return captions

    def _caption_batch(self, images: list, batch_index: int) -> list[str]:
        import torch

        inputs = self.processor(images=images, text=[self.settings.prompt] * len(images), return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), torch.inference_mode():
            torch.manual_seed(_batch_seed(self.settings.seed, batch_index))
            output = self.model.generate(**inputs, **self.settings.generate_kwargs())
        # transformers 5 returns the prompt (query placeholders and prompt tokens) before the new tokens.
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]
