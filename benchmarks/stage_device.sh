#!/usr/bin/env bash
# Stage what `benchmarks/bench_train.py --model sdxl` needs on a GPU device machine (docs/benchmarks.md).
#
# The device gets this checkout only: ../shared does not travel, and its image (Python 3.12, x86-64)
# has torch, torchvision, transformers, accelerate, peft, safetensors, pyarrow, psutil and pillow but
# neither diffusers nor datasets (nor bitsandbytes). This copies the reference script into outputs/reference/ and
# downloads the missing wheels, at this project's pins, into .whl/ (ignored through .git/info/exclude):
# name both in the run's carry. Usage: benchmarks/stage_device.sh [REFERENCE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
reference_dir=${1:-../shared/reference}

rm -rf outputs/reference && mkdir -p outputs && cp -r "$reference_dir" outputs/reference
chmod -R u+w outputs/reference

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
for name in diffusers datasets dill multiprocess importlib_metadata fsspec; do
    pins+=("$(grep -i "^${name}==" constraints.txt)")
done
# 8-bit Adam for --config production: the payload's pin (pyproject's container extra; CUDA-only, 43 MB)
pins+=("$(grep -o '"bitsandbytes==[^"]*"' pyproject.toml | tr -d '"')")
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
ls -l .whl outputs/reference
echo "carry: [\".whl\", \"outputs/reference\"]  ($(du -sh .whl | cut -f1) of wheels)"
