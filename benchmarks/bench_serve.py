"""`make bench-serve`: serving many LoRA adapters, against the original way and the base model.

One process, one base model, the same requests, interleaved request by request so drift hits
every path alike:

  ours      ml.serve.inference's Engine (what `sdxl-lora serve` runs): the active (adapters, scale) fused,
            a change restored and re-fused from the cached matrices
  original  the original system's way, per request: unfuse_lora + unload_lora_weights +
            load_lora_weights (from disk) + fuse_lora, then generate
  unfused   diffusers' PEFT path without fusing: every adapter loaded, set_adapters per request
  base      the base pipeline without any LoRA

The request mix repeats and switches adapters and scales the way an endpoint shared by several
adapters sees them. Before the mix, a fresh Engine is loaded (warm-up included) and its first
request after healthy is timed against the next one.

  --model tiny   the tiny random SDXL (ml.fixtures.tiny_model), for a CPU
  --model sdxl   the real SDXL architecture with random fp16 weights, for a GPU

Exits 0 whether or not the goals are met; non-zero only when something fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ensure_model  # noqa: E402  (benchmarks/ is a folder of scripts)

PRESETS = {"tiny": {"size": 64, "steps": 4, "repeats": 5}, "sdxl": {"size": 1024, "steps": 30, "repeats": 2}}
PROMPT = "storyboard frame, ink outline, a red circle on the left"
GUIDANCE = 5.0
# (adapter, lora_scale) per request: repeats, scale changes and adapter changes.
MIX = [("default", 1.0), ("default", 1.0), ("default", 1.0), ("ink", 1.0), ("ink", 1.0), ("ink", 0.6),
       ("paper", 1.0), ("default", 1.0), ("paper", 1.0), ("paper", 1.0), ("ink", 0.6), ("default", 0.8)]
ADAPTERS = {"default": 0, "ink": 1, "paper": 2}

# Goals of issue 11.
OVERHEAD_GOAL = 0.05  # a LoRA image at most 5% slower than the base model's
CPU_SWITCH_SPEEDUP_GOAL = 10.0  # a switch at least 10x faster than the original way (CPU, tiny)
GPU_SWITCH_GOAL_SECONDS = 0.100  # a switch under 100 ms (GPU, SDXL)
FIRST_REQUEST_GOAL = 0.10  # the first request after healthy within 10% of the next (GPU, SDXL)


def write_adapters(base_model: Path, model_dir: Path, rank: int) -> None:
    """Random (not no-op) LoRAs on the UNet and both text encoders, saved as `sdxl-lora train` saves them."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ml.contract.container import LORA_WEIGHTS
    from ml.serve.adapters import ADAPTERS_DIR
    from ml.train.models import TEXT_LORA_TARGETS, UNET_LORA_TARGETS

    if (model_dir / LORA_WEIGHTS).exists():
        return
    for name, seed in ADAPTERS.items():
        pipeline = StableDiffusionXLPipeline.from_pretrained(base_model)
        torch.manual_seed(seed)
        layers = {}
        for part, targets in (("unet", UNET_LORA_TARGETS), ("text_encoder", TEXT_LORA_TARGETS),
                              ("text_encoder_2", TEXT_LORA_TARGETS)):
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets)
            module = getattr(pipeline, part)
            module.add_adapter(config)
            for parameter in module.parameters():  # small, so an image changes without turning to noise
                if parameter.requires_grad:
                    parameter.data.mul_(0.3)
            layers[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
            layers[f"{part}_lora_adapter_metadata"] = config.to_dict()
        folder = model_dir if name == "default" else model_dir / ADAPTERS_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        StableDiffusionXLPipeline.save_lora_weights(folder, weight_name=LORA_WEIGHTS, safe_serialization=True,
                                                    **layers)
        del pipeline


def adapter_file(model_dir: Path, name: str) -> Path:
    from ml.contract.container import LORA_WEIGHTS
    from ml.serve.adapters import ADAPTERS_DIR

    return (model_dir if name == "default" else model_dir / ADAPTERS_DIR / name) / LORA_WEIGHTS


class Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


def load_pipeline(base_model: Path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    cuda = torch.cuda.is_available()
    pipeline = StableDiffusionXLPipeline.from_pretrained(base_model, dtype=torch.float16 if cuda else torch.float32)
    pipeline.to("cuda" if cuda else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, args, seed: int) -> None:
    import torch

    pipeline(prompt=PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps,
             guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed))


class Original:
    """The original system: every request unfuses, unloads, loads from disk and fuses its LoRA."""

    def __init__(self, pipeline, model_dir: Path, clock: Clock):
        self.pipeline, self.model_dir, self.clock, self.loaded = pipeline, model_dir, clock, False

    def switch(self, name: str, scale: float) -> float:
        started = self.clock.now()
        if self.loaded:
            self.pipeline.unfuse_lora()
            self.pipeline.unload_lora_weights()
        path = adapter_file(self.model_dir, name)
        self.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        self.pipeline.fuse_lora(lora_scale=scale, adapter_names=[name])
        self.loaded = True
        return self.clock.now() - started


def timed(clock: Clock, function) -> float:
    started = clock.now()
    function()
    return clock.now() - started


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from ml.serve import inference

    cuda = torch.cuda.is_available()
    clock = Clock(cuda)
    base_model = ensure_model(args.model, workdir / f"base-{args.model}")
    model_dir = workdir / f"model-{args.model}-r{args.rank}"
    print(f"writing {len(ADAPTERS)} random rank-{args.rank} adapters in {model_dir} ...", flush=True)
    write_adapters(base_model, model_dir, args.rank)
    os.environ["BASE_MODEL"] = str(base_model)

    # First: a fresh engine, nothing warm yet in this process but what its own warm-up does.
    started = time.perf_counter()
    engine = inference.model_fn(model_dir)
    healthy_seconds = time.perf_counter() - started

    def ours(name: str, scale: float, seed: int) -> inference.Prediction:
        return engine.generate(inference.parse_request({
            "prompt": PROMPT, "width": args.size, "height": args.size, "num_inference_steps": args.steps,
            "guidance_scale": GUIDANCE, "seed": seed, "adapter": name, "lora_scale": scale}))

    first = timed(clock, lambda: ours("default", 1.0, 1))
    second = timed(clock, lambda: ours("default", 1.0, 2))
    print(f"healthy after {healthy_seconds:.2f} s (warm-up {engine.warmup_seconds:.2f} s); first request "
          f"{first:.3f} s, next {second:.3f} s", flush=True)

    original = Original(load_pipeline(base_model), model_dir, clock)
    base = load_pipeline(base_model)  # never touched by a LoRA
    unfused = load_pipeline(base_model)
    for name in ADAPTERS:
        path = adapter_file(model_dir, name)
        unfused.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)

    rows = {key: [] for key in ("ours_image", "ours_request", "ours_switch", "original_image", "original_switch",
                                "original_request", "unfused_image", "base_image")}
    previous = None
    for round_ in range(args.repeats):
        for index, (name, scale) in enumerate(MIX):
            seed = round_ * 100 + index
            request_seconds = timed(clock, lambda: rows.setdefault("_p", []).append(ours(name, scale, seed)))
            prediction = rows.pop("_p")[0]
            rows["ours_request"].append(request_seconds)
            rows["ours_image"].append(prediction.inference_seconds)
            if (name, scale) != previous:
                rows["ours_switch"].append(prediction.timings["fuse_seconds"])

            switch = original.switch(name, scale)
            image = timed(clock, lambda: generate(original.pipeline, args, seed))
            rows["original_switch"].append(switch)
            rows["original_image"].append(image)
            rows["original_request"].append(switch + image)

            unfused.set_adapters([name], adapter_weights=[scale])
            rows["unfused_image"].append(timed(clock, lambda: generate(unfused, args, seed)))

            rows["base_image"].append(timed(clock, lambda: generate(base, args, seed)))
            previous = (name, scale)
        print(f"round {round_ + 1}/{args.repeats} done", flush=True)
    medians = {key: statistics.median(values) for key, values in rows.items()}
    medians.update({"first_request": first, "second_request": second, "healthy": healthy_seconds,
                    "switches_per_round": sum(1 for i, item in enumerate(MIX) if i == 0 or item != MIX[i - 1])})
    return medians


def report(results: dict, args: argparse.Namespace, device: str) -> None:
    ms = lambda seconds: f"{seconds * 1000:9.1f}"  # noqa: E731
    base = results["base_image"]
    print(f"\nbench-serve: --model {args.model}, {args.size}x{args.size}, {args.steps} steps, guidance {GUIDANCE}, "
          f"rank {args.rank}, {len(MIX)} requests x {args.repeats} rounds ({results['switches_per_round']} "
          f"changes of adapter or scale per round), on {device}; medians in ms\n")
    print(f"{'path':<44}{'image':>10}{'switch':>10}{'request':>10}{'image vs base':>15}")
    lines = [
        ("ours: fused, re-fused from cache on change", results["ours_image"], results["ours_switch"],
         results["ours_request"]),
        ("original: unfuse+unload+load+fuse each req", results["original_image"], results["original_switch"],
         results["original_request"]),
        ("unfused PEFT layers, set_adapters", results["unfused_image"], None, None),
        ("base model, no LoRA", base, None, None),
    ]
    for label, image, switch, request in lines:
        print(f"{label:<44}{ms(image)}{ms(switch) if switch is not None else ' ' * 9 + '-'}"
              f"{ms(request) if request is not None else ' ' * 9 + '-'}{image / base:>14.3f}x")
    overhead = results["ours_image"] / base - 1
    speedup = results["original_switch"] / max(results["ours_switch"], 1e-9)
    first_ratio = results["first_request"] / results["second_request"] - 1
    print(f"\nfirst request after healthy {ms(results['first_request']).strip()} ms, the next "
          f"{ms(results['second_request']).strip()} ms (healthy after {results['healthy']:.2f} s)")
    print(f"switch: ours {ms(results['ours_switch']).strip()} ms, original {ms(results['original_switch']).strip()} "
          f"ms: {speedup:.1f}x faster")
    print(f"requests of the mix: ours {results['original_request'] / results['ours_request']:.2f}x faster than "
          "the original way\n")

    def goal(text: str, met: bool, measured: str) -> None:
        print(f"  [{'met' if met else 'NOT met'}] {text}: {measured}")

    print("goals (issue 11):")
    goal("LoRA image within 5% of the base model", overhead <= OVERHEAD_GOAL, f"{overhead * 100:+.1f}%")
    if args.model == "sdxl":
        goal("switch under 100 ms", results["ours_switch"] < GPU_SWITCH_GOAL_SECONDS,
             f"{results['ours_switch'] * 1000:.1f} ms")
        goal("first request after healthy within 10% of the next", first_ratio <= FIRST_REQUEST_GOAL,
             f"{first_ratio * 100:+.1f}%")
    else:
        goal("switch at least 10x faster than the original way", speedup >= CPU_SWITCH_SPEEDUP_GOAL,
             f"{speedup:.1f}x")
        print(f"  [info] first request after healthy vs the next: {first_ratio * 100:+.1f}% (a GPU goal)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--size", type=int, help="image width and height (tiny: 64, sdxl: 1024)")
    parser.add_argument("--steps", type=int, help="denoising steps (tiny: 4, sdxl: 30)")
    parser.add_argument("--repeats", type=int, help="rounds of the request mix (tiny: 5, sdxl: 2)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of the adapters (the production rank: 4)")
    parser.add_argument("--workdir", type=Path, help="keeps the built model between runs (default: a temporary one)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.size % 8 or args.size < 8:
        parser.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.steps < 1 or args.repeats < 1 or args.rank < 1:
        parser.error("--steps, --repeats and --rank must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    import torch

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):  # load reports and progress bars bury the table
        library.set_verbosity_error()
        library.disable_progress_bar()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    if args.model == "sdxl" and not torch.cuda.is_available():
        print("note: --model sdxl without a GPU takes a long time; its goals are GPU goals", flush=True)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = benchmark(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
            results = benchmark(args, Path(workdir))
    report(results, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
