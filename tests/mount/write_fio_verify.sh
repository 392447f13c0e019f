#!/usr/bin/env bash
# Concurrent O_DIRECT writes: fio with two jobs, libaio, iodepth 16, random
# block sizes from 4k to 1M, crc32c in every block, verified right after
# writing; then, after unmount and qemu-img check, verified again from a new
# mount (fio --verify_only), and compared with qemu-img convert.
source "$(dirname "$0")/lib.sh"
init "$@"
need fio

SIZE=$((256 << 20))
cd "$T"
mkdir mnt
qemu-img create -q -f qcow2 -o cluster_size=64k "$T/vm.qcow2" $SIZE

job=(--name=verify --filename="$T/mnt/vm.raw" --rw=randwrite --bsrange=4k-1M
     --ioengine=libaio --direct=1 --iodepth=16 --numjobs=2 --size=$((SIZE / 2))
     --offset_increment=$((SIZE / 2)) --verify=crc32c --verify_fatal=1
     --verify_state_save=0 --randseed=4242 --group_reporting)

step "fio write + verify"
qmount "$T/vm.qcow2" "$T/mnt"
fio "${job[@]}" --do_verify=1 --output="$T/fio-write.log" ||
  { cat "$T/fio-write.log"; fail "fio write/verify failed"; }
grep -q "err= 0" "$T/fio-write.log" || { cat "$T/fio-write.log"; fail "fio reported errors"; }
cp --sparse=always "$T/mnt/vm.raw" "$T/mounted.raw"
qumount "$T/mnt" "$T/vm.qcow2"
check_image "$T/vm.qcow2"
to_raw "$T/vm.qcow2" "$T/after.raw"
cmp "$T/after.raw" "$T/mounted.raw" || fail "the image differs from what the mount showed"

step "fio --verify_only from a new mount"
qmount "$T/vm.qcow2" "$T/mnt"
fio "${job[@]}" --verify_only --output="$T/fio-verify.log" ||
  { cat "$T/fio-verify.log"; fail "fio verify_only failed after remount"; }
qumount "$T/mnt" "$T/vm.qcow2"
check_image "$T/vm.qcow2"
echo "ok"
