#!/usr/bin/env bash
# Dense, MoT, MoE-4x, MoMa-style (4t4i4s) and the MoT+MoE hybrid (4 experts in the text tower),
# trained with the same data order, schedule, seed and FLOPs per token (same D, F, L; expert choice
# at capacity factor 1). Prints per model and modality:
#   - the final validation loss with expert-choice routing (EC) and with causal routing (the
#     auxiliary routers; the same number for models without experts),
#   - the step-matching fraction against dense (dev/MATH.md, section 10): the first step at which the
#     model's validation loss_m reaches dense's at dense's final step, over that final step, with
#     the model's EC loss and with its causal loss,
#   - the same fraction in wall-clock time: the fraction times the model's step time over dense's
#     (median step times from the logs of this run, evaluation excluded; the median, because the
#     2-core machines are shared and a few steps may be slowed by other work).
# Validation losses are evaluated every --eval-every steps on the same fixed batches for every run
# and smoothed the same way (trailing mean of the last 3 evaluations), as in dev/experiment.sh.
#
#   bash dev/experiment_experts.sh [OUT_DIR] [extra ./mot flags]   (default OUT_DIR runs/experts)
#   e.g. bash dev/experiment_experts.sh runs/exp --steps 3000 --dim 256 --layers 4 --heads 8 --ffn 768
#   DATA=data/default/small bash dev/experiment_experts.sh /tmp/exp --steps 20 --dim 32 ...  (smoke test)
#   JOBS=2 ... --threads 1: two runs at a time (each run's output then goes to OUT_DIR/KIND.out);
#   on 2 cores that halves the wall time, but each run's step times then include its partner's
#   load, so the wall-clock column is rougher (`make bench` measures the step-time ratios).
#   ORDER="moma dense moe4x hybrid mot": the order to train in (default the table's order); with
#   JOBS=2 the slowest first keeps both cores busy to the end.
#   A finished run (its model.ckpt exists) is not trained again; an unfinished one (killed, or the
#   session ended) resumes from its newest checkpoint, written every SAVE_EVERY steps (default
#   250): run the same command again, with the same flags.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/experts}; shift || true
data=${DATA:-data/default}
kinds="dense mot moe4x moma hybrid"
order=${ORDER:-$kinds}
for kind in $order; do
  [[ " $kinds " == *" $kind "* ]] || { echo "experiment_experts.sh: ORDER: unknown model '$kind' (one of: $kinds)" >&2; exit 2; }
done
[ -f "$data/manifest.txt" ] || bash data/build.sh "$data"
make -s mot
flags="--data $data/train_*.bin --val $data/val_*.bin --layers 4 --dim 128 --heads 4 --seq 128 --batch 16
       --steps 1000 --warmup 50 --lr 3e-3 --eval-every 25 --eval-batches 8 --eval-items 0 --seed 1 --log-every 50"
declare -A arch=([dense]="--dense" [mot]="--mot" [moe4x]="--dense --experts 4"
                 [moma]="--mot --tie-attn --experts 4,4,4" [hybrid]="--mot --experts 4,1,1")
mkdir -p "$out"
declare -A started=()
njobs=${JOBS:-1}
[[ "$njobs" =~ ^[1-9][0-9]?$ ]] || { echo "experiment_experts.sh: JOBS must be 1-99, not '$njobs'" >&2; exit 2; }
save_every=${SAVE_EVERY:-250}
[[ "$save_every" =~ ^[1-9][0-9]{0,5}$ ]] || { echo "experiment_experts.sh: SAVE_EVERY must be 1-999999, not '$save_every'" >&2; exit 2; }
set -f  # the shard patterns in $flags are for ./mot, not for the shell
running=0
fail() { echo "experiment_experts.sh: a run failed (see $out/*.out)" >&2; kill $(jobs -p) 2>/dev/null; exit 1; }
for kind in $order $kinds; do
  if [ -n "${started[$kind]:-}" ]; then continue; fi
  started[$kind]=1
  if [ -s "$out/$kind/model.ckpt" ]; then echo "$out/$kind: done already"; continue; fi
  # with JOBS > 1, wait for a free slot first, so that the line below says when the run starts
  if [ "$njobs" -gt 1 ] && [ "$running" -ge "$njobs" ]; then wait -n || fail; running=$((running - 1)); fi
  if compgen -G "$out/$kind/step_*.ckpt" >/dev/null; then echo "=== resuming $kind (${arch[$kind]}) at $(date +%H:%M)"
  else echo "=== training $kind (${arch[$kind]}) at $(date +%H:%M)"; fi
  if [ "$njobs" = 1 ]; then
    # shellcheck disable=SC2086
    ./mot $flags ${arch[$kind]} --out "$out/$kind" --resume --save-every "$save_every" "$@"
  else
    # shellcheck disable=SC2086
    OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} ./mot $flags ${arch[$kind]} --out "$out/$kind" --resume \
      --save-every "$save_every" "$@" >>"$out/$kind.out" 2>&1 &
    running=$((running + 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || fail
  running=$((running - 1))
done
set +f
# log.csv columns: 1 step, 8 tokens_per_s, 9-12 val (overall, text, image, speech), 13-16 the same
# with causal routing. Every run has the same tokens per step, so 1 / tokens_per_s is its step time
# in a common unit.
logs=()
for kind in $kinds; do logs+=("$out/$kind/log.csv"); done
awk -F, -v kinds="$kinds" '
  FNR == 1 { n_f = split(FILENAME, parts, "/"); run = parts[n_f - 1]; n[run] = 0; nt[run] = 0; next }
  { dt[run, nt[run]++] = 1 / $8 }
  $9 != "nan" && $9 != "-nan" {
    k = n[run]++; step[run, k] = $1
    for (c = 9; c <= 16; c++) { v[run, k, c] = $c; s = 0; w = 0
      for (j = k; j >= 0 && j > k - 3; j--) { s += v[run, j, c]; w++ }
      sm[run, k, c] = s / w }
  }
  function median(r,   i, j, k, x, a) {  # of dt[r, 0 .. nt[r]-1] (insertion sort: a few thousand steps)
    for (i = 0; i < nt[r]; i++) { x = dt[r, i]; for (j = i - 1; j >= 0 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
    k = int(nt[r] / 2); return nt[r] % 2 ? a[k] : (a[k - 1] + a[k]) / 2
  }
  function match_step(r, c, target,   k) {
    for (k = 0; k < n[r]; k++) if (sm[r, k, c] <= target) return step[r, k]
    return -1
  }
  END {
    split(kinds, K, " "); split("overall text image speech", name, " ")
    dl = n["dense"] - 1; final = step["dense", dl]
    for (i = 1; i <= length(K); i++) rel[K[i]] = median(K[i]) / median("dense")
    printf "dense final step %d; median step time relative to dense:", final
    for (i = 1; i <= length(K); i++) printf " %s %.3f", K[i], rel[K[i]]
    printf "\n\n| model | modality | final val EC | final val causal | step-matching EC | step-matching causal | wall-clock fraction (EC) |\n"
    printf "|---|---|---|---|---|---|---|\n"
    for (i = 1; i <= length(K); i++) {
      r = K[i]; last = n[r] - 1
      for (m = 1; m <= 4; m++) {
        c = 8 + m; target = sm["dense", dl, c]
        he = match_step(r, c, target); hc = match_step(r, c + 4, target)
        printf "| %s | %s | %.4f | %.4f | %s | %s | %s |\n", r, name[m], sm[r, last, c], sm[r, last, c + 4],
               he < 0 ? "> 1" : sprintf("%.2f", he / final), hc < 0 ? "> 1" : sprintf("%.2f", hc / final),
               he < 0 ? "> 1" : sprintf("%.2f", he / final * rel[r])
      }
    }
  }' "${logs[@]}" | tee "$out/table.md"
plots=()
for kind in $kinds; do plots+=("$kind=$out/$kind"); done
bash dev/plot.sh loss "$out/loss.png" "${plots[@]}" || echo "(no chart: dev/plot.sh failed)"
