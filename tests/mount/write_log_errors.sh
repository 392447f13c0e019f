#!/usr/bin/env bash
# Where the daemon's messages go, and that a failing host does not flood
# them: the host file system fills up under a 200 MiB writer, which fails
# about once per MiB, yet each cause of failure is logged once, then
# summarized with a count ("(repeated N times in S s)"), not once per
# failed MiB. Checked for -o log=FILE (append, timestamped, kept after the
# daemon detaches) and for -f (standard error). And without a syslog daemon
# (no /dev/log), a detached daemon's messages land in the kernel log.
source "$(dirname "$0")/lib.sh"
init "$@"
need mkfs.ext4 dd dmesg unshare

mkdir -p "$T/host" "$T/mnt"
truncate -s 96M "$T/host.ext4"
mkfs.ext4 -q -F "$T/host.ext4" || fail "mkfs.ext4 failed"
attach_loop "$T/host.ext4"
timeout "$TIMEOUT" mount "$LOOP" "$T/host" || fail "mounting the host file system failed"
img="$T/host/vm.qcow2"

# fill: writes 200 MiB into the mounted disk, which cannot fit.
fill() {
  local rc=0
  dd if=/dev/zero of="$T/mnt/vm.raw" bs=1M count=200 oflag=direct conv=fsync,notrunc \
    status=none 2>"$T/dd.err" || rc=$?
  [[ $rc != 0 ]] || fail "200 MiB fit on a 96 MiB host file system"
  grep -q "No space left on device" "$T/dd.err" || { cat "$T/dd.err"; fail "dd did not report ENOSPC"; }
  # More writes that cannot fit, each failing the same way (dd stops at its
  # first error, and write-behind now returns most errors at the write
  # itself, so the big dd alone may fail only once or twice).
  local i
  for i in $(seq 1 40); do
    dd if=/dev/zero of="$T/mnt/vm.raw" bs=1M count=1 seek=$((300 + i)) oflag=direct \
      conv=notrunc status=none 2>/dev/null || true
  done
  return 0
}

# check_log FILE: a few lines for the many failures, at least one of them
# a summary with a count.
check_log() {
  local lines problems
  lines=$(wc -l <"$1")
  problems=$(grep -cvE ' (mounted|unmounted) |an older line' "$1" || true)
  echo "   $lines lines, $problems about problems; summaries:"
  grep 'repeated' "$1" | sed 's/^/     /' || true
  (( problems >= 1 )) || { cat "$1"; fail "no problem was logged"; }
  (( problems <= 12 )) || { cat "$1"; fail "$problems lines about problems: not rate-limited"; }
  grep -qE '\(repeated [0-9]+ times? in [0-9]+ s\)$' "$1" ||
    { cat "$1"; fail "no summary line with a count"; }
}

step "-o log=FILE, daemon: errors rate-limited, appended with timestamps"
echo "an older line" >"$T/q.log"
qemu-img create -q -f qcow2 "$img" 512M
(cd "$T" && qmount -o log=q.log "$img" "$T/mnt")   # relative to the caller
fill
qumount "$T/mnt" "$img"
check_log "$T/q.log"
[[ $(head -1 "$T/q.log") == "an older line" ]] || fail "log= did not append"
grep -qE "^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8} mount\.qcow2fs\[[0-9]+\]: mounted $img on $T/mnt" "$T/q.log" ||
  { cat "$T/q.log"; fail "no timestamped 'mounted' line after detaching"; }
grep -q "unmounted $T/mnt" "$T/q.log" || { cat "$T/q.log"; fail "no 'unmounted' line"; }

step "log= that cannot be opened fails the mount with one line"
mount_fails -o log="$T/no/such/dir/q.log" "$img" "$T/mnt"
grep -q "log file" <<<"$ERR" || fail "message does not name the log file: $ERR"

step "-f: errors rate-limited on standard error"
rm -f "$img"
qemu-img create -q -f qcow2 "$img" 512M
"$MOUNT_BIN" -f "$img" "$T/mnt" 2>"$T/stderr" &
fg_pid=$!
PIDS+=("$fg_pid")
for i in $(seq $((TIMEOUT * 10))); do
  findmnt -rn --mountpoint "$T/mnt" >/dev/null && break
  sleep 0.1
done
findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "-f mount did not appear"
fill
timeout "$TIMEOUT" umount "$T/mnt"
wait "$fg_pid" || true   # exits 1: data acknowledged by write-behind was lost
check_log "$T/stderr"

step "no syslog daemon: a detached daemon logs to the kernel log"
rm -f "$img"
qemu-img create -q -f qcow2 "$img" 64M
# In a mount namespace of its own, /dev/log (if a syslog daemon has one) is
# hidden, so the check means the same on every machine.
timeout $((TIMEOUT * 3)) unshare -m --propagation private bash -c '
  set -e
  if [[ -e /dev/log ]]; then mount --bind /dev/null /dev/log; fi
  "$1" "$2" "$3"
  umount "$3"' _ "$MOUNT_BIN" "$img" "$T/mnt" || fail "mount in a namespace without /dev/log failed"
timeout "$TIMEOUT" flock "$img" true
dmesg | grep -q "mount\.qcow2fs\[[0-9]*\]: mounted $img on $T/mnt" ||
  { dmesg | tail -5; fail "the 'mounted' line is not in the kernel log"; }
echo "   $(dmesg | grep -F "mounted $img" | tail -1)"
timeout "$TIMEOUT" umount "$T/host"
echo "ok"
