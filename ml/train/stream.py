"""The data stream: micro-batches of (image, flip) pairs, a function of (seed, position).

Per epoch the images are shuffled, grouped by aspect-ratio bucket, cut into batches and the
batches shuffled, so a batch never mixes buckets; a resumed run continues the same stream.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import torch

from ml.contract.hyperparameters import Hyperparameters
from ml.train.seeds import ORDER, generator


@functools.lru_cache(maxsize=2)  # the stream reads one epoch at a time
def epoch_batches(seed: int, random_flip: bool, epoch: int, groups: tuple, batch_size: int, rank: int,
                   world: int) -> list[list[tuple[int, int]]]:
    """This process's micro-batches of (image, flip) pairs for an epoch: images shuffled, grouped by
    bucket in that order, cut into batches, and the batches shuffled, so a batch never mixes buckets
    and every image comes once per epoch. Processes take every world-th batch (padded to equal counts)."""
    order_generator = generator(seed, ORDER, epoch)
    count = len(groups)
    order = torch.randperm(count, generator=order_generator).tolist()
    flips = (torch.rand(count, generator=order_generator) < 0.5).long().tolist() if random_flip else [0] * count
    by_bucket: dict = {}
    for image in order:
        by_bucket.setdefault(groups[image], []).append((image, flips[image]))
    batches = [members[start:start + batch_size] for members in by_bucket.values()
               for start in range(0, len(members), batch_size)]
    if len(by_bucket) > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=order_generator).tolist()]
    if world > 1:
        batches = (batches + batches[: (-len(batches)) % world])[rank::world]
    return batches


def micro_batch(hp: Hyperparameters, index: int, groups: tuple, rank: int, world: int) -> list[tuple[int, int]]:
    """(image, flip) pairs of the index-th micro-batch of the endless stream of epochs; groups holds
    each image's bucket."""
    per_epoch = micro_batches_per_epoch(hp, groups, world)
    epoch, position = divmod(index, per_epoch)
    return epoch_batches(hp.seed, hp.random_flip, epoch, groups, hp.train_batch_size, rank, world)[position]


def micro_batches_per_epoch(hp: Hyperparameters, groups: tuple, world: int) -> int:
    sizes = Counter(groups).values()
    return math.ceil(sum(math.ceil(size / hp.train_batch_size) for size in sizes) / world)


def total_steps(hp: Hyperparameters, groups: tuple, world: int) -> int:
    if hp.max_train_steps is not None:
        return hp.max_train_steps
    return math.ceil(hp.num_train_epochs * micro_batches_per_epoch(hp, groups, world) / hp.gradient_accumulation_steps)
