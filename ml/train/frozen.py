"""The frozen encoders' cache: what the VAE and frozen text encoders compute once per image.

Latents come from the prepare job's cache when it was made with this VAE at this bucket, else
the VAE encodes the image here (both mirror images with random_flip); frozen text encoders encode
every caption once. The loop then samples latents and reads conditioning from this cache.

With caption_dropout or shuffle_caption a training caption changes from epoch to epoch
(CaptionVariants): dropout alone keeps the cache and adds the empty caption's embedding (or token
ids, when the text encoders train); shuffling makes new captions every epoch, so they are tokenized,
and encoded by the frozen text encoders, which then stay loaded, at every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ml.contract.hyperparameters import Hyperparameters
from ml.dataset import captions as captions_module
from ml.dataset import latents as latents_module
from ml.dataset.buckets import bucket_sizes, nearest_bucket
from ml.dataset.imagefolder import Example, flipped, preprocess, preprocess_bucketed
from ml.train.interruption import StopFlag
from ml.train.seeds import CAPTION, CROP, generator

log = logging.getLogger(__name__)


@dataclass
class Frozen:
    """Per-image tensors computed once with the frozen VAE (and frozen text encoders)."""

    latent_mean: list[torch.Tensor]  # per image [flips, 4, h, w] (h, w: its bucket), times the VAE's scaling factor
    latent_std: list[torch.Tensor]
    time_ids: torch.Tensor  # [n, flips, 6]
    buckets: tuple[tuple[int, int], ...]  # per image (height, width): a batch never mixes two
    prompt_embeds: torch.Tensor | None  # [n, 77, 2048] when the text encoders are frozen
    pooled_embeds: torch.Tensor | None
    input_ids: torch.Tensor | None  # [n, 2, 77] when they are trained
    variants: "CaptionVariants | None" = field(default=None)  # training captions that change per epoch


@dataclass
class CaptionVariants:
    """The training captions of an epoch: dropped to the empty caption or their tags shuffled (ml.dataset.captions).
    Without shuffling a caption is its own or the empty one, both encoded once (empty_embeds, empty_ids); with
    it the captions are tokenized per step and encoded by the trained text encoders or by frozen_encoders."""

    captions: list[str]
    seed: int
    dropout: float
    shuffle: bool
    keep_tokens: int
    tokenizers: tuple
    frozen_encoders: tuple | None = None  # kept loaded with shuffle_caption when the text encoders are frozen
    device: object = "cpu"
    empty_embeds: torch.Tensor | None = None  # [1, 77, 2048], [1, 1280]: the empty caption, encoders frozen
    empty_pooled: torch.Tensor | None = None
    empty_ids: torch.Tensor | None = None  # [1, 2, 77]: the empty caption, encoders trained

    def caption(self, image: int, epoch: int) -> tuple[str, bool]:
        """(image's caption in this epoch, whether it was dropped): a function of (seed, epoch, image)."""
        return captions_module.variant(self.captions[image], self.dropout, self.shuffle, self.keep_tokens,
                                       generator(self.seed, CAPTION, epoch, image))

    def conditioning(self, frozen: "Frozen", images: list[int], epoch: int, text_encoders,
                     device) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = [self.caption(image, epoch) for image in images]
        if self.shuffle:
            input_ids = tokenize(self.tokenizers, [text for text, _ in drawn])
            if text_encoders is not None:
                return encode_text(text_encoders, input_ids, device)
            with torch.no_grad():
                embeds, pooled = encode_text(self.frozen_encoders, input_ids, self.device)
            return embeds.float().to(device), pooled.float().to(device)
        dropped = torch.tensor([was_dropped for _, was_dropped in drawn])
        if text_encoders is not None:
            input_ids = torch.where(dropped[:, None, None], self.empty_ids, frozen.input_ids[images])
            return encode_text(text_encoders, input_ids, device)
        embeds = torch.where(dropped[:, None, None], self.empty_embeds, frozen.prompt_embeds[images])
        pooled = torch.where(dropped[:, None], self.empty_pooled, frozen.pooled_embeds[images])
        return embeds.to(device), pooled.to(device)


@torch.no_grad()
def caption_variants(examples: list[Example], hp: Hyperparameters, tokenizers, text_encoders,
                     device) -> CaptionVariants | None:
    """What caption_dropout and shuffle_caption need beside the cache (None when both are off)."""
    if not (hp.caption_dropout or hp.shuffle_caption):
        return None
    variants = CaptionVariants([e.caption for e in examples], hp.seed, hp.caption_dropout, hp.shuffle_caption,
                               hp.keep_tokens, tokenizers, device=device)
    if hp.shuffle_caption:
        if not hp.train_text_encoder:
            variants.frozen_encoders = text_encoders
            log.info("shuffle_caption: captions change order every epoch, so the frozen text encoders stay loaded "
                     "and encode each step's captions instead of a cache")
        return variants
    empty_ids = tokenize(tokenizers, [""])
    if hp.train_text_encoder:
        variants.empty_ids = empty_ids
    else:
        embeds, pooled = encode_text(text_encoders, empty_ids, device)
        variants.empty_embeds, variants.empty_pooled = embeds.float().cpu(), pooled.float().cpu()
    return variants


def tokenize(tokenizers, captions: list[str]) -> torch.Tensor:
    """[n, 2, max_length] token ids for both tokenizers."""
    ids = [
        tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        for tok in tokenizers
    ]
    return torch.stack(ids, dim=1)


def encode_text(text_encoders, input_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: penultimate hidden states of both encoders, pooled output of the second."""
    embeds = []
    pooled = None
    for index, encoder in enumerate(text_encoders):
        out = encoder(input_ids[:, index].to(device), output_hidden_states=True, return_dict=True)
        if index == 1:
            pooled = out.text_embeds
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def _time_ids(prepared, resolution: int) -> torch.Tensor:
    return torch.tensor([*prepared.original_size, *prepared.crop_top_left, resolution, resolution], dtype=torch.float32)


@dataclass(frozen=True)
class LatentSource:
    """Where the latents come from: the training resolution's buckets, and the prepare job's cache
    when it was made with this VAE (fingerprint None: no usable cache)."""

    sizes: list[tuple[int, int]]
    fingerprint: str | None


def latent_source(examples: list[Example], hp: Hyperparameters, base: str, vae) -> LatentSource:
    from diffusers import UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
    multiple = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet_config["block_out_channels"]) - 1)
    fingerprint = None
    if any(e.latents for e in examples):
        fingerprint = latents_module.vae_fingerprint(base)
    return LatentSource(bucket_sizes(hp.resolution, multiple), fingerprint)


@torch.no_grad()
def cache_frozen(examples: list[Example], hp: Hyperparameters, vae, tokenizers, text_encoders, device, flips: int,
                 stop: StopFlag, center_crop: bool, source: LatentSource) -> Frozen:
    """Latents (from the prepare job's cache when it matches, else encoded here), time ids and, for
    frozen text encoders, the prompt embeddings of every image."""
    means, stds, time_ids, keys = [], [], [], []
    crop_generator = generator(hp.seed, CROP)
    reused = 0
    for example in examples:
        stop.check()
        if example.placement is None:  # a plain imagefolder: square crops at the resolution
            prepared = preprocess(example.path, hp.resolution, center_crop, crop_generator)
            versions = [prepared] + ([flipped(prepared, hp.resolution)] if flips == 2 else [])
            pixels = torch.stack([v.pixels for v in versions])
            ids = [_time_ids(v, hp.resolution) for v in versions]
            key = (hp.resolution, hp.resolution)
        else:
            key = nearest_bucket(*example.placement.bucket, source.sizes)
            cached = None
            if source.fingerprint and example.latents and key == example.placement.bucket:
                cached = latents_module.load(example.latents, source.fingerprint, key, flips)
            placement = example.placement
            if cached is None:
                image, placement = preprocess_bucketed(example, key)
                pixels = torch.stack([image, image.flip(-1)][:flips])
            versions = [placement, placement.mirrored()][:flips]
            ids = [torch.tensor(v.time_ids(), dtype=torch.float32) for v in versions]
            if cached is not None:
                means.append(cached[0])
                stds.append(cached[1])
                time_ids.append(torch.stack(ids))
                keys.append(key)
                reused += 1
                continue
        mean, std = latents_module.encode(vae, pixels.to(device))
        means.append(mean)
        stds.append(std)
        time_ids.append(torch.stack(ids))
        keys.append(key)
    if reused:
        log.info("took the latents of %d of %d images from the dataset's cache", reused, len(examples))
    input_ids = tokenize(tokenizers, [e.caption for e in examples])
    prompt_embeds = pooled = None
    if not hp.train_text_encoder:
        prompt_embeds, pooled = encode_text(text_encoders, input_ids, device)
        prompt_embeds, pooled = prompt_embeds.float().cpu(), pooled.float().cpu()
        input_ids = None
    return Frozen(means, stds, torch.stack(time_ids), tuple(keys), prompt_embeds, pooled, input_ids)


def conditioning(frozen: Frozen, images: list[int], text_encoders, device,
                 epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and pooled embeddings of some images: cached, or encoded by the trained encoders; in a training
    epoch, of the captions that epoch trains with (frozen.variants)."""
    if epoch is not None and frozen.variants is not None:
        return frozen.variants.conditioning(frozen, images, epoch, text_encoders, device)
    if frozen.prompt_embeds is not None:
        return frozen.prompt_embeds[images].to(device), frozen.pooled_embeds[images].to(device)
    return encode_text(text_encoders, frozen.input_ids[images], device)


def sample_latents(frozen: Frozen, pairs: list[tuple[int, int]], generator: torch.Generator) -> torch.Tensor:
    mean = torch.stack([frozen.latent_mean[i][f] for i, f in pairs])
    std = torch.stack([frozen.latent_std[i][f] for i, f in pairs])
    return mean + std * torch.randn(mean.shape, generator=generator)
