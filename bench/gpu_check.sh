#!/usr/bin/env bash
# The GPU check: everything issue 14 asks of a lent H100/H200, in one command, within 8 minutes.
#
#   bench/gpu_check.sh [--dry-run] [--out DIR] [--budget-s 450] [--steps a,b,...]
#
# Steps (bench/gpu_check.py): the CUDA tests of tests/pool; pool swap vs from_pretrained at
# 0.5B; the mixed multi-LoRA batch (0.5B, 8 adapters, batch 64) vs PEFT adapter_names; X-LoRA
# with a KV cache vs PEFT; largest_group vs fcfs scheduling. Random weights of realistic shapes
# (the machine has no weights and no network). Results: DIR/gpu_check.{json,md,log} and
# DIR/pool_gpu_tests.xml; DIR defaults to $OUT (set on the lent machine), else
# bench/results/gpu_check. --dry-run: the same steps on the CPU with tiny shapes.
#
# What the GPU image lacks: pydantic (coe's config and types need it) and an install of coe.
#  - pydantic travels as wheels: run bench/gpu_wheels.sh here once (it fills .whl/, which git
#    ignores), and name .whl in the run's carry list. This script installs them into
#    /tmp/coe-site when `import pydantic` fails.
#  - coe.* is imported from the checkout by bench/checkout_import.py (pyproject's package-dir
#    map as a meta-path finder), so no pip install of coe is needed.
#
# On the lent machine (device tool): command `bash bench/gpu_check.sh`, carry [".whl"],
# timeout_s 540. Exit status: 0 when every step passed, 1 when one failed, 2 when set-up failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import pydantic" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    site=${COE_SITE:-/tmp/coe-site}
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: pydantic is missing and no wheels were carried: run bench/gpu_wheels.sh and carry .whl" >&2
    exit 2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
$PY bench/checkout_import.py bench/gpu_check.py "$@"
