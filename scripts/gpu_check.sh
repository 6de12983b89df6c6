#!/usr/bin/env bash
# The prepared GPU check for a task that is lent a device machine (one H100/H200, ~15 minutes in all).
#
#   bash scripts/gpu_check.sh prepare   # HERE, before any device call: wheels the GPU image lacks -> .whl/
#   bash scripts/gpu_check.sh run       # ON THE DEVICE, as one `run` call with carry [".whl"], timeout_s 600
#
# `run` writes under $OUT: nvidia-smi.txt, pytest_gpu.log (every test marked gpu), peers_cuda.md /
# peers_cuda.json (benchmarks/compare_peers.py --device cuda: fp16 eager / CUDA graphs / compile /
# max-autotune vs HF transformers and open_clip; image batch 1 / 32 / 1024 and text), env.txt.
# The GPU image (see the device tool's KINDS.md) has torch, transformers, onnxruntime, typer,
# safetensors, numpy, Pillow, regex, tqdm; it lacks ftfy (our tokenizer) and open_clip.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    # Pure-Python wheels, so the device's Python 3.12 takes them as they are.
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
        "ftfy==6.3.1" "wcwidth==0.2.13" "open_clip_torch==3.3.0"
    ls -l .whl
    ;;
run)
    OUT=${OUT:-gpu_out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    { nvidia-smi; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
        > "$OUT/env.txt" 2>&1
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    # Warnings are not errors here: the device's torch / transformers versions differ from CI's.
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -o filterwarnings=default tests/backends \
        2>&1 | tee "$OUT/pytest_gpu.log"
    timeout 330 python3 benchmarks/compare_peers.py --device cuda --rounds 3 --skip-e2e \
        --json "$OUT/peers_cuda.json" > "$OUT/peers_cuda.md" 2> "$OUT/peers_cuda.err"
    echo "compare_peers exit $?"; cat "$OUT/peers_cuda.md"; tail -20 "$OUT/peers_cuda.err"
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
