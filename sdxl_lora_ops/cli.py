"""`sdxl-lora-ops`: the tools around the job images, never inside them.

`local-stack` (the docker-free AWS stand-in), `airflow` (the UI against it), `demo` (the pipeline
through the DAGs), `submit` (one training job without Airflow, through the SageMaker Python SDK),
`stage-models` (SDXL and InstructBLIP into S3, checked first, where the jobs read them), `upload-images` (a
folder of one's own images into raw_dataset/<version>/), `fetch-results` (a grid run's
LoRA, card, leaderboard, sheets and curves as files), `iam-policies` (docs/iam/'s policies filled in for one account,
or applied), `base-images` (the Deep Learning Container URIs the Dockerfiles build on), `approve` (a model package
version's approval, which the registry watch deploys) and `install-dags` (the DAG files into an Airflow that has this
package). The container's `sdxl-lora` (ml/cli.py) keeps only the payload verbs, so ml/ never imports this package, while
this package runs ml/ entrypoints as local processes. Each verb imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys


def _local_stack(args: argparse.Namespace) -> int:
    from local_stack import main

    return main.run(args.port, args.workdir, args.max_concurrent_jobs, args.spot_interruption_at, host=args.host,
                    persist=args.persist, instance_quotas=dict(args.instance_quota or []),
                    threads_per_job=args.threads_per_job)


def _instance_quota(text: str) -> tuple[str, int]:
    instance, _, count = text.partition("=")
    if not instance.startswith("ml.") or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected an instance type and a count, e.g. ml.g5.xlarge=1; got {text!r}")
    return instance, int(count)


def _airflow(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import demo as pipeline_demo

    return pipeline_demo.ui(args.workdir, port=args.port)


def _demo(args: argparse.Namespace) -> int:
    if args.train_only:
        from sdxl_lora_ops import single_job as demo

        return demo.main(args.workdir, steps=args.steps)
    from sdxl_lora_ops import demo as pipeline_demo

    return pipeline_demo.main(args.workdir)


def _submit(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import submit

    return submit.main(args)


def _base_images(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import base_images

    uris = base_images.retrieve_all(args.region)
    if args.format == "json":
        print(json.dumps(uris, indent=2))
    else:
        for image, uri in uris.items():
            print(f"{image}={uri}")
    return 0


def _stage_models(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import stage_models

    return stage_models.main(args)


def _variant(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", text):
        raise argparse.ArgumentTypeError(f"a variant is a word of a weight file's name (fp16 in "
                                         f"model.fp16.safetensors); got {text!r}")
    return text


def _upload_images(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import upload_images

    return upload_images.main(args)


def _fetch_results(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import results

    return results.main(args)


def _iam_policies(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import iam_policies

    return iam_policies.main(args)


def _approve(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import approve

    return approve.main(args)


def _install_dags(args: argparse.Namespace) -> int:
    from sdxl_lora_ops import install_dags

    return install_dags.main(args)


def _where(command: argparse.ArgumentParser) -> None:
    """--workdir / --aws: the running local stack of `make airflow` (sdxl_lora_ops/target.py), or S3 on AWS."""
    place = command.add_mutually_exclusive_group()
    place.add_argument("--workdir", default=None,
                       help="the local stack that `airflow` or `demo` runs on this work dir (its local-stack.json); "
                            "default: the newest running one of outputs/airflow and outputs/demo")
    place.add_argument("--aws", action="store_true",
                       help="S3 on AWS even when a local stack runs: SDXL_LORA_BUCKET and SDXL_LORA_PREFIX, boto3's "
                            "default credentials (the default when no local stack runs)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"max_train_steps\": 500}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-lora-ops",
                                     description="Local stack, Airflow UI, demo and one-off jobs for sdxl-lora.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = commands.add_parser("local-stack", help="serve S3, CloudWatch Logs and SageMaker on one loopback port",
                                  description="A docker-free stand-in for AWS that really runs the jobs.")
    command.add_argument("--port", type=int, default=4566)
    command.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (0.0.0.0 in docker-compose, so other services reach it)")
    command.add_argument("--workdir", default=".local-stack", help="where jobs and endpoints keep their files")
    command.add_argument("--max-concurrent-jobs", type=int, default=4,
                         help="training (and, separately, processing) jobs allowed to run at once")
    command.add_argument("--instance-quota", metavar="TYPE=N", action="append", type=_instance_quota,
                         help="a smaller quota of one instance type (per job type), e.g. ml.g5.xlarge=1: more "
                              "answers ResourceLimitExceeded, as AWS does at an instance type's quota; repeatable")
    command.add_argument("--spot-interruption-at", metavar="REGEX",
                         help="interrupt each managed-spot training job once, at its first log line matching REGEX")
    command.add_argument("--persist", action=argparse.BooleanOptionalAction, default=False,
                         help="save S3's objects under WORKDIR/s3/ on stop and restore them on start (jobs and "
                              "endpoints are not kept); `demo` and `airflow` start their stack with it")
    command.add_argument("--threads-per-job", type=int, default=None, metavar="N",
                         help="torch threads of each job and endpoint process (OMP_NUM_THREADS; default: "
                              "OMP_NUM_THREADS when set, else 1). The jobs share this machine's cores, where each "
                              "would have an instance's own on AWS: with several running, more threads than cores "
                              "spin against each other")
    command.set_defaults(handler=_local_stack)

    command = commands.add_parser("airflow", help="the Airflow UI against a local stack with staged data",
                                  description="Starts the local stack, stages a tiny SDXL and raw frames, and runs "
                                              "Airflow (api-server on loopback, scheduler, dag-processor, triggerer) "
                                              "with the pool and the aws_default connection. Ctrl-C or SIGTERM stops "
                                              "everything. Without --workdir it shows the last `demo`'s runs "
                                              "and reports (outputs/demo) when there is one, else outputs/airflow.")
    command.add_argument("--workdir", default=None,
                         help="default: outputs/demo after a `demo` (its Airflow home and S3), else outputs/airflow")
    command.add_argument("--port", type=int, default=8080)
    command.set_defaults(handler=_airflow)

    command = commands.add_parser("demo", help="the whole pipeline through the DAGs, on this machine",
                                  description="prepare -> grid search -> deploy -> invoke, through the real DAGs "
                                              "against the local stack, on a tiny SDXL.")
    command.add_argument("--workdir", default="outputs/demo",
                         help="its Airflow home and S3 (kept: `airflow` shows them); replaced by the next demo")
    command.add_argument("--train-only", action="store_true",
                         help="only run one training job in a SageMaker-style directory, without Airflow")
    command.add_argument("--steps", type=int, default=40, help="optimizer steps with --train-only")
    command.set_defaults(handler=_demo)

    command = commands.add_parser(
        "submit", help="start one training job through the SageMaker Python SDK, without Airflow",
        description="Builds the request the DAGs build (plugins/sdxl_lora/sagemaker_requests.py, settings from SDXL_LORA_* "
                    "environment variables) and creates the job with sagemaker-core's TrainingJob. AWS or the "
                    "local stack answers, chosen by the usual AWS environment (AWS_ENDPOINT_URL for the stack).")
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset-version", help="train on <bucket>/<prefix>/proc_dataset/VERSION/")
    source.add_argument("--dataset-uri", help="train on this s3:// prefix")
    command.add_argument("--job-name", help="default: sdxl-lora-submit-<UTC time>")
    command.add_argument("--hyperparameters", type=_json_object, default={},
                         help="JSON object merged over the hyperparameters of the settings' preset "
                              "(SDXL_LORA_PRESET: production, or local)")
    command.add_argument("--wait", action="store_true", help="wait for the job to end and print its outcome")
    command.add_argument("--timeout", type=int, default=None, help="seconds to wait with --wait")
    command.set_defaults(handler=_submit)

    command = commands.add_parser(
        "stage-models", help="SDXL (and a fixed VAE) and InstructBLIP into S3, checked first, where the jobs read them",
        description="Stages the base model into <prefix>/base_model/ and the captioner into <prefix>/captioner/ of "
                    "the running local stack of `airflow` (or `demo`), else of S3 on AWS, and prints the settings "
                    "that point the jobs at them (SDXL_LORA_BASE_MODEL_URI, SDXL_LORA_BASE_MODEL_ID, "
                    "SDXL_LORA_CAPTIONER_URI). A SOURCE is a Hugging Face Hub id (org/name or org/name@revision: "
                    "downloaded into the Hugging Face cache, resumable; with HF_HUB_OFFLINE=1 from the cache alone) "
                    "or a local folder. Only what the loaders read is staged: configs, tokenizers and safetensors "
                    "(never a pickle). Each model is loaded as the jobs load it before anything is uploaded; an "
                    "object of the same size and sha256 is not uploaded again, and objects of the prefix that are "
                    "not part of the model are deleted.")
    command.add_argument("--base-model", metavar="SOURCE",
                         help="a diffusers SDXL pipeline; default stabilityai/stable-diffusion-xl-base-1.0; "
                              "'none' leaves base_model/ as it is")
    command.add_argument("--variant", type=_variant, metavar="VARIANT",
                         help="stage each component's VARIANT safetensors where it has them, e.g. fp16 (half the "
                              "bytes; the jobs load it alone); default: full precision where it is there")
    command.add_argument("--vae", metavar="SOURCE",
                         help="a diffusers AutoencoderKL staged as the base model's vae/ in place of its own, e.g. "
                              "madebyollin/sdxl-vae-fp16-fix (SDXL's VAE overflows in fp16; this one does not)")
    command.add_argument("--captioner", metavar="SOURCE",
                         help="an InstructBLIP; default Salesforce/instructblip-vicuna-7b; 'none' leaves captioner/ "
                              "as it is")
    _where(command)
    command.set_defaults(handler=_stage_models)

    command = commands.add_parser(
        "upload-images", help="a folder of your own images (captions optional) into raw_dataset/VERSION/",
        description="Uploads every file under FOLDER, as it is, to <prefix>/raw_dataset/VERSION/ of the running local "
                    "stack of `airflow` (or `demo`), else of S3 on AWS. Captions are optional: a .txt beside an image, "
                    "or a metadata.jsonl with file_name and text; prepare captions the rest. Images are not checked "
                    "here: sdxl_dataset_prepare reports the ones it rejects. Then trigger sdxl_dataset_prepare with "
                    "that version.")
    command.add_argument("folder", metavar="FOLDER")
    command.add_argument("--version", required=True,
                         help="the dataset version: letters, digits, '.', '_' and '-' (what the prepare DAG accepts)")
    command.add_argument("--replace", action="store_true",
                         help="delete the version's objects first when it has some (else it is refused)")
    _where(command)
    command.set_defaults(handler=_upload_images)

    command = commands.add_parser(
        "fetch-results", help="a grid run's LoRA, model card, leaderboard, sheets and loss curves as files",
        description="Copies grid_search/<run token>/ (leaderboards and report/: comparison sheets, loss curves) of "
                    "the running local stack, else of S3 on AWS, and extracts the winner's model.tar.gz into "
                    "OUT/winner/ (pytorch_lora_weights.safetensors, README.md). Prints the paths.")
    command.add_argument("--run", required=True, metavar="RUN_ID", help="the DAG run id, as the UI shows it")
    command.add_argument("--dag", choices=("sdxl_lora_grid_search", "sdxl_lora_tune"), default="sdxl_lora_grid_search")
    command.add_argument("--out", default=None, help="default: outputs/results/<run token>")
    _where(command)
    command.set_defaults(handler=_fetch_results)

    command = commands.add_parser(
        "approve", help="approve (or reject) a model package version: the registry watch deploys it",
        description="UpdateModelPackage on the running local stack, else on AWS: the version becomes Approved "
                    "(Rejected with --reject). sdxl_lora_registry_watch deploys the group's latest Approved version "
                    "within its schedule; rejecting the serving version brings back the latest Approved one before "
                    "it.")
    command.add_argument("--version-arn", required=True, metavar="ARN",
                         help="the version: arn:aws:sagemaker:REGION:ACCOUNT:model-package/GROUP/N")
    command.add_argument("--reject", action="store_true", help="reject the version instead")
    command.add_argument("--description", default=None, metavar="TEXT", help="kept as its ApprovalDescription")
    _where(command)
    command.set_defaults(handler=_approve)

    command = commands.add_parser(
        "iam-policies", help="docs/iam/'s role and policies filled in for your account; --apply creates them",
        description="Fills every placeholder of docs/iam/'s three policies (the SageMaker trust and execution "
                    "policies, Airflow's policy) from these flags and prints them as one JSON object keyed by file "
                    "name, or writes them with --out. The KMS statements are there only with --kms-key-arn. "
                    "--apply creates the execution role with its inline policy and Airflow's managed policy through "
                    "boto3 (again: updated, not duplicated) and prints their ARNs and the settings to use.")
    from sdxl_lora_ops import iam_policies  # its flags; it imports no more than the standard library

    iam_policies.add_arguments(command)
    command.set_defaults(handler=_iam_policies)

    command = commands.add_parser("base-images",
                                  help="the Hugging Face Deep Learning Container URIs of a region (image_uris)",
                                  description="What `containers/build_and_push.sh` passes as BASE_IMAGE.")
    command.add_argument("--region", required=True)
    command.add_argument("--format", choices=("env", "json"), default="env")
    command.set_defaults(handler=_base_images)

    command = commands.add_parser(
        "install-dags", help="copy the DAG files into an Airflow's DAGs folder",
        description="Copies this package's DAG files into DIR, replacing earlier copies of them, and prints their "
                    "paths. The Airflow needs this package installed ('sdxl-lora-sagemaker[airflow]': its plugin "
                    "comes by entry point), the sagemaker_training pool, the aws_default connection and the "
                    "settings: docs/airflow-deployment.md.")
    command.add_argument("--dags-folder", required=True, metavar="DIR",
                         help="the Airflow's [core] dags_folder; for MWAA, a folder to copy to the environment's "
                              "dags/ in S3")
    command.set_defaults(handler=_install_dags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C: the verb's own cleanup has run; no traceback
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
