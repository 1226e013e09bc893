#!/usr/bin/env bash
# Every relative link in README.md and the Markdown files under dev/, test/, data/ and
# tokenizers/, [text](path) or ![alt](path), must name a file or folder inside the repository, and
# a '#anchor' in a link to a Markdown file (or in the same file) must name one of its headings, as
# GitHub makes anchors: lower case, punctuation dropped, spaces to '-'. http(s) and mailto links
# are skipped. One test case per Markdown file, in doctest's format for test/run.sh.
cd "$(dirname "$0")/.."
root=$(pwd -P)
passed=0; failed=0
# the anchors of a Markdown file's headings (code blocks skipped)
anchors() {
  perl -CSD -ne 'if (/^```/) { $code = !$code; next } next if $code;
    if (/^#+\s+(.*?)\s*$/) { $h = lc $1; $h =~ s/[^\w\- ]//g; $h =~ s/ /-/g; print "$h\n" }' "$1"
}
for md in README.md dev/*.md dev/*/README.md test/*.md data/*.md tokenizers/*.md; do
  bad=0
  # the target of every inline link: after "](" up to the first ")" or space
  while IFS= read -r target; do
    case "$target" in http://*|https://*|mailto:*|'') continue ;; esac
    path="${target%%#*}"
    anchor=""; [[ "$target" == *'#'* ]] && anchor="${target#*#}"
    [ -n "$path" ] || path=$(basename "$md")
    full=$(realpath -m "$(dirname "$md")/$path")
    if [[ "$full/" != "$root/"* ]]; then
      echo "$md: link leaves the repository (not in a user's clone): $target"
      bad=1
    elif [ ! -e "$full" ]; then
      echo "$md: broken link: $target"
      bad=1
    elif [ -n "$anchor" ] && [[ "$full" == *.md ]] && ! anchors "$full" | grep -qxF -- "$anchor"; then
      echo "$md: no heading for the anchor: $target"
      bad=1
    fi
  done < <(grep -o '\]([^) ]*' "$md" | sed 's/^](//')
  if [ "$bad" = 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "[doctest] test cases: $((passed + failed)) | $passed passed | $failed failed | 0 skipped"
[ "$failed" = 0 ]
