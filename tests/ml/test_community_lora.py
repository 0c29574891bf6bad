"""Community LoRA files at the endpoint (ml/serve/kohya_lora.py through ml.serve.adapters and the Engine), on the
tiny SDXL.

The files are written here the way their tools name them, from PEFT layers on the tiny pipeline:
- kohya LoRA: the project's own writer (ml/train/kohya_format.py), SGM block names, lora_down/lora_up/alpha.
- LoCon, LoHa, LoKr (LyCORIS' kohya-style naming): a module `<prefix>_<path with dots as underscores>` holds
  its tensors under their PEFT names without the adapter (`.lora_down.weight`/`.lora_up.weight` for LoCon,
  `.hada_w1_a` ... `.hada_t2`, `.lokr_w1` ... `.lokr_t2`, never a `.weight` suffix for the LyCORIS ones) and
  `.alpha`, a 0-d tensor: the trained scale times the rank; for a LoKr module with both Kronecker factors whole,
  no alpha and the scale in lokr_w1 (LyCORIS scales those by 1). LoCon and LoHa name the UNet in SGM's layout
  (sd-scripts'), LoKr in diffusers' (`lora_unet_down_blocks_1_...`), the two layouts files come in.
The reference is PEFT's own unfused forward pass with the same layers.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_serve import FAST

from ml.contract import kohya_names
from ml.contract.container import KOHYA_LORA_WEIGHTS, LORA_WEIGHTS
from ml.contract.hyperparameters import parse
from ml.serve import adapters, inference
from ml.lora.deltas import AdapterLayer
from ml.train import kohya_format
from ml.train.models import TEXT_LORA_TARGETS, UNET_LORA_TARGETS, save_lora

SCALE_TOLERANCE = 3  # uint8 levels: fused weights and PEFT's unfused layers round differently
# Every Linear and Conv2d kind of the UNet: attention, feed-forward, projections, resnets (3x3 and the 1x1
# shortcut), the down- and upsamplers' `conv`, conv_in/conv_out and the time and added-condition embeddings.
ALL_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                    "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
ADAPTER = "default"  # PEFT's adapter name in the reference models


def _images(prediction) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")).astype(np.int16) for image in prediction.images]


def render(engine, **fields) -> np.ndarray:
    return _images(engine.generate(inference.parse_request({**FAST, **fields})))[0]


def _pipeline(base_model: Path):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _unfused(pipeline, scale: float = 1.0) -> np.ndarray:
    """PEFT's forward pass, as the engine renders FAST (the scale as diffusers applies a LoRA scale)."""
    image = pipeline(prompt=FAST["prompt"], width=32, height=32, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(FAST["seed"]),
                     cross_attention_kwargs={"scale": scale}).images[0]
    return np.asarray(image).astype(np.int16)


def _lycoris_state(model, name_of) -> dict[str, torch.Tensor]:
    """A PEFT-adapted model's LoRA, LoHa or LoKr layers under kohya-style names (the module docstring's rules)."""
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    state = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            tensors = {"lora_down.weight": module.lora_A[ADAPTER].weight,
                       "lora_up.weight": module.lora_B[ADAPTER].weight}
            rank = module.r[ADAPTER]
        elif isinstance(module, LycorisLayer):
            tensors = {kind: getattr(module, kind)[ADAPTER] for kind in module.adapter_layer_names
                       if ADAPTER in getattr(module, kind)}
            rank = module.r[ADAPTER]
        else:
            continue
        tensors = {kind: tensor.detach().clone() for kind, tensor in tensors.items()}
        if isinstance(module, LoKrLayer) and {"lokr_w1", "lokr_w2"} <= tensors.keys():
            tensors["lokr_w1"] = tensors["lokr_w1"] * module.scaling[ADAPTER]
        else:
            tensors["alpha"] = torch.tensor(module.scaling[ADAPTER] * rank)
        state.update({f"{name_of(path)}.{kind}": tensor.contiguous() for kind, tensor in tensors.items()})
    return state


def _sgm_name(unet):
    blocks = kohya_names.sgm_blocks(unet.config)
    return lambda path: kohya_names.kohya_name(kohya_names.UNET_PREFIX, kohya_names.sgm_path(path, blocks))


def _diffusers_name(path: str) -> str:
    return kohya_names.kohya_name(kohya_names.UNET_PREFIX, path)


def _deltas_match_peft(engine, name: str, reference) -> None:
    """Module by module, the served delta at scale 1 is PEFT's get_delta_weight (the whole adapter, nothing left)."""
    served = {id(layer.module): layer for layer in engine.bank.cache[name].layers}
    paths = {id(module): path for path, module in engine.pipeline.unet.named_modules()}
    peft_layers = {path: module for path, module in reference.unet.named_modules()
                   if hasattr(module, "get_delta_weight") and ADAPTER in getattr(module, "scaling", {})}
    assert {paths[key] for key in served} == set(peft_layers)
    for key, layer in served.items():
        expected = peft_layers[paths[key]].get_delta_weight(ADAPTER).detach()
        torch.testing.assert_close(layer.delta(1.0), expected.reshape(layer.module.weight.shape), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Fixtures: the files, the engine serving them, PEFT references


@pytest.fixture(scope="module")
def references(base_model, tmp_path_factory):
    """The model directory and the PEFT-adapted pipelines its files come from."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    root = tmp_path_factory.mktemp("community")
    folder = root / "adapters"
    (folder / "own").mkdir(parents=True)
    torch.manual_seed(0)

    # The project's own files: LoRA on the UNet's attention and both text encoders, alpha != rank.
    own = _pipeline(base_model)
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_LORA_TARGETS)
    text_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TEXT_LORA_TARGETS)
    own.unet.add_adapter(unet_config)
    encoders = (own.text_encoder, own.text_encoder_2)
    for encoder in encoders:
        encoder.add_adapter(text_config)
    save_lora(SimpleNamespace(unwrap_model=lambda model: model), folder / "own", own.unet, encoders,
              unet_config, text_config)
    state = kohya_format.kohya_state(own.unet, encoders)
    header = kohya_format.metadata(state, parse({"rank": "4", "lora_alpha": "8", "train_text_encoder": "true"}),
                                   "tiny-sdxl", 10, 6, "own")
    kohya_format.save(folder / "own-kohya.safetensors", state, header)

    made = {}
    for name, config, name_of in (
            ("locon", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=ALL_UNET_TARGETS), "sgm"),
            ("loha", LoHaConfig(r=2, alpha=32, init_weights=False, use_effective_conv2d=True,
                                target_modules=ALL_UNET_TARGETS), "sgm"),
            ("lokr", LoKrConfig(r=2, alpha=3, init_weights=False, use_effective_conv2d=True, decompose_both=True,
                                target_modules=ALL_UNET_TARGETS), "diffusers")):
        pipeline = _pipeline(base_model)
        inject_adapter_in_model(config, pipeline.unet, adapter_name=ADAPTER)
        made[name] = pipeline
        state = _lycoris_state(pipeline.unet, _sgm_name(pipeline.unet) if name_of == "sgm" else _diffusers_name)
        if name == "lokr":  # a folder holding the file as downloaded
            (folder / name).mkdir()
            save_file(state, str(folder / name / "styleLoKr_v2.safetensors"))
        else:
            save_file(state, str(folder / f"{name}.safetensors"))
    return root, made


@pytest.fixture(scope="module")
def engine(references, base_model):
    root, _ = references
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BASE_MODEL", str(base_model))
        patch.setenv("SDXL_SERVE_WARMUP_STEPS", "0")
        return inference.model_fn(root)


def _write(root: Path, name: str, state: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    save_file(state, str(root / "adapters" / f"{name}.safetensors"), metadata=metadata)
    return name


# ---------------------------------------------------------------------------------------
# Serving


def test_the_projects_kohya_file_serves_the_same_image_as_its_diffusers_file(engine, references):
    root, _ = references
    keys = load_file(root / "adapters" / "own-kohya.safetensors").keys()
    assert {key.split("_", 2)[1] for key in keys} == {"unet", "te1", "te2"}
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)  # SGM's names
    base = render(engine, adapter=None)
    for scale in (1.0, 0.7):
        diffusers_image = render(engine, adapter="own", lora_scale=scale)
        kohya_image = render(engine, adapter="own-kohya", lora_scale=scale)
        assert np.abs(diffusers_image - base).max() > 10  # the LoRA shows
        assert np.abs(kohya_image - diffusers_image).max() <= 1
    # The same modules and deltas: 32 UNet attention projections, 12 per text encoder.
    kohya = {id(layer.module): layer for layer in engine.bank.cache["own-kohya"].layers}
    diffusers = {id(layer.module): layer for layer in engine.bank.cache["own"].layers}
    assert kohya.keys() == diffusers.keys() and len(kohya) == 56
    for key, layer in kohya.items():
        torch.testing.assert_close(layer.delta(0.7), diffusers[key].delta(0.7), rtol=1e-6, atol=1e-7)
    assert engine.bank.cache["own-kohya"].layout == "kohya LoRA, 56 modules"
    assert engine.pipeline.get_list_adapters() == {}  # no PEFT layer stays in the forward pass


@pytest.mark.parametrize("name, adapter", [("locon", "locon"), ("loha", "loha"), ("lokr", "lokr")])
def test_locon_loha_and_lokr_files_fuse_to_peft_unfused_output(engine, references, name, adapter):
    _, made = references
    reference = made[name]
    fused = render(engine, adapter=adapter)
    assert np.abs(fused - _unfused(reference)).max() <= SCALE_TOLERANCE
    assert np.abs(fused - render(engine, adapter=None)).max() > 10
    _deltas_match_peft(engine, adapter, reference)
    assert engine.bank.cache[adapter].layout.startswith({"locon": "kohya LoRA", "loha": "kohya LoHa",
                                                         "lokr": "kohya LoKr"}[name])


def test_lycoris_files_take_the_requests_lora_scale_and_mix_with_other_adapters(engine, references):
    _, made = references
    assert np.abs(render(engine, adapter="loha", lora_scale=0.6) - _unfused(made["loha"], 0.6)).max() <= SCALE_TOLERANCE
    mixed = render(engine, adapter={"loha": 0.5, "own-kohya": 1.0})
    assert not np.array_equal(mixed, render(engine, adapter="loha"))
    assert np.array_equal(render(engine, adapter="lokr", lora_scale=0.0), render(engine, adapter=None))


def test_every_tensor_kind_of_the_files_is_used(references):
    """The fixtures cover what the converter reads: LoCon 3x3 and 1x1, LoHa with and without Tucker cores,
    LoKr with each factor whole, factored and (w2) Tucker, and a LoKr module scaled by 1 (both factors whole)."""
    root, _ = references
    kinds = {name: {key.split(".", 1)[1] for key in load_file(path)}
             for name, path in (("locon", root / "adapters" / "locon.safetensors"),
                                ("loha", root / "adapters" / "loha.safetensors"),
                                ("lokr", root / "adapters" / "lokr" / "styleLoKr_v2.safetensors"))}
    assert kinds["locon"] == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert kinds["loha"] == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}
    assert kinds["lokr"] == {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                             "alpha"}
    lokr = load_file(root / "adapters" / "lokr" / "styleLoKr_v2.safetensors")
    modules = {key.split(".")[0] for key in lokr}
    assert any(f"{m}.alpha" not in lokr for m in modules)  # scaled by 1
    locon = load_file(root / "adapters" / "locon.safetensors")
    kernels = {t.shape[2:] for k, t in locon.items() if k.endswith("lora_down.weight") and t.dim() == 4}
    assert kernels == {(3, 3), (1, 1)}
    sgm = {key.split(".")[0] for key in locon}
    assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0", "lora_unet_label_emb_0_0",
            "lora_unet_input_blocks_2_0_op", "lora_unet_output_blocks_1_2_conv",
            "lora_unet_middle_block_0_in_layers_2", "lora_unet_input_blocks_3_0_skip_connection",
            "lora_unet_output_blocks_0_0_emb_layers_1"} <= sgm


def test_locon_tucker_cores_are_the_three_convolutions_in_one():
    """kohya's LoCon with lora_mid: a 1x1 down, a k x k core and a 1x1 up, applied one after the other."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=False)
    down, mid, up = torch.randn(2, 6, 1, 1), torch.randn(2, 2, 3, 3), torch.randn(5, 2, 1, 1)
    layer = AdapterLayer(conv, "LoRA", {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}, 0.5)
    x = torch.randn(1, 6, 8, 8)
    chained = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid,
                                                                    padding=1), up) * 0.5
    torch.testing.assert_close(torch.nn.functional.conv2d(x, layer.delta(1.0), padding=1), chained, rtol=1e-5,
                               atol=1e-5)


def test_a_tucker_locon_file_is_served(engine, references):
    root, _ = references
    torch.manual_seed(1)
    # conv1 of the first down block's resnet: SGM input_blocks.1.0.in_layers.2, a 16 -> 16 3x3 convolution.
    name = _write(root, "tucker", {"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.randn(2, 16, 1, 1),
                                   "lora_unet_input_blocks_1_0_in_layers_2.lora_mid.weight": torch.randn(2, 2, 3, 3),
                                   "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": torch.randn(16, 2, 1, 1),
                                   "lora_unet_input_blocks_1_0_in_layers_2.alpha": torch.tensor(1.0)})
    assert not np.array_equal(render(engine, adapter=name), render(engine, adapter=None))
    (layer,) = engine.bank.cache[name].layers
    assert layer.module is engine.pipeline.unet.down_blocks[0].resnets[0].conv1 and layer.scaling == 0.5


# ---------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("name, state, named", [
    ("sd15", {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)},
     "not an SDXL LoRA: it names lora_te_, the one text encoder of SD 1.x and 2.x"),
    ("sd15-unet", {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
                   torch.zeros(2, 32),
                   "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
                   torch.zeros(32, 2)},
     "is not a LoRA for this SDXL model: 1 of the 1 modules it adapts are not in the pipeline "
     "(e.g. lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q)"),
    ("flux-kohya", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),
                    "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 2)},
     "not a LoRA for this SDXL model"),
    ("flux", {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
              "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
     "not an SDXL LoRA: its tensors name no part of the SDXL pipeline "
     "(e.g. transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"),
    ("big-sdxl", {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
                  "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4)},
     "does not fit this SDXL model: 1 of its modules have other shapes: "
     "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"),
    ("ia3", {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.weight": torch.zeros(32),
             "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.on_input": torch.tensor(False)},
     "holds tensors of kinds that are not read here: .on_input (LyCORIS (IA)^3), .weight (LyCORIS (IA)^3)"),
    ("dora", {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 32),
              "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 2),
              "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.dora_scale": torch.ones(32, 1)},
     "is a DoRA file (dora_scale tensors"),
    ("half-diffusers", {f"unet.{block}.attentions.0.transformer_blocks.0.attn1.to_q.{part}.weight": torch.ones(*shape)
                        for block in ("down_blocks.1", "down_blocks.0")  # the tiny SDXL's first level has no attention
                        for part, shape in (("lora_A", (2, 32)), ("lora_B", (32, 2)))},
     "is not a LoRA for this SDXL model: 1 of its 2 LoRA modules name nothing in the pipeline"),
])
def test_files_for_other_models_or_of_other_kinds_are_refused_naming_why(engine, references, name, state, named):
    root, _ = references
    _write(root, name, state, {"ss_base_model_version": "sd_v1"} if name == "sd15" else None)
    with pytest.raises(inference.RequestError) as refused:
        render(engine, adapter=name)
    assert refused.value.status == 400 and named in str(refused.value), str(refused.value)
    assert name not in engine.bank.cache and engine.pipeline.get_list_adapters() == {}
    if name in ("flux", "ia3"):  # the formats accepted are listed
        assert "kohya LoRA and LoCon" in str(refused.value) and "LyCORIS LoHa" in str(refused.value)
    if name == "sd15":
        assert "its metadata says ss_base_model_version=sd_v1" in str(refused.value)


def test_a_downloaded_pickle_is_refused_without_being_opened(engine, references, monkeypatch):
    root, _ = references
    (root / "adapters" / "legacy.ckpt").write_bytes(pickle.dumps({"a": 1}))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads was called"))
    with pytest.raises(inference.RequestError) as refused:
        render(engine, adapter="legacy")
    assert refused.value.status == 400 and "pickle file (legacy.ckpt)" in str(refused.value)


def test_the_served_file_survives_a_refused_one_and_the_base_is_restored(engine, references):
    root, _ = references
    before = render(engine, adapter="loha")
    misfit = _write(root, "misfit", {"lora_unet_input_blocks_3_1_proj_in.lora_down.weight": torch.ones(2, 32),
                                     "lora_unet_input_blocks_3_1_proj_in.lora_up.weight": torch.ones(32, 2),
                                     "lora_unet_input_blocks_3_1_proj_out.lora_down.weight": torch.ones(2, 64),
                                     "lora_unet_input_blocks_3_1_proj_out.lora_up.weight": torch.ones(32, 2)})
    with pytest.raises(inference.RequestError, match="does not fit"):
        render(engine, adapter=misfit)
    assert np.array_equal(render(engine, adapter="loha"), before)


# ---------------------------------------------------------------------------------------
# Where files are found


def test_downloaded_files_are_found_by_their_folder_or_their_name(tmp_path, references):
    root, _ = references
    locator = adapters.AdapterLocator(root, tmp_path / "cache")
    assert {"own", "own-kohya", "locon", "loha", "lokr"} <= set(locator.names())
    assert "default" not in locator.names()
    assert locator.locate("own") == root / "adapters" / "own" / LORA_WEIGHTS
    assert locator.locate("own-kohya") == root / "adapters" / "own-kohya.safetensors"
    assert locator.locate("lokr") == root / "adapters" / "lokr" / "styleLoKr_v2.safetensors"

    # A model directory whose LoRA is one downloaded file: it is the default.
    single = tmp_path / "single"
    single.mkdir()
    (single / "pixel-art-xl.safetensors").write_bytes((root / "adapters" / "loha.safetensors").read_bytes())
    locator = adapters.AdapterLocator(single, tmp_path / "cache")
    assert locator.names() == ["default"] and locator.locate("default") == single / "pixel-art-xl.safetensors"
    # A training job's output holds both of its files: the diffusers one is the default.
    (single / LORA_WEIGHTS).write_bytes((root / "adapters" / "own" / LORA_WEIGHTS).read_bytes())
    (single / KOHYA_LORA_WEIGHTS).write_bytes((root / "adapters" / "own-kohya.safetensors").read_bytes())
    assert adapters.AdapterLocator(single, tmp_path / "cache").locate("default") == single / LORA_WEIGHTS
    # Two downloaded files and neither is pytorch_lora_weights.safetensors: which one is not guessed.
    (single / LORA_WEIGHTS).unlink()
    locator = adapters.AdapterLocator(single, tmp_path / "cache")
    assert locator.has_default()
    with pytest.raises(adapters.AdapterError, match="holds 2 .safetensors files .* which one is the adapter is not"):
        locator.locate("default")


def test_a_model_directory_holding_one_downloaded_file_serves_it_as_the_default(tmp_path, references, base_model,
                                                                               monkeypatch):
    root, made = references
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "pixel-art-xl.safetensors").write_bytes((root / "adapters" / "loha.safetensors").read_bytes())
    monkeypatch.setenv("BASE_MODEL", str(base_model))
    monkeypatch.setenv("SDXL_SERVE_WARMUP_STEPS", "0")
    model = inference.model_fn(tmp_path / "model")
    assert model.default_adapter == "default" and model.bank.cache["default"].layout.startswith("kohya LoHa")
    assert np.abs(render(model) - _unfused(made["loha"])).max() <= SCALE_TOLERANCE


# ---------------------------------------------------------------------------------------
# The names


# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the parts that shape the module tree.
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def _diffusers_module(converted_key: str) -> str:
    """diffusers' converted key (old attention-processor spelling) as the module path it loads into."""
    path = converted_key.removesuffix(".down.weight").replace(".processor.", ".")
    for old, new in (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0")):
        path = path.replace(old, new)
    return path.removesuffix(".lora")


@pytest.mark.parametrize("config", ["sdxl", "tiny"])
def test_every_sgm_name_is_mapped_back_to_its_module_by_diffusers_converter(config, base_model):
    """sd-scripts' SDXL names for each Linear and Conv2d of the UNet (794 in SDXL's, 85 in the tiny one), read back
    by diffusers' own kohya conversion (what StableDiffusionXLPipeline.load_lora_weights runs): each to the module
    it came from."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET) if config == "sdxl" else UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(base_model, subfolder="unet"))
    blocks = kohya_names.sgm_blocks(unet.config)
    paths = [path for path, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(paths) == (794 if config == "sdxl" else 85)
    names = {kohya_names.unet_names(path, blocks)[0]: path for path in paths}
    assert len(names) == len(paths) and all(name.startswith("lora_unet_") for name in names)
    remapped = _maybe_map_sgm_blocks_to_diffusers({f"{name}.lora_down.weight": path for name, path in names.items()},
                                                  unet.config)
    assert {_diffusers_module(_convert_unet_lora_key(key)): path for key, path in remapped.items()} == {
        path: path for path in paths}
    # The attention modules' names are the ones the training job's kohya file gives them.
    attention = kohya_format.sgm_attention_blocks(unet.config)
    for path in paths:
        if ".transformer_blocks." in path and path.endswith(tuple(UNET_LORA_TARGETS)):
            assert kohya_names.unet_names(path, blocks)[0] == kohya_format.unet_module_name(path, attention)


def test_a_module_is_found_under_its_sgm_and_its_diffusers_name(base_model):
    from diffusers import UNet2DConditionModel

    from ml.lora.deltas import module_table

    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    table = module_table({"unet": unet})
    conv1 = unet.down_blocks[1].resnets[0].conv1
    assert table["lora_unet_input_blocks_3_0_in_layers_2"] is table["lora_unet_down_blocks_1_resnets_0_conv1"] is conv1
    assert table["lora_unet_output_blocks_1_2_conv"] is unet.up_blocks[0].upsamplers[0].conv
    assert table["lora_unet_label_emb_0_2"] is unet.add_embedding.linear_2
    assert len(set(map(id, table.values()))) == 85 and len(table) == 2 * 85
