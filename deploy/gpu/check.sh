#!/usr/bin/env bash
# The GPU check: what this project verifies on a GPU, in one run (under 8 minutes on one H100, by design).
#
# Runs on a machine with an NVIDIA GPU, Python 3.12, torch and triton, from the repository root, with
# .gpu/ beside it (`make gpu-pack` here: the wheels of the other packages and the default tokenizer;
# the device tool carries it with carry: [".gpu"]). Prints, and keeps in $OUT/gpu-check.log:
#  1. the card and versions;
#  2. the Triton kernels compiled for the GPU against their torch references;
#  3. the engine on the GPU against the same engine on the CPU (perplexity, predictions), batched decode;
#     captured CUDA graphs against the eager step;
#  4. `bench engine` at a Llama-3-8B shape (random weights, bf16): decode against the HBM floor (with CUDA
#     graphs and eager) and prefill against the bf16 GEMM rate, both limits measured in the same run;
#  5. a stack (NATS, Redis, gateway, prefill and decode workers on the GPU) against the engine in process.
# Exit status 0 only if every step passed. `--no-install`: the packages are there already (a machine
# with `make install` done; python3 the project's), only the tokenizer is taken from .gpu/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
if [ "${1:-}" != "--no-install" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/wheels/*.whl || { echo "installing .gpu/wheels failed (run make gpu-pack where pip works)"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export DISTSERVE_CACHE_DIR=/tmp/distserve-cache
export DISTSERVE_GPU_TEST_MODEL="random:{\"preset\":\"smollm2-135m\",\"tokenizer\":\"$PWD/.gpu/tokenizer\"}"
LLAMA_3_8B="random:{\"preset\":\"llama-3-8b\",\"tokenizer\":\"$PWD/.gpu/tokenizer\"}"  # the default tokenizer: see pack.py

status=0
step() {
    local name=$1
    shift
    echo "== $name" | tee -a "$LOG"
    local started=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    echo "== $name: $([ "$code" = 0 ] && echo passed || echo "FAILED ($code)") in $((SECONDS - started)) s" | tee -a "$LOG"
    [ "$code" = 0 ] || status=1
}
pytest() { python3 -m pytest -q -p no:cacheprovider "$@"; }

step "card and versions" sh -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv &&
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"'
step "Triton kernels on the GPU" env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/engine/test_triton_kernels.py
step "engine on the GPU vs the CPU, CUDA graphs" pytest tests/engine/test_device.py tests/engine/test_cuda_graphs.py
step "bench engine, Llama-3-8B shape, bf16" python3 -m services.cli bench engine --device cuda \
    --model "$LLAMA_3_8B" --variants bf16 --prefill-lengths 512,2048 --decode-batches 1,16,64 --context 512 \
    --kv-gib 8 --quality-tokens 0 --copy-mib 2048 --gemm-n 8192 --warmup 3 --repeat 10
step "a stack on the GPU" pytest tests/services/test_gpu_stack.py
echo "GPU check: $([ $status = 0 ] && echo passed || echo FAILED) in $SECONDS s" | tee -a "$LOG"
exit $status
