"""`make bench-train`: time `python -m ml.train` against a diffusers-style training loop.

Both jobs run as their own processes on the same base model, images, hyperparameters,
seed and environment, alternately (ours, baseline, ours, ...) so drift hits both alike.
For each run the benchmark measures from outside the whole-job wall time (process start
to exit) and the peak RSS (ru_maxrss of the reaped child, from os.wait4); each job
reports its own training-loop seconds and steps/s in model/training_summary.json.
Medians over --repeats runs are compared with the goals of the issue.

  --model tiny   a tiny random SDXL (ml.tiny_model), for a CPU: seconds per job
  --model sdxl   the real SDXL architecture with random fp16 weights, for a GPU

Exits 0 whether or not the goals are met; non-zero only when a job fails.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ml import synthetic
from ml.demo import lay_out_job

REPO = Path(__file__).resolve().parent.parent
BASELINE = Path(__file__).resolve().parent / "baseline_diffusers_loop.py"
DATASET_IMAGES = 16
SEED = 7

# Per model: what the issue asks to measure by default. mixed_precision None means fp16
# when CUDA is available (SDXL in fp32 is not how anyone trains it on a GPU), else no.
PRESETS = {
    "tiny": {"resolution": 64, "batch_size": 2, "steps": 150, "mixed_precision": "no"},
    "sdxl": {"resolution": 1024, "batch_size": 1, "steps": 30, "mixed_precision": None},
}

# Goals of the issue: ours against the baseline.
WHOLE_JOB_GOAL = 1.5  # baseline wall seconds / ours
LOOP_GOAL = 1.2  # ours steps/s / baseline
MEMORY_GOAL = 1.0  # ours peak RSS / baseline, at most

# ---------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0's component configurations (the public
# config.json files), for a model of the real size and shape with random weights.

SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 2048, "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": True, "upcast_attention": None, "resnet_time_scale_shift": "default",
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "time_embedding_type": "positional",
    "conv_in_kernel": 3, "conv_out_kernel": 3,
}
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "layers_per_block": 2,
    "norm_num_groups": 32, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}
# The text encoders keep the real vocabulary size (49408), which covers the character-level
# tokenizers written by ml.tiny_model. eos_token_id 2 selects CLIP's legacy pooling (the
# position of the largest token id), which finds those tokenizers' end token as well:
# it has the largest id of their vocabulary.
_CLIP_TEXT = {
    "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
    "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SDXL_TEXT_ENCODER = {  # CLIP ViT-L/14
    **_CLIP_TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768,
}
SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14
    **_CLIP_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280,
}
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "steps_offset": 1, "timestep_spacing": "leading",
}


def build_sdxl(out_dir: Path) -> None:
    """SDXL-sized pipeline with random fp16 weights, in diffusers layout."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ml.tiny_model import write_tokenizer

    # Random initialisation of 3.5 billion parameters takes minutes on a CPU, seconds on a GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    def make(factory):  # built in fp32 and halved one at a time: peak is the UNet's 10 GB plus 5 GB
        with torch.device(device):
            return factory().to(torch.float16)

    unet = make(lambda: UNet2DConditionModel(**SDXL_UNET))
    vae = make(lambda: AutoencoderKL(**SDXL_VAE))
    text_encoder = make(lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER)))
    text_encoder_2 = make(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)))
    for name in ("tokenizer", "tokenizer_2"):
        write_tokenizer(out_dir / name)
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(out_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(out_dir / "tokenizer_2"),
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)


def build_model(model: str, out_dir: Path) -> None:
    if model == "tiny":
        from ml import tiny_model

        tiny_model.build(out_dir)
    else:
        build_sdxl(out_dir)


def ensure_model(model: str, out_dir: Path) -> Path:
    """Build the base model once per work directory, in a process of its own.

    A separate process keeps the builder's memory (and any CUDA context) out of this
    one, which stays small while the jobs run beside it.
    """
    if not (out_dir / "model_index.json").exists():
        print(f"building the {model} base model in {out_dir} ...", flush=True)
        builder = multiprocessing.get_context("spawn").Process(target=build_model, args=(model, out_dir))
        builder.start()
        builder.join()
        if builder.exitcode != 0:
            raise SystemExit(f"building the {model} base model failed (exit status {builder.exitcode})")
    return out_dir


def ensure_dataset(out_dir: Path, resolution: int) -> Path:
    """16:9 storyboard frames whose short side is the training resolution."""
    if not (out_dir / "metadata.jsonl").exists():
        synthetic.write_dataset(out_dir, count=DATASET_IMAGES, width=resolution * 16 // 9, height=resolution)
    return out_dir


# ---------------------------------------------------------------------------------------
# Running and measuring one job


@dataclass
class Run:
    wall_seconds: float  # process start to exit, measured here
    peak_rss_mb: float  # ru_maxrss of the child, measured here
    loop_seconds: float  # reported by the job
    steps_per_second: float
    peak_gpu_mb: float | None


class JobFailed(Exception):
    pass


def measure(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run command to completion; its wall seconds and peak RSS in MB."""
    with log.open("wb") as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        # wait4 reaps the child and returns its own resource usage; Linux reports ru_maxrss in KiB.
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise JobFailed(f"{' '.join(command)} exited with status {child.returncode}; last lines of its log:\n{tail}")
    return wall, usage.ru_maxrss / 1024


def _run(command: list[str], env: dict[str, str], run_dir: Path, summary: Path) -> Run:
    wall, rss = measure(command, env, run_dir / "job.log")
    reported = json.loads(summary.read_text())
    return Run(round(wall, 3), round(rss, 1), reported["loop_seconds"], reported["steps_per_second"],
               reported.get("peak_gpu_mb"))


def run_ours(run_dir: Path, base_model: Path, dataset: Path, hyperparameters: dict, env: dict[str, str]) -> Run:
    """`python -m ml.train` in a SageMaker-style job directory."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a reused --workdir must not leave outputs behind
    lay_out_job(run_dir, base_model, dataset, {
        **hyperparameters,
        "checkpointing_steps": hyperparameters["max_train_steps"] + 1,  # the baseline writes none either
        "validation_split": 0,
        "logging_steps": 1,
    })
    # SM_NUM_GPUS=1: one training process, like the baseline, also on a multi-GPU host.
    job_env = {**env, "SAGEMAKER_BASE_DIR": str(run_dir), "SM_NUM_GPUS": "1"}
    return _run([sys.executable, "-m", "ml.train"], job_env, run_dir, run_dir / "model" / "training_summary.json")


def run_baseline(run_dir: Path, base_model: Path, dataset: Path, hyperparameters: dict, env: dict[str, str]) -> Run:
    """baseline_diffusers_loop.py with the same values as command-line flags."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    flags = [f"--{key}={value}" for key, value in hyperparameters.items()]
    command = [sys.executable, str(BASELINE), f"--pretrained_model_name_or_path={base_model}",
               f"--train_data_dir={dataset}", f"--output_dir={run_dir / 'model'}", *flags]
    return _run(command, env, run_dir, run_dir / "model" / "training_summary.json")


# ---------------------------------------------------------------------------------------
# Report


def medians(runs: list[Run]) -> dict:
    figures = {}
    for field in ("wall_seconds", "loop_seconds", "steps_per_second", "peak_rss_mb", "peak_gpu_mb"):
        values = [getattr(run, field) for run in runs if getattr(run, field) is not None]
        figures[field] = statistics.median(values) if values else None
    return figures


def compare(ours: dict, baseline: dict) -> dict:
    ratios = {
        "whole_job_speedup": baseline["wall_seconds"] / ours["wall_seconds"],
        "loop_speedup": ours["steps_per_second"] / baseline["steps_per_second"],
        "memory_ratio": ours["peak_rss_mb"] / baseline["peak_rss_mb"],
    }
    if ours["peak_gpu_mb"] and baseline["peak_gpu_mb"]:
        ratios["gpu_memory_ratio"] = ours["peak_gpu_mb"] / baseline["peak_gpu_mb"]
    goals = {
        "whole_job_speedup": ratios["whole_job_speedup"] >= WHOLE_JOB_GOAL,
        "loop_speedup": ratios["loop_speedup"] >= LOOP_GOAL,
        "memory_ratio": ratios["memory_ratio"] <= MEMORY_GOAL,
    }
    return {"ratios": ratios, "goals_met": goals}


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(title: str, ours: dict, baseline: dict, comparison: dict) -> None:
    rows = [("whole job (s)", "wall_seconds", 2), ("training loop (s)", "loop_seconds", 2),
            ("loop (steps/s)", "steps_per_second", 2), ("peak RSS (MB)", "peak_rss_mb", 0)]
    if ours["peak_gpu_mb"] is not None:
        rows.append(("peak GPU memory (MB)", "peak_gpu_mb", 0))
    print(f"\n{title}\n")
    print(f"{'':24}{'ours':>12}{'baseline':>12}")
    for label, key, digits in rows:
        print(f"{label:24}{_fmt(ours[key], digits):>12}{_fmt(baseline[key], digits):>12}")
    ratios, met = comparison["ratios"], comparison["goals_met"]
    print()
    lines = [("whole-job speedup", "whole_job_speedup", f">= {WHOLE_JOB_GOAL}x"),
             ("loop speedup", "loop_speedup", f">= {LOOP_GOAL}x"),
             ("peak RSS ours/baseline", "memory_ratio", f"<= {MEMORY_GOAL}x")]
    for label, key, goal in lines:
        print(f"{label:24}{ratios[key]:>11.2f}x   goal {goal:8} {'met' if met[key] else 'NOT MET'}")
    if "gpu_memory_ratio" in ratios:
        print(f"{'peak GPU ours/baseline':24}{ratios['gpu_memory_ratio']:>11.2f}x   (information)")


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, help="optimizer steps per job (tiny: 150, sdxl: 30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job; medians are compared")
    parser.add_argument("--resolution", type=int, help="tiny: 64, sdxl: 1024")
    parser.add_argument("--batch-size", type=int, help="tiny: 2, sdxl: 1")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                        help="tiny: no; sdxl: fp16 with CUDA, else no")
    parser.add_argument("--workdir", type=Path,
                        help="keep the base model, data and runs here (reused next time); default: a temporary directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    preset = PRESETS[args.model]
    args.steps = args.steps or preset["steps"]
    args.resolution = args.resolution or preset["resolution"]
    args.batch_size = args.batch_size or preset["batch_size"]
    args.mixed_precision = args.mixed_precision or preset["mixed_precision"] or _default_precision()
    return args


def _default_precision() -> str:
    import torch

    return "fp16" if torch.cuda.is_available() else "no"


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    base_model = ensure_model(args.model, workdir / f"base-{args.model}")
    dataset = ensure_dataset(workdir / f"dataset-{args.resolution}", args.resolution)
    # Same values for both jobs, under the names both understand. Both default to random
    # crops and no flips; the baseline's defaults otherwise differ, so everything is explicit.
    hyperparameters = {
        "resolution": args.resolution, "train_batch_size": args.batch_size, "max_train_steps": args.steps,
        "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0, "rank": 4,
        "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "mixed_precision": args.mixed_precision,
        "seed": SEED,
    }
    # One environment for both (so the same thread settings), with the Hub out of reach.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs: dict[str, list[Run]] = {"ours": [], "baseline": []}
    jobs = (("ours", run_ours), ("baseline", run_baseline))
    for repeat in range(args.repeats):
        for name, run_job in jobs:  # alternate, so slow drift of the machine hits both
            run = run_job(workdir / "runs" / f"{name}-{repeat}", base_model, dataset, hyperparameters, env)
            runs[name].append(run)
            print(f"run {repeat + 1}/{args.repeats} {name:8}: {run.wall_seconds:7.2f} s whole job, "
                  f"{run.steps_per_second:7.2f} steps/s, {run.peak_rss_mb:7.0f} MB peak RSS", flush=True)
    ours, baseline = medians(runs["ours"]), medians(runs["baseline"])
    return {
        "model": args.model, "repeats": args.repeats, "hyperparameters": hyperparameters,
        "runs": {name: [asdict(run) for run in found] for name, found in runs.items()},
        "median": {"ours": ours, "baseline": baseline},
        **compare(ours, baseline),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            result = benchmark(args, workdir)
        except JobFailed as failure:
            print(f"\njob failed: {failure}", file=sys.stderr)
            return 1
    hp = result["hyperparameters"]
    print_report(f"model {args.model}: {hp['max_train_steps']} steps, resolution {hp['resolution']}, "
                 f"batch {hp['train_batch_size']}, mixed precision {hp['mixed_precision']}; "
                 f"median of {args.repeats} run(s) each, alternating",
                 result["median"]["ours"], result["median"]["baseline"], result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
