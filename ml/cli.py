"""`sdxl-lora`: the job images' entrypoint, with the payload verbs only.

train and serve are what SageMaker runs (`docker run IMAGE train|serve`), prepare is the
processing job's entrypoint, and the tiny-model builders make offline inputs. The local
tools (the local stack, the Airflow UI, the pipeline demo, submit) are `sdxl-lora-ops`
(local_stack/cli.py), so nothing here imports local_stack/ or the orchestration set.
Each subcommand imports what it needs when it runs, so `sdxl-lora --help` and the
container verbs start fast.
"""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from ml import train
    from ml.contract import exit_now

    exit_now(train.main())


def _serve(args: argparse.Namespace) -> int:
    from ml import serve
    from ml.contract import exit_now

    exit_now(serve.main(host=args.host, port=args.port))


def _prepare(args: argparse.Namespace) -> int:
    from ml import prepare

    return prepare.main(args.input, args.output, args.resolution, args.caption_column)


def _tiny_model(args: argparse.Namespace) -> int:
    from ml import tiny_model

    path = tiny_model.build(args.out_dir, seed=args.seed)
    print(f"tiny SDXL pipeline written to {path}")
    return 0


def _tiny_captioner(args: argparse.Namespace) -> int:
    from ml import tiny_captioner

    path = tiny_captioner.build(args.out_dir, seed=args.seed)
    print(f"tiny InstructBLIP captioner written to {path}")
    return 0


def _synthetic_data(args: argparse.Namespace) -> int:
    from ml import synthetic

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

    command = commands.add_parser("prepare", help="processing-job entrypoint: raw images to the training imagefolder",
                                  description="Captions from sidecar .txt files or the input's metadata.jsonl; "
                                              "/opt/ml paths resolve under $SAGEMAKER_BASE_DIR.")
    command.add_argument("--input", default="/opt/ml/processing/input/raw", help="raw images (searched recursively)")
    command.add_argument("--output", default="/opt/ml/processing/output/dataset",
                         help="where the PNGs, metadata.jsonl and prepare_summary.json go")
    command.add_argument("--resolution", type=int, default=1024,
                         help="downscale so the short side is at most this many pixels (never upscale)")
    command.add_argument("--caption-column", default="text", help="caption column of the input's metadata.jsonl")
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
