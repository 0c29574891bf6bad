"""Caption variants for training: caption dropout and tag shuffling, as kohya's sd-scripts do them.

A caption is comma-separated tags ("ohwx person, red jacket, beach"). With dropout an example trains
with the empty caption (the unconditional prompt, which classifier-free guidance contrasts with); with
shuffling its tags change order, the first keep_tokens staying in place (a trigger word). Each draw
comes from the generator the caller makes for (seed, epoch, image), so a run and its resumption see the
same captions.
"""

from __future__ import annotations

import torch


def tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffled(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """The caption's tags after the first keep_tokens in a random order, joined with ', '."""
    parts = tags(caption)
    head, tail = parts[:keep_tokens], parts[keep_tokens:]
    order = torch.randperm(len(tail), generator=generator).tolist()
    return ", ".join(head + [tail[i] for i in order])


def variant(caption: str, dropout: float, shuffle: bool, keep_tokens: int,
            generator: torch.Generator) -> tuple[str, bool]:
    """(the caption this example trains with, whether it was dropped). One uniform draw decides dropout
    whatever its rate, so the shuffles of a seed are the same with and without dropout."""
    dropped = bool(torch.rand((), generator=generator) < dropout)
    if dropped:
        return "", True
    return (shuffled(caption, keep_tokens, generator) if shuffle else caption), False
