"""Kohya-named LoRA files (kohya LoRA and LoCon, LyCORIS LoHa and LoKr) as per-module weight deltas.

The endpoint's adapter bank (ml.serve.adapters) fuses the deltas into the base weights; a scoring job
(ml.train.evaluate) fuses the LyCORIS ones. The file's factors are kept as they are, on the device, and the
delta is computed when fused. The arithmetic is each method's own, as LyCORIS defines it and PEFT's LoHa
and LoKr and ComfyUI's loaders compute it:
- LoRA: up @ down * alpha / rank (rank: down's rows). A k x k convolution's down is (rank, in, k, k) and its
  up (out, rank, 1, 1); with LoCon's Tucker core lora_mid (rank, rank, k, k) both down and up are 1 x 1.
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (rank: w1_b's rows). With Tucker cores hada_t1 and
  hada_t2 (rank, rank, k, k), each factor is its core contracted with w_a (rank, out) and w_b (rank, in).
- LoKr: kron(w1, w2) * alpha / rank, each factor whole or w_a @ w_b (lokr_t2: a Tucker core, as above);
  rank: w2_b's rows, else w1_b's. With both factors whole the scale is 1 and alpha is unused, as in LyCORIS.
A file without alphas (or an alpha of 0) scales by 1. A product is reshaped to its module's weight, so a
convolution's flattened (out, in * k * k) factors fit; one of any other shape is another model's and refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ml.contract import kohya_names
from ml.contract.lora_files import (
    ALPHA,
    KOHYA_TENSORS,
    LOHA,
    LOKR,
    LORA,
    LoraFileError,
    architecture_hint,
    split_kohya_key,
)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_SHOWN = 3


def _tucker(core, out_factor, in_factor):
    """A k x k weight (out, in, k, k) from a Tucker core (rank, rank, k, k) and factors (rank, out), (rank, in)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, out_factor, in_factor)


def _lora_product(f):
    down, up = f["lora_down.weight"], f["lora_up.weight"]
    if "lora_mid.weight" in f:  # 1 x 1 down, k x k core, 1 x 1 up: the three convolutions as one
        return torch.einsum("o r, r s h w, s i -> o i h w", up.flatten(1), f["lora_mid.weight"], down.flatten(1))
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def _loha_product(f):
    if "hada_t1" in f:
        return (_tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
                * _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"]))
    return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])


def _lokr_product(f):
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs: an einsum's output may not allow it


PRODUCTS = {LORA: _lora_product, LOHA: _loha_product, LOKR: _lokr_product}


def _rank(kind: str, factors: dict) -> int | None:
    """The rank alpha is divided by; None where the method scales by 1."""
    if kind == LORA:
        return factors["lora_down.weight"].shape[0]
    if kind == LOHA:
        return factors["hada_w1_b"].shape[0]
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if name in factors:
            return factors[name].shape[0]
    return None


def scaling(kind: str, factors: dict, alpha) -> float:
    rank = _rank(kind, factors)
    alpha = None if alpha is None else float(alpha.item() if hasattr(alpha, "item") else alpha)
    return alpha / rank if alpha and rank else 1.0


@dataclass
class AdapterLayer:
    """One adapted module: its delta is PRODUCTS[kind](factors), reshaped to the weight, times scaling."""

    module: object  # the base torch.nn.Linear or Conv2d whose weight the adapter changes
    kind: str  # LORA, LOHA or LOKR
    factors: dict  # tensor kind -> tensor, as the file names them (`lora_down.weight`, `hada_w1_a`, ...)
    scaling: float

    def product_shape(self) -> torch.Size:
        """The product's shape, computed on the meta device (nothing is multiplied)."""
        return PRODUCTS[self.kind]({k: torch.empty(v.shape, device="meta") for k, v in self.factors.items()}).shape

    def delta(self, scale: float):
        """scale * scaling * product, shaped like the module's weight, in fp32."""
        product = PRODUCTS[self.kind]({k: v.float() for k, v in self.factors.items()})
        return product.reshape(self.module.weight.shape) * (self.scaling * scale)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.factors.values())


def module_table(parts: dict) -> dict[str, torch.nn.Module]:
    """kohya name -> module for every Linear and Conv2d of a pipeline's UNet (`unet`) and text encoders
    (`text_encoder`, `text_encoder_2`), the UNet's modules under both their SGM and their diffusers names."""
    table = {}
    unet = parts.get("unet")
    if unet is not None:
        blocks = kohya_names.sgm_blocks(unet.config)
        for path, module in unet.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                table.update(dict.fromkeys(kohya_names.unet_names(path, blocks), module))
    for component in TEXT_ENCODERS:
        encoder = parts.get(component)
        if encoder is None:
            continue
        level = hasattr(encoder, "text_model")
        for path, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                table[kohya_names.text_encoder_name(component, path, level)] = module
    return table


def _examples(names) -> str:
    names = sorted(names)
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def kohya_layers(state: dict, table: dict, label: str, metadata: dict | None = None) -> list[AdapterLayer]:
    """The layers of a kohya-named state dict (one lora_files.detect_format passed) on table's modules.
    LoraFileError when a module is not in the table (another model's LoRA) or a product does not fit its weight."""
    modules: dict[str, dict] = {}
    for key, tensor in state.items():
        module, tensor_kind = split_kohya_key(key)
        modules.setdefault(module, {})[tensor_kind] = tensor
    unmatched = [name for name in modules if name not in table]
    if unmatched:
        raise LoraFileError(f"{label} is not a LoRA for this SDXL model: {len(unmatched)} of the {len(modules)} "
                            f"modules it adapts are not in the pipeline (e.g. {_examples(unmatched)})"
                            f"{architecture_hint(metadata)}; SDXL's are named like "
                            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q and "
                            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    layers, misfits = [], []
    for name, tensors in modules.items():
        alpha = tensors.pop(ALPHA, None)
        (kind,) = {KOHYA_TENSORS[t] for t in tensors}
        layer = AdapterLayer(table[name], kind, tensors, scaling(kind, tensors, alpha))
        weight = layer.module.weight
        try:
            shape = layer.product_shape()
        except RuntimeError as error:  # factors that do not multiply
            misfits.append(f"{name} ({str(error).splitlines()[0]})")
            continue
        if shape[0] != weight.shape[0] or shape.numel() != weight.numel():
            misfits.append(f"{name} ({kind} of shape {tuple(shape)} for a weight of {tuple(weight.shape)})")
            continue
        layers.append(layer)
    if misfits:
        raise LoraFileError(f"{label} does not fit this SDXL model: {len(misfits)} of its modules have other "
                            f"shapes: {_examples(misfits)}{architecture_hint(metadata)}")
    return layers


def load_layers(path, parts: dict, label: str, metadata: dict | None = None, device=None) -> list[AdapterLayer]:
    """kohya_layers of a safetensors file (read by safetensors alone: nothing is unpickled)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(device or "cpu"))
    except Exception as error:  # safetensors raises its own errors for a damaged file
        raise LoraFileError(f"{label} could not be read: {error}") from None
    return kohya_layers(state, module_table(parts), label, metadata)


@torch.no_grad()
def fuse(layers: list[AdapterLayer], scale: float = 1.0) -> None:
    """Adds each layer's delta to its module's weight, in place (the scoring job's one-off fusion)."""
    for layer in layers:
        weight = layer.module.weight
        weight.add_(layer.delta(scale).to(device=weight.device, dtype=weight.dtype))
