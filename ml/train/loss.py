"""The diffusion loss (epsilon or v targets, Min-SNR weighting) and the deterministic validation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ml.train.frozen import Frozen, conditioning, sample_latents
from ml.train.seeds import generator

VALIDATION_TIMESTEPS = 5  # fixed timesteps scored per held-out image
VALIDATION_SEED = 0  # independent of the trial's seed, so every trial sees the same noise


def compute_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def diffusion_loss(unet, scheduler, latents, noise, timesteps, prompt_embeds, pooled, time_ids,
                   snr_gamma: float | None = None, reduce: bool = True) -> torch.Tensor:
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                return_dict=False)[0]
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
        if scheduler.config.prediction_type == "v_prediction":
            weights = weights * snr / (snr + 1)
        per_sample = per_sample * weights
    return per_sample.mean() if reduce else per_sample


def validation_loss(unet, scheduler, frozen: Frozen, text_encoders, device, dtype) -> float:
    """Mean epsilon MSE on held-out images at fixed timesteps with fixed noise.

    Seeded independently of the trial, so every trial and the base model are scored on
    exactly the same latents, noise and timesteps.
    """
    count = len(frozen.latent_mean)
    k = VALIDATION_TIMESTEPS
    train_steps = scheduler.config.num_train_timesteps
    timesteps = torch.tensor([int((j + 0.5) * train_steps / k) for j in range(k)], device=device)
    total = 0.0
    was_training = unet.training
    unet.eval()
    with torch.no_grad():
        for i in range(count):
            noise_generator = generator(VALIDATION_SEED, i)
            latents = sample_latents(frozen, [(i, 0)], noise_generator).repeat(k, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=noise_generator)
            embeds, pooled = conditioning(frozen, [i], text_encoders, device)
            losses = diffusion_loss(unet, scheduler, latents.to(device, dtype), noise.to(device, dtype), timesteps,
                                    embeds.repeat(k, 1, 1).to(dtype), pooled.repeat(k, 1).to(dtype),
                                    frozen.time_ids[i, :1].repeat(k, 1).to(device, dtype))
            total += float(losses)
    unet.train(was_training)
    return total / count
