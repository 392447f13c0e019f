#!/usr/bin/env bash
# Side-by-side fio run: mount.qcow2fs vs QEMU's own FUSE export
# (qemu-storage-daemon --export type=fuse) vs the raw file on the host fs.
#
#   tools/bench/fio_compare.sh [--quick] [--runtime=SEC] [--size=SIZE]
#       [--only=WORKLOAD[,...]] [--targets=raw,qemu,qemu-cached,qcow2fs]
#       [--workdir=DIR] [--keep] [--mount=PATH_TO_mount.qcow2fs]
#
# Targets, each given the same image and a fresh daemon for every workload:
#   raw          the raw file itself (qemu-img convert -O raw of the image)
#   qemu         qemu-storage-daemon, file cache.direct=on (O_DIRECT host I/O)
#   qemu-cached  the same with cache.direct=off: everything through the host
#                page cache (qcow2fs, with its default host-cache=off, sends
#                transfers of 64 KiB or more with O_DIRECT and smaller ones
#                through the page cache: between the two QEMU columns)
#   qcow2fs      build/fuse/mount.qcow2fs IMAGE DIR, file DIR/IMAGE.raw
#
# Workloads (fio, O_DIRECT on the guest file where the target accepts it,
# page cache dropped before every run):
#   seqread      sequential 1 MiB reads of a fully allocated SIZE image, once
#   seqwrite     sequential 1 MiB writes into a FRESH (empty) image, once,
#                fsync at the end
#   randread     random 4 KiB reads, libaio, iodepth 16, 2 jobs, RUNTIME s
#   randwrite    random 4 KiB overwrites, libaio, iodepth 16, 2 jobs, RUNTIME s,
#                fsync at the end
#   sparse       random 4 KiB reads at 1 MiB-aligned offsets of a 16 GiB image
#                whose data is 4 KiB at every MiB (every read hits data, all 32
#                L2 tables in play), L2 cache limited to 1 MiB (half the
#                tables) on both qcow2fs (cache-size=) and QEMU (l2-cache-size=)
#   sparse-dflt  the same with each program's default L2 cache (covers the disk)
#   zlib, zstd   sequential 1 MiB reads of compressed images (qemu-img convert
#                -c) of compressible data (concatenated /usr/lib files), once
#
# Sizes: SIZE 2G (--quick 256M), compressible data SIZE/2, RUNTIME 15 s
# (--quick 4 s). The sequential workloads run twice, targets in forward and
# then reverse order, and report the mean. The full run takes about 9
# minutes on 2 cores.
#
# Results: tools/bench/results/latest.md (markdown table, also printed),
# latest.csv, chart.png (gnuplot, if installed). Peak RSS (VmHWM) of the
# daemons is read from /proc/PID/status right after each fio run.
#
# Needs root, /dev/fuse, fio, qemu-img, qemu-storage-daemon, python3; the
# mount.qcow2fs binary (built when missing). The EXIT trap unmounts
# everything under the work directory and stops every daemon this script
# started, however it ends; every mount and unmount runs under `timeout`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH_DIR=$ROOT/tools/bench
RESULTS=${RESULTS:-$BENCH_DIR/results}
BUILD=${BUILD:-$ROOT/build}
MOUNT_BIN=${MOUNT_BIN:-$BUILD/fuse/mount.qcow2fs}
TIMEOUT=30          # seconds for one mount or unmount

SIZE=2G
RUNTIME=15
QUICK=false
ONLY=
TARGETS=raw,qemu,qemu-cached,qcow2fs
WORKDIR=
KEEP=false
SPARSE_SIZE=16G
SPARSE_CACHE=1M
for arg in "$@"; do
  case $arg in
    --quick) QUICK=true; SIZE=256M; RUNTIME=4 ;;
    --runtime=*) RUNTIME=${arg#*=} ;;
    --size=*) SIZE=${arg#*=} ;;
    --only=*) ONLY=${arg#*=} ;;
    --targets=*) TARGETS=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --keep) KEEP=true ;;
    --mount=*) MOUNT_BIN=${arg#*=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fio_compare.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
ALL_WORKLOADS=(seqread seqwrite randread randwrite sparse sparse-dflt zlib zstd)
WORKLOADS=("${ALL_WORKLOADS[@]}")
[[ -n $ONLY ]] && IFS=, read -r -a WORKLOADS <<<"$ONLY"
IFS=, read -r -a TARGET_LIST <<<"$TARGETS"

die() { echo "fio_compare.sh: $*" >&2; exit 1; }
log() { echo "== $(date +%T) $*" >&2; }

for w in "${WORKLOADS[@]}"; do
  [[ " ${ALL_WORKLOADS[*]} " == *" $w "* ]] || die "unknown workload $w"
done
for t in "${TARGET_LIST[@]}"; do
  [[ $t =~ ^(raw|qemu|qemu-cached|qcow2fs)$ ]] || die "unknown target $t"
done
[[ $(id -u) == 0 ]] || die "needs root (FUSE mounts, drop_caches)"
[[ -c /dev/fuse ]] || die "/dev/fuse is missing"
for tool in fio qemu-img qemu-storage-daemon python3 timeout findmnt flock; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
source "$BENCH_DIR/common.sh"
if [[ ",$TARGETS," == *,qcow2fs,* && $MOUNT_BIN == "$BUILD/fuse/mount.qcow2fs" ]]; then
  require_release_build "$BUILD"
fi
if [[ ",$TARGETS," == *,qcow2fs,* ]]; then
  if [[ ! -x $MOUNT_BIN && $MOUNT_BIN == "$BUILD/fuse/mount.qcow2fs" ]]; then
    log "building $MOUNT_BIN"
    ninja -C "$BUILD" fuse/mount.qcow2fs >&2 || die "cannot build mount.qcow2fs"
  fi
  [[ -x $MOUNT_BIN ]] || die "$MOUNT_BIN is not an executable"
  MOUNT_BIN=$(realpath "$MOUNT_BIN")
fi

if [[ -z $WORKDIR ]]; then
  WORKDIR=$(mktemp -d /var/tmp/qcow2fs-fio-compare.XXXXXX)
  OWN_WORKDIR=true
else
  mkdir -p "$WORKDIR"
  WORKDIR=$(realpath "$WORKDIR")
  OWN_WORKDIR=false
fi
W=$WORKDIR
DAEMONS=()   # pids of the daemons this script started

mounts_under_w() {
  findmnt -rn -o TARGET | awk -v w="$W/" 'index($0, w) == 1' | sort -r
}

cleanup() {
  local rc=$? m p _
  set +e
  trap - EXIT
  for m in $(mounts_under_w); do
    timeout 10 umount "$m" 2>/dev/null || timeout 10 fusermount3 -uz "$m" ||
      timeout 10 umount -l "$m"
  done
  for p in "${DAEMONS[@]}"; do
    kill -0 "$p" 2>/dev/null || continue
    kill -TERM "$p" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  if [[ -n $(mounts_under_w) ]]; then
    echo "fio_compare.sh: still mounted under $W, not removing it:" >&2
    mounts_under_w >&2
  elif [[ $KEEP == true || $OWN_WORKDIR == false ]]; then
    echo "fio_compare.sh: kept $W" >&2
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
bytes_of() { numfmt --from=iec "$1"; }
forget_daemon() {
  local kept=() p
  for p in "${DAEMONS[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done
  DAEMONS=("${kept[@]}")
}
wait_gone() {  # PID: waits up to TIMEOUT s for it to exit
  local _
  for _ in $(seq $((TIMEOUT * 10))); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}
hwm_kib() {  # PID -> VmHWM in KiB (0 when unknown)
  awk '/^VmHWM:/ { print $2; found = 1 } END { if (!found) print 0 }' \
    "/proc/$1/status" 2>/dev/null || echo 0
}

# ---------------------------------------------------------------- targets
# start_target TARGET IMAGE QCOW2FS_OPTS QEMU_QCOW2_OPTS: serves IMAGE and
# leaves the file to run fio on in $FILE and the daemon's pid in $DPID.
start_target() {
  local target=$1 img=$2 qopts=$3 qemu_opts=$4 name
  DPID=
  case $target in
    raw)
      FILE=${img%.qcow2}.raw
      ;;
    qemu|qemu-cached)
      local direct=on
      [[ $target == qemu-cached ]] && direct=off
      FILE=$W/export-$target.raw
      rm -f "$FILE" "$W/qsd.pid"
      touch "$FILE"
      timeout "$TIMEOUT" qemu-storage-daemon \
        --blockdev "driver=file,node-name=file,filename=$img,cache.direct=$direct" \
        --blockdev "driver=qcow2,node-name=fmt,file=file$qemu_opts" \
        --export "type=fuse,id=exp,node-name=fmt,mountpoint=$FILE,writable=on" \
        --pidfile "$W/qsd.pid" --daemonize >"$W/qsd.log" 2>&1 ||
        { cat "$W/qsd.log" >&2; die "qemu-storage-daemon failed to export $img"; }
      DPID=$(cat "$W/qsd.pid")
      DAEMONS+=("$DPID")
      findmnt -rn --mountpoint "$FILE" >/dev/null || die "QEMU export $FILE is not mounted"
      ;;
    qcow2fs)
      local mnt=$W/mnt
      mkdir -p "$mnt"
      local args=()
      [[ -n $qopts ]] && args=(-o "$qopts")
      timeout "$TIMEOUT" "$MOUNT_BIN" "${args[@]}" "$img" "$mnt" ||
        die "mount.qcow2fs ${args[*]} $img $mnt failed"
      findmnt -rn --mountpoint "$mnt" >/dev/null || die "$mnt is not mounted"
      # The daemon: the process whose command line ends in the mount point.
      for pid in $(pgrep -f -- "mount\.qcow2fs" || true); do
        # (a process pgrep listed may have exited since: no message for it)
        if [[ $( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) == *" $img $mnt " ]]; then
          DPID=$pid
        fi
      done
      [[ -n $DPID ]] || die "no mount.qcow2fs daemon found for $mnt"
      DAEMONS+=("$DPID")
      name=$(basename "$img")
      FILE=$mnt/${name%.*}.raw
      [[ -f $FILE ]] || die "$FILE is missing in the mount"
      ;;
  esac
}

# stop_target TARGET: unmounts and waits for the daemon to exit.
stop_target() {
  local target=$1
  case $target in
    raw) ;;
    qemu|qemu-cached)
      # qemu-storage-daemon unmounts its export when it quits.
      kill -TERM "$DPID" 2>/dev/null || true
      wait_gone "$DPID" || die "qemu-storage-daemon $DPID did not exit"
      if findmnt -rn --mountpoint "$FILE" >/dev/null; then
        timeout "$TIMEOUT" umount "$FILE" || die "umount $FILE failed"
      fi
      forget_daemon "$DPID"
      ;;
    qcow2fs)
      timeout "$TIMEOUT" umount "$W/mnt" || die "umount $W/mnt failed"
      wait_gone "$DPID" || die "mount.qcow2fs $DPID did not exit after umount"
      forget_daemon "$DPID"
      ;;
  esac
}

# Does FILE take O_DIRECT?
direct_ok() {
  dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null
}

# --------------------------------------------------------------- images
make_images() {
  local size_b
  size_b=$(bytes_of "$SIZE")
  need() { local w; for w in "$@"; do [[ " ${WORKLOADS[*]} " == *" $w "* ]] && return 0; done; return 1; }

  if need seqread randread randwrite && [[ ! -s $W/data.qcow2 ]]; then
    log "data.qcow2: $SIZE of random data, fully allocated, 64k clusters"
    head -c "$size_b" /dev/urandom >"$W/src.raw"
    qemu-img convert -O qcow2 -o cluster_size=65536 "$W/src.raw" "$W/data.qcow2"
    mv "$W/src.raw" "$W/data.raw"
  fi
  if need sparse sparse-dflt && [[ ! -s $W/sparse.qcow2 ]]; then
    log "sparse.qcow2: $SPARSE_SIZE, 4 KiB of data at every MiB"
    # rw=write:1020k writes 4k, then skips 1020k.
    fio --name=sparse --filename="$W/sparse-src.raw" --rw=write:1020k --bs=4k \
      --size="$SPARSE_SIZE" --fallocate=none --refill_buffers \
      --output=/dev/null
    truncate -s "$SPARSE_SIZE" "$W/sparse-src.raw"
    qemu-img convert -O qcow2 -o cluster_size=65536 "$W/sparse-src.raw" "$W/sparse.qcow2"
    mv "$W/sparse-src.raw" "$W/sparse.raw"
  fi
  if need zlib zstd && [[ ! -s $W/text.raw ]]; then
    local text_b=$((size_b / 2))
    log "text.raw: $((text_b >> 20)) MiB of concatenated /usr/lib files"
    # Files in a fixed order; repeated if /usr/lib is smaller than asked.
    find /usr/lib /usr/share -xdev -type f -size +4k -size -8M -print0 2>/dev/null |
      sort -z >"$W/files"
    python3 - "$W/files" "$W/text.raw" "$text_b" <<'PY'
import sys
names = [n for n in open(sys.argv[1], "rb").read().split(b"\0") if n]
left = int(sys.argv[3])
with open(sys.argv[2], "wb") as out:
    while left > 0:
        wrote = False
        for n in names:
            try:
                data = open(n, "rb").read(left)
            except OSError:
                continue
            out.write(data)
            left -= len(data)
            wrote = wrote or bool(data)
            if left <= 0:
                break
        if not wrote:
            sys.exit("no readable files")
PY
  fi
  local c
  for c in zlib zstd; do
    if need "$c" && [[ ! -s $W/$c.qcow2 ]]; then
      log "$c.qcow2: qemu-img convert -c -o compression_type=$c"
      qemu-img convert -c -O qcow2 -o "cluster_size=65536,compression_type=$c" \
        "$W/text.raw" "$W/$c.qcow2"
      # The raw target reads the uncompressed data.
      ln -f "$W/text.raw" "$W/$c.raw"
    fi
  done
}

# --------------------------------------------------------------- workloads
# fio_args WORKLOAD SIZE_BYTES -> the fio options of the workload.
fio_args() {
  local w=$1 size_b=$2
  case $w in
    seqread|zlib|zstd)
      echo "--rw=read --bs=1M --ioengine=psync --size=$size_b" ;;
    seqwrite)
      echo "--rw=write --bs=1M --ioengine=psync --size=$size_b --end_fsync=1" ;;
    randread)
      echo "--rw=randread --bs=4k --ioengine=libaio --iodepth=16 --numjobs=2 --size=$size_b --norandommap --time_based --runtime=$RUNTIME" ;;
    randwrite)
      echo "--rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --numjobs=2 --size=$size_b --norandommap --time_based --runtime=$RUNTIME --end_fsync=1" ;;
    sparse|sparse-dflt)
      echo "--rw=randread --bs=4k --blockalign=1M --ioengine=libaio --iodepth=16 --numjobs=2 --size=$size_b --norandommap --time_based --runtime=$RUNTIME" ;;
  esac
}

describe() {
  case $1 in
    seqread) echo "seq read 1M ($SIZE, once)" ;;
    seqwrite) echo "seq write 1M, fresh image ($SIZE)" ;;
    randread) echo "rand read 4k, QD16 x2 jobs" ;;
    randwrite) echo "rand write 4k, QD16 x2 jobs" ;;
    sparse) echo "rand read 4k, $SPARSE_SIZE sparse, L2 cache $SPARSE_CACHE" ;;
    sparse-dflt) echo "rand read 4k, $SPARSE_SIZE sparse, default L2 cache" ;;
    zlib) echo "seq read 1M, zlib-compressed" ;;
    zstd) echo "seq read 1M, zstd-compressed" ;;
  esac
}

# run_one WORKLOAD TARGET -> appends a line to $CSV_RAW
run_one() {
  local w=$1 target=$2 img size_b qopts="" qemu_opts="" direct=1 note=""
  case $w in
    seqread|randread|randwrite) img=$W/data.qcow2 ;;
    seqwrite)
      img=$W/fresh-$target.qcow2
      rm -f "$img" "${img%.qcow2}.raw"
      [[ $target == raw ]] || qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" "$SIZE"
      ;;
    sparse|sparse-dflt) img=$W/sparse.qcow2 ;;
    zlib|zstd) img=$W/$w.qcow2 ;;
  esac
  if [[ $w == sparse ]]; then
    qopts="cache-size=$SPARSE_CACHE"
    qemu_opts=",l2-cache-size=$(bytes_of "$SPARSE_CACHE")"
  fi
  case $w in
    seqwrite) size_b=$(bytes_of "$SIZE") ;;
    zlib|zstd) size_b=$(stat -c %s "$W/text.raw") ;;
    *) size_b=$(qemu-img info --output=json "$img" |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') ;;
  esac

  drop_caches
  start_target "$target" "$img" "$qopts" "$qemu_opts"
  if [[ $w == seqwrite && $target == raw ]]; then
    dd if=/dev/zero of="$W/probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null ||
      { direct=0; note="O_DIRECT refused, buffered"; }
    rm -f "$W/probe"
  elif ! direct_ok "$FILE"; then
    direct=0
    note="O_DIRECT refused, buffered"
  fi
  local json=$W/fio-$w-$target.json
  # shellcheck disable=SC2046
  if ! timeout $((RUNTIME * 4 + 300)) fio --name="$w" --filename="$FILE" \
      --direct=$direct --fallocate=none --group_reporting --randrepeat=1 \
      --invalidate=1 $(fio_args "$w" "$size_b") \
      --output-format=json --output="$json" >"$W/fio.err" 2>&1; then
    cat "$W/fio.err" >&2
    die "fio $w on $target failed"
  fi
  local hwm=0
  [[ -n $DPID ]] && hwm=$(hwm_kib "$DPID")
  stop_target "$target"
  local rw="read"
  if [[ $w == seqwrite || $w == randwrite ]]; then
    rw="write"
    # A fast write that breaks the image is no result: QEMU must accept it.
    if [[ $target != raw ]] && ! qemu-img check -q "$img" >"$W/check.log" 2>&1; then
      cat "$W/check.log" >&2
      note="${note:+$note; }qemu-img check FAILED after the run"
      log "  $target: qemu-img check $img failed"
    fi
  fi
  python3 - "$json" "$rw" "$w" "$target" "$direct" "$hwm" "$note" >>"$CSV_RAW" <<'PY'
import json, sys
path, rw, w, target, direct, hwm, note = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
if job.get("error"):
    sys.exit(f"fio reported error {job['error']} for {w} on {target}")
r = job[rw]
print(f"{w},{target},{r['bw_bytes'] / 2**20:.1f},{r['iops']:.0f},{direct},{hwm},{note}")
PY
  local last
  last=$(tail -n1 "$CSV_RAW")
  log "  $target: $(cut -d, -f3 <<<"$last") MiB/s, $(cut -d, -f4 <<<"$last") IOPS, direct=$direct, VmHWM $hwm KiB"
  if [[ $w == seqwrite ]]; then
    rm -f "$img" "${img%.qcow2}.raw"
  fi
}

# ----------------------------------------------------------------- main
START=$SECONDS
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "work directory $W"
make_images
mkdir -p "$RESULTS"
CSV_RAW=$W/results.csv
echo "workload,target,mibps,iops,direct,vmhwm_kib,note" >"$CSV_RAW"
for w in "${WORKLOADS[@]}"; do
  log "$w: $(describe "$w")"
  for t in "${TARGET_LIST[@]}"; do
    run_one "$w" "$t"
  done
  # A workload that reads or writes every byte once takes seconds and is
  # sensitive to what the host disk did just before (the first target after
  # the images are made often finds them in the host's cache): run it again
  # with the targets in reverse order; the report shows the mean.
  case $w in
    seqread|seqwrite|zlib|zstd)
      for ((i = ${#TARGET_LIST[@]} - 1; i >= 0; i--)); do
        run_one "$w" "${TARGET_LIST[i]}"
      done
      ;;
  esac
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$((SECONDS - START))

# Descriptions for the report, one per workload.
DESC=$W/desc.txt
: >"$DESC"
for w in "${WORKLOADS[@]}"; do echo "$w=$(describe "$w")" >>"$DESC"; done

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain -- src include fuse 2>/dev/null) ]] && COMMIT="$COMMIT+dirty"
export COMMIT LOAD_BEFORE LOAD_AFTER ELAPSED SIZE RUNTIME QUICK
QEMU_VERSION=$(qemu-img --version | head -n1)
FIO_VERSION=$(fio --version)
export QEMU_VERSION FIO_VERSION
python3 "$BENCH_DIR/report.py" "$CSV_RAW" "$DESC" "$RESULTS" "$W"
cat "$RESULTS/latest.md"
if command -v gnuplot >/dev/null; then
  gnuplot "$W/chart.gp" || log "gnuplot failed; no chart"
  [[ -s $RESULTS/chart.png ]] && log "chart: $RESULTS/chart.png"
else
  log "gnuplot not installed (apt-get install gnuplot-nox); no chart"
fi
log "done in ${ELAPSED}s; results in $RESULTS/latest.md, latest.csv"
