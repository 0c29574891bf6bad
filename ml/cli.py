"""`sdxl-lora`: the job images' entrypoint, with the payload verbs only.

train and serve are what SageMaker runs (`docker run IMAGE train|serve`), prepare is the
processing job's entrypoint, and the tiny-model builders make offline inputs. The local
tools (the local stack, the Airflow UI, the pipeline demo, submit) are `sdxl-lora-ops`
(sdxl_lora_ops/cli.py), so nothing here imports local_stack/ or the orchestration set.
Each subcommand imports what it needs when it runs, so `sdxl-lora --help` and the
container verbs start fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def _train(args: argparse.Namespace) -> NoReturn:
    from ml.contract.container import exit_now
    from ml.train import job as train

    exit_now(train.main())


def _serve(args: argparse.Namespace) -> NoReturn:
    from ml.contract.container import exit_now
    from ml.serve import server as serve

    exit_now(serve.main(host=args.host, port=args.port))


def _prepare(args: argparse.Namespace) -> int:
    from ml.prepare import job as prepare

    return prepare.main(args)


def _tiny_model(args: argparse.Namespace) -> int:
    from ml.fixtures import tiny_model

    path = tiny_model.build(args.out_dir, seed=args.seed)
    print(f"tiny SDXL pipeline written to {path}")
    return 0


def _tiny_captioner(args: argparse.Namespace) -> int:
    from ml.fixtures import tiny_captioner

    path = tiny_captioner.build(args.out_dir, seed=args.seed)
    print(f"tiny InstructBLIP captioner written to {path}")
    return 0


def _synthetic_data(args: argparse.Namespace) -> int:
    from ml.fixtures import synthetic

    path = synthetic.write_dataset(args.out_dir, count=args.count, seed=args.seed,
                                   sidecar_captions=args.sidecar_captions)
    print(f"{args.count} synthetic storyboard frames written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-lora",
                                     description="SDXL LoRA fine-tuning jobs for SageMaker: the container verbs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = commands.add_parser("train", help="training-container entrypoint (SageMaker runs `IMAGE train`)",
                                  description="Reads $SAGEMAKER_BASE_DIR (default /opt/ml) as SageMaker lays it out.")
    command.set_defaults(handler=_train)

    command = commands.add_parser("serve", help="inference-container entrypoint (SageMaker runs `IMAGE serve`)",
                                  description="Answers GET /ping and POST /invocations with $BASE_MODEL plus the LoRA "
                                              "in $SAGEMAKER_BASE_DIR/model (default /opt/ml/model).")
    command.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces, as SageMaker needs)")
    command.add_argument("--port", type=int, default=None, help="port (default: $SAGEMAKER_BIND_TO_PORT or 8080)")
    command.set_defaults(handler=_serve)

    command = commands.add_parser(
        "prepare", help="processing-job entrypoint: raw images to a checked, captioned, bucketed dataset",
        description="Checks every input file, captions images without a sidecar .txt or metadata.jsonl row with "
                    "InstructBLIP, fits each to its SDXL aspect-ratio bucket, optionally caches VAE latents, and "
                    "writes an imagefolder with metadata.jsonl and manifest.json. /opt/ml paths resolve under "
                    "$SAGEMAKER_BASE_DIR.")
    command.add_argument("--input", default="/opt/ml/processing/input/raw", help="raw files (searched recursively)")
    command.add_argument("--output", default="/opt/ml/processing/output/dataset",
                         help="where the PNGs, metadata.jsonl and manifest.json go")
    command.add_argument("--captioner", default="Salesforce/instructblip-vicuna-7b", metavar="MODEL",
                         help="InstructBLIP model directory or Hub id; 'none' rejects uncaptioned images instead")
    command.add_argument("--recaption", action="store_true", help="caption every image, ignoring existing captions")
    command.add_argument("--caption-prefix", default="", help="prepended to every caption, e.g. a trigger word")
    command.add_argument("--caption-column", default="text", help="caption column of the input's metadata.jsonl")
    captions = command.add_argument_group("caption generation (defaults: the original system's settings)")
    captions.add_argument("--prompt", help="the instruction given to InstructBLIP")
    for name, kind in (("max-length", int), ("min-length", int), ("num-beams", int), ("temperature", float),
                       ("top-p", float), ("repetition-penalty", float), ("length-penalty", float)):
        captions.add_argument(f"--{name}", type=kind)
    captions.add_argument("--no-sample", action="store_true", help="beam search without sampling")
    captions.add_argument("--caption-batch-size", type=int, help="images per generate() call (default 8)")
    command.add_argument("--resolution", type=int, default=1024,
                         help="bucket scale: SDXL's 1024-pixel buckets scaled to this (without buckets: the short "
                              "side is downscaled to at most this)")
    command.add_argument("--no-buckets", action="store_true",
                         help="keep each image's aspect ratio uncropped; training then crops squares")
    command.add_argument("--bucket-multiple", type=int,
                         help="bucket sides are multiples of this (default: from --base-model, else 32)")
    command.add_argument("--min-size", type=int, default=256, help="reject images whose short side is smaller")
    command.add_argument("--max-pixels", type=int, default=89_478_485,
                         help="reject images with more pixels (decompression-bomb limit)")
    command.add_argument("--min-images", type=int, default=1, help="fail when fewer usable images remain")
    command.add_argument("--base-model", metavar="DIR",
                         help="diffusers SDXL directory: its VAE for --latent-cache, its tokenizer to count long "
                              "captions, its bucket multiple")
    command.add_argument("--latent-cache", action="store_true",
                         help="store each image's VAE latents with the dataset (needs --base-model)")
    command.add_argument("--version", default="", help="dataset version, recorded in manifest.json")
    command.add_argument("--input-key", default="", help="the orchestrator's key of the input, recorded in manifest.json")
    command.add_argument("--num-shards", type=int, help="instances sharing the work (default: the job's hosts)")
    command.add_argument("--shard-index", type=int, help="this instance's share (default: from the job's hosts)")
    command.add_argument("--merge", metavar="DIR",
                         help="only merge the parts that several shards wrote under DIR into one manifest")
    command.set_defaults(handler=_prepare)

    command = commands.add_parser("tiny-model", help="write a tiny random SDXL pipeline (offline)")
    command.add_argument("out_dir")
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(handler=_tiny_model)

    command = commands.add_parser("tiny-captioner", help="write a tiny random InstructBLIP captioner (offline)")
    command.add_argument("out_dir")
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(handler=_tiny_captioner)

    command = commands.add_parser("synthetic-data", help="write a synthetic storyboard dataset (imagefolder)")
    command.add_argument("out_dir")
    command.add_argument("--count", type=int, default=12)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--sidecar-captions", action="store_true", help="write .txt captions, not metadata.jsonl")
    command.set_defaults(handler=_synthetic_data)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
