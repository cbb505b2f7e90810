#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in a few minutes, with only the repo and python3 to start from.
#
#   bash benchmarks/gpu_check.sh
#
#   1. the venv (make install) with torch's CUDA build: the default index's Linux wheel of torch==2.13.0 is the
#      CUDA one (TORCH_SPEC and TORCH_INDEX override, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128);
#      a CPU build already in the venv is replaced;
#   2. the GPU-marked tests (pytest -m gpu; QLoRA's needs bitsandbytes, installed here when pip can get it);
#   3. pretrain tokens/s and MFU (6·N·tokens/s over the GPU's bf16 dense datasheet peak) of a ~125M-parameter
#      Llama, bf16, context 1024, against a hand-written loop and transformers' Trainer in the same run;
#   4. with two GPUs or more: the same pretrain component on 2 GPUs (Lightning DDP under torchrun).
#
# Figures go to benchmarks/results/bench_pretrain.cuda-125m*.json (benchmarks/record.py), and into $OUT too when
# it is set (the device tool's folder of files to bring back). Each stage has its own time limit; on a machine
# with the venv in place the whole check takes about 3-4 minutes, a fresh install adds the download of torch.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY=$VENV/bin/python
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
failed=()
stage() { printf '\n== %s  (%d s so far)\n' "$*" "$SECONDS"; }

if ! nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; then
    echo "gpu_check: nvidia-smi finds no NVIDIA GPU here; this check is for a CUDA machine" >&2
    exit 1
fi
GPUS=$(nvidia-smi -L | grep -c '^GPU')

stage "1/4 venv with torch's CUDA build ($TORCH_SPEC)"
# A find-links folder of CPU wheels (PIP_FIND_LINKS) would win: torch's `+cpu` local version sorts above the plain one.
unset PIP_FIND_LINKS
if [ ! -x "$PY" ]; then
    # A python3 that already has a CUDA build of torch (an offline GPU image) lends it to the venv: no download.
    if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
        "$PYTHON" -m venv --system-site-packages "$VENV" || exit 1
    else
        "$PYTHON" -m venv "$VENV" || exit 1
    fi
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    "$PY" -m pip uninstall -y -q torch 2>/dev/null
    timeout 480 "$PY" -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC" || {
        echo "gpu_check: could not install $TORCH_SPEC (no network? set TORCH_INDEX to a reachable index)" >&2
        exit 1
    }
fi
if command -v make >/dev/null; then
    timeout 300 make -s install PYTHON="$PYTHON" VENV="$VENV" TORCH_SPEC="$TORCH_SPEC" || exit 1
else  # what `make install` does
    timeout 300 "$PY" -m pip install -q -e '.[dev]' || exit 1
fi
"$PY" - <<'EOF' || exit 1
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) does not see the GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
EOF

stage "2/4 GPU-marked tests"
"$PY" -c "import bitsandbytes" 2>/dev/null || timeout 180 "$PY" -m pip install -q bitsandbytes \
    || echo "gpu_check: bitsandbytes is not installable here; the QLoRA test is skipped"
timeout 420 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests || failed+=("GPU-marked tests")

stage "3/4 pretrain tokens/s and MFU, ~125M Llama, bf16, context 1024, vs transformers' Trainer"
# One GPU: transformers' Trainer would otherwise wrap the model in DataParallel across every visible GPU.
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} timeout 420 \
    "$PY" benchmarks/bench_pretrain.py --device cuda --size 125m || failed+=("pretrain benchmark")

if [ "$GPUS" -ge 2 ]; then
    stage "4/4 the pretrain component on 2 GPUs, DDP under torchrun"
    timeout 300 "$VENV/bin/torchrun" --standalone --nnodes 1 --nproc-per-node 2 \
        benchmarks/bench_pretrain.py --device cuda --size 125m --ddp || failed+=("2-GPU DDP step")
else
    stage "4/4 skipped: one GPU here, the DDP step needs two"
fi

"$PY" benchmarks/report.py
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp benchmarks/results/bench_pretrain.cuda-125m*.json "$OUT/results/" 2>/dev/null
fi
printf '\ngpu_check: %d s in all\n' "$SECONDS"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed: ${failed[*]}" >&2
    exit 1
fi
