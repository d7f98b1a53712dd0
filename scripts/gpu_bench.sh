#!/usr/bin/env bash
# GPU benchmark for sessions lent a device machine (an NVIDIA H200 with CUDA 13, Python 3.12,
# torch and onnxruntime (CPU) preinstalled; no internet there). See docs/benchmarks.md.
#
# onnxruntime-gpu 1.31 (built for CUDA 13, uses the image's nvidia-* CUDA 13 / cuDNN 9
# wheels) is a 255 MB wheel, more than the 64 MiB one call may carry, so it travels in parts:
#
#   here:    scripts/gpu_bench.sh prepare        # pip download into .whl/, split into .whl/parts/*
#            (.whl/ must be git-ignored: `echo /.whl/ >> .git/info/exclude`)
#   device:  one call per part, each carrying only that part, back to back (the machine stays
#            warm ~30 s between calls; a fresh machine is bare):
#              run(command="scripts/gpu_bench.sh receive", carry=[".whl/parts/ort.part.aa"])
#              ... .ab, .ac, .ad
#   device:  run(command="scripts/gpu_bench.sh run", carry=[".whl/parts/ort.part.ae", ".whl/parts/SHA256SUMS", ".whl/deps"])
#            # reassemble, install, parity, bench, table (the small last part travels with it)
#
# `run` writes gpu_parity.json, gpu_scoring.json and gpu_scoring.md under $OUT (or ./gpu-out);
# `profile` (same carry as `run`) splits the GPU time: transfers, ONNX Runtime on the device,
# the same graph in PyTorch eager, and its top kernels (gpu_profile.md).
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION="${ORT_VERSION:-1.31.1}"
STASH="${STASH:-/tmp/din-ort-parts}"
SITE="${SITE:-/tmp/din-site}"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$PWD/gpu-out}"
DEVICE="${DEVICE:-cuda}"
CASES="${CASES:-1x50x200,1x100x500,16x50x3200,64x50x12800,256x50x51200,1024x50x204800}"

stash() {  # the wheel parts (and checksums) this call carried, into the folder that outlives the call
    mkdir -p "$STASH"
    local found=0 part
    for part in .whl/parts/ort.part.* .whl/parts/SHA256SUMS; do
        [ -f "$part" ] || continue
        cp "$part" "$STASH/" && found=1 && echo "stashed $part"
    done
    [ "$found" = 1 ]
}

setup() {  # for run and profile: onnxruntime-gpu and the deps installed, the CUDA libraries found
    mkdir -p "$OUT_DIR"
    # The last (small) part, the checksums and the Python deps travel with this call itself.
    stash || true
    if [ -z "${SKIP_INSTALL:-}" ]; then
        if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
            [ -f "$STASH/SHA256SUMS" ] || { echo "no onnxruntime-gpu: run 'prepare' here and 'receive' per part first" >&2; exit 1; }
            wheel="$STASH/$(awk '{print $2}' "$STASH/SHA256SUMS")"
            cat "$STASH"/ort.part.* > "$wheel"
            (cd "$STASH" && sha256sum -c SHA256SUMS) || { ls -la "$STASH" >&2; exit 1; }
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$wheel"
        fi
        # What the image lacks for `din bench scoring` (pydantic, pydantic-settings, our typer): `prepare` fetched them.
        if ls .whl/deps/*.whl >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/deps/*.whl
        fi
        export PYTHONPATH="$SITE:${PYTHONPATH:-}"
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH:-}"
    # CUDA 13 / cuDNN 9 libraries of the image's nvidia-* wheels, for onnxruntime's CUDA provider
    NV_LIBS="$("$PY" - <<'PYEOF'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})))
PYEOF
)"
    export LD_LIBRARY_PATH="${NV_LIBS}:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
    "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
}

case "${1:-}" in
prepare)
    mkdir -p .whl/parts
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl "onnxruntime-gpu==${ORT_VERSION}"
    rm -f .whl/parts/ort.part.*
    split -b 60m .whl/onnxruntime_gpu-"${ORT_VERSION}"-*.whl .whl/parts/ort.part.
    (cd .whl && sha256sum onnxruntime_gpu-"${ORT_VERSION}"-*.whl > parts/SHA256SUMS)
    # what the image lacks for `din bench scoring`, at this checkout's versions (a few MB: they travel with `run`)
    mkdir -p .whl/deps
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/deps \
        $("${VENV_PY:-.venv/bin/python}" -m pip list --format=freeze 2>/dev/null | grep -iE \
          '^(pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|typing[-_]inspection|annotated[-_]types|typer|annotated[-_]doc|typing[-_]extensions|rich|shellingham)==')
    ls -la .whl/parts
    echo "carry each full .whl/parts/ort.part.* in its own 'receive' call, then call 'run' carrying the last part, .whl/parts/SHA256SUMS and .whl/deps"
    ;;
receive)
    stash || { echo "no part carried in this call" >&2; exit 1; }
    ls -la "$STASH"
    ;;
profile)
    setup
    "$PY" scripts/gpu_profile.py --device "$DEVICE" ${PROFILE_ARGS:-} 2>"$OUT_DIR/gpu_profile.log" | tee "$OUT_DIR/gpu_profile.md" \
        || { tail -30 "$OUT_DIR/gpu_profile.log"; exit 1; }
    ;;
run)
    setup
    failed=""

    echo "== parity: $DEVICE vs CPU (and what DEVICE=auto picks)"
    "$PY" scripts/gpu_check.py --device "$DEVICE" 2>"$OUT_DIR/gpu_parity.log" | tee "$OUT_DIR/gpu_parity.json" \
        || { failed="$failed parity"; tail -20 "$OUT_DIR/gpu_parity.log"; }
    if "$PY" -c "import tensorrt" 2>/dev/null; then
        "$PY" scripts/gpu_check.py --device tensorrt | tee "$OUT_DIR/gpu_parity_tensorrt.json" || failed="$failed tensorrt"
    else
        echo "TensorRT libraries are not in this image: DEVICE=tensorrt not checked" | tee "$OUT_DIR/tensorrt.txt"
    fi

    echo "== din bench scoring on $DEVICE at growing batch sizes"
    if "$PY" -m service.cli bench scoring --device "$DEVICE" --cases "$CASES" \
        --impls "${IMPLS:-torch_eager_naive,onnx_naive,onnx_optimized}" --seconds "${SECONDS_PER_CASE:-1}" --json \
        > "$OUT_DIR/gpu_scoring.json" 2> "$OUT_DIR/gpu_scoring.log"; then
        "$PY" -c "import json, sys; from service.bench_scoring import format_table; print(format_table(json.load(open(sys.argv[1]))))" \
            "$OUT_DIR/gpu_scoring.json" | tee "$OUT_DIR/gpu_scoring.md"
    else
        failed="$failed scoring"; tail -30 "$OUT_DIR/gpu_scoring.log"
    fi
    [ -z "$failed" ] || { echo "FAILED:$failed" >&2; exit 1; }
    ;;
*)
    echo "usage: $0 prepare|receive|run   (see the comment at the top)" >&2
    exit 2
    ;;
esac
