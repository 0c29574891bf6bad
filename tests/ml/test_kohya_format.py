"""The kohya-format LoRA training writes beside the diffusers one (ml/train/kohya_format.py), and the
diffusers file's text-encoder names under transformers 4's CLIPTextModel layout.

The names are checked against what the loaders read, as their code reads them:
- ComfyUI, comfy/lora.py (Forge loads LoRAs with the same functions, backend/patcher/lora.py):
  model_lora_keys_unet maps `lora_unet_<weight key of its SGM UNet, minus `diffusion_model.` and `.weight`,
  `.` as `_`>`; model_lora_keys_clip maps `lora_te1_text_model_encoder_layers_<N>_<part>` (CLIP-L) and
  `lora_te2_…` (CLIP-G), part one of LORA_CLIP_MAP's self_attn_{q,k,v,out}_proj, mlp_fc1, mlp_fc2; load_lora
  reads `<name>.lora_up.weight`, `<name>.lora_down.weight` and `<name>.alpha`.
- Automatic1111, extensions-builtin/Lora/networks.py: load_network turns `lora_unet` into `diffusion_model`
  (its SDXL modules bear the SGM names) and `lora_te1_text_model` into `0_transformer_text_model`;
  convert_diffusers_name_to_compvis turns `lora_te2_text_model_encoder_layers_N_self_attn_*` into OpenCLIP's
  `1_model_transformer_resblocks_N_attn_*`, where q, k and v are one in_proj that network_apply_weights
  changes only when q, k, v and out of the layer are all in the file. network.py's detect_version files a
  LoRA under SDXL when its ss_base_model_version starts with `sdxl_`.
- kohya's sd-scripts, networks/lora.py on library/sdxl_original_unet.py: a module's name is its path in the
  SDXL UNet sd-scripts builds, whose transformer blocks are KOHYA_SDXL_TRANSFORMERS below.
- diffusers, loaders/lora_conversion_utils.py: _maybe_map_sgm_blocks_to_diffusers and
  _convert_non_diffusers_lora_to_diffusers read them back (the image test; the SDXL block indices below).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPPreTrainedModel, CLIPTextModel

from ml.contract.container import KOHYA_LORA_WEIGHTS, LORA_WEIGHTS
from ml.contract.hyperparameters import parse
from ml.train import kohya_format
from ml.train.models import TEXT_LORA_TARGETS, UNET_LORA_TARGETS, save_lora

RANK, ALPHA = 4, 8  # alpha != rank: a file writing the rank as alpha would scale by 1 instead of 2

# kohya's SDXL UNet (library/sdxl_original_unet.py): SGM block -> transformer blocks in it.
KOHYA_SDXL_TRANSFORMERS = {"input_blocks.4.1": 2, "input_blocks.5.1": 2, "input_blocks.7.1": 10,
                           "input_blocks.8.1": 10, "middle_block.1": 10,
                           **{f"output_blocks.{i}.1": 10 for i in (0, 1, 2)},
                           **{f"output_blocks.{i}.1": 2 for i in (3, 4, 5)}}
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the parts that shape the module tree.
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
UNET_NAME = re.compile(r"lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)"
                       r"_transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)")
TEXT_NAME = re.compile(r"lora_te[12]_text_model_encoder_layers_(?P<layer>\d+)_"
                       r"(?P<part>self_attn_(q|k|v|out)_proj|mlp_fc1|mlp_fc2)")
KEY = re.compile(r"(?P<name>[a-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)")


def _unet_targets(unet) -> list[str]:
    return [path for path, _ in unet.named_modules() if path.endswith(tuple(f".{t}" for t in UNET_LORA_TARGETS))]


@pytest.fixture(scope="module")
def adapted(base_model):
    """The tiny SDXL with LoRA on the UNet and both text encoders (what train_text_encoder trains), random
    (not no-op) weights, so the images tell a wrong mapping or scale."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)
    torch.manual_seed(0)
    configs = [LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=targets)
               for targets in (UNET_LORA_TARGETS, TEXT_LORA_TARGETS)]
    pipeline.unet.add_adapter(configs[0])
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2):
        encoder.add_adapter(configs[1])
    return pipeline, configs


@pytest.fixture(scope="module")
def saved(adapted, tmp_path_factory) -> Path:
    """Both files, written by the functions the training job writes them with."""
    pipeline, (unet_config, text_config) = adapted
    folder = tmp_path_factory.mktemp("lora")
    encoders = (pipeline.text_encoder, pipeline.text_encoder_2)
    save_lora(SimpleNamespace(unwrap_model=lambda model: model), folder, pipeline.unet, encoders,
              unet_config, text_config)
    state = kohya_format.kohya_state(pipeline.unet, encoders)
    header = kohya_format.metadata(state, parse({"rank": str(RANK), "lora_alpha": str(ALPHA),
                                                 "train_text_encoder": "true"}), "tiny-sdxl", 10, 6, "test")
    kohya_format.save(folder / KOHYA_LORA_WEIGHTS, state, header)
    return folder


def _render(base_model: Path, folder: Path | None = None, weight_name: str | None = None):
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)  # a fresh one per file: nothing carried over
    pipeline.set_progress_bar_config(disable=True)
    extra = {}
    if folder is not None:
        pipeline.load_lora_weights(str(folder), weight_name=weight_name)
        extra = {"cross_attention_kwargs": {"scale": 0.7}}
    layers = [sum(isinstance(m, LoraLayer) for m in part.modules())
              for part in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2)]
    image = pipeline("storyboard frame, a red circle", num_inference_steps=2, height=32, width=32,
                     generator=torch.Generator().manual_seed(0), output_type="np", **extra).images[0]
    return image, layers


def test_diffusers_reads_the_kohya_file_into_the_same_image_as_the_diffusers_file(base_model, saved):
    diffusers_image, diffusers_layers = _render(base_model, saved, LORA_WEIGHTS)
    kohya_image, kohya_layers = _render(base_model, saved, KOHYA_LORA_WEIGHTS)
    base_image, _ = _render(base_model)
    assert kohya_layers == diffusers_layers == [32, 12, 12]  # 4 UNet attentions x 2 x 4; 3 layers x 4 per encoder
    assert np.abs(diffusers_image - base_image).max() > 0.05  # the LoRA (text encoders included) shows
    np.testing.assert_allclose(kohya_image, diffusers_image, atol=1e-6, rtol=0)


def test_alpha_is_the_trained_lora_alpha_not_the_rank(saved):
    state = load_file(saved / KOHYA_LORA_WEIGHTS)
    alphas = {key: tensor for key, tensor in state.items() if key.endswith(".alpha")}
    assert len(alphas) == 56 and {tensor.item() for tensor in alphas.values()} == {ALPHA}
    assert all(tensor.dim() == 0 for tensor in alphas.values())
    assert {t.shape[0] for k, t in state.items() if k.endswith(".lora_down.weight")} == {RANK}
    with safe_open(saved / KOHYA_LORA_WEIGHTS, "pt") as handle:
        header = handle.metadata()
    assert header["ss_network_dim"] == str(RANK) and header["ss_network_alpha"] == str(ALPHA)


def test_every_key_follows_the_names_the_sdxl_loaders_read(adapted, saved):
    pipeline, _ = adapted
    state = load_file(saved / KOHYA_LORA_WEIGHTS)
    parts = defaultdict(set)
    for key in state:
        match = KEY.fullmatch(key)
        assert match, key
        parts[match["name"]].add(match["part"])
    # ComfyUI's load_lora, A1111's network_lora and diffusers read up, down and alpha of one name together.
    assert all(found == {"lora_down.weight", "lora_up.weight", "alpha"} for found in parts.values())
    unet_names = {name for name in parts if name.startswith("lora_unet_")}
    assert all(UNET_NAME.fullmatch(name) for name in unet_names), unet_names
    blocks = kohya_format.sgm_attention_blocks(pipeline.unet.config)
    assert unet_names == {kohya_format.unet_module_name(path, blocks) for path in _unet_targets(pipeline.unet)}
    layers_by_encoder = defaultdict(lambda: defaultdict(set))
    for name in parts.keys() - unet_names:
        match = TEXT_NAME.fullmatch(name)
        assert match, name
        layers_by_encoder[name[:8]][int(match["layer"])].add(match["part"])
    for prefix, encoder in (("lora_te1", pipeline.text_encoder), ("lora_te2", pipeline.text_encoder_2)):
        layers = layers_by_encoder[prefix]
        assert sorted(layers) == list(range(encoder.config.num_hidden_layers))
        # A1111 adapts OpenCLIP-G's fused in_proj only from a layer's q, k, v and out together.
        assert all(found == {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"}
                   for found in layers.values())
    for name in parts:
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        assert down.dtype == up.dtype == torch.float32 and down.shape[0] == up.shape[1] == RANK
    with safe_open(saved / KOHYA_LORA_WEIGHTS, "pt") as handle:
        header = handle.metadata()
    assert header["ss_base_model_version"].startswith("sdxl_") and header["ss_network_module"] == "networks.lora"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_sdxl_unet_names_are_the_modules_of_kohyas_sdxl_unet():
    """On the real SDXL UNet's module tree (built on the meta device: no weights), every LoRA target."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    blocks = kohya_format.sgm_attention_blocks(unet.config)
    targets = _unet_targets(unet)
    names = {kohya_format.unet_module_name(path, blocks): path for path in targets}
    kohya_modules = {f"lora_unet_{block}.transformer_blocks.{index}.{attention}.{target}".replace(".", "_")
                     for block, depth in KOHYA_SDXL_TRANSFORMERS.items() for index in range(depth)
                     for attention in ("attn1", "attn2") for target in UNET_LORA_TARGETS}
    assert len(targets) == 560 and set(names) == kohya_modules
    # diffusers maps each back to its own module (its next step renames input_blocks to down_blocks, etc.).
    back = _maybe_map_sgm_blocks_to_diffusers({f"{name}.lora_down.weight": None for name in names}, unet.config)
    renamed = {key.removesuffix(".lora_down.weight").replace("input_blocks", "down_blocks")
               .replace("middle_block", "mid_block").replace("output_blocks", "up_blocks") for key in back}
    assert renamed == {f"lora_unet_{path}".replace(".", "_") for path in targets}


class Transformers4CLIPTextModel(CLIPPreTrainedModel):
    """CLIPTextModel's module tree as transformers 4 builds it, everything under `text_model.`
    (transformers 5's CLIPTextModel is that level itself)."""

    def __init__(self, config):
        super().__init__(config)
        self.text_model = CLIPTextModel(config)
        self.post_init()


def _file_text_encoder_paths(file: Path) -> set[str]:
    return {key.removeprefix("text_encoder.").split(".lora_linear_layer.")[0]
            for key in load_file(file) if key.startswith("text_encoder.")}


@pytest.mark.parametrize("weight_name", [LORA_WEIGHTS, KOHYA_LORA_WEIGHTS])
def test_the_text_encoder_loads_into_the_transformers_4_layout(adapted, saved, weight_name):
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    pipeline, _ = adapted
    old = Transformers4CLIPTextModel(pipeline.text_encoder.config)
    assert "text_model.encoder.layers.0.self_attn.q_proj" in dict(old.named_modules())
    if weight_name == LORA_WEIGHTS:  # the file names modules of that tree, each one
        assert _file_text_encoder_paths(saved / weight_name) <= dict(old.named_modules()).keys()
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(str(saved), weight_name=weight_name,
                                                                        return_lora_metadata=True)
    StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, old, prefix="text_encoder", metadata=metadata)
    loaded = {path: module for path, module in old.named_modules() if isinstance(module, LoraLayer)}
    trained = {f"text_model.{path}": module for path, module in pipeline.text_encoder.named_modules()
               if isinstance(module, LoraLayer)}
    assert loaded.keys() == trained.keys() and len(loaded) == 12
    for path, module in loaded.items():
        (adapter,) = module.active_adapters
        torch.testing.assert_close(module.lora_A[adapter].weight, trained[path].lora_A["default"].weight)
        torch.testing.assert_close(module.lora_B[adapter].weight, trained[path].lora_B["default"].weight)
        assert module.scaling[adapter] == ALPHA / RANK


def test_transformers_5_names_alone_miss_the_transformers_4_layout(adapted, saved):
    """What the diffusers file held before: text_encoder keys without `text_model.` name no module there."""
    pipeline, _ = adapted
    old = Transformers4CLIPTextModel(pipeline.text_encoder.config)
    bare = {path.removeprefix("text_model.") for path in _file_text_encoder_paths(saved / LORA_WEIGHTS)}
    assert bare and not bare & dict(old.named_modules()).keys()


def test_dora_magnitudes_become_dora_scale_shaped_like_the_weight(base_model):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=True, target_modules=UNET_LORA_TARGETS))
    state = kohya_format.kohya_state(unet)
    blocks, targets = kohya_format.sgm_attention_blocks(unet.config), set(_unet_targets(unet))
    for path, module in unet.named_modules():
        if path in targets:
            scale = state[f"{kohya_format.unet_module_name(path, blocks)}.dora_scale"]
            magnitude = module.lora_magnitude_vector["default"].weight
            assert scale.shape == (module.out_features, 1)
            torch.testing.assert_close(scale.flatten(), magnitude)
    header = kohya_format.metadata(state, parse({}), "tiny-sdxl", 10, 6, "dora")
    assert header["ss_network_module"] == "lycoris.kohya"
    assert json.loads(header["ss_network_args"]) == {"algo": "lora", "dora_wd": "True"}


def test_a_training_job_writes_the_kohya_file_beside_the_diffusers_one(make_job, base_model):
    job = make_job({"train_text_encoder": True, "rank": RANK, "lora_alpha": ALPHA, "max_train_steps": 2}).run()
    assert job.returncode == 0, job.stdout
    kohya, diffusers = load_file(job.model / KOHYA_LORA_WEIGHTS), load_file(job.lora)
    # The same trained matrices, module by module: the diffusers file's names turned into kohya's.
    blocks = kohya_format.sgm_attention_blocks(SimpleNamespace(**json.loads((base_model / "unet" / "config.json")
                                                                            .read_text())))
    prefixes = dict(zip(("text_encoder", "text_encoder_2"), kohya_format.TEXT_ENCODER_PREFIXES))
    for key, tensor in diffusers.items():
        component, rest = key.split(".", 1)
        path, _, part = rest.partition(".lora")  # unet: `.lora.down.weight`; encoders: `.lora_linear_layer.…`
        assert component == "unet" or path.startswith("text_model."), key  # transformers 4's names
        name = (kohya_format.unet_module_name(path, blocks) if component == "unet"
                else kohya_format.text_encoder_module_name(prefixes[component], path))
        assert torch.equal(kohya[f"{name}.lora_{'down' if '.down.' in part else 'up'}.weight"], tensor), key
    assert len(kohya) == len(diffusers) * 3 // 2  # and an alpha per module
    assert {t.item() for k, t in kohya.items() if k.endswith(".alpha")} == {ALPHA}
    with safe_open(job.model / KOHYA_LORA_WEIGHTS, "pt") as handle:
        header = handle.metadata()
    assert header["ss_steps"] == "2" and header["ss_num_train_images"] == "10" and header["ss_resolution"] == "(32, 32)"
    card = (job.model / "README.md").read_text()
    assert KOHYA_LORA_WEIGHTS in card and "ComfyUI" in card and "Automatic1111" in card
