#!/usr/bin/env bash
# qcow2fs-img's command line, judged against QEMU's own tools:
#   - --help (stdout, exit 0) for the tool and every command, --version,
#     usage errors (exit 1, one line and the pointer to --help, on stderr);
#   - info, map, check and snapshot list in JSON agree with qemu-img's on
#     every field that means the same thing, for a plain image, a backing
#     chain (qcow2 over qcow2 over raw), zstd-compressed clusters, internal
#     snapshots, an external data file, extended L2, version 2, and an image
#     flagged corrupt;
#   - convert writes what `qemu-img convert -O raw` writes, no less sparse;
#   - check's exit status: 0 clean, 3 leaks, 2 corruptions (a refcount
#     edited, and a dirty image left by `sigraise 9` with lazy refcounts),
#     63 raw; repairs leave images qemu-img finds clean;
#   - -U reads an image a writer holds, which is refused without it;
#   - snapshot create/delete/apply leave what qemu-img expects.
#
#   tests/tool/img_cli.sh QCOW2FS_IMG_BINARY [EXPECTED_VERSION]
#
# Needs qemu-img, qemu-io and jq; a missing one is a failure, never a skip.
set -Eeuo pipefail
trap 'echo "FAIL: line $LINENO: \"$BASH_COMMAND\" exited with $?" >&2' ERR

fail() {
  echo "FAIL: $*" >&2
  exit 1
}
step() { echo "-- $*"; }

[[ $# -ge 1 ]] || fail "usage: $0 QCOW2FS_IMG_BINARY [EXPECTED_VERSION]"
IMG=$(realpath "$1")
[[ -x $IMG ]] || fail "$1 is not an executable"
VERSION=${2:-}
for tool in qemu-img qemu-io jq cmp du stat od dd; do
  command -v "$tool" >/dev/null 2>&1 || fail "required tool '$tool' is not installed"
done

T=$(mktemp -d /tmp/qcow2fs-img-test.XXXXXX)
HOLDER=
cleanup() {
  [[ -n $HOLDER ]] && kill "$HOLDER" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT
cd "$T"

# run CMD...: runs it, keeping stdout in $T/out, stderr in $T/err, status in
# $rc (never failing the test by itself).
run() {
  rc=0
  "$@" >"$T/out" 2>"$T/err" || rc=$?
}

# ------------------------------------------------------------ help, version
step "--help and --version"
for args in "--help" "-h" "info --help" "map --help" "convert --help" "dump --help" \
            "check --help" "snapshot --help" "snapshot list --help" \
            "snapshot create --help" "info -h"; do
  # shellcheck disable=SC2086
  run "$IMG" $args
  [[ $rc == 0 ]] || fail "qcow2fs-img $args exited $rc"
  [[ -s $T/out ]] || fail "qcow2fs-img $args printed nothing on stdout"
  [[ ! -s $T/err ]] || fail "qcow2fs-img $args wrote on stderr: $(cat "$T/err")"
  grep -q '^Usage: qcow2fs-img' "$T/out" || fail "qcow2fs-img $args: no Usage line"
done
run "$IMG" --version
[[ $rc == 0 ]] || fail "--version exited $rc"
grep -Eqx 'qcow2fs-img [0-9]+\.[0-9]+\.[0-9]+' "$T/out" || fail "--version printed '$(cat "$T/out")'"
[[ -z $VERSION || $(cat "$T/out") == "qcow2fs-img $VERSION" ]] ||
  fail "--version printed '$(cat "$T/out")', the project is at $VERSION"

# ------------------------------------------------------------ usage errors
step "usage errors: exit 1, one line and 'Try', on stderr"
qemu-img create -q -f qcow2 u.qcow2 1M
usage_cases=(
  ""
  "frobnicate u.qcow2"
  "--frob"
  "info"
  "info u.qcow2 extra"
  "info --output=xml u.qcow2"
  "info --output"
  "info -x u.qcow2"
  "info --backing-chain=yes u.qcow2"
  "map"
  "convert u.qcow2"
  "convert -l u.qcow2"
  "dump a b c"
  "check -r u.qcow2"
  "check -r some u.qcow2"
  "check -U -r leaks u.qcow2"
  "snapshot"
  "snapshot frob u.qcow2"
  "snapshot list"
  "snapshot create u.qcow2"
  "snapshot delete u.qcow2 a b"
)
for args in "${usage_cases[@]}"; do
  # shellcheck disable=SC2086
  run "$IMG" $args
  [[ $rc == 1 ]] || fail "qcow2fs-img $args: exit $rc, expected 1"
  [[ ! -s $T/out ]] || fail "qcow2fs-img $args wrote on stdout"
  [[ $(wc -l <"$T/err") == 2 ]] || fail "qcow2fs-img $args: stderr is not two lines: $(cat "$T/err")"
  head -1 "$T/err" | grep -q '^qcow2fs-img: .' || fail "qcow2fs-img $args: $(head -1 "$T/err")"
  [[ $(tail -1 "$T/err") == "Try 'qcow2fs-img --help'." ]] ||
    fail "qcow2fs-img $args: last line '$(tail -1 "$T/err")'"
done
run "$IMG" info missing.qcow2
[[ $rc == 1 && -s $T/err ]] || fail "info of a missing file: exit $rc"

# ------------------------------------------------------------ the images
step "making images with qemu-img and qemu-io"
# plain: data, a zero cluster, a compressed cluster, unallocated space.
qemu-img create -q -f qcow2 plain.qcow2 64M
qemu-io -c 'write -P 0x11 0 3M' -c 'write -z 4M 64k' -c 'write -c -P 0x22 8M 64k' \
  -c 'write -P 0 16M 256k' -c 'write -P 0x33 20M 4k' plain.qcow2 >/dev/null
# chain: qcow2 over qcow2 over raw (shorter than the disk).
qemu-img create -q -f raw base.raw 4M
qemu-io -f raw -c 'write -P 1 0 64k' -c 'write -P 2 1M 64k' base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 8M
qemu-io -c 'write -P 3 64k 64k' -c 'write -z 1M 64k' mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 8M
qemu-io -c 'write -P 4 128k 128k' -c 'write -c -P 5 2M 64k' -c 'write -P 6 6M 64k' \
  top.qcow2 >/dev/null
# zstd, compressed through and through.
qemu-img convert -q -c -O qcow2 -o compression_type=zstd plain.qcow2 zstd.qcow2
# snapshots.
qemu-img create -q -f qcow2 snap.qcow2 16M
qemu-io -c 'write -P 7 0 1M' snap.qcow2 >/dev/null
qemu-img snapshot -c first snap.qcow2
qemu-io -c 'write -P 8 0 64k' -c 'write -P 9 5M 64k' snap.qcow2 >/dev/null
qemu-img snapshot -c second snap.qcow2
qemu-io -c 'write -P 10 64k 64k' snap.qcow2 >/dev/null
# external data files, raw and not.
qemu-img create -q -f qcow2 -o data_file=dfr.data,data_file_raw=on dfr.qcow2 16M
qemu-io -c 'write -P 12 0 1M' dfr.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o data_file=df.data df.qcow2 16M
qemu-io -c 'write -P 13 1M 1M' -c 'write -P 14 128k 64k' df.qcow2 >/dev/null
# extended L2 (subclusters of 1 KiB), version 2, small clusters, 8-bit refcounts.
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32k ext.qcow2 8M
qemu-io -c 'write -P 15 0 5k' -c 'write -P 16 100k 1k' ext.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 8M
qemu-io -c 'write -P 17 1M 64k' v2.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=8 small.qcow2 8M
qemu-io -c 'write -P 18 0 100k' small.qcow2 >/dev/null
# flagged corrupt (incompatible feature bit 1).
cp plain.qcow2 flagged.qcow2
printf '\x02' | dd of=flagged.qcow2 bs=1 seek=79 conv=notrunc status=none

# The fields both tools fill the same way (qemu-img adds some of its own,
# qcow2fs-img a few more; those are not compared).
INFO_FIELDS='{filename, format, "virtual-size", "cluster-size", "dirty-flag",
  "backing-filename", "full-backing-filename", "backing-filename-format",
  "format-specific",
  snapshots: (.snapshots // [] | map({id, name, "vm-state-size", "date-sec",
    "date-nsec", "vm-clock-sec", "vm-clock-nsec"}))}'

# same_json WHAT FILTER OURS_FILE QEMU_FILE
same_json() {
  local what=$1 filter=$2
  if ! diff <(jq -S "$filter" "$3") <(jq -S "$filter" "$4") >"$T/diff"; then
    cat "$T/diff" >&2
    fail "$what: qcow2fs-img and qemu-img disagree (< ours, > qemu-img's)"
  fi
}

step "info --output=json against qemu-img info"
for img in plain top mid zstd snap dfr df ext v2 small flagged; do
  "$IMG" info --output=json "$img.qcow2" >ours.json
  qemu-img info --output=json "$img.qcow2" >qemu.json
  same_json "info $img" "$INFO_FIELDS" ours.json qemu.json
  # Host space: the same st_blocks, except where the data file counts too.
  if [[ $img != df && $img != dfr ]]; then
    same_json "info $img actual-size" '."actual-size"' ours.json qemu.json
  fi
  "$IMG" info "$img.qcow2" >ours.txt
  grep -qx "image: $img.qcow2" ours.txt || fail "info $img: no image line"
  grep -qx "virtual size: .* ($(jq '."virtual-size"' qemu.json) bytes)" ours.txt ||
    fail "info $img: wrong virtual size line: $(grep virtual ours.txt)"
done
jq -e '.warnings | length > 0' <("$IMG" info --output=json flagged.qcow2) >/dev/null ||
  fail "info of an image flagged corrupt shows no warning"
# Through an absolute path, the backing file names resolve the same way.
"$IMG" info --output=json "$T/top.qcow2" >ours.json
qemu-img info --output=json "$T/top.qcow2" >qemu.json
same_json "info (absolute path)" "$INFO_FIELDS" ours.json qemu.json

step "info --backing-chain"
"$IMG" info --output=json --backing-chain top.qcow2 >ours.json
qemu-img info --output=json --backing-chain top.qcow2 >qemu.json
same_json "info --backing-chain" "map($INFO_FIELDS + {\"actual-size\"})" ours.json qemu.json
[[ $(jq length ours.json) == 3 ]] || fail "the chain has 3 images"
"$IMG" info --backing-chain top.qcow2 >ours.txt
[[ $(grep -c '^image: ' ours.txt) == 3 ]] || fail "human --backing-chain shows $(grep -c '^image: ' ours.txt) images"
grep -qx 'backing file: mid.qcow2' ours.txt || fail "no backing file line"
grep -qx 'file format: raw' ours.txt || fail "the raw base is not shown"

step "map --output=json against qemu-img map"
# qemu-img 7.2 has no "compressed" key (later versions do): not compared.
for img in plain top mid zstd snap dfr df v2 small; do
  "$IMG" map --output=json "$img.qcow2" >ours.json
  qemu-img map --output=json "$img.qcow2" >qemu.json
  same_json "map $img" 'map(del(.compressed))' ours.json qemu.json
done
# qemu-img gives the unallocated subclusters of an allocated cluster the
# cluster's host offset (which holds nothing); the core's block status has
# none for ranges that are not data. Compared without offsets on ranges
# that are not data, neighbours that then agree merged.
MERGED='map(del(.compressed) | if .data then . else del(.offset) end)
  | reduce .[] as $e ([];
      if length > 0 and (.[-1] | del(.start, .length, .offset)) == ($e | del(.start, .length, .offset))
         and ((.[-1].offset == null and $e.offset == null)
              or (.[-1].offset != null and $e.offset != null and .[-1].offset + .[-1].length == $e.offset))
      then .[-1].length += $e.length else . + [$e] end)'
"$IMG" map --output=json ext.qcow2 >ours.json
qemu-img map --output=json ext.qcow2 >qemu.json
same_json "map ext" "$MERGED" ours.json qemu.json
# Data from every depth of the chain, and compressed data flagged.
"$IMG" map --output=json top.qcow2 >ours.json
[[ $(jq -c '[.[] | select(.data) | .depth] | unique' ours.json) == "[0,1,2]" ]] ||
  fail "map of the chain does not show data at depths 0, 1 and 2"
jq -e 'any(.[]; .compressed and .data and (has("offset") | not))' ours.json >/dev/null ||
  fail "map does not flag the compressed cluster"
# Text output: the ranges holding data, qemu-img's lines where qemu-img has
# them (it refuses images with compressed clusters).
for img in mid snap df ext; do
  "$IMG" map "$img.qcow2" >ours.txt
  qemu-img map "$img.qcow2" >qemu.txt
  diff ours.txt qemu.txt >&2 || fail "map $img (text) differs from qemu-img's"
done

step "convert against qemu-img convert -O raw"
blocks() { stat -c %b "$1"; }
for img in plain top zstd snap dfr df ext v2 small; do
  "$IMG" convert "$img.qcow2" ours.raw
  qemu-img convert -O raw "$img.qcow2" qemu.raw
  cmp ours.raw qemu.raw || fail "convert $img: the raw files differ"
  # (a few blocks of slack: the host file system's own extent metadata)
  (($(blocks ours.raw) <= $(blocks qemu.raw) + 128)) ||
    fail "convert $img: $(blocks ours.raw) blocks, qemu-img's file $(blocks qemu.raw)"
done
"$IMG" dump plain.qcow2 ours.raw
# 64 MiB disk with a little over 3 MiB of non-zero data: a sparse file.
(($(du -k ours.raw | cut -f1) < 4096)) || fail "dump output is not sparse: $(du -k ours.raw)"
[[ $(stat -c %s ours.raw) == $((64 << 20)) ]] || fail "dump output has the wrong size"
# An existing, larger output is replaced, not overwritten in place.
head -c $((70 << 20)) /dev/urandom >ours.raw
"$IMG" convert -p top.qcow2 ours.raw 2>"$T/err"
[[ ! -s $T/err ]] || fail "convert -p drew on a stderr that is not a terminal"
qemu-img convert -O raw top.qcow2 qemu.raw
cmp ours.raw qemu.raw || fail "convert over an existing file differs"
for s in first 2; do
  "$IMG" convert -l "$s" snap.qcow2 ours.raw
  qemu-img convert -l "$s" -O raw snap.qcow2 qemu.raw
  cmp ours.raw qemu.raw || fail "convert -l $s differs"
done
run "$IMG" convert -l nosuch snap.qcow2 ours.raw
[[ $rc == 1 ]] || fail "convert -l of a missing snapshot exited $rc"
run "$IMG" convert plain.qcow2 plain.qcow2
[[ $rc == 1 ]] || fail "convert onto the image itself exited $rc"
qemu-img check -q plain.qcow2 || fail "convert onto itself damaged the image"

step "snapshot list"
"$IMG" snapshot list --output=json snap.qcow2 >ours.json
qemu-img info --output=json snap.qcow2 | jq .snapshots >qemu.json
same_json "snapshot list" 'map({id, name, "vm-state-size", "date-sec", "date-nsec",
  "vm-clock-sec", "vm-clock-nsec"})' ours.json qemu.json
"$IMG" snapshot list snap.qcow2 >ours.txt
qemu-img snapshot -l snap.qcow2 >qemu.txt
# The same columns, without qemu-img's ICOUNT.
diff ours.txt <(sed -E 's/ +[0-9]*$//; s/ +ICOUNT$//' qemu.txt) >&2 ||
  fail "snapshot list (text) differs from qemu-img snapshot -l"
[[ -z $("$IMG" snapshot list plain.qcow2) ]] || fail "snapshot list of an image without any"
[[ $("$IMG" snapshot list --output=json plain.qcow2) == "[]" ]] || fail "empty JSON list"

# ------------------------------------------------------------ check
# check_case NAME EXPECTED_STATUS: compares the JSON with qemu-img's and the
# exit statuses of both tools in both output modes.
check_case() {
  local img=$1 want=$2 qrc=0
  run "$IMG" check --output=json "$img"
  [[ $rc == "$want" ]] || fail "check --output=json $img: exit $rc, expected $want: $(cat "$T/err")"
  cp "$T/out" ours.json
  qemu-img check --output=json "$img" >qemu.json 2>/dev/null || qrc=$?
  [[ $qrc == "$want" ]] || fail "qemu-img check $img exits $qrc, the test expects $want"
  same_json "check $img" . ours.json qemu.json
  run "$IMG" check "$img"
  [[ $rc == "$want" ]] || fail "check $img: exit $rc, expected $want"
}

step "check: clean images exit 0"
for img in plain top snap df ext v2 small zstd; do
  check_case "$img.qcow2" 0
  grep -qx 'No errors were found on the image.' "$T/out" || fail "check $img: $(cat "$T/out")"
done
grep -Eqx '[0-9]+/[0-9]+ = [0-9.]+% allocated, [0-9.]+% fragmented, [0-9.]+% compressed clusters' \
  "$T/out" || fail "no allocation line: $(cat "$T/out")"
grep -Eqx 'Image end offset: [0-9]+' "$T/out" || fail "no image end offset line"

# Offsets in a fresh 64 KiB-cluster image: header, refcount table, one
# refcount block, L1 table; the first L2 table is named by L1[0].
be64() { od -An -tu8 --endian=big -j "$2" -N8 "$1" | tr -d ' '; }
qemu-img create -q -f qcow2 base-c.qcow2 64M
qemu-io -c 'write -P 7 0 3M' base-c.qcow2 >/dev/null
refblock=$(( $(be64 base-c.qcow2 $(( $(be64 base-c.qcow2 48) ))) ))
l2=$(( $(be64 base-c.qcow2 $(( $(be64 base-c.qcow2 40) ))) & 0x00fffffffffffe00 ))

step "check: a leaked cluster exits 3, -r leaks repairs it"
cp base-c.qcow2 leak.qcow2
# Guest cluster 0 unmapped: its host cluster is still counted, nobody uses it.
printf '\0\0\0\0\0\0\0\0' | dd of=leak.qcow2 bs=1 seek=$l2 conv=notrunc status=none
check_case leak.qcow2 3
grep -qx '1 leaked clusters were found on the image.' "$T/out" || fail "leak summary: $(cat "$T/out")"
grep -q 'This means waste of disk space, but no harm to data.' "$T/out" || fail "no leak advice"
grep -q '^Leaked cluster' "$T/err" || fail "no 'Leaked cluster' line on stderr: $(cat "$T/err")"
run "$IMG" check -r leaks leak.qcow2
[[ $rc == 0 ]] || fail "check -r leaks: exit $rc: $(cat "$T/out" "$T/err")"
grep -q 'Double checking the fixed image now' "$T/out" || fail "no double check after a repair"
qemu-img check -q leak.qcow2 || fail "qemu-img check finds the repaired image unclean"

step "check: a corruption exits 2, -r all repairs it"
cp base-c.qcow2 bad.qcow2
# The refcount of cluster 5, the first data cluster, set to 0.
printf '\0\0' | dd of=bad.qcow2 bs=1 seek=$((refblock + 2 * 5)) conv=notrunc status=none
check_case bad.qcow2 2
grep -q 'errors were found on the image.' "$T/out" || fail "corruption summary: $(cat "$T/out")"
grep -q '^ERROR' "$T/err" || fail "no ERROR line on stderr"
run "$IMG" check -r all --output=json bad.qcow2
[[ $rc == 0 ]] || fail "check -r all: exit $rc: $(cat "$T/out" "$T/err")"
jq -e '."corruptions-fixed" > 0 and (has("corruptions") | not)' "$T/out" >/dev/null ||
  fail "check -r all JSON: $(cat "$T/out")"
qemu-img check -q bad.qcow2 || fail "qemu-img check finds the repaired image unclean"

step "check: an image left dirty by a crash with lazy refcounts exits 2"
qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 16M
(qemu-io -c 'write -P 7 0 1M' -c 'sigraise 9' dirty.qcow2 >/dev/null 2>&1) 2>/dev/null || true
[[ $(qemu-img info --output=json dirty.qcow2 | jq '."dirty-flag"') == true ]] ||
  fail "qemu-io did not leave the image dirty"
"$IMG" info --output=json dirty.qcow2 | jq -e '."dirty-flag"' >/dev/null || fail "info: not dirty"
"$IMG" info dirty.qcow2 | grep -qx 'cleanly shut down: no' || fail "info: no 'cleanly shut down: no'"
check_case dirty.qcow2 2

step "check: raw has nothing to check (63)"
run "$IMG" check base.raw
[[ $rc == 63 ]] || fail "check of a raw image: exit $rc"

# ------------------------------------------------------------ -U
step "-U reads an image a writer holds"
cp plain.qcow2 held.qcow2
mkfifo cmds
qemu-io held.qcow2 <cmds >/dev/null 2>&1 &
HOLDER=$!
exec 3>cmds
# Until qemu-io holds the image, qemu-img can open it read-only. (The
# limit only guards against a hang: a loaded machine may take seconds to
# start qemu-io.)
for _ in $(seq 1200); do
  qemu-img info held.qcow2 >/dev/null 2>&1 || break
  kill -0 "$HOLDER" 2>/dev/null || fail "qemu-io exited before it held the image"
  sleep 0.1
done
qemu-img info held.qcow2 >/dev/null 2>&1 && fail "qemu-io did not lock the image"
for cmd in "info" "map" "check" "snapshot list"; do
  # shellcheck disable=SC2086
  run "$IMG" $cmd held.qcow2
  [[ $rc == 1 ]] || fail "$cmd of a held image without -U: exit $rc"
  # shellcheck disable=SC2086
  run "$IMG" $cmd -U held.qcow2
  [[ $rc == 0 ]] || fail "$cmd -U of a held image: exit $rc: $(cat "$T/err")"
done
"$IMG" convert --force-share held.qcow2 ours.raw
qemu-img convert -U -O raw held.qcow2 qemu.raw
cmp ours.raw qemu.raw || fail "convert -U differs"
echo quit >&3
exec 3>&-
wait "$HOLDER" || true
HOLDER=

# ------------------------------------------------------------ snapshots
step "snapshot create, apply, delete"
qemu-img create -q -f qcow2 s.qcow2 8M
qemu-io -c 'write -P 21 0 1M' s.qcow2 >/dev/null
qemu-img convert -O raw s.qcow2 before.raw
run "$IMG" snapshot create s.qcow2 before
[[ $rc == 0 ]] || fail "snapshot create: exit $rc: $(cat "$T/err")"
[[ $(qemu-img snapshot -l s.qcow2 | awk 'NR > 2 { print $2 }') == before ]] ||
  fail "qemu-img does not list the snapshot: $(qemu-img snapshot -l s.qcow2)"
qemu-img check -q s.qcow2 || fail "qemu-img check after snapshot create"
qemu-io -c 'write -P 22 512k 1M' s.qcow2 >/dev/null
qemu-img convert -l before -O raw s.qcow2 ours.raw
cmp ours.raw before.raw || fail "the snapshot does not hold the disk as it was"
run "$IMG" snapshot create s.qcow2 ""
[[ $rc == 1 ]] || fail "snapshot create with an empty name: exit $rc"
run "$IMG" snapshot apply s.qcow2 before
[[ $rc == 0 ]] || fail "snapshot apply: exit $rc: $(cat "$T/err")"
qemu-img convert -O raw s.qcow2 ours.raw
cmp ours.raw before.raw || fail "after apply, the disk is not the snapshot's"
qemu-img check -q s.qcow2 || fail "qemu-img check after snapshot apply"
run "$IMG" snapshot delete s.qcow2 before
[[ $rc == 0 ]] || fail "snapshot delete: exit $rc: $(cat "$T/err")"
[[ -z $(qemu-img snapshot -l s.qcow2) ]] || fail "the snapshot is still listed"
qemu-img check -q s.qcow2 || fail "qemu-img check after snapshot delete"
run "$IMG" snapshot delete s.qcow2 before
[[ $rc == 1 ]] || fail "deleting a missing snapshot: exit $rc"

echo "PASS"
