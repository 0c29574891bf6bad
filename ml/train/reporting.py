"""What a training job shows people: its loss curve as a PNG, its validation images and its model card.

Drawn with PIL only (the payload's image library), so nothing here needs a plotting package. The
files land in the model directory (the adapter's Hugging Face style folder: README.md, samples/,
loss_curve.png) and, copied, in `output/data/report/`, which SageMaker uploads as the job's small
`output.tar.gz`: the grid search reads that one instead of every trial's weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from ml.contract.container import KOHYA_LORA_WEIGHTS
from ml.contract.hyperparameters import Hyperparameters

LOSS_CURVE = "loss_curve.png"
REPORT_DIR = "report"  # under output/data/
SUMMARY = "training_summary.json"
# Validation image i is always drawn from seed FIRST_SAMPLE_SEED + i, whatever the trial's own seed:
# every trial of a grid renders the same prompt from the same noise, so their images compare cell by cell.
FIRST_SAMPLE_SEED = 1000
# owner/name, as the Hub names every SDXL pipeline; a path (absolute, ./, ../) never matches.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

_TRAIN_COLOUR = (31, 119, 180)
_VAL_COLOUR = (255, 127, 14)
_AXIS = (60, 60, 60)
_GRID = (225, 225, 225)


def sample_seed(index: int) -> int:
    if index < 0:
        raise ValueError(f"validation image index must be 0 or more, got {index}")
    return FIRST_SAMPLE_SEED + index


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"axis range must be finite, got {low}..{high}")
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _label(value: float) -> str:
    return f"{value:.4g}"


def draw_loss_curve(losses: list[dict], validation: list[dict], title: str, size: tuple[int, int] = (800, 480)):
    """The training loss per logged step (line) and the validation loss (points joined by a dashed
    line; step 0 is the base model), on one pair of axes. Returns a PIL image."""
    from PIL import Image, ImageDraw

    train = [(float(p["step"]), float(p["loss"])) for p in losses if math.isfinite(float(p["loss"]))]
    val = [(float(p["step"]), float(p["val_loss"])) for p in validation
           if p.get("val_loss") is not None and math.isfinite(float(p["val_loss"]))]
    if not train and not val:
        raise ValueError("nothing to plot: no finite training or validation loss")
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    small, normal = _font(13), _font(16)
    left, right, top, bottom = 78, width - 24, 44, height - 56
    steps = [s for s, _ in train + val]
    values = [v for _, v in train + val]
    x_ticks = nice_ticks(min(0.0, min(steps)), max(steps) or 1.0, 6)
    y_ticks = nice_ticks(min(values), max(values), 6)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def at(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x0) / (x1 - x0) * (right - left), bottom - (value - y0) / (y1 - y0) * (bottom - top))

    for tick in y_ticks:
        _, y = at(x0, tick)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((left - 8, y), _label(tick), fill=_AXIS, font=small, anchor="rm")
    for tick in x_ticks:
        x, _ = at(tick, y0)
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        draw.text((x, bottom + 8), f"{tick:g}", fill=_AXIS, font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=_AXIS)
    draw.text((width / 2, 14), title, fill="black", font=normal, anchor="mt")
    draw.text(((left + right) / 2, height - 20), "optimizer step", fill=_AXIS, font=small, anchor="mm")
    draw.text((12, (top + bottom) / 2), "loss", fill=_AXIS, font=small, anchor="lm")
    if len(train) > 1:
        draw.line([at(*p) for p in train], fill=_TRAIN_COLOUR, width=2)
    for point in train if len(train) == 1 else ():
        x, y = at(*point)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_TRAIN_COLOUR)
    points = [at(*p) for p in val]
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        pieces = max(1, int(math.hypot(xb - xa, yb - ya) // 8))
        for i in range(0, pieces, 2):  # dashed
            draw.line([(xa + (xb - xa) * i / pieces, ya + (yb - ya) * i / pieces),
                       (xa + (xb - xa) * (i + 1) / pieces, ya + (yb - ya) * (i + 1) / pieces)],
                      fill=_VAL_COLOUR, width=2)
    for x, y in points:
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=_VAL_COLOUR, outline="black")
    legend = [(f"training loss ({len(train)} steps)", _TRAIN_COLOUR), (f"validation loss ({len(val)} points)",
                                                                        _VAL_COLOUR)]
    for row, (text, colour) in enumerate(legend):
        y = top + 12 + row * 20
        draw.line([(right - 250, y), (right - 222, y)], fill=colour, width=3)
        draw.text((right - 214, y), text, fill="black", font=small, anchor="lm")
    return image


def validation_points(summary: dict) -> list[dict]:
    """Validation losses by step: the base model at step 0 (when measured), any during training, the end."""
    points = []
    if summary.get("baseline_val_loss") is not None:
        points.append({"step": 0, "val_loss": summary["baseline_val_loss"]})
    points.extend(summary.get("validation_losses") or [])
    if summary.get("val_loss") is not None and not any(p["step"] == summary["global_step"] for p in points):
        points.append({"step": summary["global_step"], "val_loss": summary["val_loss"]})
    return sorted(points, key=lambda p: p["step"])


def dataset_version(train_channel: Path) -> str | None:
    """The version `sdxl-lora prepare` wrote into the channel's manifest.json; None for a plain imagefolder."""
    manifest = train_channel / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("version")
    except (json.JSONDecodeError, AttributeError):
        return None


def base_model_name(base: str, hp: Hyperparameters) -> str:
    """The card's base_model for the pipeline loaded from base: the Hub id it came from, never a container path."""
    if hp.base_model_id:
        return hp.base_model_id
    # The text encoders' configs are left out: theirs name CLIP models, not the pipeline.
    for config in (Path(base) / "model_index.json", Path(base) / "unet" / "config.json"):
        recorded = _recorded_name(config)
        if recorded and HUB_ID.fullmatch(recorded):
            return recorded
    if base == hp.pretrained_model_name_or_path:
        return base
    # Nothing staged says where it came from. The folder's own name may still tell one staged model from
    # another; the channel's path is the same /opt/ml/input/data/base_model in every job and would tell nothing.
    return Path(base).resolve().name


def _recorded_name(config: Path) -> str | None:
    try:
        recorded = json.loads(config.read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def _base_model_sentence(base: str) -> str:
    if HUB_ID.fullmatch(base):
        return f"A LoRA adapter for [`{base}`](https://huggingface.co/{base})"
    return f"A LoRA adapter for the SDXL pipeline `{base}`"


def model_card(summary: dict, weights_name: str) -> str:
    """README.md of the adapter, in the Hugging Face model card format (YAML metadata, then markdown)."""
    hp = summary["hyperparameters"]
    base = summary["base_model"]
    version = summary.get("dataset_version")
    samples = summary.get("samples") or []
    seeds = summary.get("sample_seeds") or []
    prompt = hp.get("validation_prompt")
    metadata = ["---", "library_name: diffusers", f"base_model: {json.dumps(base)}", "license: openrail++",
                "pipeline_tag: text-to-image",
                "tags: [stable-diffusion-xl, stable-diffusion-xl-diffusers, text-to-image, diffusers, lora]"]
    if version:
        metadata.append(f"datasets: [{json.dumps(version)}]")
    if prompt and samples:
        metadata.append("widget:")
        for name in samples:
            metadata += [f"  - text: {json.dumps(prompt)}", "    output:", f"      url: {name}"]
    metrics = [("validation loss (held-out images)", summary.get("val_loss")),
               ("validation loss of the base model", summary.get("baseline_val_loss")),
               ("final training loss", summary.get("final_loss"))]
    metric_rows = "\n".join(f"| {name} | {'-' if value is None else f'{value:.6g}'} |" for name, value in metrics)
    card = ["\n".join(metadata), "---", "", f"# SDXL LoRA: {hp.get('learning_rate')} learning rate, rank {hp.get('rank')}",
            "", _base_model_sentence(base),
            f"trained by `sdxl-lora train` on dataset version `{version or 'unversioned imagefolder'}` "
            f"({summary['train_images']} training images, {summary['validation_images']} held out): "
            f"{summary['global_step']} optimizer steps, {summary['epochs']} epochs.", "",
            "## Metrics", "", "| metric | value |", "|---|---|", metric_rows, "",
            "Validation loss: mean noise-prediction error on the held-out images at 5 fixed timesteps with "
            "fixed noise, the same for every trial and the base model (lower is better).", ""]
    if (summary.get("loss_curve")):
        card += [f"![loss curve]({summary['loss_curve']})", ""]
    card += ["## Samples", ""]
    if samples:
        card.append(f"Prompt: `{prompt}`, {hp.get('num_validation_inference_steps')} steps, "
                    f"{hp.get('resolution')}x{hp.get('resolution')}.")
        card.append("")
        card += [f"![seed {seed}]({name}) seed {seed}" for name, seed in zip(samples, seeds or [None] * len(samples))]
    else:
        card.append("None rendered (no `validation_prompt`).")
    card += ["", "## How to use it", "",
             "The same LoRA is here twice, in safetensors; pick the file your tool reads:", "",
             "| file | format | for |", "|---|---|---|",
             f"| `{weights_name}` | diffusers (PEFT) LoRA: `unet.` keys, and `text_encoder.` / "
             "`text_encoder_2.` when the text encoders were trained | diffusers (`pipe.load_lora_weights`), PEFT, "
             "the SageMaker endpoint |",
             f"| `{KOHYA_LORA_WEIGHTS}` | kohya (sd-scripts) LoRA: `lora_unet_`, `lora_te1_` / `lora_te2_` keys, "
             "the trained alpha per module, sd-scripts' metadata | ComfyUI, Forge, Automatic1111 |", "",
             "diffusers:", "", "```python", "import torch",
             "from diffusers import StableDiffusionXLPipeline", "",
             f"pipe = StableDiffusionXLPipeline.from_pretrained({json.dumps(base)}, torch_dtype=torch.float16)",
             "pipe.to(\"cuda\")",
             f"pipe.load_lora_weights(\"path/to/this/folder\", weight_name={json.dumps(weights_name)})",
             f"image = pipe({json.dumps(prompt or 'your prompt')}, cross_attention_kwargs={{\"scale\": 0.8}}).images[0]",
             "```", "",
             f"ComfyUI: copy `{KOHYA_LORA_WEIGHTS}` into `ComfyUI/models/loras/` and load it with a *Load LoRA* "
             "node between the SDXL checkpoint and the sampler. Forge and Automatic1111: copy it into "
             f"`models/Lora/` and add `<lora:{Path(KOHYA_LORA_WEIGHTS).stem}:0.8>` to the prompt (the name is the "
             "file's, so renaming the file renames the tag). Its text-encoder part, when the text encoders were "
             "trained, applies too (ComfyUI's strength_clip scales it).", "", "## Hyperparameters", "",
             "| name | value |", "|---|---|"]
    card += [f"| {key} | {value} |" for key, value in sorted(hp.items())]
    return "\n".join(card) + "\n"


def write(model_dir: Path, output_dir: Path, summary: dict, weights_name: str, title: str) -> None:
    """The loss curve and model card into the model directory, then a copy of what a person looks at
    (curve, samples, summary) into output/data/report/. Updates summary["loss_curve"]."""
    points = validation_points(summary)
    if summary.get("losses") or points:
        draw_loss_curve(summary.get("losses") or [], points, title).save(model_dir / LOSS_CURVE)
        summary["loss_curve"] = LOSS_CURVE
    (model_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    (model_dir / "README.md").write_text(model_card(summary, weights_name))
    report = output_dir / "data" / REPORT_DIR
    shutil.rmtree(report, ignore_errors=True)
    report.mkdir(parents=True)
    for name in [SUMMARY, "README.md", *([LOSS_CURVE] if summary.get("loss_curve") else []),
                 *(summary.get("samples") or [])]:
        target = report / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / name, target)
