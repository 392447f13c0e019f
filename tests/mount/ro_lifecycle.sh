#!/usr/bin/env bash
# How a mount starts and ends: the daemon returns only when the file is
# usable; umount, fusermount3 -u, SIGTERM, SIGINT and SIGHUP each unmount,
# end the daemon and release the lock; -f stays in the foreground and exits
# 0 on unmount; -d logs every request. Also the attributes the kernel shows:
# st_blocks and statfs.
source "$(dirname "$0")/lib.sh"
init "$@"
need stat python3

mkdir "$T/mnt"
qemu-img create -q -f qcow2 "$T/vm.qcow2" 100M
qemu-io -f qcow2 -c 'write -P 0xab 0 3M' -c 'write -P 0xcd 50M 1M' "$T/vm.qcow2" >/dev/null
to_raw "$T/vm.qcow2" "$T/ref.raw"

step "usable as soon as mount.qcow2fs returns"
for i in 1 2 3; do
  qmount -o ro "$T/vm.qcow2" "$T/mnt"
  cmp <(head -c 4096 "$T/mnt/vm.raw") <(head -c 4096 "$T/ref.raw") || fail "first read after mount"
  qumount "$T/mnt" "$T/vm.qcow2"
done

step "attributes: st_blocks follows the image, statfs is the host's"
qmount -o ro "$T/vm.qcow2" "$T/mnt"
[[ $(stat -c %b "$T/mnt/vm.raw") == $(stat -c %b "$T/vm.qcow2") ]] ||
  fail "st_blocks $(stat -c %b "$T/mnt/vm.raw"), image has $(stat -c %b "$T/vm.qcow2")"
[[ $(stat -f -c '%b %S' "$T/mnt") == $(stat -f -c '%b %S' "$T") ]] ||
  fail "statfs of the mount ($(stat -f -c '%b %S' "$T/mnt")) is not the host's ($(stat -f -c '%b %S' "$T"))"
[[ $(findmnt -rn -o FSTYPE,SOURCE --mountpoint "$T/mnt") == "fuse.qcow2fs $T/vm.qcow2" ]] ||
  fail "findmnt shows: $(findmnt -rn -o FSTYPE,SOURCE --mountpoint "$T/mnt")"
qumount "$T/mnt" "$T/vm.qcow2"

step "fusermount3 -u"
qmount -o ro "$T/vm.qcow2" "$T/mnt"
pid=$(daemon_pid "$T/mnt")
timeout "$TIMEOUT" fusermount3 -u "$T/mnt" || fail "fusermount3 -u failed"
wait_gone "$pid"
timeout "$TIMEOUT" flock "$T/vm.qcow2" true

for signal in TERM INT HUP; do
  step "SIG$signal unmounts and exits"
  qmount -o ro "$T/vm.qcow2" "$T/mnt"
  pid=$(daemon_pid "$T/mnt")
  kill -"$signal" "$pid"
  wait_gone "$pid"
  ! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "still mounted after SIG$signal"
  flock -n "$T/vm.qcow2" true || fail "image still locked after SIG$signal"
done

step "-f stays in the foreground; -d logs requests; exit 0 on unmount"
"$MOUNT_BIN" -f -d -o ro "$T/vm.qcow2" "$T/mnt" 2>"$T/fg.log" &
fg_pid=$!
PIDS+=("$fg_pid")
for i in $(seq 100); do
  findmnt -rn --mountpoint "$T/mnt" >/dev/null && break
  kill -0 "$fg_pid" 2>/dev/null || fail "foreground daemon exited: $(cat "$T/fg.log")"
  sleep 0.1
done
findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "foreground mount did not appear"
cmp "$T/mnt/vm.raw" "$T/ref.raw" || fail "foreground mount reads wrong data"
kill -0 "$fg_pid" || fail "foreground daemon is gone"
timeout "$TIMEOUT" umount "$T/mnt"
rc=0
timeout "$TIMEOUT" tail --pid="$fg_pid" -f /dev/null || fail "foreground daemon did not exit"
wait "$fg_pid" || rc=$?
[[ $rc == 0 ]] || fail "foreground daemon exited with $rc: $(cat "$T/fg.log")"
grep -q "READ off=0 " "$T/fg.log" || fail "-d did not log reads: $(head -20 "$T/fg.log")"
grep -q "LOOKUP parent=1 name=vm.raw" "$T/fg.log" || fail "-d did not log lookups"
flock -n "$T/vm.qcow2" true || fail "image still locked after the foreground daemon exited"
echo "ok"
