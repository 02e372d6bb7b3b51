#!/usr/bin/env bash
# The testbed measurement of issue 8 on one GPU, in stages that each fit a 10-minute device call. The run folders
# live under runs/ (git-ignored) and persist between calls while the machine stays warm; every stage resumes.
#
#   bash bench/testbed_gpu.sh train MINUTES     # train (or resume) the base model for MINUTES
#   bash bench/testbed_gpu.sh probe PROMPTS     # a short eval without the LoRA (timing and a first look)
#   bash bench/testbed_gpu.sh lora-cache COUNT  # 4x scenes + base guides for the guide LoRA
#   bash bench/testbed_gpu.sh lora SECONDS      # train (or resume) the guide LoRA for at most SECONDS
#   bash bench/testbed_gpu.sh eval PROMPTS      # every strategy with and without warm start -> bench/results
#   bash bench/testbed_gpu.sh variant POLICY.json SECONDS PROMPTS   # a guide LoRA under another attention
#        policy (bench/testbed_policies/), then windows+guide+lora under it -> bench/results/testbed-policy-*.json
#
# Copies of the logs and results go to $OUT when it is set (the device tool returns that folder).
set -euo pipefail
RUN=${RUN:-runs/tb}
LORA=${LORA:-runs/tb-lora}
CACHE=${CACHE:-runs/tb-lora-cache}
OUT=${OUT:-}
stage=$1
arg=${2:-}

ug=(ultragen)
command -v ultragen >/dev/null || ug=(python3 -m ultragen)  # a source checkout on PYTHONPATH
ultragen() { "${ug[@]}" "$@"; }
keep() { [ -n "$OUT" ] && cp "$@" "$OUT"/ || true; }

train_lora() {  # RUN_FOLDER SECONDS POLICY: train (or resume) a guide LoRA for at most SECONDS
  [ -f "$1/guide_lora.safetensors" ] && { echo "$1 is finished"; return 0; }
  local resume=()
  compgen -G "$1/checkpoints/step-*" >/dev/null && resume=(--resume)
  # checkpoints every 100 steps, so a stop loses little and the next call resumes
  timeout "$2" "${ug[@]}" train --model "$RUN/model" --cache "$CACHE" --out "$1" --steps 1500 --lr 5e-4 \
    --batch-size 4 --save-every 100 --validate-every 250 --policy "$3" --quiet "${resume[@]}" || [ $? -eq 124 ]
  keep "$1/loss.jsonl"
}

latest_lora() {  # RUN_FOLDER: its final LoRA, else its latest checkpoint's
  if [ -f "$1/guide_lora.safetensors" ]; then echo "$1/guide_lora.safetensors"
  else echo "$(ls -d "$1"/checkpoints/step-* | tail -1)/lora.safetensors"; fi
}

case $stage in
  train)
    ultragen testbed train --run-dir "$RUN" --preset base --steps 200000 --batch-size 64 --lr 5e-4 \
      --workers 12 --device cuda --max-minutes "$arg" --quiet
    keep "$RUN/log.jsonl"
    ;;
  probe)
    ultragen testbed eval --run-dir "$RUN" --device cuda --prompts "$arg" --batch-size 8 --quiet \
      --out "$RUN/probe.json" --grid "$RUN/probe.png"
    keep "$RUN/probe.json" "$RUN/probe.png"
    ;;
  lora-cache)
    [ -f "$CACHE/manifest.json" ] || { rm -rf "$CACHE"; ultragen testbed lora-cache --run-dir "$RUN" --out "$CACHE" \
      --count "$arg"; }
    ;;
  lora)
    train_lora "$LORA" "$arg" default
    ;;
  eval)
    ultragen testbed eval --run-dir "$RUN" --device cuda --prompts "$arg" --batch-size 20 --quiet \
      --lora "$(latest_lora "$LORA")" --out "bench/results/testbed-$(date +%Y%m%d).json"
    keep bench/results/testbed-"$(date +%Y%m%d)".*
    ;;
  variant)
    [ $# -eq 4 ] || { echo "usage: $0 variant POLICY.json SECONDS PROMPTS" >&2; exit 2; }
    policy=$arg name=$(basename "$arg" .json)
    train_lora "$LORA-$name" "$3" "$policy"
    out=bench/results/testbed-policy-$name-$(date +%Y%m%d).json
    ultragen testbed eval --run-dir "$RUN" --device cuda --prompts "$4" --batch-size 20 --quiet --policy "$policy" \
      --strategies windows+guide+lora --lora "$(latest_lora "$LORA-$name")" --out "$out" --grid "${out%.json}.png"
    keep "$out" "${out%.json}.png"
    ;;
  *)
    echo "unknown stage $stage; see the top of $0" >&2
    exit 2
    ;;
esac
