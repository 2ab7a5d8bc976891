#!/usr/bin/env bash
# Fetch the wheels the GPU check needs and the GPU image lacks (pydantic and its dependencies,
# for CPython 3.12 on x86-64 Linux) into .whl/ at the repository root (ignored by git; ~2.8 MB).
# Run here, where PyPI is reachable; the device run carries .whl (see bench/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
ls -l .whl
