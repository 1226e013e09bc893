#!/usr/bin/env bash
# Every C++/CUDA file must be laid out as .clang-format says. One test case per file, in doctest's
# summary format for test/run.sh. `bash test/format.sh --apply` (make format) lays them out. The layout depends on clang-format's
# version: with no clang-format, or another major version than .clang-format was made for (14,
# Debian 12's), every case is reported skipped, not passed.
cd "$(dirname "$0")/.."
files=$(ls ./*.h ./*.cu tokenizers/*.h tokenizers/*.cpp test/*.h test/*.cpp test/*.cu test/fuzz/*.h \
        test/fuzz/*.cpp dev/*.cpp dev/*.cu data/*.cpp 2>/dev/null)
n=$(wc -w <<<"$files")
if [ "${1:-}" = --apply ]; then
  # shellcheck disable=SC2086
  exec clang-format -i $files
fi
want=14
have=$(clang-format --version 2>/dev/null | sed -nE 's/.*version ([0-9]+)\..*/\1/p')
if [ "$have" != "$want" ]; then
  echo "format: clang-format ${have:-not found}, the layout is defined for version $want: not checked"
  echo "[doctest] test cases: $n | 0 passed | 0 failed | $n skipped"
  exit 0
fi
passed=0; failed=0
for f in $files; do
  if clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then passed=$((passed + 1))
  else echo "format: $f differs from .clang-format's layout (make format)"; failed=$((failed + 1)); fi
done
echo "[doctest] test cases: $n | $passed passed | $failed failed | 0 skipped"
[ "$failed" = 0 ]
