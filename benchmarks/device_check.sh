#!/usr/bin/env bash
# Every GPU check in one device call (docs/benchmarks.md): the GPU-only tests of the fast step,
# then `bench_train.py --model sdxl` in the default configuration (2 alternating runs each), then the
# production configuration (1 run each, fewer steps), each bounded so that what finished comes back.
# Stage first with benchmarks/stage_device.sh; run it with the device tool's `run`, carry
# [".whl", "outputs/reference"]. Writes under $OUT: device.txt, tests.log, sdxl-*.log/json, job logs.
# Usage: benchmarks/device_check.sh [BUDGET_SECONDS]
# Here first: WHEELS=0 MODEL=tiny with the project venv active runs the same steps on the CPU.
set -u
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
budget=${1:-540}
model=${MODEL:-sdxl}
started=$SECONDS
left() { echo $((budget - (SECONDS - started))); }
bounded() { local most=$1; local l; l=$(left); [ "$l" -lt "$most" ] && most=$l; echo "$most"; }
save_logs() {  # the jobs' own logs, not their weights
    (cd /tmp/bench 2>/dev/null && find . -name '*.log' -exec cp --parents {} "$OUT/" \;) 2>/dev/null
    (cd /tmp/bench-production 2>/dev/null && mkdir -p "$OUT/production" &&
        find . -name '*.log' -exec cp --parents {} "$OUT/production/" \;) 2>/dev/null
    true
}
trap save_logs EXIT

if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'EOF' 2>&1 | tee "$OUT/device.txt"
import torch, diffusers, datasets, transformers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__,
      "datasets", datasets.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "accelerate", accelerate.__version__)
for i in range(torch.cuda.device_count()):
    print(torch.cuda.get_device_name(i), f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB")
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as error:
    print("bitsandbytes missing:", error)
EOF
nproc >> "$OUT/device.txt"

echo "== GPU tests ($(left) s left)"
timeout "$(bounded 150)" python3 -m pytest -q -p no:cacheprovider tests/ml/test_fast_step.py \
    -k 'cuda or capture' 2>&1 | tail -25 | tee "$OUT/tests.log"

echo "== $model, default configuration ($(left) s left)"
timeout "$(bounded 330)" python3 benchmarks/bench_train.py --model "$model" --repeats 2 \
    --reference outputs/reference/train_text_to_image_lora_sdxl.py --workdir /tmp/bench \
    --json "$OUT/$model-default.json" 2>&1 | grep -v Writing | tee "$OUT/$model-default.log"

if [ "$(left)" -gt 90 ]; then
    echo "== $model, production configuration ($(left) s left)"
    # the same base model (symlinked, not rebuilt), 10 optimizer steps of 4 micro-batches
    mkdir -p /tmp/bench-production && ln -sfn "/tmp/bench/base-$model" "/tmp/bench-production/base-$model"
    timeout "$(bounded 400)" python3 benchmarks/bench_train.py --model "$model" --config production --repeats 1 \
        --steps 10 --reference outputs/reference/train_text_to_image_lora_sdxl.py --workdir /tmp/bench-production \
        --json "$OUT/$model-production.json" 2>&1 | grep -v Writing | tee "$OUT/$model-production.log"
fi
echo "== done, $(left) s of $budget left"
