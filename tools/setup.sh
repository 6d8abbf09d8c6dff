#!/usr/bin/env bash
# Create .venv with everything qpipe and its tests need (CPU PyTorch first, so
# nothing pulls a multi-GB CUDA build), then install qpipe itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[nemo,test,recipe]'
.venv/bin/python -c "import torch, qpipe.ir; print('qpipe ready: torch', torch.__version__)"
