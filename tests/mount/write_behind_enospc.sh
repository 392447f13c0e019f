#!/usr/bin/env bash
# Write-behind on a host file system that fills up: no acknowledged data is
# lost silently. A write is queued only once host space is reserved for it,
# so ENOSPC reaches write(2), as with a local file; whatever still fails in
# the background is returned by close(2) (FLUSH), fsync(2) and the daemon's
# exit status. On a 48 MiB ext4:
#   - cp of 100 MiB with the default options (write-behind on) exits
#     non-zero with an error (not 0 with the data gone);
#   - dd without fsync: every 1 MiB record dd counted as written, with no
#     error at close, is in the image after unmount;
#   - the daemon exits non-zero if and only if a queued write was lost;
#   - qemu-img check finds no corruption, data synced before is intact, the
#     image keeps no reserved blocks after unmount;
#   - with space freed, writing works again.
source "$(dirname "$0")/lib.sh"
init "$@"
need mkfs.ext4 dd cmp cp du stat

mkdir -p "$T/host" "$T/mnt"
truncate -s 48M "$T/host.ext4"
mkfs.ext4 -q -F -m 0 "$T/host.ext4" || fail "mkfs.ext4 failed"
attach_loop "$T/host.ext4"
timeout "$TIMEOUT" mount "$LOOP" "$T/host" || fail "mounting the host file system failed"
img=$T/host/vm.qcow2
random_file "$T/keep.bin" $((4 << 20)) 11
random_file "$T/big.bin" $((100 << 20)) 12
KEEP_AT=400   # MiB: the synced data, far from what cp and dd write

# fg_mount [OPTS]: runs the daemon in the foreground (its exit status is
# checked by fg_umount); its log goes to $T/daemon.log.
fg_mount() {
  "$MOUNT_BIN" -f ${1:+-o "$1"} "$img" "$T/mnt" 2>"$T/daemon.log" &
  FG_PID=$!
  PIDS+=("$FG_PID")
  local i
  for i in $(seq $((TIMEOUT * 10))); do
    findmnt -rn --mountpoint "$T/mnt" >/dev/null && return 0
    kill -0 "$FG_PID" 2>/dev/null || { cat "$T/daemon.log" >&2; fail "the daemon exited"; }
    sleep 0.1
  done
  fail "not mounted after ${TIMEOUT}s"
}

# fg_umount: unmounts; leaves the daemon's exit status in $FG_RC.
fg_umount() {
  timeout "$TIMEOUT" umount "$T/mnt" || fail "umount failed"
  timeout "$TIMEOUT" tail --pid="$FG_PID" -f /dev/null || fail "the daemon did not exit"
  FG_RC=0
  wait "$FG_PID" || FG_RC=$?
}

# The daemon must exit non-zero exactly when it lost a queued write.
check_exit_status() {
  if grep -q "queued write .* failed" "$T/daemon.log"; then
    [[ $FG_RC != 0 ]] || { cat "$T/daemon.log" >&2; fail "a queued write was lost, yet exit 0"; }
    echo "   a queued write failed in the background; daemon exited with $FG_RC"
  else
    [[ $FG_RC == 0 ]] || { cat "$T/daemon.log" >&2; fail "daemon exited with $FG_RC"; }
    echo "   no queued write failed in the background; daemon exited with 0"
  fi
}

# No reserved blocks stay behind: the image uses no more than its size.
check_no_reserve_left() {
  local used size
  used=$(du -B1 "$img" | cut -f1)
  size=$(stat -c %s "$img")
  (( used <= size + (64 << 10) )) || fail "image uses $used bytes on the host for $size bytes"
}

qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 512M
# Freed later: one before the dd step, one before the last.
dd if=/dev/zero of="$T/host/filler1" bs=1M count=8 status=none
dd if=/dev/zero of="$T/host/filler2" bs=1M count=8 status=none

step "cp of 100 MiB onto a 48 MiB host, write-behind on (default)"
fg_mount
dd if="$T/keep.bin" of="$T/mnt/vm.raw" bs=1M seek=$KEEP_AT conv=fsync,notrunc status=none ||
  fail "writing the first 4 MiB failed"
rc=0
cp "$T/big.bin" "$T/mnt/vm.raw" 2>"$T/cp.err" || rc=$?
echo "   cp exited with $rc: $(tr '\n' ' ' <"$T/cp.err")"
[[ $rc != 0 ]] || fail "cp of 100 MiB onto a 48 MiB host exited 0"
grep -q "No space left on device" "$T/cp.err" || fail "cp did not report ENOSPC"
cmp -i 0:$((KEEP_AT << 20)) -n $((4 << 20)) "$T/keep.bin" "$T/mnt/vm.raw" || fail "synced data changed"
fg_umount
check_exit_status
check_image "$img" leaks
check_no_reserve_left

step "dd without fsync: what dd counted as written is in the image"
rm "$T/host/filler1"
fg_mount
rc=0
dd if="$T/big.bin" of="$T/mnt/vm.raw" bs=1M seek=100 conv=notrunc 2>"$T/dd.err" || rc=$?
echo "   dd exited with $rc: $(tr '\n' ' ' <"$T/dd.err")"
[[ $rc != 0 ]] || fail "dd of 100 MiB onto a full host exited 0"
grep -q "No space left on device" "$T/dd.err" || fail "dd did not report ENOSPC"
records=$(sed -n 's/^\([0-9]*\)+0 records out.*/\1/p' "$T/dd.err")
[[ -n $records ]] || fail "no record count from dd"
fg_umount
check_exit_status
check_image "$img" leaks
check_no_reserve_left
if grep -q "error closing\|close" "$T/dd.err"; then
  echo "   dd's close reported the loss; not checking its $records records"
else
  # The error came at write(2): every record before it was acknowledged
  # with nothing reported, so it must be there.
  qmount -o ro "$img" "$T/mnt"
  cmp -i 0:$((100 << 20)) -n $((records << 20)) "$T/big.bin" "$T/mnt/vm.raw" ||
    fail "the $records MiB dd wrote before ENOSPC are not all in the image"
  cmp -i 0:$((KEEP_AT << 20)) -n $((4 << 20)) "$T/keep.bin" "$T/mnt/vm.raw" ||
    fail "synced data changed"
  qumount "$T/mnt" "$img"
  echo "   all $records MiB dd wrote before ENOSPC are in the image"
fi

step "space freed: writing with write-behind works again"
rm "$T/host/filler2"
fg_mount
random_file "$T/more.bin" $((6 << 20)) 13
dd if="$T/more.bin" of="$T/mnt/vm.raw" bs=1M seek=300 conv=notrunc status=none ||
  fail "writing after space was freed failed"
cmp -i 0:$((300 << 20)) -n $((6 << 20)) "$T/more.bin" "$T/mnt/vm.raw" || fail "new data differs"
cmp -i 0:$((KEEP_AT << 20)) -n $((4 << 20)) "$T/keep.bin" "$T/mnt/vm.raw" || fail "synced data changed"
fg_umount
[[ $FG_RC == 0 ]] || { cat "$T/daemon.log" >&2; fail "daemon exited with $FG_RC after a good write"; }
check_image "$img" leaks
check_no_reserve_left
timeout "$TIMEOUT" umount "$T/host"
echo "ok"
