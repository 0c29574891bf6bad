"""The LoRA in kohya's format, the file ComfyUI, Forge and Automatic1111 load; training writes it beside
the diffusers one (ml.contract.container.KOHYA_LORA_WEIGHTS).

Each adapted module is named `<prefix>_<module path>` (its dots as underscores), with `.lora_down.weight` (PEFT's lora_A),
`.lora_up.weight` (lora_B), `.alpha` and, for DoRA, `.dora_scale`. The prefixes and paths are those kohya's
sd-scripts gives SDXL (networks/lora.py names a module by its path in the model it trains):
- `lora_unet_`: the UNet in the original (SGM) layout sd-scripts trains SDXL on (library/sdxl_original_unet.py),
  `input_blocks.4.1.transformer_blocks.0.attn1.to_q` for diffusers' `down_blocks.1.attentions.0.…`. Every
  SDXL loader reads it: ComfyUI and Forge map each `diffusion_model.` weight of their SGM UNet to it, A1111
  turns `lora_unet` into its `diffusion_model` module names, diffusers maps it back by the UNet's config.
  kohya's own SDXL tools read only this layout, not the diffusers-named one.
- `lora_te1_` (CLIP-L, text_encoder) and `lora_te2_` (OpenCLIP-G, text_encoder_2): transformers' CLIP paths
  with their `text_model.` level, which transformers 5 dropped from CLIPTextModel and the loaders still name.
alpha is per module the trained layer's scale times its rank (kohya and the loaders scale by alpha / rank),
which is lora_alpha itself: never the rank, unless lora_alpha was the rank.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from ml.contract.hyperparameters import Hyperparameters
from ml.train.models import text_model_path

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")  # text_encoder, text_encoder_2
SDXL_BASE_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL (A1111 files LoRAs by it)
SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"  # Stability's model spec, as sd-scripts writes it
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
_ATTENTION_BLOCK = re.compile(r"(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+|"
                              r"up_blocks\.\d+\.attentions\.\d+)\.(.+)")


def sgm_attention_blocks(unet_config) -> dict[str, str]:
    """diffusers' attention blocks -> the SGM blocks holding them: `down_blocks.1.attentions.0` ->
    `input_blocks.4.1` for SDXL. SGM numbers the input blocks after conv_in (input_blocks.0), one per
    (resnet, attention) pair and one per downsampler; the output blocks one per pair, the upsampler
    riding in its level's last; the attention is always the pair's second part."""
    per_block = unet_config.layers_per_block
    layers = [per_block] * len(unet_config.down_block_types) if isinstance(per_block, int) else list(per_block)
    blocks = {"mid_block.attentions.0": "middle_block.1"}
    index = 1
    for level, kind in enumerate(unet_config.down_block_types):
        for layer in range(layers[level]):
            if "CrossAttn" in kind:
                blocks[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        index += 1  # the level's downsampler (none after the last level, where counting ends)
    index = 0
    for level, (kind, count) in enumerate(zip(unet_config.up_block_types, reversed(layers))):
        for layer in range(count + 1):
            if "CrossAttn" in kind:
                blocks[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{index}.1"
            index += 1
    return blocks


def unet_module_name(path: str, blocks: dict[str, str]) -> str:
    """`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` for a diffusers UNet module path."""
    match = _ATTENTION_BLOCK.fullmatch(path)
    if not match or match.group(1) not in blocks:
        raise ValueError(f"UNet module {path} is outside the attention blocks this export maps to kohya's names")
    return f"{UNET_PREFIX}_{blocks[match.group(1)]}.{match.group(2)}".replace(".", "_")


def text_encoder_module_name(prefix: str, path: str) -> str:
    """`lora_te1_text_model_encoder_layers_0_self_attn_q_proj` for a CLIP text encoder module path."""
    return f"{prefix}_{text_model_path(path)}".replace(".", "_")


def _lora_layers(model):
    """(module path, PEFT LoRA layer, its adapter) for every adapted module of model."""
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            (adapter,) = module.active_adapters  # training adds one adapter
            yield path, module, adapter


def _entries(name: str, module, adapter: str) -> dict[str, torch.Tensor]:
    """One adapted module's tensors under its kohya name, in fp32 on the CPU."""
    rank = module.r[adapter]
    tensors = {"lora_down.weight": module.lora_A[adapter].weight, "lora_up.weight": module.lora_B[adapter].weight,
               "alpha": torch.tensor(module.scaling[adapter] * rank)}
    if module.use_dora.get(adapter):
        # PEFT keeps one magnitude per output feature; kohya-style files shape it (out, 1, ...) like the weight,
        # which is how ComfyUI tells output-axis DoRA from LyCORIS' input-axis (1, in) one.
        weight = module.get_base_layer().weight
        magnitude = module.lora_magnitude_vector[adapter].weight
        tensors["dora_scale"] = magnitude.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    return {f"{name}.{part}": tensor.detach().to("cpu", torch.float32).contiguous()
            for part, tensor in tensors.items()}


def kohya_state(unet, text_encoders=None) -> dict[str, torch.Tensor]:
    """The adapters of the UNet (and of both text encoders, when given) under kohya's SDXL names."""
    blocks = sgm_attention_blocks(unet.config)
    state = {}
    for path, module, adapter in _lora_layers(unet):
        state.update(_entries(unet_module_name(path, blocks), module, adapter))
    for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, text_encoders or ()):
        for path, module, adapter in _lora_layers(encoder):
            state.update(_entries(text_encoder_module_name(prefix, path), module, adapter))
    return state


def _most_common(values) -> float | int:
    return Counter(values).most_common(1)[0][0]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# sd-scripts' ss_optimizer: the optimizer's class path, as kohya writes it
OPTIMIZER_CLASSES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                     "prodigy": "prodigyopt.prodigy.Prodigy", "adafactor": "transformers.optimization.Adafactor"}


def metadata(state: dict[str, torch.Tensor], hp: Hyperparameters, base_model: str, train_images: int,
             steps: int, title: str) -> dict[str, str]:
    """The safetensors header metadata sd-scripts writes (every value a string): the network (module, rank,
    alpha), the base model's version, which A1111 files LoRAs by, Stability's model spec, and the run's settings.
    No ss_output_name: A1111 would make it the LoRA's prompt alias, which is better the file's own name."""
    ranks = [t.shape[0] for key, t in state.items() if key.endswith(".lora_down.weight")]
    alphas = [t.item() for key, t in state.items() if key.endswith(".alpha")]
    dora = any(key.endswith(".dora_scale") for key in state)
    trains_text = any(key.startswith(TEXT_ENCODER_PREFIXES) for key in state)
    values = {
        # LyCORIS' kohya module is the one that writes DoRA files; sd-scripts' own networks.lora has none
        "ss_network_module": "lycoris.kohya" if dora else "networks.lora",
        "ss_network_dim": _number(_most_common(ranks)),
        "ss_network_alpha": _number(_most_common(alphas)),
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_v2": "False",
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({hp.resolution}, {hp.resolution})",
        "ss_learning_rate": _number(hp.learning_rate),
        "ss_unet_lr": _number(hp.learning_rate),
        "ss_text_encoder_lr": _number(hp.text_encoder_lr) if trains_text else "None",
        "ss_lr_scheduler": hp.lr_scheduler,
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_num_train_images": str(train_images),
        "ss_batch_size_per_device": str(hp.train_batch_size),
        "ss_gradient_accumulation_steps": str(hp.gradient_accumulation_steps),
        "ss_mixed_precision": hp.mixed_precision,
        "ss_seed": str(hp.seed),
        "ss_noise_offset": _number(hp.noise_offset),
        "ss_min_snr_gamma": "None" if hp.snr_gamma is None else _number(hp.snr_gamma),
        "ss_optimizer": OPTIMIZER_CLASSES[hp.optimizer],
        "ss_caption_dropout_rate": _number(hp.caption_dropout),
        "ss_shuffle_caption": str(hp.shuffle_caption),
        "ss_keep_tokens": str(hp.keep_tokens),
        "ss_training_comment": "trained by sdxl-lora train (diffusers + PEFT), exported to kohya's format",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": SDXL_LORA_ARCHITECTURE,
        "modelspec.implementation": SGM_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{hp.resolution}x{hp.resolution}",
    }
    if dora:
        values["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True"})
    return values


def save(path: Path, state: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=header)
