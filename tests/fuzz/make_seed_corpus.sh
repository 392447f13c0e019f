#!/usr/bin/env bash
# Builds a seed corpus of small qcow2 images for open_read_fuzzer with
# qemu-img / qemu-io. Usage: make_seed_corpus.sh OUTDIR
# Every seed is kept under 64 KiB (tiny virtual sizes, 512 B - 4 KiB
# clusters; anything larger is truncated, which still leaves valid headers
# and tables for the fuzzer to mutate). Fails if qemu-img/qemu-io are missing.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
out=$1
for tool in qemu-img qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "make_seed_corpus: $tool not found on PATH" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

MAX=65536

qimg() { qemu-img "$@" >/dev/null; }
qio() { local img=$1; shift; local args=(); for c in "$@"; do args+=(-c "$c"); done; qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null; }

# Semi-compressible data: text, random and zero stretches.
python3 - <<'PY'
import random
r = random.Random(1234)
words = b"qcow2 cluster refcount table backing snapshot guest offset host L1 L2".split()
out = bytearray()
while len(out) < 256 * 1024:
    k = r.randrange(4)
    n = r.randrange(64, 3000)
    if k == 0:
        out += bytes(r.getrandbits(8) for _ in range(n))
    elif k == 1:
        while n > 0:
            w = r.choice(words) + b" "
            out += w
            n -= len(w)
    elif k == 2:
        out += bytes(n)
    else:
        out += bytes([r.randrange(256)]) * n
open("semi.raw", "wb").write(out[:256 * 1024])
PY
head -c 65536 /dev/urandom > rand.raw

add() {  # add NAME FILE
  local name=$1 file=$2
  local size
  size=$(stat -c %s "$file")
  if (( size > MAX )); then
    truncate -s "$MAX" "$file"
  fi
  cp "$file" "$out/$name"
}

# v2, 512-byte clusters, a few writes.
qimg create -f qcow2 -o compat=0.10,cluster_size=512 v2_512.qcow2 64K
qio v2_512.qcow2 "write -P 0x11 0 1536" "write -P 0x22 8k 512" "write -z 16k 1k"
add v2_512 v2_512.qcow2

# v3, 512-byte clusters: data, zero clusters, discard, partial writes.
qimg create -f qcow2 -o cluster_size=512 v3_512.qcow2 128K
qio v3_512.qcow2 "write -P 0x33 0 4k" "write -z 1k 1k" "discard 2k 512" "write -P 0x44 100000 300"
add v3_512 v3_512.qcow2

# v3, 4 KiB clusters, refcount widths at both ends.
qimg create -f qcow2 -o cluster_size=4096 v3_4k.qcow2 256K
qio v3_4k.qcow2 "write -P 0x55 0 12k" "write -z 64k 8k" "write -P 0x66 200k 5000"
add v3_4k v3_4k.qcow2
for bits in 1 64; do
  qimg create -f qcow2 -o cluster_size=512,refcount_bits=$bits rc$bits.qcow2 64K
  qio rc$bits.qcow2 "write -P 0x77 512 2k"
  add refcount_bits_$bits rc$bits.qcow2
done

# Compressed clusters, zlib and zstd, several per host cluster.
head -c 65536 semi.raw > semi64k.raw
for ct in zlib zstd; do
  qimg convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=$ct semi64k.raw c_$ct.qcow2
  add compressed_${ct}_4k c_$ct.qcow2
  qimg convert -c -f raw -O qcow2 -o cluster_size=512,compression_type=$ct semi64k.raw c512_$ct.qcow2
  add compressed_${ct}_512 c512_$ct.qcow2
done
qimg convert -c -f raw -O qcow2 -o compat=0.10,cluster_size=1024 semi64k.raw c_v2.qcow2
add compressed_v2_1k c_v2.qcow2

# Extended L2 (clusters of at least 16 KiB; truncated to 64 KiB).
qimg create -f qcow2 -o cluster_size=16384,extended_l2=on ext.qcow2 256K
qio ext.qcow2 "write -P 0x88 512 512" "write -z 2k 1k" "write -P 0x99 20k 1k"
add extended_l2_16k ext.qcow2

# Internal snapshots.
qimg create -f qcow2 -o cluster_size=512 snap.qcow2 32K
qio snap.qcow2 "write -P 0xaa 0 2k"
qimg snapshot -c s1 snap.qcow2
qio snap.qcow2 "write -P 0xbb 512 1k"
qimg snapshot -c s2 snap.qcow2
add snapshots_512 snap.qcow2

# Backing file and external data file (the fuzzer refuses to open them).
qimg create -f qcow2 -o cluster_size=512 base.qcow2 32K
qimg create -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 overlay.qcow2 32K
qio overlay.qcow2 "write -P 0xcc 1k 1k"
add backing_512 overlay.qcow2
qimg create -f qcow2 -o cluster_size=512,data_file=ext.data df.qcow2 32K
qio df.qcow2 "write -P 0xdd 0 1k"
add data_file_512 df.qcow2

# Bitmaps extension, lazy refcounts.
qimg create -f qcow2 -o cluster_size=4096 bm.qcow2 128K
qimg bitmap --add bm.qcow2 b0
qio bm.qcow2 "write -P 0xee 0 8k"
add bitmaps_4k bm.qcow2
qimg create -f qcow2 -o cluster_size=1024,lazy_refcounts=on lazy.qcow2 64K
qio lazy.qcow2 "write -P 0xf0 0 3k"
add lazy_refcounts_1k lazy.qcow2

count=$(find "$out" -type f | wc -l)
if (( count < 10 )); then
  echo "make_seed_corpus: only $count seeds made" >&2
  exit 1
fi
echo "make_seed_corpus: $count seeds in $out"
