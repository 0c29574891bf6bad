"""An exponential moving average of the trained LoRA weights (ema_decay).

After optimizer update n (0 first) the average moves toward the weights with decay
min(ema_decay, (1 + n) / (10 + n)), diffusers' EMAModel's default warm-up, so the first updates
follow the weights closely instead of pinning the average to their random start. The average lives
in fp32 beside the weights; checkpoints carry it (EMA_FILE), so a resumed run averages on exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

EMA_FILE = "lora_ema.safetensors"  # in a checkpoint, beside the LoRA weights


def decay_at(ema_decay: float, updates: int) -> float:
    """The decay of update number `updates` (counted from 0)."""
    return min(ema_decay, (1 + updates) / (10 + updates))


class LoraEMA:
    """The average of `parameters` (the trained LoRA tensors, in the optimizer's order)."""

    def __init__(self, parameters: list[torch.nn.Parameter], ema_decay: float):
        self.parameters, self.ema_decay = list(parameters), ema_decay
        with torch.no_grad():
            self.average = [p.detach().float().clone() for p in self.parameters]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One optimizer update's step of the average: average += (1 - decay) * (weights - average)."""
        weight = 1.0 - decay_at(self.ema_decay, self.updates)
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.parameters], weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"average.{i}": tensor.detach().cpu().contiguous() for i, tensor in enumerate(self.average)}
        state["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, tensor in enumerate(self.average):
            tensor.copy_(state[f"average.{i}"])
        self.updates = int(state["updates"])

    @contextmanager
    def applied(self):
        """The model holds the average inside the block and its own weights again after it."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.parameters]
            for parameter, average in zip(self.parameters, self.average):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, weights in zip(self.parameters, raw):
                    parameter.copy_(weights)
