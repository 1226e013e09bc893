#!/usr/bin/env bash
# Plots for run folders (gnuplot; dev/setup.sh installs it when missing).
#
#   bash dev/plot.sh loss OUT.png NAME=RUN_DIR [NAME=RUN_DIR ...]
#       per-modality loss: train (exponential moving average, 0.95) as lines and validation as
#       points joined by lines, one panel per modality, every run on the same axes
#   bash dev/plot.sh match OUT.png DENSE_DIR MOT_DIR
#       MoT against dense (dev/experiment.sh): smoothed val loss in the second half of training,
#       dense's final loss and the step where MoT reaches it, one panel per modality and overall
#   bash dev/plot.sh samples RUN_DIR
#       RUN_DIR/samples/grid.png: the generated images with their captions
set -euo pipefail
die() { echo "plot.sh: $*" >&2; exit 1; }
command -v gnuplot >/dev/null || bash "$(dirname "$0")/setup.sh" || die "gnuplot is missing and dev/setup.sh could not install it"
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
  # y axis fitted to the late losses: from the lowest value plotted to the highest after the first
  # 15% of training (the first steps, near log V, would squash the part worth reading)
  steps=$(cat "$tmp"/*.dat | awk 'END { print $1 }')
  # six colours (dev/experiment_experts.sh draws five runs), light for the train line, dark for val
  train_c=("#6baed6" "#fd8d3c" "#74c476" "#9e9ac8" "#bdbdbd" "#fa9fb5")
  val_c=("#08519c" "#d94801" "#006d2c" "#54278f" "#252525" "#ae017e")
  {
    echo "set terminal pngcairo size 1500,450 font ',10'; set output '$out'"
    echo "set multiplot layout 1,3; set grid; set key top right; set xlabel 'step'; set ylabel 'loss'"
    for m in 0 1 2; do
      title=(text image speech); echo "set title '${title[$m]} loss (train: EMA line, val: points)'"
      range=$(cat "$tmp"/*.dat | awk -v c=$((m + 2)) -v v=$((m + 5)) -v s="$steps" '
        $1 >= 0.15 * s { for (j = 0; j < 2; j++) { x = $(j ? v : c); if (x ~ /^[0-9.e+-]+$/ && x != "") { x += 0; if (!n++ || x < lo) lo = x; if (n == 1 || x > hi) hi = x } } }
        END { if (n) { p = (hi - lo) * 0.08 + 1e-3; printf "[%g:%g]", lo - p, hi + p } else print "[*:*]" }')
      echo "set yrange $range"
      line="plot "
      for ((k = 0; k < i; k++)); do
        line+="'$tmp/$k.dat' using 1:$((m + 2)) with lines lw 1.5 lc rgb '${train_c[$((k % 6))]}' title '${names[$k]} train', "
        [ -s "$tmp/$k.val" ] && line+="'$tmp/$k.val' using 1:$((m + 5)) with linespoints pt 7 ps 0.9 lw 2 lc rgb '${val_c[$((k % 6))]}' title '${names[$k]} val', "
      done
      echo "${line%, }"
    done
    echo "unset multiplot"
  } > "$tmp/plot.gp"
  gnuplot "$tmp/plot.gp" || die "gnuplot failed"
  echo "wrote $out"
  ;;
match)
  # MoT against dense (dev/experiment.sh): validation loss smoothed as the step-matching fraction
  # smooths it (trailing mean of 3 evaluations), zoomed on the second half of training where the
  # gap is; the dashed line is dense's final loss, the marked point the first MoT step reaching it.
  out=${1:?usage: plot.sh match OUT.png DENSE_DIR MOT_DIR}; dense=${2:?dense run folder}; mot=${3:?MoT run folder}
  for d in "$dense" "$mot"; do [ -s "$d/log.csv" ] || die "$d/log.csv: missing or empty"; done
  smooth() { awk -F, 'NR > 1 && $9 ~ /^[0-9]/ { k = n++; for (c = 9; c <= 12; c++) { v[k, c] = $c; s = 0; w = 0
               for (j = k; j >= 0 && j > k - 3; j--) { s += v[j, c]; w++ } ; sm[c] = s / w }
               printf "%s %s %s %s %s\n", $1, sm[9], sm[10], sm[11], sm[12] }' "$1"; }
  smooth "$dense/log.csv" > "$tmp/d.dat"; smooth "$mot/log.csv" > "$tmp/m.dat"
  [ -s "$tmp/d.dat" ] && [ -s "$tmp/m.dat" ] || die "no validation losses in the logs (run with --val and --eval-every)"
  final=$(awk 'END { print $1 }' "$tmp/d.dat")
  {
    echo "set terminal pngcairo size 1400,900 font ',11'; set output '$out'"
    echo "set multiplot layout 2,2 title 'MoT against dense: validation loss late in training (trailing mean of 3 evaluations)'"
    echo "set grid; set key top right; set xlabel 'step'; set ylabel 'val loss'"
    for m in 0 1 2 3; do
      title=(overall text image speech); c=$((m + 2))
      target=$(awk -v c=$c 'END { print $c }' "$tmp/d.dat")
      hit=$(awk -v c=$c -v t="$target" '$c <= t { print $1; exit }' "$tmp/m.dat")
      lo=$((final / 2)); [ -n "$hit" ] && [ "$hit" -lt $((lo + final / 20)) ] && lo=$(( hit > final / 20 ? hit - final / 20 : 0 ))
      echo "set xrange [$lo:$final]"
      range=$(cat "$tmp/d.dat" "$tmp/m.dat" | awk -v c=$c -v f="$lo" '$1 >= f { x = $c + 0; if (!n++ || x < lo) lo = x; if (n == 1 || x > hi) hi = x }
        END { p = (hi - lo) * 0.1 + 1e-4; printf "[%g:%g]", lo - p, hi + p }')
      echo "set yrange $range; unset arrow; unset label"
      if [ -n "$hit" ]; then
        frac=$(awk -v h="$hit" -v f="$final" 'BEGIN { printf "%.2f", h / f }')
        echo "set title '${title[$m]}: dense final reached by MoT at step $hit/$final (fraction $frac)'"
        echo "set arrow from $hit, graph 0 to $hit, graph 1 nohead dt 3 lc rgb '#d94801'"
        # to the left of the line when it is near the right edge, so the text stays inside the panel
        if [ $((hit - lo)) -gt $(((final - lo) * 4 / 5)) ]; then side="right offset -0.5,0"; else side="offset 0.5,0"; fi
        echo "set label 'step $hit' at $hit, graph 0.06 $side tc rgb '#d94801'"
      else
        echo "set title '${title[$m]}: MoT does not reach the dense final loss'"
      fi
      line="plot '$tmp/d.dat' using 1:$c with linespoints pt 7 ps 0.5 lw 2 lc rgb '#525252' title 'dense', "
      line+="'$tmp/m.dat' using 1:$c with linespoints pt 7 ps 0.5 lw 2 lc rgb '#2171b5' title 'MoT', "
      line+="$target with lines dt (8,6) lw 1.5 lc rgb '#525252' title 'dense final'"
      [ -n "$hit" ] && line+=", '+' using ($hit):($target) every ::0::0 with points pt 6 ps 2.5 lw 2 lc rgb '#d94801' title 'step-matching point'"
      echo "$line"
    done
    echo "unset multiplot"
  } > "$tmp/match.gp"
  gnuplot "$tmp/match.gp" || die "gnuplot failed"
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
*) die "usage: plot.sh loss OUT.png NAME=RUN_DIR ... | plot.sh match OUT.png DENSE_DIR MOT_DIR | plot.sh samples RUN_DIR" ;;
esac
