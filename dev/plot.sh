#!/usr/bin/env bash
# Plots for run folders (gnuplot; installed with apt-get when missing).
#
#   bash dev/plot.sh loss OUT.png NAME=RUN_DIR [NAME=RUN_DIR ...]
#       per-modality loss: train (exponential moving average, 0.95) as lines and validation as
#       points joined by lines, one panel per modality, every run on the same axes
#   bash dev/plot.sh samples RUN_DIR
#       RUN_DIR/samples/grid.png: the generated images with their captions
set -euo pipefail
die() { echo "plot.sh: $*" >&2; exit 1; }
if ! command -v gnuplot >/dev/null; then
  echo "plot.sh: installing gnuplot-nox" >&2
  apt-get install -y -qq gnuplot-nox >/dev/null 2>&1 || die "gnuplot is missing and apt-get install gnuplot-nox failed"
fi
mode=${1:-}; shift || true
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

case "$mode" in
loss)
  out=${1:?usage: plot.sh loss OUT.png NAME=RUN_DIR ...}; shift
  [ $# -ge 1 ] || die "give at least one NAME=RUN_DIR"
  plots=(); i=0
  for spec in "$@"; do
    name=${spec%%=*}; dir=${spec#*=}; [ "$name" != "$spec" ] || { name=$(basename "$dir"); }
    csv="$dir/log.csv"; [ -s "$csv" ] || die "$csv: missing or empty"
    # step, EMA of text/image/speech train loss, and val losses (nan when not evaluated)
    awk -F, 'NR == 1 { next } { for (m = 0; m < 3; m++) { v = $(3 + m); if (v == v + 0) e[m] = (n[m]++ ? 0.95 * e[m] + 0.05 * v : v) }
             printf "%s %s %s %s %s %s %s\n", $1, e[0], e[1], e[2], $10, $11, $12 }' "$csv" > "$tmp/$i.dat"
    grep -v ' nan' "$tmp/$i.dat" | awk '$5 != "-nan"' > "$tmp/$i.val" || true
    names[$i]=$name; i=$((i + 1))
  done
  {
    echo "set terminal png size 1500,450 font ',10'; set output '$out'"
    echo "set multiplot layout 1,3; set grid; set key top right; set xlabel 'step'; set ylabel 'loss'"
    for m in 0 1 2; do
      title=(text image speech); echo "set title '${title[$m]} loss (train EMA, val points)'"
      line="plot "
      for ((k = 0; k < i; k++)); do
        line+="'$tmp/$k.dat' using 1:$((m + 2)) with lines lc $((k + 1)) title '${names[$k]} train', "
        [ -s "$tmp/$k.val" ] && line+="'$tmp/$k.val' using 1:$((m + 5)) with linespoints pt 7 ps 0.6 lc $((k + 1)) dt 2 title '${names[$k]} val', "
      done
      echo "${line%, }"
    done
    echo "unset multiplot"
  } > "$tmp/plot.gp"
  gnuplot "$tmp/plot.gp" || die "gnuplot failed"
  echo "wrote $out"
  ;;
samples)
  dir=${1:?usage: plot.sh samples RUN_DIR}/samples
  [ -s "$dir/samples.txt" ] || die "$dir/samples.txt: missing (the run writes it at the end)"
  grep '^image_' "$dir/samples.txt" > "$tmp/images.txt" || die "$dir/samples.txt: no images listed"
  n=$(wc -l < "$tmp/images.txt"); cols=5; rows=$(( (n + cols - 1) / cols ))
  {
    echo "set terminal png size $((cols * 180)),$((rows * 200)) font ',9'; set output '$dir/grid.png'"
    echo "set multiplot layout $rows,$cols; unset border; unset tics; unset key; set size ratio -1"
    while IFS=$'\t' read -r file caption; do
      echo "set title \"${caption//\"/}\" noenhanced"
      echo "plot '$dir/$file' binary filetype=png with rgbimage"
    done < "$tmp/images.txt"
    echo "unset multiplot"
  } > "$tmp/grid.gp"
  gnuplot "$tmp/grid.gp" 2>/dev/null || die "gnuplot failed on $dir"
  echo "wrote $dir/grid.png"
  ;;
*) die "usage: plot.sh loss OUT.png NAME=RUN_DIR ... | plot.sh samples RUN_DIR" ;;
esac
