#!/usr/bin/env bash
# dev/same_bits.sh REV — does the working tree train bit for bit as commit REV does?
#
# For code moves that must change no bit of training (a reformat, a restructuring): builds the
# CPU trainer (g++, fp32, train.cu) from the working tree and from REV (checked out with `git
# worktree` in a temporary folder), trains the same short run with each, 40 steps of dense, MoT,
# MoMa-style (tied attention, 4 experts per modality) and the Transfusion setting at a small shape
# on the small dataset (data/default/small, built by data/build.sh --small --transfusion if
# missing), and compares the final checkpoints (parameters, Adam moments, step, data order) byte
# for byte. Prints one line per model; exits 1 on any difference, 2 on bad usage. About 3-4 minutes
# on 2 cores, most of it the two compiles.
#
#   bash dev/same_bits.sh HEAD~1     # e.g. after a commit that only moved code
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: bash dev/same_bits.sh REV" >&2; exit 2; }
rev=$1
git rev-parse -q --verify "$rev^{commit}" >/dev/null || { echo "same_bits.sh: '$rev' is not a commit" >&2; exit 2; }
data=data/default/small
[ -f "$data/manifest.txt" ] && ls "$data"/tf_train_*.bin >/dev/null 2>&1 ||
  bash data/build.sh "$data" --small --transfusion --force >"${TMPDIR:-/tmp}/same_bits_data.log" 2>&1 ||
  { echo "same_bits.sh: the data build failed (${TMPDIR:-/tmp}/same_bits_data.log)" >&2; exit 1; }
work=$(mktemp -d)
cleanup() { git worktree remove --force "$work/rev" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
git worktree add -q --detach "$work/rev" "$rev"
# the same compile for both (not each tree's Makefile, which may differ between the two)
build() { (cd "$1" && g++ -std=c++17 -O3 -march=native -fopenmp -fno-math-errno -x c++ train.cu -o "$2" -ljpeg); }
echo "same_bits.sh: building the working tree and $rev ($(git rev-parse --short "$rev"))"
build . "$work/mot_tree" &
p=$!
build "$work/rev" "$work/mot_rev"
wait $p
common="--layers 2 --dim 64 --heads 4 --seq 64 --batch 8 --steps 40 --warmup 5 --eval-items 0 --eval-gen 0
        --log-every 1000 --threads 2 --seed 3"
declare -A arch=([dense]="--dense" [mot]="--mot" [moma]="--mot --tie-attn --experts 4,4,4"
                 [transfusion]="--mot --setting transfusion")
fail=0
for kind in dense mot moma transfusion; do
  shards="$data/train_*.bin"
  [ "$kind" = transfusion ] && shards="$data/tf_train_*.bin"
  for side in tree rev; do
    # shellcheck disable=SC2086
    OMP_WAIT_POLICY=passive "$work/mot_$side" --data "$shards" $common ${arch[$kind]} \
      --save "$work/$kind.$side.ckpt" >"$work/$kind.$side.out" 2>&1 ||
      { echo "same_bits.sh: $kind: the $side build failed:"; tail -n 3 "$work/$kind.$side.out"; exit 1; }
  done
  if cmp -s "$work/$kind.tree.ckpt" "$work/$kind.rev.ckpt"; then
    echo "$kind: same bits ($(stat -c %s "$work/$kind.tree.ckpt") bytes of checkpoint after 40 steps)"
  elif [ "$(stat -c %s "$work/$kind.tree.ckpt")" = "$(stat -c %s "$work/$kind.rev.ckpt")" ] &&
       [ "$(cmp -l "$work/$kind.tree.ckpt" "$work/$kind.rev.ckpt" | awk '$1 < 5 || $1 > 8 { n++ } END { print n + 0 }')" = 0 ]; then
    # only bytes 5-8 (1-based), the header's version field, differ: a file-format bump, same training
    echo "$kind: same bits except the checkpoint's version field (a format version changed between the two)"
  else
    echo "$kind: DIFFERENT checkpoints after 40 steps"
    fail=1
  fi
done
[ "$fail" = 0 ] && echo "same_bits.sh: the working tree trains as $rev does, bit for bit"
exit "$fail"
