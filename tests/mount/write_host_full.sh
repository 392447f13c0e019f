#!/usr/bin/env bash
# The host file system fills up under a writer. Writes are queued ahead of
# the image (write-behind) and reach the host with O_DIRECT, so the error
# surfaces at fsync: `dd conv=fsync` must fail with ENOSPC, the daemon must
# keep serving, data synced before must be intact, and qemu-img check must
# find no corruption (leaked clusters are allowed). Then, with space freed
# on the host, writing works again. Both host paths are covered: the
# default (O_DIRECT, write-behind) and host-cache=on,write-behind=0.
source "$(dirname "$0")/lib.sh"
init "$@"
need mkfs.ext4 dd cmp

mkdir -p "$T/host" "$T/mnt"
truncate -s 96M "$T/host.ext4"
mkfs.ext4 -q -F "$T/host.ext4" || fail "mkfs.ext4 failed"
attach_loop "$T/host.ext4"
timeout "$TIMEOUT" mount "$LOOP" "$T/host" || fail "mounting the host file system failed"
random_file "$T/keep.bin" $((4 << 20)) 7

for opts in "" "host-cache=on,write-behind=0"; do
  step "fill the host ${opts:+(-o $opts)}"
  img="$T/host/vm.qcow2"
  rm -f "$img" "$T/host/filler"
  qemu-img create -q -f qcow2 "$img" 512M
  dd if=/dev/zero of="$T/host/filler" bs=1M count=16 status=none   # freed later
  qmount ${opts:+-o "$opts"} "$img" "$T/mnt"
  dd if="$T/keep.bin" of="$T/mnt/vm.raw" bs=1M oflag=direct conv=fsync,notrunc status=none ||
    fail "writing the first 4 MiB failed"
  rc=0
  dd if=/dev/urandom of="$T/mnt/vm.raw" bs=1M seek=8 count=200 oflag=direct conv=fsync,notrunc \
    status=none 2>"$T/dd.err" || rc=$?
  [[ $rc != 0 ]] || fail "200 MiB fit on a 96 MiB host file system"
  grep -q "No space left on device" "$T/dd.err" || { cat "$T/dd.err"; fail "dd did not report ENOSPC"; }
  echo "   dd: $(tr '\n' ' ' <"$T/dd.err")"
  # The daemon still serves, and what was synced before is intact.
  cmp -n $((4 << 20)) "$T/keep.bin" "$T/mnt/vm.raw" || fail "synced data changed"
  qumount "$T/mnt" "$img"
  check_image "$img" leaks
  echo "   image after the failure: $(( $(du -B1 "$img" | cut -f1) >> 20 )) MiB allocated"
  # Room again: a write and fsync succeed.
  rm "$T/host/filler"
  qmount ${opts:+-o "$opts"} "$img" "$T/mnt"
  random_file "$T/more.bin" $((8 << 20)) 8
  dd if="$T/more.bin" of="$T/mnt/vm.raw" bs=1M seek=300 oflag=direct conv=fsync,notrunc \
    status=none || fail "writing after space was freed failed"
  cmp -i 0:$((300 << 20)) -n $((8 << 20)) "$T/more.bin" "$T/mnt/vm.raw" || fail "new data differs"
  cmp -n $((4 << 20)) "$T/keep.bin" "$T/mnt/vm.raw" || fail "synced data changed after remount"
  qumount "$T/mnt" "$img"
  check_image "$img" leaks
done
timeout "$TIMEOUT" umount "$T/host"
echo "ok"
