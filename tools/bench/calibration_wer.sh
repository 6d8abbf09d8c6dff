#!/usr/bin/env bash
# WER of one model quantized with four calibration sources, side by side with the float model:
# synthetic (BN-statistics distillation, the default), real audio, Gaussian noise, one all-zeros input.
#
#   tools/bench/calibration_wer.sh MODEL.nemo EVAL_MANIFEST REAL_AUDIO_MANIFEST [WORK_DIR]
#
# The real-audio manifest must not overlap the evaluation set.
set -euo pipefail
model=$1 eval_manifest=$2 real_manifest=$3 work=${4:-/tmp/qpipe-calibration-wer}
root=$(cd "$(dirname "$0")/../.." && pwd)
qpipe="$root/tools/qpipe"
mkdir -p "$work"
tail="substitute-int-ops,fuse-requant,eliminate-dead-float"
declare -A calib=(
  [synthetic]="calibrate-synthetic"
  [real]="calibrate-data{manifest=$real_manifest,utterances=32}"
  [noise]="calibrate-noise{kind=gaussian}"
  [zeros]="calibrate-noise{kind=zeros}"
)
outs=()
for name in synthetic real noise zeros; do
  "$qpipe" "$model" --passes "fold-bn,insert-observers,${calib[$name]},$tail" -o "$work/$name" --force --quiet > "$work/$name.report.txt"
  outs+=("$work/$name")
done
"$qpipe" eval "$model" "${outs[@]}" --manifest "$eval_manifest" --json "$work/eval.json" --quiet
