#!/usr/bin/env bash
# Mounts that cannot work are refused at once: non-zero exit, one line
# naming the problem, nothing left mounted, no daemon left running. Covers
# bad images (missing, not qcow2, empty, truncated, corrupt header), bad
# mount points, bad options and a missing /dev/fuse.
source "$(dirname "$0")/lib.sh"
init "$@"
need unshare python3 pgrep

mkdir "$T/mnt"
qemu-img create -q -f qcow2 "$T/good.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 4M' "$T/good.qcow2" >/dev/null

# expect_refusal PATTERN [ARGS...]: the mount must fail and its message must
# match PATTERN (extended regex, case-insensitive).
expect_refusal() {
  local pattern=$1
  shift
  mount_fails "$@"
  grep -qiE -- "$pattern" <<<"$ERR" || fail "message for '$*' does not match /$pattern/: $ERR"
}

step "image missing"
expect_refusal "missing\\.qcow2.*(no such file|not found)" "$T/missing.qcow2" "$T/mnt"

step "image is raw data, not qcow2"
random_file "$T/random.img" $((1 << 20))
expect_refusal "random\\.img" "$T/random.img" "$T/mnt"
expect_refusal "random\\.img" -o ro "$T/random.img" "$T/mnt"

step "image is empty"
: >"$T/empty.qcow2"
expect_refusal "empty\\.qcow2" -o ro "$T/empty.qcow2" "$T/mnt"

step "image truncated inside its header"
head -c 50 "$T/good.qcow2" >"$T/short.qcow2"
expect_refusal "short\\.qcow2" -o ro "$T/short.qcow2" "$T/mnt"

step "corrupt header: cluster_bits 40"
cp "$T/good.qcow2" "$T/bits.qcow2"
printf '\x00\x00\x00\x28' | dd of="$T/bits.qcow2" bs=1 seek=20 conv=notrunc status=none
expect_refusal "bits\\.qcow2" -o ro "$T/bits.qcow2" "$T/mnt"

step "corrupt header: L1 table beyond the end of the file"
cp "$T/good.qcow2" "$T/l1.qcow2"
printf '\x00\x00\x10\x00\x00\x00\x00\x00' | dd of="$T/l1.qcow2" bs=1 seek=40 conv=notrunc status=none
expect_refusal "l1\\.qcow2" -o ro "$T/l1.qcow2" "$T/mnt"

step "mount point missing, or not a directory"
expect_refusal "nowhere.*(no such file|not found)" -o ro "$T/good.qcow2" "$T/nowhere"
expect_refusal "not a directory" -o ro "$T/good.qcow2" "$T/good.qcow2"

step "bad options"
expect_refusal "frobnicate" -o ro,frobnicate "$T/good.qcow2" "$T/mnt"
expect_refusal "lock=off" -o lock=off "$T/good.qcow2" "$T/mnt"
expect_refusal "threads" -o ro,threads=0 "$T/good.qcow2" "$T/mnt"
expect_refusal "size=" -o size=1G "$T/good.qcow2" "$T/mnt"
expect_refusal "compress" -o ro,compress=zstd "$T/good.qcow2" "$T/mnt"
expect_refusal "argument|image and a mount point" "$T/good.qcow2"

step "no /dev/fuse (hidden in a private mount namespace)"
rc=0
ERR=$(timeout "$TIMEOUT" unshare -m --propagation private sh -c \
  'mount -t tmpfs none /dev && exec "$0" -o ro "$1" "$2"' \
  "$MOUNT_BIN" "$T/good.qcow2" "$T/mnt" 2>&1) || rc=$?
[[ $rc != 0 && $rc != 124 ]] || fail "mount without /dev/fuse exited with $rc"
grep -q "/dev/fuse" <<<"$ERR" || fail "message does not name /dev/fuse: $ERR"
echo "   refused ($rc): $ERR"

step "nothing left behind"
[[ -z $(pgrep -f -- "qcow2fs.* $T/") ]] || fail "a daemon is still running: $(pgrep -af -- "qcow2fs.* $T/")"
[[ -z $(mounts_under_t) ]] || fail "something is still mounted: $(mounts_under_t)"
# The good image is still fine and mountable.
qmount -o ro "$T/good.qcow2" "$T/mnt"
qumount "$T/mnt" "$T/good.qcow2"
echo "ok"
