#!/usr/bin/env bash
# A clean end always leaves a clean image: after writes without fsync,
# umount, SIGTERM and SIGINT each flush before the lock is released, so
# qemu-img check finds nothing (not even leaks) and every write is there.
source "$(dirname "$0")/lib.sh"
init "$@"

mkdir "$T/mnt"
random_file "$T/data" $((8 << 20)) 5

for how in umount TERM INT; do
  step "end by $how"
  rm -f "$T/vm.qcow2"
  qemu-img create -q -f qcow2 "$T/vm.qcow2" 128M
  truncate -s 128M "$T/ref.raw"
  qmount "$T/vm.qcow2" "$T/mnt"
  pid=$(daemon_pid "$T/mnt")
  for seek in 0 3 17 64 120; do
    dd if="$T/data" of="$T/mnt/vm.raw" bs=1M seek=$seek conv=notrunc status=none
    dd if="$T/data" of="$T/ref.raw" bs=1M seek=$seek conv=notrunc status=none
  done
  if [[ $how == umount ]]; then
    timeout "$TIMEOUT" umount "$T/mnt" || fail "umount failed"
  else
    kill -"$how" "$pid"
  fi
  # The lock is released only after the final flush: once flock gets it,
  # the image must be complete.
  timeout "$TIMEOUT" flock "$T/vm.qcow2" true || fail "lock still held"
  wait_gone "$pid"
  ! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "still mounted after $how"
  check_image "$T/vm.qcow2"
  to_raw "$T/vm.qcow2" "$T/after.raw"
  cmp "$T/after.raw" "$T/ref.raw" || fail "writes missing after $how"
done
echo "ok"
