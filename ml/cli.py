"""`sdxl-lora`: one command for every job verb and local tool.

Each subcommand imports what it needs when it runs, so `sdxl-lora --help` and the
container verbs start fast.
"""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from ml import train

    train.exit_now(train.main())


def _tiny_model(args: argparse.Namespace) -> int:
    from ml import tiny_model

    path = tiny_model.build(args.out_dir, seed=args.seed)
    print(f"tiny SDXL pipeline written to {path}")
    return 0


def _synthetic_data(args: argparse.Namespace) -> int:
    from ml import synthetic

    path = synthetic.write_dataset(args.out_dir, count=args.count, seed=args.seed,
                                   sidecar_captions=args.sidecar_captions)
    print(f"{args.count} synthetic storyboard frames written to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ml import demo

    return demo.main(args.workdir, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-lora", description="SDXL LoRA fine-tuning jobs for SageMaker.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = commands.add_parser("train", help="training-container entrypoint (SageMaker runs `IMAGE train`)",
                                  description="Reads $SAGEMAKER_BASE_DIR (default /opt/ml) as SageMaker lays it out.")
    command.set_defaults(handler=_train)

    command = commands.add_parser("tiny-model", help="write a tiny random SDXL pipeline (offline)")
    command.add_argument("out_dir")
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(handler=_tiny_model)

    command = commands.add_parser("synthetic-data", help="write a synthetic storyboard dataset (imagefolder)")
    command.add_argument("out_dir")
    command.add_argument("--count", type=int, default=12)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--sidecar-captions", action="store_true", help="write .txt captions, not metadata.jsonl")
    command.set_defaults(handler=_synthetic_data)

    command = commands.add_parser("demo", help="train a tiny LoRA end to end on this machine")
    command.add_argument("--workdir", default="outputs/demo")
    command.add_argument("--steps", type=int, default=40)
    command.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
