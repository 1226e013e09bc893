#!/usr/bin/env bash
# MoT against dense, as the paper compares them: the same data order, schedule, seed and FLOPs
# per token (same D, F, L; MoT only has one copy of each weight per modality). Prints the
# step-matching fraction per modality (dev/MATH.md, section 10): the first MoT step at which MoT's
# validation loss_m reaches dense's loss_m at dense's final step, divided by that final step.
# Validation losses are evaluated every --eval-every steps on the same fixed batches for both
# runs and smoothed the same way (trailing mean of the last 3 evaluations).
#
#   bash dev/experiment.sh [OUT_DIR] [extra ./mot flags]       (default OUT_DIR runs/experiment)
#   e.g. bash dev/experiment.sh runs/exp --steps 2000 --dim 256 --layers 4 --heads 8
#
# SETTING=transfusion: the same comparison in the Transfusion setting (images as pixel patches
# trained by diffusion) on the tf_train_*.bin / tf_val_*.bin shards of the same documents
# (`bash data/build.sh DATA --transfusion`, run here when DATA has no build yet). The image row
# of the table is then the validation noise MSE, the overall row LM + 5 MSE. Extra flags go to
# both runs and to the evaluation, e.g. --diffusion-loss min-snr, --threads 1.
# In both settings both final models are then evaluated on caption->image accuracy (EVAL_GEN
# images per class, default 3, 0 skips it; the trainer's --cfg and --best-of; the 5-NN classifier
# on real images), printed beside the table and appended to OUT_DIR/table.md.
#   e.g. SETTING=transfusion bash dev/experiment.sh runs/tf --threads 1
# DATA is the dataset folder (default data/default; with SETTING=transfusion data/default/transfusion).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/experiment}; shift || true
setting=${SETTING:-tokens}
# the Transfusion default is the folder `make train SETTING=transfusion` builds, so the two share it
if [ "$setting" = transfusion ]; then data=${DATA:-data/default/transfusion}; else data=${DATA:-data/default}; fi
eval_gen=${EVAL_GEN:-3}
case "$setting" in
tokens)
  [ -f "$data/manifest.txt" ] || bash data/build.sh "$data"
  prefix="" ; setting_flag="" ;;
transfusion)
  if [ ! -f "$data/manifest.txt" ]; then
    bash data/build.sh "$data" --transfusion
  elif ! ls "$data"/tf_train_*.bin >/dev/null 2>&1; then
    echo "experiment.sh: $data was built without --transfusion (no tf_train_*.bin): rebuild it with" \
         "'bash data/build.sh $data --transfusion --force', or set DATA to another folder" >&2
    exit 1
  fi
  prefix="tf_" ; setting_flag="--setting transfusion" ;;
*) echo "experiment.sh: bad SETTING '$setting' (expected tokens or transfusion)" >&2; exit 2 ;;
esac
make -s mot
flags="--data $data/${prefix}train_*.bin --val $data/${prefix}val_*.bin $setting_flag --layers 4 --dim 128 --heads 4
       --seq 128 --batch 16 --steps 1000 --warmup 50 --lr 3e-3 --eval-every 25 --eval-batches 8 --eval-items 0 --seed 1
       --log-every 50"
mkdir -p "$out"
set -f  # the shard patterns in $flags are for ./mot, not for the shell
for kind in dense mot; do
  if [ -s "$out/$kind/model.ckpt" ]; then echo "$out/$kind: done already"; continue; fi
  rm -rf "$out/$kind"
  echo "=== training $kind"
  # shellcheck disable=SC2086
  ./mot $flags --$kind --out "$out/$kind" "$@"
done
# val columns: 10 text, 11 image, 12 speech (9 is the overall val loss)
awk -F, '
  FNR == 1 { run = (FILENAME ~ /dense/) ? "d" : "m"; n[run] = 0; next }
  $9 != "nan" && $9 != "-nan" {
    k = n[run]++; step[run, k] = $1
    for (c = 9; c <= 12; c++) { v[run, k, c] = $c; s = 0; w = 0
      for (j = k; j >= 0 && j > k - 3; j--) { s += v[run, j, c]; w++ }
      sm[run, k, c] = s / w }
  }
  END {
    last = n["d"] - 1; final = step["d", last]
    split("overall text image speech", name, " ")
    printf "| modality | dense final val loss (step %d) | MoT final val loss | MoT step reaching dense final | step-matching fraction |\n", final
    printf "|---|---|---|---|---|\n"
    for (c = 9; c <= 12; c++) {
      target = sm["d", last, c]; hit = -1
      for (k = 0; k < n["m"]; k++) if (sm["m", k, c] <= target) { hit = step["m", k]; break }
      printf "| %s | %.4f | %.4f | %s | %s |\n", name[c - 8], target, sm["m", n["m"] - 1, c],
             hit < 0 ? "not reached" : hit, hit < 0 ? "> 1" : sprintf("%.2f", hit / final)
    }
  }' "$out/dense/log.csv" "$out/mot/log.csv" | tee "$out/table.md"
# caption -> image of each final model (token images or DDIM samples, the trainer's --cfg and
# --best-of, classified by the 5-NN on real images), so the two settings can be compared
if [ "$eval_gen" -gt 0 ]; then
  echo | tee -a "$out/table.md"
  echo "| model | caption->image accuracy (images; 5-NN on real images) |" | tee -a "$out/table.md"
  echo "|---|---|" | tee -a "$out/table.md"
  for kind in dense mot; do
    # shellcheck disable=SC2086
    line=$(./mot --data "$data/${prefix}train_*.bin" --init-from "$out/$kind/model.ckpt" --eval-only --eval-items 0 \
             --eval-gen "$eval_gen" "$@" | grep '^eval ' | tail -1)
    acc=$(echo "$line" | sed -n 's/.*caption->image \([0-9.]*\) (\([0-9]*\); k-NN on real images \([0-9.]*\)).*/\1 (\2; \3)/p')
    [ -n "$acc" ] || { echo "experiment.sh: no caption->image figure from $kind: '$line'" >&2; exit 1; }
    echo "| $kind | $acc |" | tee -a "$out/table.md"
  done
fi
bash dev/plot.sh loss "$out/loss.png" dense="$out/dense" MoT="$out/mot"
bash dev/plot.sh match "$out/match.png" "$out/dense" "$out/mot"
