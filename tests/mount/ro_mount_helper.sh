#!/usr/bin/env bash
# mount.qcow2fs as a mount helper: run by mount.fuse3 (as mount(8) does for
# -t fuse.qcow2fs) under the name `qcow2fs` with mount's option noise, and
# under the name mount.fuse.qcow2fs with mount(8)'s own arguments.
source "$(dirname "$0")/lib.sh"
init "$@"
need mount.fuse3

mkdir "$T/mnt" "$T/bin"
ln -s "$MOUNT_BIN" "$T/bin/qcow2fs"
ln -s "$MOUNT_BIN" "$T/bin/mount.fuse.qcow2fs"
qemu-img create -q -f qcow2 "$T/vm.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' "$T/vm.qcow2" >/dev/null
to_raw "$T/vm.qcow2" "$T/ref.raw"

# helper_mounted: checks the mount and remembers its daemon.
helper_mounted() {
  local pid
  [[ $(findmnt -rn -o FSTYPE --mountpoint "$T/mnt") == fuse.qcow2fs ]] ||
    fail "not mounted as fuse.qcow2fs: $(findmnt -rn --mountpoint "$T/mnt")"
  findmnt -rn -o OPTIONS --mountpoint "$T/mnt" | grep -qE '(^|,)ro(,|$)' ||
    fail "not mounted read-only: $(findmnt -rn -o OPTIONS --mountpoint "$T/mnt")"
  pid=$(daemon_pid "$T/mnt")
  [[ -n $pid ]] || fail "no daemon for $T/mnt"
  PIDS+=("$pid")
  cmp "$T/mnt/vm.raw" "$T/ref.raw" || fail "wrong data through the helper mount"
}

step "mount.fuse3 -t fuse.qcow2fs with fstab-style options"
PATH=$T/bin:$PATH timeout "$TIMEOUT" mount.fuse3 "$T/vm.qcow2" "$T/mnt" -t fuse.qcow2fs \
  -o ro,defaults,noatime,nofail,_netdev,noauto,user,x-systemd.automount,comment=test ||
  fail "mount.fuse3 failed"
helper_mounted
timeout "$TIMEOUT" fusermount3 -u "$T/mnt"
timeout "$TIMEOUT" flock "$T/vm.qcow2" true

step "mount.fuse3 with the type#source form"
PATH=$T/bin:$PATH timeout "$TIMEOUT" mount.fuse3 "qcow2fs#$T/vm.qcow2" "$T/mnt" -o ro ||
  fail "mount.fuse3 qcow2fs#source failed"
helper_mounted
qumount "$T/mnt" "$T/vm.qcow2"

step "mount.fuse.qcow2fs SOURCE DIR -n -v -o OPTIONS, as mount(8) runs it"
timeout "$TIMEOUT" "$T/bin/mount.fuse.qcow2fs" "$T/vm.qcow2" "$T/mnt" -n -v -o rw,ro,nosuid,nodev ||
  fail "mount.fuse.qcow2fs failed"
helper_mounted
findmnt -rn -o OPTIONS --mountpoint "$T/mnt" | grep -q nosuid || fail "nosuid was not passed on"
qumount "$T/mnt" "$T/vm.qcow2"

step "-s (sloppy) ignores unknown options, without it they are refused"
mount_fails -o ro,no_such_option "$T/vm.qcow2" "$T/mnt"
timeout "$TIMEOUT" "$T/bin/mount.fuse.qcow2fs" "$T/vm.qcow2" "$T/mnt" -s -o ro,no_such_option ||
  fail "sloppy mount failed"
helper_mounted
qumount "$T/mnt" "$T/vm.qcow2"

step "a wrong -t is refused"
mount_fails -t fuse.sshfs -o ro "$T/vm.qcow2" "$T/mnt"
echo "ok"
