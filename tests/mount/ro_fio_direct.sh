#!/usr/bin/env bash
# Concurrent O_DIRECT reads through a read-only mount return the right data:
#  - fio, libaio, iodepth 16, two jobs, random 64k reads, each block checked
#    against the pattern fio wrote into it (its own offset, %o), on a plain
#    and on a compressed image;
#  - many dd iflag=direct reads of random unaligned ranges in parallel,
#    compared with the same ranges of `qemu-img convert` output.
source "$(dirname "$0")/lib.sh"
init "$@"
need fio xargs

SIZE=$((128 << 20))
cd "$T"  # fio may leave state files in the working directory
mkdir mnt

step "writing the pattern image (each 64k block holds its offset)"
fio --name=fill --filename="$T/pattern.raw" --rw=write --bs=64k --size=$SIZE \
  --verify=pattern --verify_pattern=%o --do_verify=0 --verify_state_save=0 \
  --output=/dev/null || fail "fio could not write the pattern"
qemu-img convert -O qcow2 "$T/pattern.raw" "$T/plain.qcow2"
qemu-img convert -c -O qcow2 -o cluster_size=16k "$T/pattern.raw" "$T/compressed.qcow2"

for name in plain compressed; do
  step "fio random direct reads of $name.qcow2"
  qmount -o ro "$T/$name.qcow2" "$T/mnt"
  fio --readonly --name=check --filename="$T/mnt/$name.raw" --rw=randread \
    --bs=64k --size=$SIZE --ioengine=libaio --direct=1 --iodepth=16 \
    --numjobs=2 --verify=pattern --verify_pattern=%o --verify_fatal=1 \
    --verify_state_save=0 --group_reporting --output="$T/fio.log" ||
    { cat "$T/fio.log"; fail "fio found bad data in $name.qcow2"; }
  grep -q "err= 0" "$T/fio.log" || { cat "$T/fio.log"; fail "fio reported errors"; }
  qumount "$T/mnt" "$T/$name.qcow2"
done

step "parallel dd iflag=direct of random ranges"
qemu-img create -q -f qcow2 "$T/mixed.qcow2" $SIZE
qemu-io -f qcow2 -c 'write -P 0x5a 0 5M' -c 'write -c -P 0x77 16M 4M' \
  -c 'write -z 30M 10M' -c 'write -P 0x0f 33M 3M' -c 'write -P 0xf0 100M 28M' \
  "$T/mixed.qcow2" >/dev/null
to_raw "$T/mixed.qcow2" "$T/ref.raw"
qmount -o ro "$T/mixed.qcow2" "$T/mnt"
python3 -c '
import random
r = random.Random(1234)
size = 128 << 20
for _ in range(200):
    n = r.choice([1, 512, 4096, 65536, 1 << 20, 3 << 20]) + r.randrange(0, 4096)
    off = r.randrange(0, size - n)
    print(off, n)' >"$T/ranges"
check_range() {  # off len: direct read through the mount vs the reference
  cmp <(dd if="$MNT_FILE" iflag=direct,skip_bytes,count_bytes bs=1M skip="$1" count="$2" status=none) \
      <(dd if="$REF" iflag=skip_bytes,count_bytes bs=1M skip="$1" count="$2" status=none) ||
    { echo "mismatch: $2 bytes at $1" >&2; return 255; }  # 255 stops xargs
}
export -f check_range
MNT_FILE=$T/mnt/mixed.raw REF=$T/ref.raw xargs -P 16 -n 2 bash -c 'check_range "$@"' _ \
  <"$T/ranges" || fail "parallel direct reads returned wrong data"
cmp "$T/mnt/mixed.raw" "$T/ref.raw" || fail "whole-file compare after the parallel reads"
qumount "$T/mnt" "$T/mixed.qcow2"
echo "ok"
