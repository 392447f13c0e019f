#!/usr/bin/env bash
# A read-only mount refuses every kind of modification with EROFS and leaves
# the image byte for byte as it was.
source "$(dirname "$0")/lib.sh"
init "$@"
need python3 sha256sum fallocate truncate

mkdir "$T/mnt"
qemu-img create -q -f qcow2 "$T/vm.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 4M' "$T/vm.qcow2" >/dev/null
before=$(sha256sum <"$T/vm.qcow2")
mtime=$(stat -c %Y "$T/vm.qcow2")
to_raw "$T/vm.qcow2" "$T/ref.raw"

qmount -o ro "$T/vm.qcow2" "$T/mnt"
f=$T/mnt/vm.raw
# refused CMD...: the command must fail.
refused() {
  if "$@" >/dev/null 2>&1; then fail "read-only mount allowed: $*"; fi
}
refused dd if=/dev/zero of="$f" bs=4k count=1 conv=notrunc
refused dd if=/dev/zero of="$f" bs=4k count=1 conv=notrunc oflag=direct
refused truncate -s 1G "$f"
refused truncate -s 1M "$f"
refused fallocate -p -o 0 -l 1M "$f"
refused fallocate -z -o 0 -l 1M "$f"
refused touch "$f"
refused rm "$f"
refused mv "$f" "$T/mnt/other.raw"
refused touch "$T/mnt/new"
refused mkdir "$T/mnt/dir"
python3 - "$f" <<'PY' || fail "open for writing did not fail with EROFS"
import errno, os, sys
for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_DIRECT):
    try:
        os.open(sys.argv[1], flags)
    except OSError as e:
        assert e.errno == errno.EROFS, e
    else:
        raise AssertionError(f"open with flags {flags:#o} succeeded")
PY
cmp "$f" "$T/ref.raw" || fail "the disk changed"
qumount "$T/mnt" "$T/vm.qcow2"
[[ $(sha256sum <"$T/vm.qcow2") == "$before" ]] || fail "the image file changed"
[[ $(stat -c %Y "$T/vm.qcow2") == "$mtime" ]] || fail "the image file's mtime changed"
echo "ok"
