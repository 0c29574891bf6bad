"""Deterministic randomness: every draw is a function of (seed, purpose, position).

So data order, flips, crops, noise and timesteps are the same whether a run goes straight
through or resumes from a checkpoint.
"""

from __future__ import annotations

import torch

ORDER, NOISE, CROP, CAPTION = 1, 2, 3, 4  # purposes


def generator(*key: int) -> torch.Generator:
    value = 0
    for part in key:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(value)

