"""The base model's parts and the LoRA adapters trained on them: loading, device checks, the
adapters' state in diffusers format and the saved LoRA file."""

from __future__ import annotations

from pathlib import Path

import torch

from ml.contract.container import BASE_MODEL_CHANNEL, LORA_WEIGHTS, ContainerPaths, JobError
from ml.contract.hyperparameters import Hyperparameters
from ml.contract.model_files import load_options

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_MODEL = "text_model."
# With ema_decay the adapter saved as LORA_WEIGHTS is the moving average; the weights as trained go beside it.
RAW_LORA_WEIGHTS = "pytorch_lora_weights_raw.safetensors"


def base_model_path(paths: ContainerPaths, hp: Hyperparameters) -> str:
    channel = paths.channel(BASE_MODEL_CHANNEL)
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
        # Safetensors only, the variant staged (ml.contract.model_files): never a pickle beside them.
        text_encoders = (CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=text_dtype,
                                                       **load_options(base, "text_encoder")),
                         CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2",
                                                                     dtype=text_dtype,
                                                                     **load_options(base, "text_encoder_2")))
        # fp32: SDXL's VAE overflows in fp16, and it runs only once per image here.
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=torch.float32, **load_options(base, "vae"))
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        return tokenizers, text_encoders, vae, scheduler

    return _loading(base, load)


def load_unet(base: str, dtype: torch.dtype):
    """The UNet, straight into its compute dtype (half the memory of loading fp32 and casting)."""
    from diffusers import UNet2DConditionModel

    return _loading(base, lambda: UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=dtype,
                                                                        **load_options(base, "unet")))


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights and activations under a mixed_precision setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def load_frozen_encoders(base: str, weight_dtype: torch.dtype, device: torch.device, lora_on_text: bool):
    """load_encoders' parts, frozen and on the device. Text encoders that carry a LoRA run in fp32 (they
    train so); frozen ones run in the compute dtype."""
    tokenizers, text_encoders, vae, scheduler = load_encoders(base, torch.float32 if lora_on_text else weight_dtype)
    for model in (vae, *text_encoders):
        model.requires_grad_(False)
        model.to(device)
    return tokenizers, text_encoders, vae, scheduler


def load_frozen_unet(base: str, weight_dtype: torch.dtype, device: torch.device):
    """The UNet frozen, in the compute dtype, on the device."""
    unet = load_unet(base, weight_dtype)
    unet.requires_grad_(False)
    # NHWC convolutions: about 15% faster UNet steps on CPU here, and the layout GPU tensor cores want.
    unet.to(device, memory_format=torch.channels_last)
    return unet


def text_model_path(path: str) -> str:
    """A CLIP text encoder's module path with its `text_model.` level: transformers 5 dropped that level from
    CLIPTextModel (CLIPTextModelWithProjection keeps it), transformers 4 and every LoRA loader still name it.
    diffusers removes it again where the model has no such level, so a file naming it loads under both."""
    return path if path.startswith(TEXT_MODEL) else TEXT_MODEL + path


def lora_state(model) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def check_precision_support(hp: Hyperparameters) -> None:
    if hp.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise JobError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on a CPU")


def check_device_support(hp: Hyperparameters) -> None:
    """What training needs of the device and the image: check_precision_support's, CUDA and bitsandbytes for
    8-bit Adam, prodigyopt for Prodigy."""
    check_precision_support(hp)
    if hp.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise JobError("optimizer adamw8bit (use_8bit_adam) needs a CUDA GPU (bitsandbytes 8-bit Adam has no "
                           "CPU kernels)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise JobError("optimizer adamw8bit needs bitsandbytes installed in the training image") from None
    if hp.optimizer == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise JobError("optimizer prodigy needs the prodigyopt package installed in the training image") from None


def save_lora(accelerator, model_dir: Path, unet, text_encoders, unet_config, text_config,
              weight_name: str = LORA_WEIGHTS) -> None:
    from diffusers import StableDiffusionXLPipeline

    layers = {"unet_lora_layers": lora_state(accelerator.unwrap_model(unet)),
              "unet_lora_adapter_metadata": unet_config.to_dict()}
    if text_encoders is not None:
        for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
            state = lora_state(accelerator.unwrap_model(encoder))
            layers[f"{name}_lora_layers"] = {text_model_path(key): tensor for key, tensor in state.items()}
            layers[f"{name}_lora_adapter_metadata"] = text_config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(model_dir, weight_name=weight_name, safe_serialization=True, **layers)
