#!/usr/bin/env bash
# Runs each doctest binary given, then prints one summary line "N passed, N failed" over all of
# them (test cases), counting a binary that crashed or printed no summary as one failure.
passed=0; failed=0; skipped=0
# Threads sleep at barriers instead of spinning (see the Makefile's train target): the tests run
# ./mot and the tools, often beside other jobs.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
# An entry DIR:BIN runs BIN inside DIR (the sanitizer builds); an entry *.sh runs with bash; an
# entry "BIN ARG" passes BIN the one argument ARG (a doctest filter such as -tc=gradient*).
for t in "$@"; do
  echo "=== $t"
  arg=()
  if [[ $t == *" "* ]]; then arg=("${t#* }"); t=${t%% *}; fi
  if [[ $t == *:* ]]; then out=$(cd "${t%%:*}" && "./${t#*:}" "${arg[@]}" 2>&1); rc=$?
  elif [[ $t == *.sh ]]; then out=$(bash "$t" "${arg[@]}" 2>&1); rc=$?
  else out=$("./$t" "${arg[@]}" 2>&1); rc=$?; fi
  printf '%s\n' "$out" | tail -n 40
  line=$(printf '%s\n' "$out" | grep -E '^\[doctest\] test cases:' | tail -n 1)
  if [ -z "$line" ]; then echo "$t: no doctest summary (exit $rc)"; failed=$((failed + 1)); continue; fi
  p=$(sed -E 's/.*\| *([0-9]+) passed.*/\1/' <<<"$line"); f=$(sed -E 's/.*\| *([0-9]+) failed.*/\1/' <<<"$line")
  s=$(sed -nE 's/.*\| *([0-9]+) skipped.*/\1/p' <<<"$line")
  # with a filter, doctest counts the cases it filtered out as skipped: they are left to make test
  if [ ${#arg[@]} -gt 0 ]; then echo "(${s:-0} cases not selected by the filter: make test runs them)"; s=0; fi
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + ${s:-0}))
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then echo "$t: exit $rc"; failed=$((failed + 1)); fi
done
# RUN_START (seconds since the epoch, set by make check): the time since then, before the summary
if [ -n "${RUN_START:-}" ]; then echo "elapsed: $(( $(date +%s) - RUN_START )) s (build and tests)"; fi
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
