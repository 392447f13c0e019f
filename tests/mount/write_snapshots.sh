#!/usr/bin/env bash
# Snapshots in the mount: .snapshots/NAME/vm.raw shows each internal
# snapshot's disk (read-only, its own size, holes, date), mkdir takes one of
# the live disk with every acknowledged write in it, rmdir drops one (EBUSY
# while open), and qemu-img agrees afterwards: `check` clean, `snapshot -l`
# lists what was taken, `convert -l snapshot.name=` equals what the mount
# showed. Then fio --verify on the live disk while snapshots are taken and
# dropped, and 50 snapshots on one image.
source "$(dirname "$0")/lib.sh"
init "$@"
need fio python3 stat dd

MIB=$((1 << 20))
cd "$T"
mkdir mnt
img=$T/vm.qcow2
snaps=$T/mnt/.snapshots

# expect_errno ERRNO_TEXT COMMAND...: the command fails with that message.
expect_errno() {
  local want=$1 out
  shift
  if out=$("$@" 2>&1); then fail "$* succeeded, expected '$want'"; fi
  [[ $out == *"$want"* ]] || fail "$* said '$out', expected '$want'"
}

# snapshot_raw NAME|id=ID FILE [SIZE]: the snapshot's disk as QEMU reads
# it. QEMU reads a snapshot at the live disk's size; SIZE, the snapshot's
# own (smaller) size, cuts off the rest, which must read as zeros.
snapshot_raw() {
  local which=snapshot.name=$1
  [[ $1 == id=* ]] && which=snapshot.$1
  qemu-img convert -l "$which" -O raw "$img" "$2" || fail "qemu-img convert -l $which failed"
  if [[ -n ${3:-} ]]; then
    cmp -s <(tail -c +$(($3 + 1)) "$2") <(head -c $(($(stat -c %s "$2") - $3)) /dev/zero) ||
      fail "qemu-img convert -l snapshot.name=$1 shows data past the snapshot's size"
    truncate -s "$3" "$2"
  fi
}

# pattern_block BYTE: 64 KiB of that byte (given as two hex digits).
pattern_block() {
  head -c 65536 /dev/zero | tr '\0' "\\$(printf '%03o' "0x$1")"
}

# --- An image with snapshots taken by QEMU -------------------------------
step "image with QEMU snapshots: 'base' (64 MiB) and 'a/b' (shown by ID)"
qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 64M
qemu-io -f qcow2 -c "write -P 0x11 0 4M" -c "write -P 0x22 8M 1M" "$img" >/dev/null
qemu-img snapshot -c base "$img"
qemu-io -f qcow2 -c "write -P 0x33 1M 2M" "$img" >/dev/null
qemu-img snapshot -c "a/b" "$img"
qemu-img resize -q "$img" 96M
qemu-io -f qcow2 -c "write -P 0x44 80M 1M" "$img" >/dev/null
snapshot_raw base "$T/base.raw" $((64 * MIB))
snapshot_raw id=2 "$T/ab.raw" $((64 * MIB))
base_date=$(qemu-img info --output=json "$img" |
  python3 -c 'import json,sys; print([s["date-sec"] for s in json.load(sys.stdin)["snapshots"] if s["name"] == "base"][0])')

# A long write-behind queue, so that the writes mkdir must drain are many.
qmount -o write-behind=64M "$img" "$T/mnt"
ls -a "$T/mnt" | grep -qx .snapshots || fail "ls -a does not show .snapshots"
ls "$T/mnt" | grep -q snapshots && fail "ls (without -a) shows .snapshots"
[[ $(ls "$snaps" | tr '\n' ' ') == "2 base " ]] ||
  fail ".snapshots lists '$(ls "$snaps" | tr '\n' ' ')', expected '2 base '"

step "snapshot files: content, size, mode, holes, blocks, date"
cmp "$snaps/base/vm.raw" "$T/base.raw" || fail "base differs from qemu-img convert -l"
cmp "$snaps/2/vm.raw" "$T/ab.raw" || fail "snapshot 2 (a/b) differs from qemu-img convert -l"
[[ $(stat -c %s "$snaps/base/vm.raw") == $((64 * MIB)) ]] || fail "base is not 64 MiB"
[[ $(stat -c %s "$T/mnt/vm.raw") == $((96 * MIB)) ]] || fail "the live disk is not 96 MiB"
[[ $(stat -c %a "$snaps/base/vm.raw") == 444 ]] ||
  fail "base's file has mode $(stat -c %a "$snaps/base/vm.raw"), expected 444"
[[ $(stat -c %Y "$snaps/base") == "$base_date" ]] ||
  fail "base's directory mtime $(stat -c %Y "$snaps/base") is not the snapshot date $base_date"
# Data clusters of base: 4 MiB at 0 and 1 MiB at 8 MiB.
[[ $(stat -c %b "$snaps/base/vm.raw") == $((5 * MIB / 512)) ]] ||
  fail "base has $(stat -c %b "$snaps/base/vm.raw") blocks, expected $((5 * MIB / 512))"
[[ $(seek_extents "$snaps/base/vm.raw") == "0 $((4 * MIB))"$'\n'"$((8 * MIB)) $((9 * MIB))" ]] ||
  fail "SEEK_DATA/SEEK_HOLE on base: $(seek_extents "$snaps/base/vm.raw" | tr '\n' ' ')"
[[ $(stat -c %i "$snaps/base") != $(stat -c %i "$snaps/2") &&
   $(stat -c %i "$snaps/base/vm.raw") != $(stat -c %i "$T/mnt/vm.raw") ]] ||
  fail "inode numbers collide"

step "snapshot files are read-only"
expect_errno "Read-only file system" dd if=/dev/zero of="$snaps/base/vm.raw" bs=4k count=1 conv=notrunc status=none
expect_errno "Read-only file system" truncate -s 1M "$snaps/base/vm.raw"

step "writes to the live disk leave the snapshots alone"
random_file "$T/w1" $((8 * MIB)) 11
dd if="$T/w1" of="$T/mnt/vm.raw" bs=1M oflag=direct conv=notrunc,fsync status=none
cmp "$snaps/base/vm.raw" "$T/base.raw" || fail "base changed when the live disk was written"
cmp "$snaps/2/vm.raw" "$T/ab.raw" || fail "snapshot 2 changed when the live disk was written"

step "mkdir takes a snapshot with every acknowledged write in it"
random_file "$T/w2" $((4 * MIB)) 12
dd if="$T/w2" of="$T/mnt/vm.raw" bs=1M seek=16 oflag=direct conv=notrunc,fsync status=none
cp "$T/mnt/vm.raw" "$T/new.expected"
# Acknowledged, not fsynced: the last 1 MiB writes may still wait in the
# write-behind queue when dd exits and mkdir comes (on a fast host the queue
# is usually empty by then, so this does not prove the drain every run).
random_file "$T/w3" $((32 * MIB)) 13
dd if="$T/w3" of="$T/mnt/vm.raw" bs=1M seek=24 oflag=direct conv=notrunc status=none
dd if="$T/w3" of="$T/new.expected" bs=1M seek=24 conv=notrunc status=none
mkdir "$snaps/new"
# Everything written from here on must not show.
random_file "$T/w4" $((64 * MIB)) 14
dd if="$T/w4" of="$T/mnt/vm.raw" bs=1M seek=8 oflag=direct conv=notrunc status=none
cmp "$snaps/new/vm.raw" "$T/new.expected" || fail "the new snapshot is not the disk at mkdir"
cp "$T/mnt/vm.raw" "$T/live.raw"
[[ $(ls "$snaps" | tr '\n' ' ') == "2 base new " ]] || fail "listing after mkdir: $(ls "$snaps")"

step "errors: EEXIST, EPERM, ENOENT, EBUSY"
expect_errno "File exists" mkdir "$snaps/new"
expect_errno "File exists" mkdir "$snaps/base"
expect_errno "File exists" mkdir "$snaps/1"            # base's ID
expect_errno "Operation not permitted" mkdir "$T/mnt/dir"
expect_errno "Operation not permitted" mkdir "$snaps/new/dir"
expect_errno "No such file or directory" rmdir "$snaps/nonesuch"
mkdir "$snaps/gone"
exec {held}<"$snaps/gone/vm.raw"
expect_errno "Device or resource busy" rmdir "$snaps/gone"
exec {held}<&-
# The kernel sends RELEASE after close(2) returns: give it a moment.
for i in $(seq 50); do rmdir "$snaps/gone" 2>/dev/null && break; sleep 0.1; done
[[ ! -e $snaps/gone ]] || fail "rmdir did not drop 'gone' after its file was closed"
ls "$snaps" | grep -qx gone && fail "'gone' is still listed"
qumount "$T/mnt" "$img"

step "read-only mount: snapshots readable, mkdir and rmdir refused"
qmount -o ro "$img" "$T/mnt"
cmp "$snaps/new/vm.raw" "$T/new.expected" || fail "'new' differs after remount"
expect_errno "Read-only file system" mkdir "$snaps/ro"
expect_errno "Read-only file system" rmdir "$snaps/new"
qumount "$T/mnt" "$img"

step "-o snapshot=base: no .snapshots"
qmount -o snapshot=base "$img" "$T/mnt"
ls -a "$T/mnt" | grep -q snapshots && fail ".snapshots shown in a snapshot mount"
cmp "$T/mnt/vm.raw" "$T/base.raw" || fail "-o snapshot=base differs"
qumount "$T/mnt" "$img"

step "qemu-img agrees"
check_image "$img"
qemu-img snapshot -l "$img" >"$T/list"
for name in base a/b new; do
  awk -v n="$name" '$2 == n { found = 1 } END { exit !found }' "$T/list" ||
    { cat "$T/list"; fail "qemu-img snapshot -l does not list $name"; }
done
grep -qw gone "$T/list" && fail "'gone' is still in the snapshot table"
snapshot_raw new "$T/new.qemu"
cmp "$T/new.qemu" "$T/new.expected" || fail "qemu-img convert -l snapshot.name=new differs"
snapshot_raw base "$T/base.qemu" $((64 * MIB))
cmp "$T/base.qemu" "$T/base.raw" || fail "base changed"
to_raw "$img" "$T/live.qemu"
cmp "$T/live.qemu" "$T/live.raw" || fail "the live disk differs"
qemu-img snapshot -d base "$img"   # QEMU can drop what we keep ...
qemu-img snapshot -a new "$img"    # ... and revert to what we took
check_image "$img"
to_raw "$img" "$T/applied.raw"
cmp "$T/applied.raw" "$T/new.expected" || fail "qemu-img snapshot -a new differs"

# --- fio --verify on the live disk while snapshots come and go -----------
step "fio --verify while snapshots are taken, read and dropped"
rm -f "$img" "$T"/*.raw "$T"/*.qemu "$T"/*.expected "$T"/w?
qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 64M
job=(--filename="$T/mnt/vm.raw" --rw=randwrite --bsrange=4k-256k --ioengine=libaio
     --direct=1 --iodepth=8 --size=$((48 * MIB)) --verify=crc32c --verify_fatal=1
     --verify_state_save=0 --group_reporting)
qmount "$img" "$T/mnt"
fio --name=pass1 "${job[@]}" --randseed=1 --do_verify=1 --output="$T/fio1.log" ||
  { cat "$T/fio1.log"; fail "fio pass 1 failed"; }
mkdir "$snaps/pass1"
# Pass 2 overwrites it all, slowly enough for about 15 s of snapshots.
fio --name=pass2 "${job[@]}" --randseed=2 --rate=3m --do_verify=1 --verify_backlog=64 \
  --output="$T/fio2.log" &
fio_pid=$!
i=0
while kill -0 "$fio_pid" 2>/dev/null; do
  i=$((i + 1))
  mkdir "$snaps/churn$i"
  head -c $((4 * MIB)) "$snaps/churn$i/vm.raw" >/dev/null
  if ((i > 2)); then rmdir "$snaps/churn$((i - 2))"; fi
  sleep 0.3
done
wait "$fio_pid" || { cat "$T/fio2.log"; fail "fio pass 2 (with snapshots taken meanwhile) failed"; }
((i >= 10)) || fail "only $i snapshots taken during fio"
echo "   $i snapshots taken and all but two dropped during fio"
# pass1 still holds pass 1's data, block for block as fio wrote it.
cp "$snaps/pass1/vm.raw" "$T/pass1.raw"
fio --name=pass1 "${job[@]}" --filename="$T/pass1.raw" --direct=0 --randseed=1 --verify_only \
  --output="$T/fio1v.log" || { cat "$T/fio1v.log"; fail "snapshot pass1 lost pass 1's data"; }
for n in $((i - 1)) $i; do cp "$snaps/churn$n/vm.raw" "$T/churn$n.raw"; done
cp "$T/mnt/vm.raw" "$T/live.raw"
qumount "$T/mnt" "$img"
check_image "$img"
[[ $(qemu-img snapshot -l "$img" | awk 'NR > 2' | wc -l) == 3 ]] ||
  { qemu-img snapshot -l "$img"; fail "expected 3 snapshots after the churn"; }
snapshot_raw pass1 "$T/pass1.qemu"
cmp "$T/pass1.qemu" "$T/pass1.raw" || fail "pass1 differs from qemu-img convert -l"
for n in $((i - 1)) $i; do
  snapshot_raw "churn$n" "$T/churn$n.qemu"
  cmp "$T/churn$n.qemu" "$T/churn$n.raw" || fail "churn$n differs from qemu-img convert -l"
done
to_raw "$img" "$T/live.qemu"
cmp "$T/live.qemu" "$T/live.raw" || fail "the live disk differs after the churn"

# --- 50 snapshots on one image --------------------------------------------
step "50 snapshots, each after writing its own block"
rm -f "$img" "$T"/*.raw "$T"/*.qemu
qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 16M
qmount "$img" "$T/mnt"
for i in $(seq 1 50); do
  pattern_block "$(printf %02x "$i")" |
    dd of="$T/mnt/vm.raw" bs=64k seek="$i" oflag=direct conv=notrunc status=none
  mkdir "$snaps/s$i"
done
[[ $(ls "$snaps" | wc -l) == 50 ]] || fail "$(ls "$snaps" | wc -l) snapshots listed, expected 50"
# s25 has blocks 1..25 and nothing after.
pattern_block 19 | cmp - <(dd if="$snaps/s25/vm.raw" bs=64k skip=25 count=1 status=none) ||
  fail "s25's block 25 is wrong"
head -c 65536 /dev/zero | cmp - <(dd if="$snaps/s25/vm.raw" bs=64k skip=26 count=1 status=none) ||
  fail "s25 shows block 26, written after it was taken"
for n in 1 25 50; do cp "$snaps/s$n/vm.raw" "$T/s$n.raw"; done
# Drop every other one.
for i in $(seq 2 2 50); do rmdir "$snaps/s$i"; done
[[ $(ls "$snaps" | wc -l) == 25 ]] || fail "$(ls "$snaps" | wc -l) snapshots left, expected 25"
qumount "$T/mnt" "$img"
check_image "$img"
[[ $(qemu-img snapshot -l "$img" | awk 'NR > 2' | wc -l) == 25 ]] ||
  fail "qemu-img lists $(qemu-img snapshot -l "$img" | awk 'NR > 2' | wc -l) snapshots, expected 25"
for n in 1 25; do
  snapshot_raw "s$n" "$T/s$n.qemu"
  cmp "$T/s$n.qemu" "$T/s$n.raw" || fail "s$n differs from qemu-img convert -l"
done
qemu-img snapshot -l "$img" | grep -qw s50 && fail "s50 was dropped but is listed"
echo "ok"
