"""A complete SDXL pipeline with tiny random weights, built offline.

Same architecture family as stabilityai/stable-diffusion-xl-base-1.0 (two CLIP text
encoders, the second with a projection, a text_time-conditioned UNet, a KL VAE and the
SDXL scheduler), scaled down so tests and the local stack run on a CPU in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

# Byte-level BPE alphabet as CLIP builds it: printable bytes map to themselves, the rest
# to code points from 256 up, so every byte string has a spelling in the vocabulary.
def _byte_alphabet() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in keep:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(out_dir: Path, model_max_length: int = 77) -> None:
    """A CLIP tokenizer with a character-level vocabulary and no merges."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)


TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED = 8
VOCAB_SIZE = 2 * 256 + 2


def _text_config(**overrides):
    from transformers import CLIPTextConfig

    base = dict(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=TEXT_PROJECTION,
        bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1,
    )
    base.update(overrides)
    return CLIPTextConfig(**base)


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to out_dir in diffusers layout and return the path."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TEXT_PROJECTION + 6 * TIME_EMBED,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    write_tokenizer(out / "tokenizer")
    write_tokenizer(out / "tokenizer_2")
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
        unet=unet, scheduler=scheduler,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    return out
