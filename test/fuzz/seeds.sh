#!/usr/bin/env bash
# test/fuzz/seeds.sh OUT [DATA]: the seed corpora of the fuzz targets, OUT/<target>/, made from
# files the trainer, the tokenizer tools and the dataset builder write (DATA: a --small build,
# made there when missing). Nothing binary is committed; the same script makes them in CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=$1
DATA=${2:-/tmp/mot_fuzz_data}
die() { echo "seeds.sh: error: $*" >&2; exit 1; }
trap 'echo "seeds.sh: error: line $LINENO failed" >&2' ERR
for t in mot tokenizers/bpe tokenizers/vq tokenizers/speech; do [ -x "$t" ] || die "$t is not built (make)"; done
[ -f "$DATA/manifest.txt" ] || bash data/build.sh "$DATA" --small >/dev/null || die "data/build.sh $DATA --small failed"
rm -rf "$OUT"
for t in shard checkpoint debug_state bpe vq_model speech_model wav image; do mkdir -p "$OUT/$t"; done
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
byte() { printf "\\$(printf %03o "$1")"; }
le32() { byte $(($1 & 255)); byte $(($1 >> 8 & 255)); byte $(($1 >> 16 & 255)); byte $(($1 >> 24 & 255)); }
le64() { le32 $(($1 & 0xffffffff)); le32 $(($1 >> 32)); }

# shards: the first 64 tokens of a built shard (its header with n rewritten), and a shard of a
# 12-id vocabulary for the trainer below (tokens 1..11 in turn)
{ head -c 24 "$DATA/val_000.bin"; le64 64; dd if="$DATA/val_000.bin" bs=32 skip=1 count=4 2>/dev/null; } >"$OUT/shard/val64.bin"
{ printf MOTS; le32 1; le32 12; le32 8; le32 10; le32 0; le64 200; for i in $(seq 0 199); do byte $((1 + i % 11)); byte 0; done; } >"$OUT/shard/tiny.bin"

# a shard of the Transfusion form (version 2): BOS BOI [49 image ids] EOI EOS four times, the pixels
{ printf MOTS; le32 2; le32 12; le32 8; le32 10; le32 0; le64 212; le64 4
  for d in 1 2 3 4; do byte 1; byte 0; byte 3; byte 0; for i in $(seq 1 49); do byte 8; byte 0; done; byte 4; byte 0; byte 2; byte 0; done
  head -c 3136 /dev/zero | tr '\0' '\200'; } >"$OUT/shard/tf.bin"

# checkpoints and debug states from the trainer, at the smallest shapes (fast to fuzz)
./mot --data "$OUT/shard/tiny.bin" --layers 1 --dim 2 --heads 1 --ffn 2 --seq 4 --batch 1 --steps 2 --warmup 1 \
    --threads 1 --save "$OUT/checkpoint/mot.ckpt" --debug-state "$OUT/debug_state/mot.dbg" >/dev/null
./mot --data "$OUT/shard/tiny.bin" --dense --layers 2 --dim 4 --heads 2 --ffn 3 --seq 3 --batch 2 --steps 1 --warmup 1 \
    --threads 1 --save "$OUT/checkpoint/dense.ckpt" --debug-state "$OUT/debug_state/dense.dbg" >/dev/null
./mot --data "$OUT/shard/tf.bin" --setting transfusion --layers 1 --dim 2 --heads 1 --ffn 2 --seq 8 --batch 1 \
    --steps 1 --warmup 1 --threads 1 --save "$OUT/checkpoint/tf.ckpt" --debug-state "$OUT/debug_state/tf.dbg" >/dev/null
./mot --data "$OUT/shard/tiny.bin" --tie-ffn --tie-norm --layers 1 --dim 2 --heads 1 --ffn 1 --seq 2 --batch 1 \
    --steps 0 --threads 1 --save "$OUT/checkpoint/tied.ckpt" >/dev/null

# BPE: the built model and one trained on the captions, each followed by text (uint16 length first)
cut -f3 "$DATA/classes.txt" >"$W/captions.txt"
./tokenizers/bpe train "$W/small.bpe" 300 "$W/captions.txt" >/dev/null 2>&1
for m in "$DATA/text.bpe" "$W/small.bpe"; do
    n=$(stat -c %s "$m")
    { byte $((n & 255)); byte $((n >> 8)); cat "$m"; head -c 300 "$W/captions.txt"; } >"$OUT/bpe/$(basename "$m")"
done

# VQ: the built codebook
cp "$DATA/image.vq" "$OUT/vq_model/image.vq"

# speech: a WAV decoded from units by the tool, the same at 22,050 Hz (header rewritten: the
# reader resamples it), and a 4-unit model trained on it
echo "3 17 42 17 3" | ./tokenizers/speech decode "$DATA/speech.sp" "$OUT/wav/units.wav" --iters 2 >/dev/null 2>&1
{ head -c 24 "$OUT/wav/units.wav"; le32 22050; le32 44100; tail -c +33 "$OUT/wav/units.wav"; } >"$OUT/wav/units22k.wav"
./tokenizers/speech train "$OUT/speech_model/small.sp" --units 4 --iters 3 "$OUT/wav/units.wav" >/dev/null 2>&1

# images: a PNG decoded from codes by the tool, and that image as baseline and progressive JPEG
seq 0 48 | tr '\n' ' ' | ./tokenizers/vq decode "$DATA/image.vq" "$OUT/image/codes.png" >/dev/null
c++ -std=c++17 -O1 test/fuzz/to_jpeg.cpp -o "$W/to_jpeg" -ljpeg
"$W/to_jpeg" "$OUT/image/codes.png" "$OUT/image/base.jpg" "$OUT/image/prog.jpg"
for t in "$OUT"/*; do echo "$(basename "$t"): $(ls "$t" | wc -l) seeds, $(cat "$t"/* | wc -c) bytes"; done
