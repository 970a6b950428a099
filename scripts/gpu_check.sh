#!/usr/bin/env bash
# On a CUDA machine: the GPU-marked tests, the latency benchmark and the clinical-size
# benchmark (its last lines give the GPU's busy share of the queued run), with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'   # a CUDA build of torch from the index
fi
export BENTOML_DO_NOT_TRACK=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
.venv/bin/python -m pytest -m gpu -q
.venv/bin/python scripts/bench/latency.py --device cuda
.venv/bin/python scripts/bench/scale.py --device cuda --repeats 3
