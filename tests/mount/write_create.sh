#!/usr/bin/env bash
# -o create makes the image when it does not exist, with the size, cluster
# size, compression type and backing file asked for, and mounts it; an
# existing image is mounted as it is.
source "$(dirname "$0")/lib.sh"
init "$@"
need python3

mkdir "$T/mnt"
info() {  # info IMAGE KEY...: fields of qemu-img info --output=json
  qemu-img info --output=json "$1" | python3 -c '
import json, sys
info = json.load(sys.stdin)
out = []
for key in sys.argv[1:]:
    value = info
    for part in key.split("."):
        value = value.get(part, {}) if isinstance(value, dict) else {}
    out.append(str(value))
print(" ".join(out))' "${@:2}"
}

step "create,size=100M,cluster_size=128K,compression_type=zstd"
qmount -o create,size=100M,cluster_size=128K,compression_type=zstd "$T/new.qcow2" "$T/mnt"
[[ $(stat -c %s "$T/mnt/new.raw") == $((100 << 20)) ]] || fail "size $(stat -c %s "$T/mnt/new.raw")"
cmp -n $((100 << 20)) "$T/mnt/new.raw" /dev/zero || fail "a new disk does not read as zeros"
dd if=/dev/urandom of="$T/chunk" bs=1M count=3 status=none
dd if="$T/chunk" of="$T/mnt/new.raw" bs=1M seek=10 conv=notrunc status=none
qumount "$T/mnt" "$T/new.qcow2"
check_image "$T/new.qcow2"
[[ $(info "$T/new.qcow2" format virtual-size cluster-size format-specific.data.compression-type) == \
   "qcow2 $((100 << 20)) 131072 zstd" ]] ||
  fail "qemu-img info: $(info "$T/new.qcow2" format virtual-size cluster-size format-specific.data.compression-type)"

step "create on an existing image mounts it unchanged, with a warning if it differs"
qmount -o create,size=5G "$T/new.qcow2" "$T/mnt" 2>"$T/err"
echo "   stderr: $(cat "$T/err")"
[[ $(wc -l <"$T/err") == 1 ]] && grep -q "warning: .*new.qcow2 already exists and is mounted as it is (size 100M, not size=5G)" "$T/err" ||
  fail "expected one warning about the kept size, got: $(cat "$T/err")"
[[ $(stat -c %s "$T/mnt/new.raw") == $((100 << 20)) ]] || fail "existing image was changed by create"
cmp <(dd if="$T/mnt/new.raw" bs=1M skip=10 count=3 status=none) "$T/chunk" || fail "existing data"
qumount "$T/mnt" "$T/new.qcow2"
qmount -o create,size=100M "$T/new.qcow2" "$T/mnt" 2>"$T/err"
[[ ! -s $T/err ]] || fail "warning although the existing image matches: $(cat "$T/err")"
qumount "$T/mnt" "$T/new.qcow2"

step "create,backing=...: an overlay"
qemu-img create -q -f qcow2 "$T/base.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 2M' "$T/base.qcow2" >/dev/null
qmount -o create,backing=base.qcow2,backing_fmt=qcow2,size=64M "$T/overlay.qcow2" "$T/mnt"
cmp <(head -c 2M "$T/mnt/overlay.raw") <(head -c 2M /dev/zero | tr '\0' '\253') ||
  fail "overlay does not show the backing file's data"
dd if="$T/chunk" of="$T/mnt/overlay.raw" bs=1M seek=1 conv=notrunc status=none
qumount "$T/mnt" "$T/overlay.qcow2"
check_image "$T/overlay.qcow2"
[[ $(info "$T/overlay.qcow2" backing-filename) == base.qcow2 ]] ||
  fail "backing file: $(info "$T/overlay.qcow2" backing-filename)"
qemu-io -f qcow2 -c 'read -P 0xab 0 1M' "$T/overlay.qcow2" >/dev/null || fail "backing data lost"

step "create with ro is refused"
mount_fails -o create,size=1G,ro "$T/other.qcow2" "$T/mnt"
[[ ! -e $T/other.qcow2 ]] || fail "a refused create left a file behind"
echo "ok"
