#!/usr/bin/env bash
# Build the job images (and the Airflow image) and push them to ECR.
#
#   containers/build_and_push.sh --region eu-west-1 --account 111122223333 [--prefix sdxl-lora] [--tag 0.1.0]
#                                [--images "sdxl-lora-training sdxl-lora-inference"] [--no-push]
#
# Image names come from ml/contract/job_images.py (the registry the local stack uses too); each is built from
# containers/<name without "sdxl-lora-">/Dockerfile on the Hugging Face Deep Learning Container that
# `sdxl-lora-ops base-images` (the SageMaker SDK's image_uris) names for the region. Repositories are
# <prefix>/<image> and are created when missing (scan on push, KMS encryption). Needs docker, the AWS
# CLI and this project's venv (PYTHON, default .venv/bin/python). Prints the settings to use.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

region="" account="" prefix="sdxl-lora" tag="" images="" push=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --region) region="${2:?--region needs a value}"; shift 2 ;;
    --account) account="${2:?--account needs a value}"; shift 2 ;;
    --prefix) prefix="${2:?--prefix needs a value}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --images) images="${2:?--images needs a value}"; shift 2 ;;
    --no-push) push=0; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n "$region" ]] || { echo "--region is required (e.g. us-east-1)" >&2; exit 2; }
[[ "$account" =~ ^[0-9]{12}$ ]] || { echo "--account must be a 12-digit AWS account id, got '${account}'" >&2; exit 2; }
[[ "$prefix" =~ ^[a-z0-9][a-z0-9._/-]*$ ]] || { echo "--prefix must be a lower-case ECR namespace, got '${prefix}'" >&2; exit 2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
tag="${tag:-$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo latest)}"
registry="${account}.dkr.ecr.${region}.amazonaws.com"
known="$(cd "$root" && "$python" -c 'from ml.contract.job_images import IMAGE_VERBS; print(" ".join(sorted(IMAGE_VERBS)))')"
images="${images:-$known}"
for image in $images; do
  [[ " $known " == *" $image "* ]] || { echo "unknown image $image (known: $known)" >&2; exit 2; }
done
declare -A base
while IFS='=' read -r image uri; do base[$image]="$uri"; done \
  < <(cd "$root" && "$python" -m sdxl_lora_ops.cli base-images --region "$region")

login() { aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$1"; }
login "$registry"
declare -A logged_in
for image in $images; do
  base_registry="${base[$image]%%/*}"
  if [[ -z "${logged_in[$base_registry]:-}" ]]; then login "$base_registry"; logged_in[$base_registry]=1; fi
done

for image in $images; do
  repository="${prefix}/${image}"
  uri="${registry}/${repository}:${tag}"
  if [[ $push -eq 1 ]] && ! aws ecr describe-repositories --region "$region" --repository-names "$repository" >/dev/null 2>&1; then
    aws ecr create-repository --region "$region" --repository-name "$repository" \
      --image-scanning-configuration scanOnPush=true --encryption-configuration encryptionType=KMS >/dev/null
  fi
  docker build --file "$root/containers/${image#sdxl-lora-}/Dockerfile" --build-arg "BASE_IMAGE=${base[$image]}" \
    --tag "$uri" "$root"
  [[ $push -eq 1 ]] && docker push "$uri"
  setting="$(echo "${image#sdxl-lora-}" | tr '[:lower:]' '[:upper:]')_IMAGE"
  echo "SDXL_LORA_${setting}=${uri}"
done
