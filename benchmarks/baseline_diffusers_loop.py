"""Baseline for bench_train.py: the training loop of diffusers' train_text_to_image_lora_sdxl.py.

A re-implementation of that example's structure and per-step work, so the benchmark can
time the reference way of training an SDXL LoRA on the same model, data and settings:
eager imports; tokenizers, text encoders, VAE, UNet and DDPMScheduler from one pipeline
directory; a peft LoRA on the UNet's attention projections; AdamW and diffusers'
get_scheduler; and a loop that for every batch decodes and preprocesses the images,
VAE-encodes them, tokenizes and encodes the captions with both text encoders, then runs
the UNet, the MSE loss, backward and the optimizer step. The LoRA is saved with
StableDiffusionXLPipeline.save_lora_weights.

Where this environment forces a difference, the replacement does the same work:
- `datasets` is not installed: a torch Dataset reads the imagefolder's metadata.jsonl
  (file_name, text) and applies per example the transform the example registers with
  `with_transform`; a DataLoader with num_workers=0 (its default) batches it;
- torchvision is not installed: Resize, RandomCrop/CenterCrop, RandomHorizontalFlip,
  ToTensor and Normalize([0.5], [0.5]) are done with PIL and numpy.
Left out because the benchmark switches them off for both jobs: trackers, the Hub,
validation images, checkpoints, text-encoder LoRAs, SNR weighting and noise offset.

Writes training_summary.json (loop_seconds, steps_per_second, ...) to --output_dir.
"""

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers

logger = get_logger(__name__)


def parse_args() -> argparse.Namespace:
    """The example's flags that the benchmark sets; defaults are the example's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--train_data_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--max_train_steps", type=int, required=True)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    return parser.parse_args()


class ImageFolder(torch.utils.data.Dataset):
    """The rows of metadata.jsonl, each decoded and transformed when it is indexed."""

    def __init__(self, root: str, transform):
        self.root = Path(root)
        lines = (self.root / "metadata.jsonl").read_text().splitlines()
        self.rows = [json.loads(line) for line in lines if line.strip()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        with Image.open(self.root / row["file_name"]) as image:
            return self.transform(image.convert("RGB"), row["text"])


def tokenize_prompt(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def make_transform(args: argparse.Namespace, tokenizers):
    """The example's preprocess_train, for one example."""

    def transform(image: Image.Image, caption: str) -> dict:
        original_size = (image.height, image.width)
        # Resize(resolution): the short side becomes the resolution, the long side is truncated.
        scale = args.resolution / min(image.width, image.height)
        width, height = (args.resolution, int(image.height * scale)) if image.width <= image.height else (
            int(image.width * scale), args.resolution)
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if args.random_flip and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if args.center_crop:
            top = max(0, int(round((image.height - args.resolution) / 2.0)))
            left = max(0, int(round((image.width - args.resolution) / 2.0)))
        else:  # RandomCrop.get_params draws with torch's global generator
            top = int(torch.randint(0, image.height - args.resolution + 1, size=(1,)).item())
            left = int(torch.randint(0, image.width - args.resolution + 1, size=(1,)).item())
        image = image.crop((left, top, left + args.resolution, top + args.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # ToTensor
        return {
            "pixel_values": (pixels - 0.5) / 0.5,  # Normalize([0.5], [0.5])
            "original_size": original_size,
            "crop_top_left": (top, left),
            "input_ids_one": tokenize_prompt(tokenizers[0], caption)[0],
            "input_ids_two": tokenize_prompt(tokenizers[1], caption)[0],
        }

    return transform


def collate_fn(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).to(
            memory_format=torch.contiguous_format).float(),
        "original_sizes": [e["original_size"] for e in examples],
        "crop_top_lefts": [e["crop_top_left"] for e in examples],
        "input_ids_one": torch.stack([e["input_ids_one"] for e in examples]),
        "input_ids_two": torch.stack([e["input_ids_two"] for e in examples]),
    }


def encode_prompt(text_encoders, text_input_ids_list) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states of both encoders side by side; pooled output of the last one."""
    prompt_embeds_list = []
    for text_encoder, text_input_ids in zip(text_encoders, text_input_ids_list):
        outputs = text_encoder(text_input_ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
        pooled_prompt_embeds = outputs[0]
        prompt_embeds = outputs[-1][-2]
        bs_embed, seq_len, _ = prompt_embeds.shape
        prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
    prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
    return prompt_embeds, pooled_prompt_embeds.view(bs_embed, -1)


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    base = args.pretrained_model_name_or_path
    tokenizers = (AutoTokenizer.from_pretrained(base, subfolder="tokenizer", use_fast=False),
                  AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", use_fast=False))
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    text_encoder_one = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    for model in (vae, text_encoder_one, text_encoder_two, unet):
        model.requires_grad_(False)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32)  # the SDXL VAE overflows in fp16
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)

    unet_lora_config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.add_adapter(unet_lora_config)
    if args.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32
    params_to_optimize = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params_to_optimize, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    train_dataset = ImageFolder(args.train_data_dir, make_transform(args, tokenizers))
    train_dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn,
                                                   batch_size=args.train_batch_size,
                                                   num_workers=args.dataloader_num_workers)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    def compute_time_ids(original_size, crops_coords_top_left) -> torch.Tensor:
        add_time_ids = list(original_size + crops_coords_top_left + (args.resolution, args.resolution))
        return torch.tensor([add_time_ids]).to(accelerator.device, dtype=weight_dtype)

    logger.info(f"***** Running training: {len(train_dataset)} examples, {args.max_train_steps} steps *****")
    global_step = 0
    progress_bar = tqdm(range(args.max_train_steps), desc="Steps", disable=not accelerator.is_local_main_process)
    loop_started = time.monotonic()
    for _ in range(num_train_epochs):
        unet.train()
        train_loss = 0.0
        for batch in train_dataloader:
            with accelerator.accumulate(unet):
                model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
                model_input = (model_input * vae.config.scaling_factor).to(weight_dtype)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=model_input.device).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                add_time_ids = torch.cat([compute_time_ids(s, c) for s, c in
                                          zip(batch["original_sizes"], batch["crop_top_lefts"])])
                prompt_embeds, pooled_prompt_embeds = encode_prompt(
                    (text_encoder_one, text_encoder_two), (batch["input_ids_one"], batch["input_ids_two"]))
                unet_added_conditions = {"time_ids": add_time_ids, "text_embeds": pooled_prompt_embeds}
                model_pred = unet(noisy_model_input, timesteps, prompt_embeds,
                                  added_cond_kwargs=unet_added_conditions, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                else:
                    target = noise
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(args.train_batch_size)).mean()
                train_loss += avg_loss.item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                final_loss, train_loss = train_loss, 0.0
            progress_bar.set_postfix(step_loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
            if global_step >= args.max_train_steps:
                break
    loop_seconds = time.monotonic() - loop_started
    progress_bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet_lora_state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        StableDiffusionXLPipeline.save_lora_weights(save_directory=args.output_dir,
                                                    unet_lora_layers=unet_lora_state_dict)
        summary = {
            "global_step": global_step,
            "final_loss": final_loss,
            "loop_seconds": round(loop_seconds, 3),
            "steps_per_second": round(global_step / loop_seconds, 4),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        }
        Path(args.output_dir, "training_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    main()
