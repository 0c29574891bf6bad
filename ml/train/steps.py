"""The training step the loop drives, in two implementations: the fast path and accelerate's.

The loop calls micro_step() once per micro-batch of an optimizer step, then update(); loss() and
learning_rate() describe the last finished step. Both implementations draw a micro-batch's latents,
noise and timesteps from its own generator in the same order, so they learn the same weights
(tests/ml/test_fast_step.py) and a resumed run continues bit for bit.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import torch

from ml.contract.container import JobError
from ml.contract.hyperparameters import Hyperparameters
from ml.train.fast_step import FastStep, StepInputs
from ml.train.frozen import Frozen, conditioning, sample_latents
from ml.train.loss import diffusion_loss


def timestep_weights(hp: Hyperparameters, count: int) -> torch.Tensor | None:
    """Sampling weights of the `count` training timesteps under timestep_bias (None: uniform), as diffusers'
    SDXL script's --timestep_bias_strategy: the biased ones weigh timestep_bias_strength times the others."""
    return _timestep_weights(hp.timestep_bias, hp.timestep_bias_strength, hp.timestep_bias_portion,
                             hp.timestep_bias_begin, hp.timestep_bias_end, count)


@functools.lru_cache(maxsize=4)
def _timestep_weights(bias, strength, portion, begin, end, count) -> torch.Tensor | None:
    if bias is None:
        return None
    biased = max(1, int(portion * count))
    if bias == "range":
        if end > count:
            raise JobError(f"timestep_bias_end {end} is beyond the scheduler's {count} training timesteps")
        chosen = slice(begin, end)
    else:
        chosen = slice(0, biased) if bias == "earlier" else slice(count - biased, count)
    weights = torch.ones(count, dtype=torch.float64)
    weights[chosen] *= strength
    return weights / weights.sum()


def sample_timesteps(hp: Hyperparameters, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` training timesteps in [0, count): uniform, or weighted by timestep_weights."""
    weights = timestep_weights(hp, count)
    if weights is None:
        return torch.randint(0, count, (size,), generator=generator)
    return torch.multinomial(weights, size, replacement=True, generator=generator)


def draw_noise(hp: Hyperparameters, scheduler, cache: Frozen, pairs, generator: torch.Generator):
    """A micro-batch's sampled latents, noise and timesteps, drawn in this order from its generator."""
    latents = sample_latents(cache, pairs, generator)
    noise = torch.randn(latents.shape, generator=generator)
    if hp.noise_offset:
        noise += hp.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    timesteps = sample_timesteps(hp, scheduler.config.num_train_timesteps, latents.shape[0], generator)
    return latents, noise, timesteps


class TrainingStep(ABC):
    """One optimizer step over gradient_accumulation_steps micro-batches of (image, flip) pairs."""

    fast_path = False
    thread_choice: dict | None = None  # the fast step's CPU thread choice (FastStep.choose_cpu_threads), if made

    def __init__(self, hp: Hyperparameters, noise_scheduler, cache: Frozen, lr_scheduler):
        self.hp, self.noise_scheduler, self.cache, self.lr_scheduler = hp, noise_scheduler, cache, lr_scheduler

    def inputs(self, pairs, generator: torch.Generator, epoch: int = 0, text_encoders=None,
               device="cpu") -> StepInputs:
        latents, noise, timesteps = draw_noise(self.hp, self.noise_scheduler, self.cache, pairs, generator)
        embeds, pooled = conditioning(self.cache, [i for i, _ in pairs], text_encoders, device, epoch)
        time_ids = torch.stack([self.cache.time_ids[i, f] for i, f in pairs])
        return StepInputs(latents, noise, timesteps, embeds, pooled, time_ids)

    @abstractmethod
    def micro_step(self, pairs, generator: torch.Generator, epoch: int = 0) -> None:
        """Forward and backward of one micro-batch of an epoch; gradients add up until update()."""

    @abstractmethod
    def update(self) -> None:
        """Ends the optimizer step: the weights and the learning rate move on."""

    @abstractmethod
    def loss(self) -> float:
        """The last finished step's loss, averaged over its micro-batches (may read the device)."""

    def learning_rate(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def graphs_captured(self) -> int:
        return 0


class AcceleratedStep(TrainingStep):
    """diffusers' step: accelerate's accumulate(), backward, clipping, optimizer and schedule. Any number of
    processes, trained text encoders, 8-bit Adam and gradient checkpointing."""

    def __init__(self, accelerator, hp: Hyperparameters, noise_scheduler, cache: Frozen, trained: list,
                 clipped: list[torch.nn.Parameter], optimizer, lr_scheduler, weight_dtype: torch.dtype):
        """trained: the prepared UNet, then the text encoders when they train; clipped: the parameters
        gradient clipping sees (the optimizer's, as built before accelerate wrapped it)."""
        super().__init__(hp, noise_scheduler, cache, lr_scheduler)
        self.accelerator, self.trained, self.clipped = accelerator, trained, clipped
        self.optimizer, self.weight_dtype = optimizer, weight_dtype
        self.unet, self.text_encoders = trained[0], tuple(trained[1:]) or None
        self.loss_sum = 0.0
        self.step_loss = 0.0

    def micro_step(self, pairs, generator: torch.Generator, epoch: int = 0) -> None:
        device, accumulation = self.accelerator.device, self.hp.gradient_accumulation_steps
        with self.accelerator.accumulate(*self.trained):
            inputs = self.inputs(pairs, generator, epoch, self.text_encoders, device).on(device, self.weight_dtype)
            loss = diffusion_loss(self.unet, self.noise_scheduler, inputs.latents, inputs.noise, inputs.timesteps,
                                  inputs.prompt_embeds, inputs.pooled, inputs.time_ids, self.hp.snr_gamma)
            self.loss_sum += float(self.accelerator.gather(loss.detach().reshape(1)).mean()) / accumulation
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.clipped, self.hp.max_grad_norm)
            # No-ops until the micro-batch that syncs gradients: accelerate steps there, as diffusers' loop does.
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def update(self) -> None:
        """The weights moved in the last micro_step (accelerate's sync point); this closes the step's loss."""
        self.step_loss, self.loss_sum = self.loss_sum, 0.0

    def loss(self) -> float:
        return self.step_loss


class FastPathStep(TrainingStep):
    """ml.train.fast_step's step for the UNet's LoRA in one process, with the LR schedule stepped beside it."""

    fast_path = True

    def __init__(self, fast: FastStep, hp: Hyperparameters, noise_scheduler, cache: Frozen, lr_scheduler,
                 scaler):
        super().__init__(hp, noise_scheduler, cache, lr_scheduler)
        self.fast = fast
        # fp16 loss scaling skips steps with overflowing gradients, and the LR schedule waits for them as
        # accelerate's does; only a schedule that changes needs to know (a read of the device per step).
        self.schedule_follows_skips = scaler is not None and hp.lr_scheduler != "constant"

    @property
    def thread_choice(self) -> dict | None:
        return self.fast.thread_choice

    def micro_step(self, pairs, generator: torch.Generator, epoch: int = 0) -> None:
        self.fast.micro_step(self.inputs(pairs, generator, epoch))

    def update(self) -> None:
        self.fast.update()
        if not (self.schedule_follows_skips and self.fast.step_was_skipped()):
            self.lr_scheduler.scheduler.step()

    def loss(self) -> float:
        return self.fast.last_loss()

    def graphs_captured(self) -> int:
        return self.fast.captured()
