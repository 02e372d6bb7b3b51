#!/usr/bin/env bash
# The testbed measurement of issue 8 on one GPU, in stages that each fit a 10-minute device call. The run folders
# live under runs/ (git-ignored) and persist between calls while the machine stays warm; every stage resumes.
#
#   bash bench/testbed_gpu.sh train MINUTES     # train (or resume) the base model for MINUTES
#   bash bench/testbed_gpu.sh restore EMA.safetensors STEP   # a run folder from saved EMA weights of the base preset,
#        for evaluation and LoRA training (not for resuming the base training: no optimizer state); refuses an
#        existing run folder
#   bash bench/testbed_gpu.sh probe PROMPTS     # a short eval without the LoRA (timing and a first look)
#   bash bench/testbed_gpu.sh lora-cache COUNT  # 4x scenes + base guides for the guide LoRA
#   bash bench/testbed_gpu.sh lora SECONDS      # train (or resume) the guide LoRA for at most SECONDS
#   bash bench/testbed_gpu.sh eval PROMPTS      # every strategy with and without warm start -> bench/results
#   bash bench/testbed_gpu.sh lora-eval PROMPTS # windows+guide+lora only, with the latest LoRA of $LORA
#   bash bench/testbed_gpu.sh variant POLICY.json SECONDS PROMPTS   # a guide LoRA under another attention
#        policy (bench/testbed_policies/), then windows+guide+lora under it -> bench/results/testbed-policy-*.json
#        (PROMPTS 0: train only)
#
# LORA_STEPS (default 1500) sets the LoRA schedule's length; LORA_ARGS adds `ultragen train` options (for example
# "--targets qkv --rank 32") and LORA_TAG names such a run (runs/tb-lora-TAG, testbed-lora-TAG-*.json); EVAL_ARGS
# adds `ultragen testbed eval` options to eval, lora-eval and variant (options without spaces or wildcards). The guide position offset, for example:
#   export LORA_TAG=offset0 LORA_ARGS="--guide-offset-tokens 0" EVAL_ARGS="--guide-offset-tokens 0"
#   bash bench/testbed_gpu.sh lora 300 && bash bench/testbed_gpu.sh lora-eval 100
# Copies of the logs and results go to $OUT when it is set (the device tool returns that folder).
set -euo pipefail
RUN=${RUN:-runs/tb}
LORA=${LORA:-runs/tb-lora}
CACHE=${CACHE:-runs/tb-lora-cache}
OUT=${OUT:-}
LORA_STEPS=${LORA_STEPS:-1500}
LORA_ARGS=${LORA_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}
[ -n "${LORA_TAG:-}" ] && LORA=$LORA-$LORA_TAG
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
  # shellcheck disable=SC2086  # LORA_ARGS is a list of options
  timeout "$2" "${ug[@]}" train --model "$RUN/model" --cache "$CACHE" --out "$1" --steps "$LORA_STEPS" --lr 5e-4 \
    --batch-size 4 --save-every 100 --validate-every 250 --policy "$3" --quiet $LORA_ARGS "${resume[@]}" \
    || [ $? -eq 124 ]
  [ -n "$OUT" ] && cp "$1/loss.jsonl" "$OUT/$(basename "$1")-loss.jsonl" || true
}

latest_lora() {  # RUN_FOLDER: its final LoRA, else its latest checkpoint's
  local last
  if [ -f "$1/guide_lora.safetensors" ]; then echo "$1/guide_lora.safetensors"; return; fi
  last=$(compgen -G "$1/checkpoints/step-*" | sort | tail -1) || true
  [ -n "$last" ] || { echo "$1 has no LoRA and no checkpoint; train one first (stage lora or variant)" >&2; exit 1; }
  echo "$last/lora.safetensors"
}

case $stage in
  train)
    ultragen testbed train --run-dir "$RUN" --preset base --steps 200000 --batch-size 64 --lr 5e-4 \
      --workers 12 --device cuda --max-minutes "$arg" --quiet
    keep "$RUN/log.jsonl"
    ;;
  restore)
    [ $# -eq 3 ] || { echo "usage: $0 restore EMA.safetensors STEP" >&2; exit 2; }
    [ -e "$RUN/checkpoint" ] && { echo "$RUN already holds a run; restore into a new RUN=folder" >&2; exit 2; }
    python3 - "$RUN" "$arg" "$3" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from ultragen.testbed.model import get_config
from ultragen.testbed.train import export_model, save_checkpoint, TrainSettings
run, weights, step = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
config = get_config("base")
run.mkdir(parents=True, exist_ok=True)
(run / "testbed.json").write_text(json.dumps(config.to_dict(), indent=2))
ema = config.build_model()
ema.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
save_checkpoint(run, step, ema, ema, torch.optim.AdamW(ema.parameters()), TrainSettings(steps=step))
export_model(ema, run / "model")
print(f"restored {run} at step {step} from {weights}")
PY
    ;;
  probe)
    ultragen testbed eval --run-dir "$RUN" --device cuda --prompts "$arg" --batch-size 8 --quiet \
      --out "$RUN/probe.json" --grid "$RUN/probe.png"
    keep "$RUN/probe.json" "$RUN/probe.png"
    ;;
  lora-cache)
    [ -f "$CACHE/manifest.json" ] || { rm -rf "$CACHE"; ultragen testbed lora-cache --run-dir "$RUN" --out "$CACHE" \
      --count "$arg" --workers "$(nproc)"; }
    ;;
  lora)
    train_lora "$LORA" "$arg" default
    ;;
  lora-eval)
    lora=$(latest_lora "$LORA")
    out=bench/results/testbed-lora${LORA_TAG:+-$LORA_TAG}-$(date +%Y%m%d).json
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of options
    ultragen testbed eval --run-dir "$RUN" --device cuda --prompts "$arg" --batch-size 20 --quiet $EVAL_ARGS \
      --strategies windows+guide+lora --lora "$lora" --out "$out" --grid "${out%.json}.png"
    keep "$out"
    ;;
  eval)
    lora=$(latest_lora "$LORA")
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of options
    ultragen testbed eval --run-dir "$RUN" --device cuda --prompts "$arg" --batch-size 20 --quiet $EVAL_ARGS \
      --lora "$lora" --out "bench/results/testbed-$(date +%Y%m%d).json"
    keep bench/results/testbed-"$(date +%Y%m%d)".*
    ;;
  variant)
    [ $# -eq 4 ] && [[ $4 =~ ^[0-9]+$ ]] || { echo "usage: $0 variant POLICY.json SECONDS PROMPTS" >&2; exit 2; }
    policy=$arg name=$(basename "$arg" .json)
    train_lora "$LORA-$name" "$3" "$policy"
    [ "$4" -eq 0 ] && exit 0
    lora=$(latest_lora "$LORA-$name")
    out=bench/results/testbed-policy-$name${LORA_TAG:+-$LORA_TAG}-$(date +%Y%m%d).json
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of options
    ultragen testbed eval --run-dir "$RUN" --device cuda --prompts "$4" --batch-size 20 --quiet --policy "$policy" $EVAL_ARGS \
      --strategies windows+guide+lora --lora "$lora" --out "$out" --grid "${out%.json}.png"
    keep "$out" "${out%.json}.png"
    ;;
  *)
    echo "unknown stage $stage; see the top of $0" >&2
    exit 2
    ;;
esac
