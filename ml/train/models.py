"""The base model's parts and the LoRA adapters trained on them: loading, device checks, the
adapters' state in diffusers format and the saved LoRA file."""

from __future__ import annotations

from pathlib import Path

import torch

from ml.contract.container import LORA_WEIGHTS, ContainerPaths, JobError
from ml.contract.hyperparameters import Hyperparameters

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def base_model_path(paths: ContainerPaths, hp: Hyperparameters) -> str:
    channel = paths.channel("base_model")
    if channel.is_dir() and (channel / "model_index.json").exists():
        return str(channel)
    if channel.is_dir() and any(channel.iterdir()):
        raise JobError("base_model channel has no model_index.json: expected a diffusers SDXL pipeline directory")
    return hp.pretrained_model_name_or_path


def _loading(base: str, load):
    try:
        return load()
    except (OSError, ValueError) as error:
        raise JobError(f"base model {base} could not be loaded: {str(error).splitlines()[0]}") from None


def load_encoders(base: str, text_dtype: torch.dtype):
    """Tokenizers, text encoders (in text_dtype), the VAE (fp32) and the noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load():
        tokenizers = (CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
                      CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2"))
        text_encoders = (CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=text_dtype),
                         CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2",
                                                                     dtype=text_dtype))
        # fp32: SDXL's VAE overflows in fp16, and it runs only once per image here.
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=torch.float32)
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        return tokenizers, text_encoders, vae, scheduler

    return _loading(base, load)


def load_unet(base: str, dtype: torch.dtype):
    """The UNet, straight into its compute dtype (half the memory of loading fp32 and casting)."""
    from diffusers import UNet2DConditionModel

    return _loading(base, lambda: UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=dtype))


def lora_state(model) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def check_device_support(hp: Hyperparameters) -> None:
    cuda = torch.cuda.is_available()
    if hp.mixed_precision == "fp16" and not cuda:
        raise JobError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on a CPU")
    if hp.use_8bit_adam:
        if not cuda:
            raise JobError("use_8bit_adam needs a CUDA GPU (bitsandbytes 8-bit Adam has no CPU kernels)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise JobError("use_8bit_adam needs bitsandbytes installed in the training image") from None


def save_lora(accelerator, model_dir: Path, unet, text_encoders, unet_config, text_config) -> None:
    from diffusers import StableDiffusionXLPipeline

    layers = {"unet_lora_layers": lora_state(accelerator.unwrap_model(unet)),
              "unet_lora_adapter_metadata": unet_config.to_dict()}
    if text_encoders is not None:
        for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
            layers[f"{name}_lora_layers"] = lora_state(accelerator.unwrap_model(encoder))
            layers[f"{name}_lora_adapter_metadata"] = text_config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(model_dir, weight_name=LORA_WEIGHTS, safe_serialization=True, **layers)
