#!/usr/bin/env bash
# The core's read path (qcow2fs::Image::Read, no FUSE) against fio reading
# the same data from a raw file, both through the host page cache, both cold.
#
#   tools/bench/read_bench.sh [--quick] [--size=SIZE] [--runtime=SEC]
#                             [--repeat=N] [--workdir=DIR] [--keep]
#
# Builds a fully allocated qcow2 image of random data (64k clusters, SIZE,
# default 2G; --quick 256M) and its raw twin (`qemu-img convert -O raw`), then
# for 1 and 2 threads:
#   seq   1 MiB reads of the whole disk once (each thread its own slice)
#   rand  4 KiB reads at random aligned offsets for RUNTIME s (default 5)
# with `sync; echo 3 > /proc/sys/vm/drop_caches` before every run. Each
# measurement is repeated N times (default 3) and the median reported: on a
# small shared machine single runs scatter by tens of percent. The core
# reads its host file with buffered pread, so the raw side is fio psync
# without O_DIRECT: same cache, same syscall, one layer less.
#
# Writes a markdown table to stdout and to tools/bench/results/read_bench.md
# (and .csv). Needs root (drop_caches), qemu-img, fio, python3 and the
# qcow2fs-read-bench binary (BUILD=build dir, default build/; or
# READ_BENCH=path to the binary).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH_DIR=$ROOT/tools/bench
RESULTS=${RESULTS:-$BENCH_DIR/results}
BUILD=${BUILD:-$ROOT/build}

SIZE=2G
RUNTIME=5
REPEAT=3
WORKDIR=
KEEP=false
for arg in "$@"; do
  case $arg in
    --quick) SIZE=256M; RUNTIME=3; REPEAT=1 ;;
    --repeat=*) REPEAT=${arg#*=} ;;
    --size=*) SIZE=${arg#*=} ;;
    --runtime=*) RUNTIME=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --keep) KEEP=true ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "read_bench.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

die() { echo "read_bench.sh: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

[[ $(id -u) == 0 ]] || die "needs root (for /proc/sys/vm/drop_caches)"
for tool in qemu-img fio python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

source "$BENCH_DIR/common.sh"
[[ -n ${READ_BENCH:-} ]] || require_release_build "$BUILD"
BIN=${READ_BENCH:-$BUILD/tools/bench/qcow2fs-read-bench}
if [[ ! -x $BIN && -z ${READ_BENCH:-} ]]; then
  log "building $BIN"
  ninja -C "$BUILD" tools/bench/qcow2fs-read-bench >&2 ||
    die "cannot build qcow2fs-read-bench (is subdir('bench') in tools/meson.build?)"
fi
[[ -x $BIN ]] || die "$BIN is not an executable"

if [[ -z $WORKDIR ]]; then
  WORKDIR=$(mktemp -d /var/tmp/qcow2fs-read-bench.XXXXXX)
  OWN_WORKDIR=true
else
  mkdir -p "$WORKDIR"
  OWN_WORKDIR=false
fi
cleanup() {
  local rc=$?
  if [[ $KEEP == false && $OWN_WORKDIR == true ]]; then rm -rf "$WORKDIR"; fi
  [[ $KEEP == true ]] && echo "read_bench.sh: kept $WORKDIR" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

IMG=$WORKDIR/data.qcow2
RAW=$WORKDIR/data.raw
if [[ ! -s $IMG || ! -s $RAW ]]; then
  log "writing $SIZE of random data, converting to qcow2 (64k clusters)"
  rm -f "$IMG" "$RAW"
  head -c "$SIZE" /dev/urandom >"$WORKDIR/src.raw"
  qemu-img convert -O qcow2 -o cluster_size=65536 "$WORKDIR/src.raw" "$IMG"
  rm -f "$WORKDIR/src.raw"
  # The comparison file is what QEMU says the image holds.
  qemu-img convert -O raw "$IMG" "$RAW"
fi
BYTES=$(stat -c %s "$RAW")
alloc=$(qemu-img map --output=json "$IMG" |
  python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
[[ $alloc == "$BYTES" ]] || die "image is not fully allocated ($alloc of $BYTES bytes)"
log "sanity: core reads the same bytes as the raw file (first 64 MiB, random 4k)"
"$BIN" --mode=seq --bs=1M --total=$((64 << 20)) --verify="$RAW" "$IMG" >/dev/null
"$BIN" --mode=rand --bs=4k --runtime=0.5 --verify="$RAW" "$IMG" >/dev/null

# core MODE BS THREADS -> "mibps iops p50_us p99_us"
core() {
  local mode=$1 bs=$2 threads=$3 limit out
  if [[ $mode == seq ]]; then limit=--total=$BYTES; else limit=--runtime=$RUNTIME; fi
  drop_caches
  out=$("$BIN" --mode="$mode" --bs="$bs" --threads="$threads" "$limit" "$IMG")
  echo "$out" | grep '^RESULT' | python3 -c '
import sys
kv = dict(p.split("=", 1) for p in sys.stdin.read().split()[1:])
print(kv["mibps"], kv["iops"], kv["lat_p50_us"], kv["lat_p99_us"])'
}

# raw MODE BS THREADS -> "mibps iops p50_us p99_us" from fio psync, buffered.
raw() {
  local mode=$1 bs=$2 threads=$3 args
  if [[ $mode == seq ]]; then
    # Same split as the core: thread i reads slice i once.
    local slice=$((BYTES / threads))
    args=(--rw=read --size="$slice" --offset_increment="$slice")
  else
    args=(--rw=randread --norandommap --randrepeat=0 --size="$BYTES"
          --time_based --runtime="$RUNTIME")
  fi
  drop_caches
  fio --name=raw --filename="$RAW" --readonly --ioengine=psync --direct=0 \
    --bs="$bs" --numjobs="$threads" --group_reporting --invalidate=1 \
    "${args[@]}" --output-format=json --output="$WORKDIR/fio.json" >/dev/null
  python3 - "$WORKDIR/fio.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
pct = r["clat_ns"]["percentile"]
print("%.1f %.0f %.1f %.1f" % (r["bw_bytes"] / 2**20, r["iops"],
      pct["50.000000"] / 1e3, pct["99.000000"] / 1e3))
PY
}

# median FUNC ARGS...: runs FUNC REPEAT times, prints the line whose first
# field (MiB/s, hence also IOPS) is the median.
median() {
  local i line lines=()
  for ((i = 0; i < REPEAT; i++)); do
    line=$("$@")
    lines+=("$line")
  done
  printf '%s\n' "${lines[@]}" | sort -g -k1,1 | sed -n "$(( (REPEAT + 1) / 2 ))p"
}

mkdir -p "$RESULTS"
CSV=$RESULTS/read_bench.csv
MD=$RESULTS/read_bench.md
echo "workload,threads,core_mibps,core_iops,core_p50_us,core_p99_us,raw_mibps,raw_iops,raw_p50_us,raw_p99_us" >"$CSV"
for spec in "seq 1M 1" "seq 1M 2" "rand 4k 1" "rand 4k 2"; do
  read -r mode bs threads <<<"$spec"
  log "$mode $bs x$threads: core"
  out=$(median core "$mode" "$bs" "$threads")
  read -r c_mib c_iops c_p50 c_p99 <<<"$out"
  log "$mode $bs x$threads: raw (fio psync)"
  out=$(median raw "$mode" "$bs" "$threads")
  read -r r_mib r_iops r_p50 r_p99 <<<"$out"
  echo "$mode $bs,$threads,$c_mib,$c_iops,$c_p50,$c_p99,$r_mib,$r_iops,$r_p50,$r_p99" >>"$CSV"
done

python3 - "$CSV" "$SIZE" "$RUNTIME" "$REPEAT" >"$MD" <<'PY'
import csv, sys, datetime, os, platform
rows = list(csv.DictReader(open(sys.argv[1])))
size, runtime, repeat = sys.argv[2], sys.argv[3], sys.argv[4]
load = open("/proc/loadavg").read().split()[:3]
print(f"## qcow2fs core read path vs raw file ({datetime.date.today()})\n")
print(f"{size} fully allocated qcow2 image (64k clusters, random data) and its raw twin; "
      f"`{platform.node()}`, {os.cpu_count()} CPUs, kernel {platform.release()}. "
      "Page cache dropped before each run; both sides buffered pread. "
      f"seq: every byte read once; rand: {runtime} s. Median of {repeat} run(s); "
      f"load average at the end {' '.join(load)}. Latency per call, p50/p99 in us.\n")
print("| workload | threads | core (Image::Read) | raw file (fio psync) | core/raw | core p50/p99 us | raw p50/p99 us |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    seq = r["workload"].startswith("seq")
    key = "mibps" if seq else "iops"
    unit = "MiB/s" if seq else "IOPS"
    c, w = float(r["core_" + key]), float(r["raw_" + key])
    fmt = (lambda v: f"{v:,.0f} {unit}")
    ratio = f"{c / w:.2f}" if w else "n/a"
    print(f"| {r['workload']} | {r['threads']} | {fmt(c)} | {fmt(w)} | {ratio} | "
          f"{float(r['core_p50_us']):.0f} / {float(r['core_p99_us']):.0f} | "
          f"{float(r['raw_p50_us']):.0f} / {float(r['raw_p99_us']):.0f} |")
PY
cat "$MD"
log "results in $MD and $CSV"
