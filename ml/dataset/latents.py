"""The frozen VAE's latents: one encoder for the prepare job's cache and the training job.

The VAE never trains, so an image's latent distribution is the same in every trial of a grid. The
prepare job can store it with the dataset version (`latents/<image>.safetensors`: the mean and
standard deviation, already multiplied by the VAE's scaling factor, of the image and of its mirror
image); a training job uses a stored entry when its VAE's fingerprint and the image's bucket match
and encodes the image itself otherwise. Both go through `encode`, so a cached latent is exactly the
one the training job would have computed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FINGERPRINT_KEY = "vae_fingerprint"
LATENTS_DIR = "latents"


def vae_fingerprint(base: str) -> str:
    """sha256 over the VAE's config and weight files of a diffusers pipeline (a directory, or a Hub id
    resolved through the local Hugging Face cache, downloading the VAE when it is not there)."""
    root = Path(base)
    if not (root / "vae").is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(base, allow_patterns=["vae/*.json", "vae/*.safetensors"]))
    files = sorted(p for p in (root / "vae").iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    if not files:
        raise FileNotFoundError(f"{base} has no vae/ config or safetensors weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def encode(vae, pixels):
    """(mean, std) of the latent distribution of pixels [n, 3, h, w] in [-1, 1], scaled, fp32 on the CPU."""
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, dtype=vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return dist.mean.float().cpu() * scale, dist.std.float().cpu() * scale


def save(path: Path, mean, std, fingerprint: str, bucket: tuple[int, int]) -> None:
    """One image's entry: [flips, c, h, w] tensors (index 0 the image, 1 its mirror)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(path),
              metadata={FINGERPRINT_KEY: fingerprint, "bucket": f"{bucket[0]}x{bucket[1]}"})


def load(path: Path, fingerprint: str, bucket: tuple[int, int], flips: int):
    """(mean, std) [flips, c, h, w] from a cache entry, or None when it was made by another VAE, for
    another bucket, or holds fewer flips than asked for (the caller then encodes the image)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as entry:
        metadata = entry.metadata() or {}
        if metadata.get(FINGERPRINT_KEY) != fingerprint or metadata.get("bucket") != f"{bucket[0]}x{bucket[1]}":
            return None
        mean, std = entry.get_tensor("mean"), entry.get_tensor("std")
    if mean.shape[0] < flips:
        return None
    return mean[:flips], std[:flips]
