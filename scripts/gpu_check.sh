#!/usr/bin/env bash
# The numbers users choose a runtime by, on the first lent GPU: the full-size preset (random weights with every
# width and depth of the published model) at 1024x1024, 50 steps, bf16 -- eager, --compile and --offload -- then
# the same side by side with the reference (transformers + diffusers) on the same weights, with the image
# difference, and `glimage check` (each component on the GPU against fp32 on the CPU).
#
# Untested as of 2026-12-04: no GPU was lent to the session that wrote it. Reference figures to compare with:
# the reference 64.3 s / 37.8 GB on one H100; vLLM-Omni 40.2 s with FP8; SGLang 35.2 s on 4 NPUs.
#
# Here (a machine with pip and the internet), once:      bash scripts/gpu_check.sh prepare
#   downloads the wheels the GPU machine lacks into .whl/ (ignored by git; carried to the device).
# There (through the device tool, carry [".whl"]), one phase per call, each well inside 10 minutes:
#   bash scripts/gpu_check.sh ours        # check + eager / compiled / offloaded, ~5 min
#   bash scripts/gpu_check.sh reference   # saves the weights once, then ours vs the reference, ~6 min
# Results: $OUT/*.json and $OUT/log.txt (or ./gpu_check/ when OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:-ours}
case $phase in
  prepare|ours|reference) ;;
  *) echo "unknown phase $phase: prepare, ours or reference" >&2; exit 2 ;;
esac
out=${OUT:-gpu_check}
mkdir -p "$out"

if [[ $phase == prepare ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  # the GPU image has torch, numpy, Pillow, safetensors, tokenizers, huggingface-hub; not these versions
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 transformers==5.23.0
  ls -la .whl
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee -a "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

common=(--preset glm-image --size 1024x1024 --steps 50 --guidance 1.5 --dtype bfloat16 --device cuda --runs 1)
case $phase in
  ours)
    timeout 90 python3 -m glimage.cli check --device cuda --dtype bfloat16 --json "$out/check_bf16.json" || true
    timeout 150 python3 -m glimage.cli bench "${common[@]}" --json "$out/eager.json" || true
    timeout 150 python3 -m glimage.cli bench "${common[@]}" --compile --json "$out/compile.json" || true
    timeout 120 python3 -m glimage.cli bench "${common[@]}" --offload --json "$out/offload.json" || true
    ;;
  reference)
    # the bench saves the random weights (32 GB) once, then both sides load that folder; images compared
    timeout 560 python3 -m glimage.cli bench "${common[@]}" --compare-reference --json "$out/vs_reference.json"
    ;;
esac
ls -la "$out"
