#!/usr/bin/env bash
# Check the exllamav2 engine on this machine's GPU in one call, offline, and print one summary.
#
#   bash ops/gpu/check.sh              # the T4 path: EXLLAMA_NO_FLASH_ATTN=1, static batches
#   bash ops/gpu/check.sh --paged      # also the paged path where flash-attn works (sm_80+)
#
# Steps: install what is missing from a local wheel folder (no index is contacted); build
# exllamav2's CUDA extension for this GPU's compute capability only; build the tiny random
# EXL2 model; check that attention is causal in the converter's environment; run tests/gpu;
# run tests/bench/bench_exl2_gpu.py on the tiny model; print the summary. About 5-8 minutes
# on an H100/H200 with 16 cores, most of it the extension build (cached for later runs).
#
# Environment:
#   OPSTREAM_WHEELS     wheel folder for missing packages (default: ops/gpu/wheels). Fill it
#                       on a machine with internet: see the README, "The GPU engine".
#   OPSTREAM_GPU_CHECK_DIR  where logs, the model and the figures go (default: $OUT, or a
#                       new folder under /tmp); a model already built there is reused.
#   PYTHON              the interpreter (default: .venv/bin/python if present, else python3)
#   TORCH_EXTENSIONS_DIR  extension build cache (torch's default: ~/.cache/torch_extensions)
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

PAGED=0
for arg in "$@"; do
  case "$arg" in
    --paged) PAGED=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
if [ "$PAGED" = 0 ]; then
  export EXLLAMA_NO_FLASH_ATTN=1  # exllamav2 reads its presence: the T4 path on any GPU
else
  unset EXLLAMA_NO_FLASH_ATTN
fi

WHEELS=${OPSTREAM_WHEELS:-$ROOT/ops/gpu/wheels}
DIR=${OPSTREAM_GPU_CHECK_DIR:-${OUT:-$(mktemp -d /tmp/opstream-gpu-check.XXXX)}}
mkdir -p "$DIR"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

declare -A RESULT
FAILED=0
started_all=$(date +%s)

note() { printf '\n== %s\n' "$*"; }
record() { RESULT[$1]=$2; }
fail() { record "$1" "FAILED: $2"; FAILED=1; }
elapsed() { echo $(( $(date +%s) - $1 )); }

# -- 1. packages -------------------------------------------------------------------------
note "python: $("$PY" --version 2>&1), wheels: $WHEELS, output: $DIR"
missing=()
# import name -> requirement
for pair in torch:torch exllamav2:exllamav2==0.3.2 ninja:ninja safetensors:safetensors \
            tokenizers:tokenizers transformers:transformers pandas:pandas \
            fastparquet:fastparquet pytest:pytest pytest_asyncio:pytest-asyncio \
            pydantic:pydantic pydantic_settings:pydantic-settings jinja2:jinja2; do
  module=${pair%%:*}; requirement=${pair#*:}
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" \
    || missing+=("$requirement")
done
if [ ${#missing[@]} -gt 0 ]; then
  note "installing from $WHEELS: ${missing[*]}"
  if "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}" \
      >"$DIR/pip.log" 2>&1; then
    record packages "installed ${missing[*]}"
  else
    tail -5 "$DIR/pip.log"
    fail packages "could not install ${missing[*]} from $WHEELS (see $DIR/pip.log)"
  fi
else
  record packages "all present"
fi

gpu_facts=$("$PY" - <<'EOF' 2>&1
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
major, minor = torch.cuda.get_device_capability(0)
print(f"{major}.{minor}|{torch.cuda.get_device_name(0)}|{torch.__version__}|{torch.version.cuda}")
EOF
)
if [ $? -ne 0 ]; then
  echo "$gpu_facts"
  fail gpu "no usable CUDA torch"
  CAPABILITY=""
else
  IFS='|' read -r CAPABILITY GPU_NAME TORCH_VERSION TORCH_CUDA <<<"$gpu_facts"
  record gpu "$GPU_NAME (sm_${CAPABILITY/./}), torch $TORCH_VERSION, CUDA $TORCH_CUDA"
fi

# -- 2. nvcc (the extension is compiled on first import) ---------------------------------
if [ -n "$CAPABILITY" ] && ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
  # No toolkit: take nvcc and headers from NVIDIA's pip packages in the wheel folder.
  cuda_major=${TORCH_CUDA%%.*}
  suffix=""; [ "$cuda_major" -lt 13 ] 2>/dev/null && suffix="-cu$cuda_major"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "nvidia-cuda-nvcc$suffix" \
    "nvidia-cuda-runtime$suffix" "nvidia-cuda-cccl$suffix" >>"$DIR/pip.log" 2>&1 || true
  home=$("$PY" - <<'EOF'
import glob, os, sysconfig
for nvcc in sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "bin", "nvcc"))):
    print(os.path.dirname(os.path.dirname(nvcc)))
    break
EOF
)
  if [ -n "$home" ]; then
    export CUDA_HOME=$home PATH="$home/bin:$PATH"
    # torch links with -lcudart; the wheels ship only the versioned library.
    lib=$home/lib; [ -d "$home/lib64" ] && lib=$home/lib64
    if [ ! -e "$lib/libcudart.so" ]; then
      versioned=$(ls "$lib"/libcudart.so.* 2>/dev/null | head -1)
      [ -n "$versioned" ] && ln -s "$(basename "$versioned")" "$lib/libcudart.so"
    fi
    record nvcc "from pip packages: $home"
  else
    fail nvcc "nvcc not found: install the CUDA toolkit matching torch's CUDA $TORCH_CUDA or set CUDA_HOME"
  fi
elif command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ]; then
  record nvcc "$(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")"
fi

# -- 3. the extension, for this GPU only --------------------------------------------------
if [ -n "$CAPABILITY" ]; then
  export TORCH_CUDA_ARCH_LIST=$CAPABILITY
  note "building exllamav2's extension for sm_${CAPABILITY/./} with $MAX_JOBS jobs"
  t0=$(date +%s)
  # A flash-attn built for another torch would break `import exllamav2`: leave it out then.
  if "$PY" - >"$DIR/extension.log" 2>&1 <<'EOF'
import os
from consumer.engine.exllamav2.probes import probe_flash_attn
probe = probe_flash_attn()
if probe.version is not None and probe.problem is not None:
    print(f"flash-attn {probe.version} left out: {probe.problem}")
    os.environ["EXLLAMA_NO_FLASH_ATTN"] = "1"
import exllamav2.ext as ext
print("JIT-built" if ext.build_jit else "prebuilt")
EOF
  then
    record extension "$(tail -1 "$DIR/extension.log") extension ready in $(elapsed "$t0") s"
  else
    tail -20 "$DIR/extension.log"
    fail extension "build failed after $(elapsed "$t0") s (see $DIR/extension.log)"
  fi
fi

# -- 4. the tiny model --------------------------------------------------------------------
MODEL=$DIR/tiny/exl2
if [ -f "$MODEL/config.json" ]; then
  record model "reused $MODEL"
elif [[ "${RESULT[extension]:-FAILED}" != FAILED* ]]; then
  note "building the tiny EXL2 model"
  t0=$(date +%s)
  if "$PY" -m tests.gpu.model_builder "$DIR/tiny" >"$DIR/model.log" 2>&1; then
    record model "built in $(elapsed "$t0") s"
  else
    tail -20 "$DIR/model.log"
    fail model "build failed (see $DIR/model.log)"
  fi
fi

# -- 5. causal attention where the converter runs -----------------------------------------
if [ -f "$MODEL/config.json" ]; then
  note "attention in the converter's environment (EXLLAMA_NO_SDPA=1)"
  if out=$(EXLLAMA_NO_FLASH_ATTN=1 EXLLAMA_NO_XFORMERS=1 EXLLAMA_NO_SDPA=1 \
            "$PY" -m tests.gpu.causality "$MODEL" 2>"$DIR/causality.log" | tail -1); then
    echo "$out"
    if "$PY" -c "import json,sys; sys.exit(not json.loads(sys.argv[1])['causal'])" "$out"; then
      record causal "yes ($out)"
    else
      fail causal "NO: $out"
    fi
  else
    tail -20 "$DIR/causality.log"
    fail causal "check failed (see $DIR/causality.log)"
  fi
fi

# -- 6. tests/gpu -------------------------------------------------------------------------
if [ -f "$MODEL/config.json" ]; then
  note "tests/gpu"
  t0=$(date +%s)
  # --confcutdir: only tests/gpu's conftest; the broker fixtures above it are not needed.
  OPSTREAM_GPU_TEST_MODEL=$MODEL "$PY" -m pytest tests/gpu -q -p no:cacheprovider \
    --confcutdir=tests/gpu --junitxml="$DIR/gpu-tests.xml" 2>&1 | tee "$DIR/gpu-tests.log" | tail -25
  counts=$("$PY" - "$DIR/gpu-tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - s} passed, {f} failed, {e} errors, {s} skipped")
EOF
)
  if [ -z "$counts" ]; then fail tests "no test report (see $DIR/gpu-tests.log)"
  elif [[ "$counts" == *" 0 failed, 0 errors"* && "$counts" != "0 passed"* ]]; then
    record tests "$counts in $(elapsed "$t0") s"
  else fail tests "$counts (see $DIR/gpu-tests.log)"; fi
fi

# -- 7. the benchmark on the tiny model -----------------------------------------------------
if [ -f "$MODEL/config.json" ]; then
  note "tests/bench/bench_exl2_gpu.py on the tiny model"
  if "$PY" tests/bench/bench_exl2_gpu.py --model-dir "$MODEL" --json "$DIR/bench.json" \
      --prompt-tokens 256 --new-tokens 64 --max-seq-len 2048 >"$DIR/bench.log" 2>&1; then
    grep '^\[' "$DIR/bench.log"
    record bench "$("$PY" - "$DIR/bench.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
lines = []
for mode, f in report["modes"].items():
    rates = f["decode_tokens_per_s"]
    lines.append(
        f"[{mode}] decode {rates['1']:.0f} tok/s at batch 1, {rates['8']:.0f} at batch 8; "
        f"prompt {f['prompt_tokens_per_s']:.0f} tok/s; peak VRAM {f['peak_reserved_bytes'] / 2**30:.2f} "
        f"GiB vs estimate {f['estimate_bytes'] / 2**30:.2f} GiB"
    )
print(" | ".join(lines))
EOF
)"
  else
    tail -20 "$DIR/bench.log"
    fail bench "failed (see $DIR/bench.log)"
  fi
fi

# -- summary ------------------------------------------------------------------------------
printf '\n==================== opstream GPU check (%s s) ====================\n' "$(elapsed "$started_all")"
printf 'path: %s\n' "$([ "$PAGED" = 1 ] && echo "paged where flash-attn works, else static" || echo "T4 path (EXLLAMA_NO_FLASH_ATTN=1, static batches)")"
for key in gpu packages nvcc extension model causal tests bench; do
  printf '%-10s %s\n' "$key" "${RESULT[$key]:-not run}"
done
printf 'logs and figures: %s\n' "$DIR"
exit $FAILED
