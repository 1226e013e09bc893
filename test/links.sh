#!/usr/bin/env bash
# Every relative link in README.md, dev/*.md and test/*.md, [text](path) or ![alt](path), must
# name a file or folder inside the repository (the part after '#' is not checked; http(s) and
# mailto links are skipped). One test case per Markdown file, in doctest's format for test/run.sh.
cd "$(dirname "$0")/.."
root=$(pwd -P)
passed=0; failed=0
for md in README.md dev/*.md test/*.md; do
  bad=0
  # the target of every inline link: after "](" up to the first ")" or space
  while IFS= read -r target; do
    case "$target" in http://*|https://*|mailto:*|'#'*|'') continue ;; esac
    path="${target%%#*}"
    full=$(realpath -m "$(dirname "$md")/$path")
    if [[ "$full/" != "$root/"* ]]; then
      echo "$md: link leaves the repository (not in a user's clone): $target"
      bad=1
    elif [ ! -e "$full" ]; then
      echo "$md: broken link: $target"
      bad=1
    fi
  done < <(grep -o '\]([^) ]*' "$md" | sed 's/^](//')
  if [ "$bad" = 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "[doctest] test cases: $((passed + failed)) | $passed passed | $failed failed | 0 skipped"
[ "$failed" = 0 ]
