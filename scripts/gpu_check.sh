#!/usr/bin/env bash
# The prepared GPU checks for a task that is lent a device machine (one H100/H200, ~15 minutes in all).
#
#   bash scripts/gpu_check.sh prepare   # HERE, before any device call: wheels the GPU image lacks -> .whl/
#   bash scripts/gpu_check.sh run       # ON THE DEVICE: tests + the JPEG loader (~340 s)
#   bash scripts/gpu_check.sh peers     # ON THE DEVICE: the towers vs their peers + profile (~330 s)
#   bash scripts/gpu_check.sh gap       # ON THE DEVICE: embed_folder vs the bare loader, rows in turn, and
#                                       # where each thread's time goes (~180 s)
#   bash scripts/gpu_check.sh assist    # ON THE DEVICE: CPU assist (session 9, never yet on a GPU): its
#                                       # gpu tests, then gpu_gap rows C L M N G O P Q in turn, then C D with
#                                       # expandable_segments (~250 s)
#   bash scripts/gpu_check.sh verify    # ON THE DEVICE: one call for a task lent a single 15-minute budget:
#                                       # every gpu test, gpu_gap rows C L M N G O P Q, then the issue's
#                                       # 1280x960 end-to-end benchmark (~480 s)
#   bash scripts/gpu_check.sh procs     # ON THE DEVICE: GPU decode processes (session 11): their gpu tests,
#                                       # then gpu_gap rows C R S T over 65536 files (~200 s)
#   bash scripts/gpu_check.sh cli       # ON THE DEVICE: whole `clipengine embed --gpu-decode` commands, one
#                                       # loader thread vs --gpu-decode-procs 4 / 6, with the commands'
#                                       # timelines (session 12; ~330 s, timeout_s 370)
#   bash scripts/gpu_check.sh fused     # ON THE DEVICE: session 15's fused preprocessing kernels:
#                                       # preprocess_tensors alone, every gpu test, then whole embed commands
#                                       # (default kernels / + the operand one, 1 and 4 loaders, 196,608 files;
#                                       # 1 and 4 loaders over 98,304: the default's threshold) (~450 s)
#
# Each device mode is one `run` call with carry [".whl"] and timeout_s 590. Session 4 ran both in one
# 15-minute budget (347 s + 291 s, plus the machine starts). Do not leave the machine warm
# (`give_back` unless the next call follows at once), and tell helpers (subagents) not to use the
# device: all calls share one budget (session 3 lost 6 of its 15 minutes to a helper's calls).
# Every stage has its own time limit (env vars below), so a slow stage cannot take the others'
# results with it; benchmarks write their tables as they go.
#
# run   (PYTEST_S 150, E2E_S 120, E2E_MIX_S 60, DECODE_S 45) writes under $OUT: pytest_gpu.log (machine +
#       versions, then every test marked gpu), e2e_cuda.md + e2e_{uniform,mix}.json
#       (benchmarks/gpu_e2e.py: JPEG folder -> embeddings, torchvision / nvImageCodec loaders vs CPU
#       workers, exact vs float32 resize, reader threads 2 / 4 / 8 / 16, decode_ahead, the hardware +
#       hybrid decode split, on 4096 1280x960 JPEGs, and on
#       2048 of a mix with 12 MP ones), decode_stages.md
#       (benchmarks/gpu_decode_bench.py: each loader stage alone) and stderr.log.
# peers (PEERS_S 260, PROFILE_S 40 twice) writes: peers_cuda.{md,json} (benchmarks/compare_peers.py
#       --device cuda: clipengine eager / compiled under CUDA graphs vs open_clip and HF, image batch
#       1024 / 32 / 1 and text), profile.txt (benchmarks/gpu_profile.py: kernels of one batch-1024
#       forward, with the patch GEMM and with cuDNN's convolution) and stderr.log.
# The GPU image (see the device tool's KINDS.md) has torch, torchvision, transformers, onnxruntime
# (CPU only), typer, safetensors, numpy, Pillow, regex, tqdm; it lacks ftfy (our tokenizer),
# open_clip and nvImageCodec: `prepare` fetches them.
set -uo pipefail
cd "$(dirname "$0")/.."

setup() {
    OUT=${OUT:-gpu_out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
}

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    # Pure-Python wheels, so the device's Python 3.12 takes them as they are.
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
        "ftfy==6.3.1" "wcwidth==0.2.13" "open_clip_torch==3.3.0"
    # nvImageCodec and the nvjpeg it loads (cu13, as the device's torch): GpuJpegDecoder(library="nvimgcodec").
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "nvidia-nvimgcodec-cu13==0.9.0.20" "nvidia-nvjpeg==13.3.2.43"
    ls -l .whl
    ;;
run)
    setup
    { date -u; nvidia-smi; python3 -c "import sys, torch, torchvision, onnxruntime as o; print(sys.version); \
print('torch', torch.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)); \
print('torchvision', torchvision.__version__, 'onnxruntime', o.__version__, o.get_available_providers())"; \
      python3 -c "from clipengine.image import nvimgcodec_decode as d; print('nvimgcodec', d.available() and d._module().__version__)"; \
      nproc; } > "$OUT/pytest_gpu.log" 2>&1
    # GPU tests (warnings are not errors here: the device's torch / transformers versions differ from CI's).
    # -rP: the tests' printed deviations (nvjpeg / nvImageCodec vs the exact path) land in the log.
    tests="tests/backends/test_accel.py tests/backends/test_fp8.py tests/backends/test_torch_backend.py tests/image/test_gpu_preprocess.py tests/pipeline/test_gpu_loading.py"
    if python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
        tests="$tests tests/backends/test_onnx_backend.py"
    fi
    timeout "${PYTEST_S:-150}" python3 -m pytest -m gpu -v -rP --durations=15 -p no:cacheprovider -o filterwarnings=default $tests >> "$OUT/pytest_gpu.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -3
    # JPEG folder -> embeddings on the issue's 1280x960 set and on a mix with every 8th image 4000x3000.
    # The 1280x960 set also sweeps the loader's reader threads (default 2).
    # Read first: the decode_ahead rows ("gpu_loading: ...") and the hardware + hybrid split rows
    # (--split), built after session 5's device time ran out, and every loader row against session 5's
    # (session 6 made the reader threads take 32-file slices: +37-55 % host side on 2 CPU cores).
    timeout "${E2E_S:-120}" python3 benchmarks/gpu_e2e.py --count 4096 --large-every 0 --seconds 6 --title "1280x960 only" \
        --thread-sweep 2,4,16 --split 0.25,0.4 --json "$OUT/e2e_uniform.json" > "$OUT/e2e_cuda.md" 2> "$OUT/stderr.log"
    echo "gpu_e2e uniform exit $?"
    timeout "${E2E_MIX_S:-60}" python3 benchmarks/gpu_e2e.py --count 2048 --large-every 8 --seconds 6 --title "mix: every 8th 4000x3000" \
        --json "$OUT/e2e_mix.json" >> "$OUT/e2e_cuda.md" 2>> "$OUT/stderr.log"
    echo "gpu_e2e mix exit $?"; cat "$OUT/e2e_cuda.md"
    timeout "${DECODE_S:-45}" python3 benchmarks/gpu_decode_bench.py > "$OUT/decode_stages.md" 2>> "$OUT/stderr.log"
    echo "decode bench exit $?"; cat "$OUT/decode_stages.md"
    ;;
peers)
    setup
    # fp8 rows are left out: measured in session 3 (no gain at these sizes), and they cost two compiles per case.
    timeout "${PEERS_S:-260}" python3 benchmarks/compare_peers.py --device cuda --rounds 3 --min-seconds 0.25 --skip-e2e \
        --skip-fp8 ${PEER_CASES:---only image1024 --only image32 --only image1 --only text} \
        --json "$OUT/peers_cuda.json" > "$OUT/peers_cuda.md" 2> "$OUT/stderr.log"
    echo "compare_peers exit $?"; cat "$OUT/peers_cuda.md"
    { timeout "${PROFILE_S:-40}" python3 benchmarks/gpu_profile.py --compile --rows 12
      timeout "${PROFILE_S:-40}" python3 benchmarks/gpu_profile.py --compile --rows 12 --conv; } > "$OUT/profile.txt" 2>&1
    echo "gpu_profile exit $?"; grep -E "^## |per batch" "$OUT/profile.txt"
    ;;
gap)
    setup
    # Session 8: over 16k files, rows in turn (benchmarks/gpu_gap.py), then the threads' stacks
    # sampled during embed_folder (benchmarks/gpu_sample.py). Both print markdown.
    timeout "${GAP_S:-200}" python3 benchmarks/gpu_gap.py --rounds 3 --json "$OUT/gap.json" > "$OUT/gap.md" 2> "$OUT/stderr.log"
    echo "gpu_gap exit $?"; cat "$OUT/gap.md"
    timeout "${SAMPLE_S:-60}" python3 benchmarks/gpu_sample.py > "$OUT/sample.md" 2>> "$OUT/stderr.log"
    echo "gpu_sample exit $?"; cat "$OUT/sample.md"
    ;;
assist)
    setup
    # Session 9 built `embed_folder(gpu_cpu_share=...)` without a GPU: CPU worker processes decode a
    # share of the files beside nvjpeg. First its correctness on CUDA, then the rates against the
    # default (C, G) in the same rounds. Read the "loader waited" log lines in stderr.log too.
    nproc > "$OUT/pytest_gpu.log"
    timeout "${PYTEST_S:-60}" python3 -m pytest -m gpu -v -rP -p no:cacheprovider -o filterwarnings=default \
        tests/pipeline/test_gpu_loading.py -k "cpu_share or matches_cpu_workers" >> "$OUT/pytest_gpu.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -3
    timeout "${GAP_S:-200}" python3 benchmarks/gpu_gap.py --rounds 3 --rows CLMNGOPQ --json "$OUT/assist.json" \
        > "$OUT/assist.md" 2> "$OUT/stderr.log"
    echo "gpu_gap exit $?"; cat "$OUT/assist.md"; grep -E "CPU assist|waited" "$OUT/stderr.log" | tail -12
    # decode_ahead lost 1-6 % in session 8; if rows C / D above show many cudaMalloc / cudaFree
    # (device-wide syncs), the allocator is the contention: the same rows with expandable segments.
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${ALLOC_S:-90}" python3 benchmarks/gpu_gap.py \
        --rounds 3 --rows CD > "$OUT/assist_expandable.md" 2>> "$OUT/stderr.log"
    echo "gpu_gap expandable_segments exit $?"; cat "$OUT/assist_expandable.md"
    ;;
verify)
    # Session 11: sessions 9 and 10 had no device, so their GPU code (CPU assist, CUDA-graph capture in
    # thread_local mode while the loader decodes, the decode-fallback warning) is checked here in one call.
    setup
    { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; \
      python3 -c "import sys, torch, torchvision; print(sys.version); print('torch', torch.__version__, torchvision.__version__)"; \
    } > "$OUT/pytest_gpu.log" 2>&1
    timeout "${PYTEST_S:-170}" python3 -m pytest -m gpu -v -rP --durations=10 -p no:cacheprovider -o filterwarnings=default \
        tests/backends/test_accel.py tests/backends/test_fp8.py tests/backends/test_torch_backend.py \
        tests/image/test_gpu_preprocess.py tests/pipeline/test_gpu_loading.py >> "$OUT/pytest_gpu.log" 2>&1
    echo "pytest exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest_gpu.log" | tail -12
    timeout "${GAP_S:-200}" python3 benchmarks/gpu_gap.py --rounds 3 --rows CLMNGOPQ --json "$OUT/assist.json" \
        > "$OUT/assist.md" 2> "$OUT/stderr.log"
    echo "gpu_gap exit $?"; cat "$OUT/assist.md"; grep -E "CPU assist|waited|Traceback|Error" "$OUT/stderr.log" | tail -12
    timeout "${E2E_S:-100}" python3 benchmarks/gpu_e2e.py --count 4096 --large-every 0 --seconds 6 --title "1280x960 only" \
        --json "$OUT/e2e_uniform.json" > "$OUT/e2e_cuda.md" 2>> "$OUT/stderr.log"
    echo "gpu_e2e uniform exit $?"; cat "$OUT/e2e_cuda.md"
    ;;
procs)
    # Session 11: GPU decode processes (`embed --gpu-decode-procs N`, pipeline.gpu_procs), built after
    # benchmarks/gpu_decode_procs.py showed torchvision's decode scaling with processes (8.2k -> 10.3k
    # img/s raw). Its gpu tests, then gpu_gap rows C R S T over 65536 files (the processes' start-up
    # is inside each timed row); stderr.log has each run's rate after its first batch.
    setup
    nproc > "$OUT/pytest_gpu.log"
    timeout "${PYTEST_S:-100}" python3 -m pytest -m gpu -v -rP -p no:cacheprovider -o filterwarnings=default \
        tests/pipeline/test_gpu_procs.py tests/pipeline/test_gpu_loading.py >> "$OUT/pytest_gpu.log" 2>&1
    echo "pytest exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest_gpu.log" | tail -8
    timeout "${GAP_S:-200}" python3 benchmarks/gpu_gap.py --count 65536 --rounds 2 --rows CRST --json "$OUT/procs.json" \
        > "$OUT/procs_gap.md" 2> "$OUT/stderr.log"
    echo "gpu_gap exit $?"; cat "$OUT/procs_gap.md"
    grep -E "decode processes|Traceback|Error|failed" "$OUT/stderr.log" | tail -20
    ;;
cli)
    # Session 12: `embed --gpu-decode-procs N` (N GPU loaders: this process's loader thread + N-1
    # processes started while the model loads, blocks claimed as each wants more). Whole
    # `clipengine embed` commands timed (benchmarks/gpu_cli_procs.py, with each command's timeline
    # from `embed -v`: listing, model load, model ready at, embedding done at): one loader thread vs
    # N = 4 over 65536 files (2 rounds), then vs N = 4 and 6 over 196608 (1 round; session 12: N = 4
    # 44.5 s vs 49.7 s, its loaders 7,613 img/s). Each command's stderr is kept under $OUT/cli_logs*.
    setup
    nproc > "$OUT/pytest_gpu.log"
    timeout "${PYTEST_S:-60}" python3 -m pytest -m gpu -v -rP -p no:cacheprovider -o filterwarnings=default \
        tests/pipeline/test_gpu_procs.py >> "$OUT/pytest_gpu.log" 2>&1
    echo "pytest exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest_gpu.log" | tail -8
    timeout "${CLI_S:-120}" python3 benchmarks/gpu_cli_procs.py --count 65536 --rounds 2 --procs 4 \
        --out "$OUT/cli_logs" --json "$OUT/cli.json" > "$OUT/cli.md" 2> "$OUT/stderr.log"
    echo "gpu_cli_procs 65536 exit $?"; cat "$OUT/cli.md"
    grep -hE "GPU loaders|ready" "$OUT"/cli_logs/*.log | cut -c1-240 | tail -6
    timeout "${CLI_BIG_S:-180}" python3 benchmarks/gpu_cli_procs.py --count 196608 --rounds 1 --procs 4,6 \
        --out "$OUT/cli_logs_big" --json "$OUT/cli_big.json" > "$OUT/cli_big.md" 2>> "$OUT/stderr.log"
    echo "gpu_cli_procs 196608 exit $?"; cat "$OUT/cli_big.md"
    grep -E "round|Traceback|Error" "$OUT/stderr.log" | cut -c1-400 | tail -12
    grep -hE "GPU loaders" "$OUT"/cli_logs_big/*.log | cut -c1-240
    ;;
fused)
    # Session 15: the GPU preprocessing's fused Triton kernels (image.gpu_triton; used by default in
    # multi-loader runs, image.gpu_fused). preprocess_tensors alone, kernels vs torch ops in turn
    # (benchmarks/gpu_preprocess_bench.py), then every gpu test (the kernels against the torch ops, the
    # whole preprocessing against the exact CPU path), then whole `embed` commands over 196,608 files:
    # one loader thread and --gpu-decode-procs 4, each as the default (session 15's kernels) and with
    # every kernel, the operand one too, also in the one loader thread. (Torch ops against the kernels
    # was measured three times in session 15; session 17 dropped those rows.) Then 1 against 4 loaders
    # over 98,304 files: since session 17, 4 loaders are the default from 100,000 files
    # (gpu_procs.default_decode_procs), set between session 12's tie at 65,536 and the gain at 196,608.
    # (~450 s: timeout_s 540).
    setup
    { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; \
      python3 -c "import sys, torch, torchvision, triton; print(sys.version); print('torch', torch.__version__, \
torchvision.__version__, 'triton', triton.__version__)"; } > "$OUT/pytest_gpu.log" 2>&1
    timeout "${BENCH_S:-80}" python3 benchmarks/gpu_preprocess_bench.py --seconds 0.6 > "$OUT/preprocess.md" 2> "$OUT/stderr.log"
    echo "gpu_preprocess_bench exit $?"; cat "$OUT/preprocess.md"; grep -E "Traceback|Error|failed" "$OUT/stderr.log" | tail -5
    timeout "${PYTEST_S:-120}" python3 -m pytest -m gpu -v -rP --durations=10 -p no:cacheprovider -o filterwarnings=default \
        tests/image/test_gpu_fused.py tests/image/test_gpu_preprocess.py tests/pipeline/test_gpu_loading.py \
        tests/pipeline/test_gpu_procs.py tests/backends/test_torch_backend.py tests/backends/test_accel.py \
        tests/backends/test_fp8.py >> "$OUT/pytest_gpu.log" 2>&1
    echo "pytest exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest_gpu.log" | tail -12
    timeout "${CLI_S:-230}" python3 benchmarks/gpu_cli_procs.py --count 196608 --rounds 1 --procs 4 \
        --variants "default=,operand=CLIPENGINE_GPU_KERNELS=triton+CLIPENGINE_GPU_KERNEL_SKIP=" \
        --out "$OUT/cli_logs" > "$OUT/cli.md" 2>> "$OUT/stderr.log"
    echo "gpu_cli_procs 196608 exit $?"; cat "$OUT/cli.md"
    grep -E "round|Traceback|Error" "$OUT/stderr.log" | cut -c1-400 | tail -8
    grep -hE "GPU loaders|kernel failed" "$OUT"/cli_logs/*.log | cut -c1-240
    timeout "${CLI_MID_S:-90}" python3 benchmarks/gpu_cli_procs.py --count 98304 --rounds 1 --procs 4 \
        --folder /tmp/clipengine_gpu_cli_98k --out "$OUT/cli_logs_98k" > "$OUT/cli_98k.md" 2>> "$OUT/stderr.log"
    echo "gpu_cli_procs 98304 exit $?"; cat "$OUT/cli_98k.md"
    grep -hE "GPU loaders" "$OUT"/cli_logs_98k/*.log | cut -c1-240
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare|run|peers|gap|assist|verify|procs|cli|fused" >&2
    exit 2
    ;;
esac
