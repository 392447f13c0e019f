#!/usr/bin/env bash
# SEEK_DATA and SEEK_HOLE through a backing chain: a hole is where every
# layer reads zeros, as `qemu-img map` reports it (past the end of a
# shorter backing file, a raw backing file's holes), so cp --sparse keeps
# a copy of an overlay sparse.
source "$(dirname "$0")/lib.sh"
init "$@"
need python3 du truncate

mkdir "$T/mnt"
# A raw base with holes, shorter than the overlay, under a qcow2 middle
# layer, under the top.
truncate -s 32M "$T/base.raw"
qemu-io -f raw -c 'write -P 0x11 4M 1M' -c 'write -P 0x12 30M 64k' "$T/base.raw" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=64k -b base.raw -F raw "$T/mid.qcow2" 48M
qemu-io -f qcow2 -c 'write -P 0x21 8M 1M' -c 'write -z 4M 512k' "$T/mid.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=64k -b mid.qcow2 -F qcow2 "$T/top.qcow2" 128M
qemu-io -f qcow2 -c 'write -P 0x31 100M 1M' -c 'write -P 0x32 30M 4k' "$T/top.qcow2" >/dev/null
to_raw "$T/top.qcow2" "$T/ref.raw"

map_extents "$T/top.qcow2" >"$T/expected"

qmount -o ro "$T/top.qcow2" "$T/mnt"
seek_extents "$T/mnt/top.raw" >"$T/actual"
diff "$T/expected" "$T/actual" || fail "data extents differ from qemu-img map (expected < > actual)"

step "cp --sparse=always of the overlay"
cp --sparse=always "$T/mnt/top.raw" "$T/copy.raw"
cmp "$T/copy.raw" "$T/ref.raw" || fail "sparse copy has different bytes"
used=$(du -B1 "$T/copy.raw" | cut -f1)
(( used < 8 << 20 )) || fail "sparse copy of the overlay uses $used bytes; holes below it were not seen"
qumount "$T/mnt" "$T/top.qcow2"
echo "ok"
