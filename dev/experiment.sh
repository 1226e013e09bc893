#!/usr/bin/env bash
# MoT against dense, as the paper compares them: the same data order, schedule, seed and FLOPs
# per token (same D, F, L; MoT only has one copy of each weight per modality). Prints the
# step-matching fraction per modality (../shared/MOT_SPEC.md): the first MoT step at which MoT's
# validation loss_m reaches dense's loss_m at dense's final step, divided by that final step.
# Validation losses are evaluated every --eval-every steps on the same fixed batches for both
# runs and smoothed the same way (trailing mean of the last 3 evaluations).
#
#   bash dev/experiment.sh [OUT_DIR] [extra ./mot flags]       (default OUT_DIR runs/experiment)
#   e.g. bash dev/experiment.sh runs/exp --steps 2000 --dim 256 --layers 4 --heads 8
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/experiment}; shift || true
data=${DATA:-data/default}
[ -f "$data/manifest.txt" ] || bash data/build.sh "$data"
make -s mot
flags="--data $data/train_*.bin --val $data/val_*.bin --layers 4 --dim 128 --heads 4 --seq 128 --batch 16
       --steps 1000 --warmup 50 --lr 3e-3 --eval-every 25 --eval-batches 8 --eval-items 0 --seed 1 --log-every 50"
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
bash dev/plot.sh loss "$out/loss.png" dense="$out/dense" MoT="$out/mot"
bash dev/plot.sh match "$out/match.png" "$out/dense" "$out/mot"
