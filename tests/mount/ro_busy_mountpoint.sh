#!/usr/bin/env bash
# A directory that already is a mount point is refused with one line
# ("busy"), and nothing is stacked on it: a live qcow2fs mount, a dead one
# (daemon killed, every access fails with ENOTCONN) and any other file
# system (tmpfs). -o nonempty mounts over it anyway.
source "$(dirname "$0")/lib.sh"
init "$@"

mkdir "$T/mnt" "$T/tmpfs"
qemu-img create -q -f qcow2 "$T/a.qcow2" 64M
qemu-img create -q -f qcow2 "$T/b.qcow2" 64M

# mounts_on DIR: how many mounts are stacked on DIR.
mounts_on() { findmnt -rn -o TARGET | awk -v d="$1" '$0 == d' | wc -l; }

# refused ARGS... IMAGE DIR: mount.qcow2fs must fail at once with one line
# saying the mount point is busy, and stack nothing on DIR.
refused() {
  local dir=${*: -1} before rc=0 err
  before=$(mounts_on "$dir")
  err=$(timeout "$TIMEOUT" "$MOUNT_BIN" "$@" 2>&1 >/dev/null) || rc=$?
  [[ $rc != 0 ]] || { PIDS+=("$(daemon_pid "$dir")"); fail "mount.qcow2fs $* stacked a mount on $dir"; }
  [[ $rc != 124 ]] || fail "mount.qcow2fs $* hung"
  [[ $(printf '%s\n' "$err" | wc -l) == 1 ]] || fail "more than one line: $err"
  [[ $err == *busy* ]] || fail "the message does not say busy: $err"
  [[ $(mounts_on "$dir") == "$before" ]] || fail "mount.qcow2fs $* changed the mounts on $dir"
  echo "   refused ($rc): $err"
}

step "a live qcow2fs mount"
qmount -o ro "$T/a.qcow2" "$T/mnt"
refused -o ro "$T/b.qcow2" "$T/mnt"
[[ -e $T/mnt/a.raw ]] || fail "the first mount no longer serves"

step "-o nonempty mounts over it"
qmount -o ro,nonempty "$T/b.qcow2" "$T/mnt"
[[ $(mounts_on "$T/mnt") == 2 ]] || fail "-o nonempty did not stack the mount"
[[ -e $T/mnt/b.raw ]] || fail "the new mount does not serve"
b_pid=$(daemon_pid "$T/b.qcow2")   # both daemons name $T/mnt
PIDS+=("$b_pid")
timeout "$TIMEOUT" umount "$T/mnt" || fail "umount of the upper mount failed"
wait_gone "$b_pid"
[[ -e $T/mnt/a.raw ]] || fail "the lower mount does not serve after the upper one went"
qumount "$T/mnt" "$T/a.qcow2"

step "a dead qcow2fs mount (daemon killed)"
qmount -o ro "$T/a.qcow2" "$T/mnt"
pid=$(daemon_pid "$T/mnt")
kill -KILL "$pid"
wait_gone "$pid"
if stat "$T/mnt" >/dev/null 2>&1; then fail "the dead mount still answers"; fi
refused -o ro "$T/b.qcow2" "$T/mnt"
timeout "$TIMEOUT" fusermount3 -uz "$T/mnt"
qmount -o ro "$T/b.qcow2" "$T/mnt"   # the directory is free again
qumount "$T/mnt" "$T/b.qcow2"

step "another file system"
timeout "$TIMEOUT" mount -t tmpfs -o size=1M tmpfs "$T/tmpfs"
refused -o ro "$T/a.qcow2" "$T/tmpfs"
timeout "$TIMEOUT" umount "$T/tmpfs"
echo "ok"
