import hashlib

import torch
from diffusers import StableDiffusionXLPipeline

from ml.fixtures import tiny_model


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_a_complete_sdxl_pipeline(base_model):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (base_model / part).is_dir(), part
    assert (base_model / "model_index.json").exists()
    size = sum(p.stat().st_size for p in base_model.rglob("*") if p.is_file())
    assert size < 4 * 2**20


def test_pipeline_loads_and_generates(base_model):
    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle", num_inference_steps=2, height=32, width=32,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert pipeline.unet.config.addition_embed_type == "text_time"
    assert pipeline.text_encoder_2.config.projection_dim == pipeline.unet.config.projection_class_embeddings_input_dim \
        - 6 * pipeline.unet.config.addition_time_embed_dim


def test_tokenizer_round_trips_text_offline(base_model):
    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)
    ids = pipeline.tokenizer("storyboard frame, a red circle").input_ids
    assert ids[0] == pipeline.tokenizer.bos_token_id and ids[-1] == pipeline.tokenizer.eos_token_id
    assert pipeline.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "storyboardframe,aredcircle"


def test_same_seed_same_weights_other_seed_other_weights(base_model, tmp_path):
    again = tiny_model.build(tmp_path / "again", seed=0)
    other = tiny_model.build(tmp_path / "other", seed=1)
    assert _digests(again) == _digests(base_model)
    differing = {k for k, v in _digests(other).items() if _digests(base_model)[k] != v}
    assert "unet/diffusion_pytorch_model.safetensors" in differing
