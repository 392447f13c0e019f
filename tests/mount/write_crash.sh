#!/usr/bin/env bash
# SIGKILL in the middle of concurrent writes: the dead mount is removed with
# fusermount3 -uz, the lock dies with the process, qemu-img check finds no
# corruption (leaked clusters are allowed), and the image mounts and reads
# completely. Data fsync()ed before the kill survives it.
source "$(dirname "$0")/lib.sh"
init "$@"
need fio python3

SIZE=$((256 << 20))
cd "$T"
mkdir mnt
qemu-img create -q -f qcow2 -o cluster_size=64k "$T/vm.qcow2" $SIZE
random_file "$T/keep" $((4 << 20)) 11

for round in 1 2 3; do
  step "round $round: kill -9 during fio"
  qmount "$T/vm.qcow2" "$T/mnt"
  pid=$(daemon_pid "$T/mnt")
  # Durable before the crash: written and fsync()ed.
  dd if="$T/keep" of="$T/mnt/vm.raw" bs=1M seek=$((round * 8)) conv=notrunc,fsync status=none ||
    fail "writing the data that must survive"
  fio --name=crash --filename="$T/mnt/vm.raw" --rw=randwrite --bsrange=4k-512k \
    --ioengine=libaio --direct=1 --iodepth=16 --numjobs=2 --size=$((SIZE / 2)) \
    --offset=$((64 << 20)) --time_based --runtime=30 --output=/dev/null >/dev/null 2>&1 &
  fio_pid=$!
  sleep 2
  kill -KILL "$pid"
  wait_gone "$pid"
  timeout "$TIMEOUT" tail --pid="$fio_pid" -f /dev/null || fail "fio hangs on the dead mount"
  wait "$fio_pid" || true   # fio fails: its file system went away
  if ls "$T/mnt/vm.raw" >/dev/null 2>&1; then fail "the dead mount still answers"; fi
  timeout "$TIMEOUT" fusermount3 -uz "$T/mnt" || fail "fusermount3 -uz failed"
  ! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "still mounted after fusermount3 -uz"
  timeout "$TIMEOUT" flock "$T/vm.qcow2" true || fail "lock not released by the killed daemon"

  check_image "$T/vm.qcow2" leaks
  qmount -o ro "$T/vm.qcow2" "$T/mnt"
  cat "$T/mnt/vm.raw" >/dev/null || fail "reading the whole disk after the crash failed"
  cmp <(dd if="$T/mnt/vm.raw" bs=1M skip=$((round * 8)) count=4 status=none) "$T/keep" ||
    fail "fsync()ed data lost in the crash"
  qumount "$T/mnt" "$T/vm.qcow2"
  qemu-img check -q -r leaks "$T/vm.qcow2" >/dev/null 2>&1 || true
done
echo "ok"
