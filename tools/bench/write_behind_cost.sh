#!/usr/bin/env bash
# The cost of write-behind's space reservation and of FLUSH draining the
# queue: sequential 1 MiB writes to a fresh image, two binaries compared.
#   tools/bench/write_behind_cost.sh OLD_MOUNT_QCOW2FS NEW_MOUNT_QCOW2FS [RUNS]
# Per binary and run: dd oflag=direct bs=1M count=2048 into a fresh 4 GiB
# image (conv=notrunc, no fsync), then dd of 1 GiB through the page cache
# path (no O_DIRECT, conv=notrunc) timed including its close(2) (FLUSH),
# then the time of `umount`. Prints MiB/s per run and the medians. Root.
# Runs alternate between the binaries.
set -euo pipefail
OLD=$1 NEW=$2 RUNS=${3:-3}
W=$(mktemp -d /var/tmp/wb-cost.XXXXXX)
trap 'umount "$W/mnt" 2>/dev/null; rm -rf "$W"' EXIT
mkdir "$W/mnt"
run() {  # BIN -> "direct_MiBs buffered_MiBs umount_s"
  local bin=$1 t0 t1 t2 t3 t4 pid
  rm -f "$W/vm.qcow2"
  sync
  qemu-img create -q -f qcow2 "$W/vm.qcow2" 4G
  "$bin" "$W/vm.qcow2" "$W/mnt"
  sync; echo 3 >/proc/sys/vm/drop_caches
  t0=$(date +%s.%N)
  dd if=/dev/zero of="$W/mnt/vm.raw" bs=1M count=2048 oflag=direct conv=notrunc status=none
  t1=$(date +%s.%N)
  # Overwrites, through the kernel's buffered path; the last close drains.
  dd if=/dev/zero of="$W/mnt/vm.raw" bs=1M count=1024 seek=2048 conv=notrunc status=none
  t2=$(date +%s.%N)
  umount "$W/mnt"
  t3=$(date +%s.%N)
  python3 -c "import sys; a=[float(x) for x in sys.argv[1:]]; print(f'{2048/(a[1]-a[0]):.0f} {1024/(a[2]-a[1]):.0f} {a[3]-a[2]:.2f}')" "$t0" "$t1" "$t2" "$t3"
}
# Interleaved (old, new, old, new, ...) so that drift in the host's load
# hits both alike.
: >"$W/res.old"; : >"$W/res.new"
for i in $(seq "$RUNS"); do
  for which in old new; do
    bin=$OLD; [[ $which == new ]] && bin=$NEW
    run "$bin" | tee -a "$W/res.$which" |
      sed "s|^|  $which run $i: direct MiB/s, buffered+close MiB/s, umount s: |"
  done
done
for which in old new; do
  python3 - "$W/res.$which" "$which" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
cols = list(zip(*rows))
print(f"{sys.argv[2]}: median direct {statistics.median(cols[0]):.0f} MiB/s, "
      f"buffered+close {statistics.median(cols[1]):.0f} MiB/s, umount {statistics.median(cols[2]):.2f} s")
PY
done
