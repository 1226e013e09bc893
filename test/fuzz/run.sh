#!/usr/bin/env bash
# test/fuzz/run.sh [TARGET...]: for each libFuzzer target (default: all built test/fuzz/fuzz_*),
# replays its seed corpus, then fuzzes for $FUZZ_S seconds (default 60) from the corpus kept in
# $FUZZ_DIR/corpus/<target> (default /tmp/mot_fuzz). Seeds come from test/fuzz/seeds.sh. Prints
# execs, corpus size and findings per target, and a doctest-style summary line (one test case
# per target) so that test/run.sh counts it. Findings (crash-* files) go to $FUZZ_DIR/findings.
set -uo pipefail
cd "$(dirname "$0")/../.."
S=${FUZZ_S:-60}
DIR=${FUZZ_DIR:-/tmp/mot_fuzz}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || for t in shard checkpoint debug_state bpe vq_model speech_model wav image; do targets+=("test/fuzz/fuzz_$t"); done
mkdir -p "$DIR/findings"
if ! bash test/fuzz/seeds.sh "$DIR/seeds" >"$DIR/seeds.log" 2>&1; then
    tail -n 5 "$DIR/seeds.log"
    echo "[doctest] test cases: ${#targets[@]} | 0 passed | ${#targets[@]} failed | 0 skipped"
    exit 1
fi
passed=0; failed=0
for bin in "${targets[@]}"; do
    t=$(basename "$bin"); t=${t#fuzz_}
    corpus="$DIR/corpus/$t"
    mkdir -p "$corpus"
    cp -n "$DIR/seeds/$t"/* "$corpus/" 2>/dev/null
    log="$DIR/$t.log"
    # every seed once (they are valid files: a rejection or a crash here is a bug), then fuzz
    "./$bin" -runs=0 "$DIR/seeds/$t" >"$log.replay" 2>&1; rc_replay=$?
    before=$(ls "$corpus" | wc -l)
    "./$bin" "$corpus" -max_total_time="$S" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$DIR/findings/$t-" >"$log" 2>&1; rc=$?
    execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
    found=$(ls "$DIR/findings" | grep -c "^$t-")
    echo "fuzz_$t: ${execs:-0} execs in ${S} s, corpus $before -> $(ls "$corpus" | wc -l) inputs, $found finding(s) so far (replay exit $rc_replay, run exit $rc)"
    if [ $rc -ne 0 ] || [ $rc_replay -ne 0 ]; then
        grep -E "ERROR|SUMMARY|fuzz: |runtime error" "$log" "$log.replay" | head -n 5
        failed=$((failed + 1))
    else
        passed=$((passed + 1))
    fi
done
echo "[doctest] test cases: $((passed + failed)) | $passed passed | $failed failed | 0 skipped"
[ $failed -eq 0 ]
