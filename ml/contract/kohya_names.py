"""The names kohya-style LoRA files (kohya's sd-scripts, LyCORIS, the tools that copy them) give the modules
of an SDXL pipeline. Pure Python: the endpoint and the scoring job build their name -> module tables from it.

A module is named `<prefix>_<path>` with the path's dots as underscores:
- `lora_unet_`: the UNet, in one of two layouts. sd-scripts trains SDXL on Stability's original (SGM) UNet,
  so most files name `input_blocks.4.1.transformer_blocks.0.attn1.to_q` for diffusers'
  `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, and a resnet's `in_layers.2` for its `conv1`;
  files made from diffusers models name the diffusers paths themselves (`lora_unet_down_blocks_1_...`).
  Both are read.
- `lora_te1_` (CLIP-L, text_encoder) and `lora_te2_` (OpenCLIP-G, text_encoder_2): transformers' CLIP paths
  with their `text_model.` level, which transformers 5 dropped from CLIPTextModel and the files still name.
  `lora_te_` is the single text encoder of SD 1.x and 2.x: never an SDXL file.
"""

from __future__ import annotations

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
SINGLE_TEXT_ENCODER_PREFIX = "lora_te"  # SD 1.x / 2.x
TEXT_MODEL = "text_model."

# Outside the down, mid and up blocks: diffusers' path -> SGM's.
_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# Inside a resnet: diffusers' ResnetBlock2D -> SGM's ResBlock.
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _config(unet_config, name: str):
    return unet_config[name] if isinstance(unet_config, dict) else getattr(unet_config, name)


def sgm_blocks(unet_config) -> dict[str, str]:
    """diffusers' UNet blocks -> SGM's, from the UNet's config: `down_blocks.1.attentions.0` -> `input_blocks.4.1`
    for SDXL. SGM numbers the input blocks after conv_in (input_blocks.0), one per (resnet, attention) pair and
    one per downsampler (none after the last level); the output blocks one per pair, each level's upsampler
    riding in its last pair, after the attention when there is one. A block's parts: resnet .0, attention .1."""
    down_types, up_types = _config(unet_config, "down_block_types"), _config(unet_config, "up_block_types")
    per_block = _config(unet_config, "layers_per_block")
    layers = [per_block] * len(down_types) if isinstance(per_block, int) else list(per_block)
    blocks = dict(_SGM_TOP)
    blocks.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                   "mid_block.resnets.1": "middle_block.2"})
    index = 1
    for level, kind in enumerate(down_types):
        for layer in range(layers[level]):
            blocks[f"down_blocks.{level}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in kind:
                blocks[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if level < len(down_types) - 1:
            blocks[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for level, (kind, count) in enumerate(zip(up_types, reversed(layers))):
        for layer in range(count + 1):
            blocks[f"up_blocks.{level}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if "CrossAttn" in kind:
                blocks[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{index}.1"
            index += 1
        if level < len(up_types) - 1:
            part = 2 if "CrossAttn" in kind else 1  # after the attention, else after the resnet
            blocks[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{part}.conv"
    return blocks


def sgm_path(path: str, blocks: dict[str, str]) -> str | None:
    """A diffusers UNet module path in SGM's layout; None for a module outside the mapped blocks."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        block = ".".join(parts[:end])
        if block in blocks:
            rest = parts[end:]
            if ".resnets." in f".{block}." and rest:
                rest = [_SGM_RESNET.get(rest[0], rest[0]), *rest[1:]]
            return ".".join([blocks[block], *rest])
    return None


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


def unet_names(path: str, blocks: dict[str, str]) -> list[str]:
    """The names a file may give a diffusers UNet module: its SGM name (sd-scripts' SDXL layout), then its
    diffusers one."""
    names = [kohya_name(UNET_PREFIX, path)]
    sgm = sgm_path(path, blocks)
    if sgm is not None:
        names.insert(0, kohya_name(UNET_PREFIX, sgm))
    return names


def text_encoder_name(component: str, path: str, has_text_model_level: bool) -> str:
    """`lora_te1_text_model_encoder_layers_0_self_attn_q_proj` for text_encoder's `encoder.layers.0.self_attn.q_proj`
    (transformers 5's CLIPTextModel, which has no `text_model.` level) or `text_model.encoder...` (one that has)."""
    return kohya_name(TEXT_ENCODER_PREFIXES[component], path if has_text_model_level else TEXT_MODEL + path)
