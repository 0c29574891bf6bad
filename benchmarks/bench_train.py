"""`make bench-train`: the training job against diffusers' own train_text_to_image_lora_sdxl.py.

The yardstick is the real script, pointed at by path (--reference, default
../shared/reference/train_text_to_image_lora_sdxl.py from the repository root; see the README
there), never a copy in this project. Both jobs run as their own processes on the same base
model, images, hyperparameters, seed and environment, alternately (ours, reference, ours, ...)
so drift of a shared machine hits both alike. For each run this measures from outside the
whole-job wall time (process start to exit) and the peak RSS (ru_maxrss of the reaped child,
from os.wait4); ours reports its loop seconds, steps/s and peak GPU memory in
model/training_summary.json, the reference in its `REFLOOP seconds=S steps=N steps_per_s=R
peak_gpu_mb=M` line (torch.cuda.max_memory_allocated in both). Medians over --repeats runs are
compared with the goals of issue 12.

  --model tiny   a tiny random SDXL (ml.fixtures.tiny_model), for a CPU: seconds per job
  --model sdxl   the real SDXL architecture with random fp16 weights, for a GPU
  --config production   the original system's settings on top: gradient accumulation 4,
                 gradient checkpointing, text-encoder LoRAs, 8-bit Adam (CUDA only)
  --accelerate-loop   a third job in the rotation: ours with fast_path=false, to see what the
                 fast step (ml/train/fast_step.py) adds on this machine

The reference needs `datasets` (the `bench` extra; `make bench-train` installs it). Where
torchvision cannot import, the reference's folder goes on PYTHONPATH for its tvshim/.
Exits 0 whether or not the goals are met; non-zero only when a job fails.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ml.fixtures import synthetic
from sdxl_lora_ops.single_job import lay_out_job

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE = "../shared/reference/train_text_to_image_lora_sdxl.py"  # from the repository root
DATASET_IMAGES = 16
SEED = 7

# Per model: what issue 12 measures. mixed_precision None means fp16 when CUDA is available
# (SDXL in fp32 is not how anyone trains it on a GPU), else no.
PRESETS = {
    "tiny": {"resolution": 64, "batch_size": 2, "steps": 60, "mixed_precision": "no"},
    "sdxl": {"resolution": 1024, "batch_size": 1, "steps": 30, "mixed_precision": None},
}
# The original system's production settings (docs/training-job.md, Hyperparameters), beside the default ones.
CONFIGS = {
    "default": {},
    "production": {"gradient_accumulation_steps": 4, "gradient_checkpointing": True, "train_text_encoder": True,
                   "use_8bit_adam": True},
}

# Goals of issue 12, ours against the reference: (figure, ">=" or "<=", value). The production
# configuration has none: its figures are reported as measured.
GOALS = {
    "tiny": [("whole_job_speedup", ">=", 1.5), ("loop_speedup", ">=", 1.5), ("rss_ratio", "<=", 0.8)],
    "sdxl": [("whole_job_speedup", ">=", 2.0), ("loop_speedup", ">=", 3.0), ("steps_per_second", ">=", 4.0),
             ("gpu_memory_ratio", "<=", 0.8)],
}

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
# tokenizers written by ml.fixtures.tiny_model. eos_token_id 2 selects CLIP's legacy pooling (the
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

    from ml.fixtures.tiny_model import write_tokenizer

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
        from ml.fixtures import tiny_model

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
    phases: dict | None = None  # ours: seconds since its start at the end of each phase (training_summary.json)


class JobFailed(Exception):
    pass


def measure(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run command to completion; its wall seconds and peak RSS in MB."""
    with log.open("wb") as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        # wait4 reaps the child and returns its own resource usage; Linux reports ru_maxrss in KiB.
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise JobFailed(f"{' '.join(command)} exited with status {child.returncode}; last lines of {log}:\n{tail}")
    return wall, usage.ru_maxrss / 1024


def run_ours(run_dir: Path, base_model: Path, dataset: Path, hyperparameters: dict, env: dict[str, str],
             fast_path: bool = True) -> Run:
    """`python -m ml.train.job` in a SageMaker-style job directory."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a reused --workdir must not leave outputs behind
    lay_out_job(run_dir, base_model, dataset, {
        **{key: str(value).lower() if isinstance(value, bool) else value for key, value in hyperparameters.items()},
        "checkpointing_steps": hyperparameters["max_train_steps"] + 1,  # the reference writes none either
        "validation_split": 0,
        "logging_steps": 1,
        "fast_path": str(fast_path).lower(),
    })
    # SM_NUM_GPUS=1: one training process, like the reference, also on a multi-GPU host.
    job_env = {**env, "SAGEMAKER_BASE_DIR": str(run_dir), "SM_NUM_GPUS": "1"}
    wall, rss = measure([sys.executable, "-m", "ml.train.job"], job_env, REPO, run_dir / "job.log")
    reported = json.loads((run_dir / "model" / "training_summary.json").read_text())
    return Run(round(wall, 3), round(rss, 1), reported["loop_seconds"], reported["steps_per_second"],
               reported.get("peak_gpu_mb"), reported.get("phase_seconds"))


REFLOOP = re.compile(r"REFLOOP seconds=(?P<seconds>[\d.]+) steps=(?P<steps>\d+) steps_per_s=(?P<rate>[\d.]+) "
                     r"peak_gpu_mb=(?P<gpu>[\d.]+)")


def reference_command(reference: Path, base_model: Path, dataset: Path, output_dir: Path,
                      hyperparameters: dict) -> list[str]:
    """The reference script with the same values as its own flags (booleans are store_true flags)."""
    flags = []
    for key, value in hyperparameters.items():
        if isinstance(value, bool):
            flags += [f"--{key}"] if value else []
        else:
            flags.append(f"--{key}={value}")
    return [sys.executable, str(reference), f"--pretrained_model_name_or_path={base_model}",
            f"--train_data_dir={dataset}", f"--output_dir={output_dir}", *flags,
            f"--checkpointing_steps={hyperparameters['max_train_steps'] + 1}", "--dataloader_num_workers=0"]


def run_reference(reference: Path, run_dir: Path, base_model: Path, dataset: Path, hyperparameters: dict,
                  env: dict[str, str]) -> Run:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # A cold `datasets` cache per run, as a fresh training job has.
    job_env = {**env, "HF_DATASETS_CACHE": str(run_dir / "datasets-cache")}
    log = run_dir / "job.log"
    wall, rss = measure(reference_command(reference, base_model, dataset, run_dir / "model", hyperparameters),
                        job_env, run_dir, log)
    found = REFLOOP.search(log.read_text(errors="replace"))
    if found is None:
        raise JobFailed(f"{reference} printed no REFLOOP line (see {log}): is it the instrumented copy?")
    gpu = float(found["gpu"])
    return Run(round(wall, 3), round(rss, 1), float(found["seconds"]), float(found["rate"]), gpu or None)


def torchvision_imports(env: dict[str, str]) -> bool:
    return subprocess.run([sys.executable, "-c", "import torchvision"], env=env, capture_output=True).returncode == 0


def reference_env(reference: Path, env: dict[str, str]) -> dict[str, str]:
    """The reference's environment: its folder (tvshim/) on PYTHONPATH where torchvision cannot import."""
    if torchvision_imports(env):
        return env
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(reference.parent), env.get("PYTHONPATH")]))}


# ---------------------------------------------------------------------------------------
# Report


def medians(runs: list[Run]) -> dict:
    figures = {}
    for field in ("wall_seconds", "loop_seconds", "steps_per_second", "peak_rss_mb", "peak_gpu_mb"):
        values = [getattr(run, field) for run in runs if getattr(run, field) is not None]
        figures[field] = statistics.median(values) if values else None
    return figures


def compare(ours: dict, reference: dict, goals: list[tuple[str, str, float]]) -> dict:
    figures = {
        "whole_job_speedup": reference["wall_seconds"] / ours["wall_seconds"],
        "loop_speedup": ours["steps_per_second"] / reference["steps_per_second"],
        "rss_ratio": ours["peak_rss_mb"] / reference["peak_rss_mb"],
        "steps_per_second": ours["steps_per_second"],
    }
    if ours["peak_gpu_mb"] and reference["peak_gpu_mb"]:
        figures["gpu_memory_ratio"] = ours["peak_gpu_mb"] / reference["peak_gpu_mb"]
    met = {}
    for name, sense, value in goals:
        if name in figures:
            met[name] = figures[name] >= value if sense == ">=" else figures[name] <= value
    return {"ratios": figures, "goals_met": met}


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(title: str, ours: dict, reference: dict, comparison: dict, goals: list) -> None:
    rows = [("whole job (s)", "wall_seconds", 2), ("training loop (s)", "loop_seconds", 2),
            ("loop (steps/s)", "steps_per_second", 3), ("peak RSS (MB)", "peak_rss_mb", 0)]
    if ours["peak_gpu_mb"] is not None or reference["peak_gpu_mb"] is not None:
        rows.append(("peak GPU memory (MB)", "peak_gpu_mb", 0))
    print(f"\n{title}\n")
    print(f"{'':24}{'ours':>12}{'reference':>12}")
    for label, key, digits in rows:
        print(f"{label:24}{_fmt(ours[key], digits):>12}{_fmt(reference[key], digits):>12}")
    ratios, met = comparison["ratios"], comparison["goals_met"]
    targets = {name: f"{sense} {value}" for name, sense, value in goals}
    print()
    lines = [("whole-job speedup", "whole_job_speedup", "x"), ("loop speedup", "loop_speedup", "x"),
             ("peak RSS ours/reference", "rss_ratio", "x"), ("peak GPU ours/reference", "gpu_memory_ratio", "x"),
             ("ours, loop steps/s", "steps_per_second", "")]
    for label, key, unit in lines:
        if key not in ratios or (key == "steps_per_second" and key not in targets):
            continue
        verdict = (f"goal {targets[key]:8} {'met' if met.get(key) else 'NOT MET'}" if key in targets
                   else "(no goal)")
        print(f"{label:24}{ratios[key]:>11.2f}{unit or ' '}   {verdict}")


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default",
                        help="production: gradient accumulation 4, gradient checkpointing, text-encoder LoRAs, "
                             "8-bit Adam (CUDA only)")
    parser.add_argument("--reference", type=Path, default=Path(DEFAULT_REFERENCE),
                        help="diffusers' train_text_to_image_lora_sdxl.py with its REFLOOP line; a relative "
                             f"path is taken from the repository root (default {DEFAULT_REFERENCE})")
    parser.add_argument("--steps", type=int, help="optimizer steps per job (tiny: 60, sdxl: 30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job; medians are compared")
    parser.add_argument("--resolution", type=int, help="tiny: 64, sdxl: 1024")
    parser.add_argument("--batch-size", type=int, help="tiny: 2, sdxl: 1")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                        help="tiny: no; sdxl: fp16 with CUDA, else no")
    parser.add_argument("--workdir", type=Path,
                        help="keep the base model, data and runs here (reused next time); default: a temporary directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--threads", type=_thread_settings,
                        help="comma-separated thread settings, each a benchmark of its own: `default` (OMP_NUM_THREADS "
                             "unset: torch's pool; ours then picks its own count) or N (OMP_NUM_THREADS=N for both "
                             "jobs). Default: default,1 on a CPU (side by side), default on a GPU")
    parser.add_argument("--accelerate-loop", action="store_true",
                        help="a third job in the rotation: ours with fast_path=false (the accelerate loop)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.model]
    args.steps = args.steps or preset["steps"]
    args.resolution = args.resolution or preset["resolution"]
    args.batch_size = args.batch_size or preset["batch_size"]
    args.mixed_precision = args.mixed_precision or preset["mixed_precision"] or _default_precision()
    if args.threads is None:
        args.threads = [None] if _cuda() else [None, 1]
    args.reference = (REPO / args.reference).resolve()
    if not args.reference.is_file():
        parser.error(f"no reference script at {args.reference}: pass --reference PATH "
                     "(diffusers' train_text_to_image_lora_sdxl.py with its REFLOOP line)")
    return args


def _thread_settings(text: str) -> list[int | None]:
    settings = []
    for item in text.split(","):
        item = item.strip()
        if item == "default":
            settings.append(None)
        elif item.isdigit() and int(item) > 0:
            settings.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"a thread setting is `default` or a positive count, got {item!r}")
    return settings


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _default_precision() -> str:
    return "fp16" if _cuda() else "no"


def hyperparameters_for(args: argparse.Namespace) -> dict:
    """Same values for both jobs, under the names both understand. Both default to random crops
    and no flips; other defaults differ (the reference warms up for 500 steps), so all are explicit."""
    values = {
        "resolution": args.resolution, "train_batch_size": args.batch_size, "max_train_steps": args.steps,
        "learning_rate": 2e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0, "rank": 4,
        "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "mixed_precision": args.mixed_precision,
        "seed": SEED, **CONFIGS[args.config],
    }
    if values.get("use_8bit_adam") and not _cuda():
        values["use_8bit_adam"] = False  # bitsandbytes' 8-bit Adam is CUDA-only, for both jobs
        print("no CUDA: 8-bit Adam left out of the production configuration (both jobs use AdamW)")
    return values


def benchmark(args: argparse.Namespace, workdir: Path, threads: int | None) -> dict:
    base_model = ensure_model(args.model, workdir / f"base-{args.model}")
    dataset = ensure_dataset(workdir / f"dataset-{args.resolution}", args.resolution)
    hyperparameters = hyperparameters_for(args)
    # One environment for both (so the same thread settings), with the Hub out of reach.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env_reference = reference_env(args.reference, env)
    jobs = [
        ("ours", lambda run_dir: run_ours(run_dir, base_model, dataset, hyperparameters, env)),
        ("reference", lambda run_dir: run_reference(args.reference, run_dir, base_model, dataset, hyperparameters,
                                                    env_reference)),
    ]
    if args.accelerate_loop:
        jobs.append(("ours-accelerate-loop",
                     lambda run_dir: run_ours(run_dir, base_model, dataset, hyperparameters, env, fast_path=False)))
    runs: dict[str, list[Run]] = {name: [] for name, _ in jobs}
    print(f"reference: {args.reference}\nload average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
          flush=True)
    for repeat in range(args.repeats):
        for name, run_job in jobs:  # alternate, so slow drift of the machine hits both
            run = run_job(workdir / "runs" / f"{name}-threads-{threads or 'default'}-{repeat}")
            runs[name].append(run)
            gpu = f", {run.peak_gpu_mb:7.0f} MB peak GPU" if run.peak_gpu_mb else ""
            print(f"run {repeat + 1}/{args.repeats} {name:20}: {run.wall_seconds:7.2f} s whole job, "
                  f"{run.steps_per_second:7.3f} steps/s, {run.peak_rss_mb:7.0f} MB peak RSS{gpu}", flush=True)
            if run.phases:
                print("    phases (s since start): " + ", ".join(f"{k} {v:.1f}" for k, v in run.phases.items()),
                      flush=True)
    median = {name: medians(found) for name, found in runs.items()}
    goals = GOALS[args.model] if args.config == "default" else []
    return {
        "model": args.model, "config": args.config, "repeats": args.repeats, "reference": str(args.reference),
        "threads": threads,
        "hyperparameters": hyperparameters, "load_average_after": os.getloadavg(),
        "runs": {name: [asdict(run) for run in found] for name, found in runs.items()},
        "median": median,
        **compare(median["ours"], median["reference"], goals), "goals": goals,
        **({"accelerate_loop": compare(median["ours-accelerate-loop"], median["reference"], [])["ratios"]}
           if "ours-accelerate-loop" in median else {}),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        results = []
        for threads in args.threads:
            print(f"\n== threads {threads or 'default'}", flush=True)
            try:
                result = benchmark(args, workdir, threads)
            except JobFailed as failure:
                print(f"\njob failed: {failure}", file=sys.stderr)
                return 1
            results.append(result)
            _report(args, result)
    if len(results) > 1:
        print_settings(results)
    if args.json:
        args.json.write_text(json.dumps(results[0] if len(results) == 1 else {"settings": results}, indent=2))
        print(f"figures written to {args.json}")
    return 0


def _report(args: argparse.Namespace, result: dict) -> None:
    hp = result["hyperparameters"]
    print_report(f"model {args.model}, config {args.config}: {hp['max_train_steps']} steps, resolution "
                 f"{hp['resolution']}, batch {hp['train_batch_size']}, mixed precision {hp['mixed_precision']}, "
                 f"threads {result['threads'] or 'default'}; "
                 f"median of {args.repeats} run(s) each, alternating",
                 result["median"]["ours"], result["median"]["reference"], result, result["goals"])
    if "accelerate_loop" in result:
        loop, ratios = result["median"]["ours-accelerate-loop"], result["accelerate_loop"]
        print(f"\nours with fast_path=false (the accelerate loop): {loop['wall_seconds']:.2f} s whole job, "
              f"{loop['steps_per_second']:.3f} steps/s, {loop['peak_rss_mb']:.0f} MB peak RSS; against the reference "
              f"{ratios['whole_job_speedup']:.2f}x whole job, {ratios['loop_speedup']:.2f}x loop")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in result['load_average_after'])} "
          f"(1, 5, 15 min) on {os.cpu_count()} CPUs")


def print_settings(results: list[dict]) -> None:
    """The thread settings side by side: medians and ratios of each."""
    print("\nthread settings side by side (medians):\n")
    print(f"{'threads':10}{'ours job s':>12}{'ref job s':>12}{'ours steps/s':>14}{'ref steps/s':>13}"
          f"{'whole job':>11}{'loop':>8}{'RSS':>7}")
    for result in results:
        ours, reference, ratios = result["median"]["ours"], result["median"]["reference"], result["ratios"]
        print(f"{str(result['threads'] or 'default'):10}{ours['wall_seconds']:>12.2f}{reference['wall_seconds']:>12.2f}"
              f"{ours['steps_per_second']:>14.2f}{reference['steps_per_second']:>13.2f}"
              f"{ratios['whole_job_speedup']:>10.2f}x{ratios['loop_speedup']:>7.2f}x{ratios['rss_ratio']:>6.2f}x")


if __name__ == "__main__":
    sys.exit(main())
