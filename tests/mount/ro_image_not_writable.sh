#!/usr/bin/env bash
# An image the user may read but not write is mounted read-only, with one
# warning line saying why, instead of failing: on a read-only file system
# (EROFS, here a read-only bind mount) and when the file is immutable
# (chattr +i: EPERM even for root). The mount is read-only (writes fail with
# EROFS), reads the right data, and the image does not change. With -o ro
# there is nothing to warn about.
source "$(dirname "$0")/lib.sh"
init "$@"
need python3 chattr sha256sum

# Whatever happens, the immutable flag must not outlive the test (rm -rf).
trap 'rc=$?; chattr -i "$T/img/vm.qcow2" 2>/dev/null; (exit $rc); cleanup' EXIT

mkdir -p "$T/img" "$T/ro" "$T/mnt"
qemu-img create -q -f qcow2 "$T/img/vm.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x5a 0 2M' "$T/img/vm.qcow2" >/dev/null
to_raw "$T/img/vm.qcow2" "$T/ref.raw"
before=$(sha256sum <"$T/img/vm.qcow2")

# check_ro_mount IMAGE ERRNO_NAME: mounts IMAGE without ro, expects exactly
# one warning line naming the image and the reason, then a read-only mount.
check_ro_mount() {
  local img=$1 reason=$2
  qmount "$img" "$T/mnt" 2>"$T/err" || { cat "$T/err" >&2; fail "mount failed"; }
  echo "   stderr: $(cat "$T/err")"
  [[ $(wc -l <"$T/err") == 1 ]] || fail "expected one warning line, got: $(cat "$T/err")"
  grep -qxF "mount.qcow2fs: warning: $img is not writable ($reason); mounting read-only" "$T/err" ||
    fail "unexpected warning: $(cat "$T/err")"
  findmnt -rn -o OPTIONS --mountpoint "$T/mnt" | tr ',' '\n' | grep -qx ro ||
    fail "not mounted read-only: $(findmnt -rn -o OPTIONS --mountpoint "$T/mnt")"
  cmp "$T/mnt/vm.raw" "$T/ref.raw" || fail "read-only mount reads wrong data"
  python3 - "$T/mnt/vm.raw" <<'PY' || fail "writing did not fail with EROFS"
import errno, os, sys
try:
    os.open(sys.argv[1], os.O_WRONLY)
except OSError as e:
    assert e.errno == errno.EROFS, e
else:
    raise AssertionError("opened for writing")
PY
  qumount "$T/mnt" "$img"
}

step "read-only file system (EROFS)"
timeout "$TIMEOUT" mount --bind "$T/img" "$T/ro"
timeout "$TIMEOUT" mount -o remount,bind,ro "$T/ro"
check_ro_mount "$T/ro/vm.qcow2" "Read-only file system"

step "-o ro on the read-only file system: no warning"
qmount -o ro "$T/ro/vm.qcow2" "$T/mnt" 2>"$T/err"
[[ ! -s $T/err ]] || fail "unexpected output with -o ro: $(cat "$T/err")"
qumount "$T/mnt" "$T/ro/vm.qcow2"
timeout "$TIMEOUT" umount "$T/ro"

step "immutable file (EPERM)"
chattr +i "$T/img/vm.qcow2"
check_ro_mount "$T/img/vm.qcow2" "Operation not permitted"
chattr -i "$T/img/vm.qcow2"

step "errors other than permission still fail the mount"
mount_fails "$T/img/missing.qcow2" "$T/mnt"

[[ $(sha256sum <"$T/img/vm.qcow2") == "$before" ]] || fail "the image changed"
echo "ok"
