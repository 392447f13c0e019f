#!/usr/bin/env bash
# SEEK_DATA and SEEK_HOLE on the mounted file report the image's allocation:
# the data extents match `qemu-img map`, the edge cases follow lseek(2), and
# cp --sparse=always makes a sparse copy with the right bytes.
source "$(dirname "$0")/lib.sh"
init "$@"
need python3 du

mkdir "$T/mnt"
qemu-img create -q -f qcow2 -o cluster_size=64k "$T/vm.qcow2" 256M
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -P 0x11 10M 100k' \
  -c 'write -z 20M 5M' -c 'write -c -P 0x22 40M 1M' -c 'write -P 0x33 255M 1M' \
  "$T/vm.qcow2" >/dev/null
to_raw "$T/vm.qcow2" "$T/ref.raw"

map_extents "$T/vm.qcow2" >"$T/expected"

qmount -o ro "$T/vm.qcow2" "$T/mnt"
seek_extents "$T/mnt/vm.raw" >"$T/actual"
diff "$T/expected" "$T/actual" || fail "data extents differ from qemu-img map (expected < > actual)"

step "edge cases"
python3 - "$T/mnt/vm.raw" <<'PY' || fail "lseek edge cases"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
M = 1 << 20
def expect_enxio(off, whence):
    try:
        os.lseek(fd, off, whence)
    except OSError as e:
        assert e.errno == errno.ENXIO, (off, whence, e)
        return
    raise AssertionError(f"lseek({off}, {whence}) did not fail with ENXIO")
assert os.lseek(fd, 0, os.SEEK_DATA) == 0
assert os.lseek(fd, 12345, os.SEEK_DATA) == 12345          # inside data
assert os.lseek(fd, 2 * M, os.SEEK_DATA) == 10 * M          # skips a hole
assert os.lseek(fd, 21 * M, os.SEEK_DATA) == 40 * M         # zero clusters are a hole
assert os.lseek(fd, 21 * M, os.SEEK_HOLE) == 21 * M
assert os.lseek(fd, 255 * M, os.SEEK_HOLE) == size          # EOF is a hole
assert os.lseek(fd, size - 1, os.SEEK_DATA) == size - 1
expect_enxio(size, os.SEEK_DATA)
expect_enxio(size, os.SEEK_HOLE)
expect_enxio(size + M, os.SEEK_DATA)
# The ordinary whences are untouched.
assert os.lseek(fd, 777, os.SEEK_SET) == 777
assert os.lseek(fd, -1, os.SEEK_END) == size - 1
PY

step "cp --sparse=always"
cp --sparse=always "$T/mnt/vm.raw" "$T/copy.raw"
cmp "$T/copy.raw" "$T/ref.raw" || fail "sparse copy has different bytes"
used=$(du -B1 "$T/copy.raw" | cut -f1)
(( used < 16 << 20 )) || fail "sparse copy uses $used bytes; holes were not seen"
qumount "$T/mnt" "$T/vm.qcow2"
echo "ok"
