#!/usr/bin/env bash
# Builds a seed corpus for write_fuzzer: qcow2 images made by qemu-img /
# qemu-io, each followed by a few write programs, plus the hostile images
# of tests/metadata_overlap_test.cc (L2 entries pointing into metadata,
# tables counted free) and two snapshot cases, patched in place.
# Usage: make_write_seed_corpus.sh OUTDIR
# Input format (see write_fuzzer.cc): [u32 LE image length][image]
# [options byte][ops: opcode byte, LEB128 offset, LEB128 length-1].
# Fails if qemu-img/qemu-io/python3 are missing.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
out=$1
for tool in qemu-img qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "make_write_seed_corpus: $tool not found on PATH" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir img

qimg() { qemu-img "$@" >/dev/null; }
qio() { local img=$1; shift; local args=(); for c in "$@"; do args+=(-c "$c"); done; qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null; }

head -c 65536 /dev/urandom > rand64k.raw

# Valid images of every layout the writer handles.
qimg create -f qcow2 -o compat=0.10,cluster_size=512 img/v2_512 64K
qio img/v2_512 "write -P 0x11 0 1536" "write -z 16k 1k"
qimg create -f qcow2 -o cluster_size=512 img/v3_512 128K
qio img/v3_512 "write -P 0x33 0 4k" "write -z 1k 1k" "discard 2k 512" "write -P 0x44 100000 300"
qimg create -f qcow2 -o cluster_size=4096 img/v3_4k 256K
qio img/v3_4k "write -P 0x55 0 12k" "write -z 64k 8k" "write -P 0x66 200k 5000"
qimg create -f qcow2 -o cluster_size=65536 img/v3_64k 1M
qio img/v3_64k "write -P 0x57 0 4k" "write -P 0x58 300k 70k"
for bits in 1 8 64; do
  qimg create -f qcow2 -o cluster_size=512,refcount_bits=$bits img/rc$bits 64K
  qio img/rc$bits "write -P 0x77 512 2k"
done
qimg convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zlib rand64k.raw img/comp_zlib_4k
qimg convert -c -f raw -O qcow2 -o cluster_size=512,compression_type=zstd rand64k.raw img/comp_zstd_512
qimg convert -c -f raw -O qcow2 -o compat=0.10,cluster_size=1024 rand64k.raw img/comp_v2_1k
qimg create -f qcow2 -o cluster_size=16384,extended_l2=on img/ext_16k 256K
qio img/ext_16k "write -P 0x88 512 512" "write -z 2k 1k" "write -P 0x99 20k 1k"
qimg create -f qcow2 -o cluster_size=512 img/snap_512 32K
qio img/snap_512 "write -P 0xaa 0 2k"
qimg snapshot -c s1 img/snap_512
qio img/snap_512 "write -P 0xbb 512 1k"
qimg snapshot -c s2 img/snap_512
qimg create -f raw base.raw 32K
qimg create -f qcow2 -o cluster_size=512 -u -b ../base.raw -F raw img/backing_512 32K
qio img/backing_512 "write -P 0xcc 1k 1k"
qimg create -f qcow2 -o cluster_size=512,data_file=ext.data img/datafile_512 32K
qimg create -f qcow2 -o cluster_size=1024,lazy_refcounts=on img/lazy_1k 64K
qio img/lazy_1k "write -P 0xf0 0 3k"
qimg create -f qcow2 -o cluster_size=4096 img/bitmaps_4k 128K
qimg bitmap --add img/bitmaps_4k b0

# Hostile images (tests/metadata_overlap_test.cc) and snapshot cases.
for cs in 65536 4096; do
  qimg create -f qcow2 -o cluster_size=$cs base_$cs.qcow2 64M
  qio base_$cs.qcow2 "write -P 0x61 0 $cs"
done
qimg create -f qcow2 -o cluster_size=4096 snapbase.qcow2 1M
qio snapbase.qcow2 "write -P 0x61 0 8k"
qimg snapshot -c s1 snapbase.qcow2
qio snapbase.qcow2 "write -P 0x62 0 4k"

python3 - "$out" <<'PY'
import os, struct, sys
out = sys.argv[1]

def be64(f, o): return struct.unpack_from(">Q", f, o)[0]
def be32(f, o): return struct.unpack_from(">I", f, o)[0]
MASK = 0x00fffffffffffe00
COPIED = 1 << 63

def leb(v):
    b = bytearray()
    while True:
        c = v & 0x7f
        v >>= 7
        if v:
            b.append(c | 0x80)
        else:
            b.append(c)
            return bytes(b)

WRITE, ZERO_UNMAP, ZERO, DISCARD, FLUSH, GROW = range(6)
def prog(flags, ops):
    b = bytearray([flags])
    for op, off, length in ops:
        b.append(op)
        b += leb(off)
        b += leb(max(length, 1) - 1)
    return bytes(b)

def seed(name, image, program):
    with open(os.path.join(out, "w_" + name), "wb") as f:
        f.write(struct.pack("<I", len(image)) + image + program)

def programs(cs, size):
    k = min(size, 64 * 1024)
    return {
        "basic": prog(0, [(WRITE, 0, 4096), (WRITE, 1000, 3000), (FLUSH, 0, 0),
                          (WRITE, size - 700, 700)]),
        "zero": prog(0, [(WRITE, 0, 3 * cs), (ZERO_UNMAP, cs // 2, 2 * cs),
                         (ZERO, 3 * cs, cs + 17), (DISCARD, cs, cs), (FLUSH, 0, 0),
                         (WRITE, cs + 3, 100)]),
        "grow": prog(0, [(GROW, 1 << 20, 0), (WRITE, size + 1000, 5000),
                         (GROW, 100, 0), (WRITE, size - 10, 20), (FLUSH, 0, 0)]),
        "smallcache": prog(1, [(WRITE, (i * 37 * cs) % size, cs + 1) for i in range(12)]
                           + [(FLUSH, 0, 0), (DISCARD, 0, k)]),
        "compress": prog(2, [(WRITE, 0, 2 * cs), (WRITE, cs // 3, cs), (FLUSH, 0, 0),
                             (ZERO, cs, cs), (WRITE, 4 * cs, 100)]),
    }

for name in sorted(os.listdir("img")):
    image = open(os.path.join("img", name), "rb").read()
    cs = 1 << be32(image, 20)
    size = be64(image, 24)
    flags_extra = 4 if name.startswith("backing") else 0
    for pname, p in programs(cs, size).items():
        seed(f"{name}_{pname}", image, bytes([p[0] | flags_extra]) + p[1:])

# metadata_overlap_test.cc's cases, at 64 KiB and 4 KiB clusters.
for cs in (65536, 4096):
    base = bytearray(open(f"base_{cs}.qcow2", "rb").read())
    l1 = be64(base, 40)
    l2 = be64(base, l1) & MASK
    rt = be64(base, 48)
    rb = be64(base, rt)
    write0 = prog(0, [(WRITE, 0, 4096), (WRITE, 32 << 20, 4096), (FLUSH, 0, 0)])
    write1 = prog(0, [(WRITE, cs, 4096), (WRITE, 5 * cs, 4096), (FLUSH, 0, 0)])
    for tname, target in (("l1", l1), ("rt", rt), ("rb", rb), ("ownl2", l2), ("header", 0)):
        f = bytearray(base)
        struct.pack_into(">Q", f, l2, target | COPIED)
        seed(f"hostile_{cs}_l2entry_into_{tname}", bytes(f), write0)
    for tname, target in (("l2", l2), ("rb", rb)):
        f = bytearray(base)
        struct.pack_into(">H", f, rb + 2 * (target // cs), 0)
        seed(f"hostile_{cs}_refcount0_{tname}", bytes(f), write1)

# Snapshots: the active L2 table was copied away from the snapshot's.
snap = bytearray(open("snapbase.qcow2", "rb").read())
cs = 1 << be32(snap, 20)
l2_active = be64(snap, be64(snap, 40)) & MASK
so = be64(snap, 64)
l2_snap = be64(snap, be64(snap, so)) & MASK
assert l2_snap != l2_active
seed("snap_plain", bytes(snap), prog(0, [(WRITE, 0, 9000), (DISCARD, 0, 2 * cs), (FLUSH, 0, 0)]))
# Guest cluster 1 claims the snapshot's L2 table as its own data.
f = bytearray(snap)
struct.pack_into(">Q", f, l2_active + 8, l2_snap | COPIED)
seed("hostile_snap_l2entry_into_snapshot_l2", bytes(f), prog(0, [(WRITE, cs, 512), (FLUSH, 0, 0)]))
# The same, shared (COPIED clear): a copy-on-write that drops the
# snapshot L2 table's only counted reference. (The core used to free and
# punch the snapshot's L2 table then; it now refuses the write.)
f = bytearray(snap)
struct.pack_into(">Q", f, l2_active + 8, l2_snap)
seed("hostile_snap_shared_entry_on_snapshot_l2", bytes(f),
     prog(0, [(WRITE, cs, 512), (FLUSH, 0, 0)]))
# Guest cluster 1 points into the snapshot's L1 table and the snapshot table.
sl1 = be64(snap, so)
for tname, target in (("snapshot_l1", sl1), ("snapshot_table", so - so % cs)):
    f = bytearray(snap)
    struct.pack_into(">Q", f, l2_active + 8, target | COPIED)
    seed(f"hostile_snap_l2entry_into_{tname}", bytes(f), prog(0, [(WRITE, cs, 512), (FLUSH, 0, 0)]))
PY

count=$(find "$out" -type f -name 'w_*' | wc -l)
if (( count < 40 )); then
  echo "make_write_seed_corpus: only $count seeds made" >&2
  exit 1
fi
echo "make_write_seed_corpus: $count seeds in $out"
