#!/usr/bin/env bash
# Tests the bash completion of mount.qcow2fs and qcow2fs-img: sources
# bash-completion and the two completion files, then asks the completion
# functions what they offer for command lines, with COMP_WORDS, COMP_CWORD,
# COMP_LINE and COMP_POINT set as bash sets them (the line split at blanks
# and at COMP_WORDBREAKS characters), and compares the replies.
#
# It also reads both programs' --help and fails if the completion misses a
# flag, an -o key (or one of its values), a command or a command's option
# they list, so the two cannot drift apart.
#
#   tests/completion/completion_test.sh [--completions DIR] [--daemon PATH]
#                                       [--img PATH]
#
# Defaults: the source tree's tools/completion/ and the release build's
# programs (build/fuse/mount.qcow2fs, build/tools/qcow2fs-img); the
# package stage of tools/test.sh passes the installed ones.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COMPLETIONS=$ROOT/tools/completion
DAEMON=$ROOT/build/fuse/mount.qcow2fs
IMG=$ROOT/build/tools/qcow2fs-img
BASH_COMPLETION=${BASH_COMPLETION:-/usr/share/bash-completion/bash_completion}

while [[ $# -gt 0 ]]; do
  case $1 in
    --completions) COMPLETIONS=$2; shift 2 ;;
    --daemon) DAEMON=$2; shift 2 ;;
    --img) IMG=$2; shift 2 ;;
    *) echo "usage: $0 [--completions DIR] [--daemon PATH] [--img PATH]" >&2; exit 2 ;;
  esac
done

# The test changes directory: make the paths absolute.
COMPLETIONS=$(realpath -m "$COMPLETIONS")
DAEMON=$(realpath -m "$DAEMON")
IMG=$(realpath -m "$IMG")
for f in "$BASH_COMPLETION" "$COMPLETIONS/mount.qcow2fs" "$COMPLETIONS/qcow2fs-img"; do
  [[ -f $f ]] || { echo "FAIL: $f is missing"; exit 1; }
done
for f in "$DAEMON" "$IMG"; do
  [[ -x $f ]] || { echo "FAIL: $f is missing or not executable"; exit 1; }
done
command -v qemu-img >/dev/null || { echo "FAIL: qemu-img not found"; exit 1; }

WORK=$(mktemp -d /tmp/qcow2fs-completion.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# The completion runs qcow2fs-img by its name (for snapshot names): the one
# under test comes first in PATH.
mkdir "$WORK/bin"
ln -s "$IMG" "$WORK/bin/qcow2fs-img"
export PATH="$WORK/bin:$PATH"

failures=0
checks=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# bash-completion and the files under test. bash-completion expects an
# interactive shell's settings; it runs with errexit and nounset off, as it
# does in one.
set +eu
# shellcheck disable=SC1090
source "$BASH_COMPLETION"
# shellcheck disable=SC1090
source "$COMPLETIONS/mount.qcow2fs"
# shellcheck disable=SC1090
source "$COMPLETIONS/qcow2fs-img"

# split_line LINE: COMP_WORDS and COMP_CWORD as bash sets them for the cursor
# at the end of LINE: words end at blanks, and a run of word-break
# characters (COMP_WORDBREAKS without the blanks: = : and the like) is a
# word of its own.
split_line() {
  local line=$1 i c kind="" word=""
  COMP_WORDS=()
  for ((i = 0; i < ${#line}; i++)); do
    c=${line:i:1}
    if [[ $c == [[:blank:]] ]]; then
      [[ -n $kind ]] && COMP_WORDS+=("$word")
      kind="" word=""
    elif [[ $COMP_WORDBREAKS == *"$c"* ]]; then
      [[ $kind == plain ]] && { COMP_WORDS+=("$word"); word=""; }
      kind=break word+=$c
    else
      [[ $kind == break ]] && { COMP_WORDS+=("$word"); word=""; }
      kind=plain word+=$c
    fi
  done
  COMP_WORDS+=("$word")  # the word at the cursor ("" after a blank)
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
}

# complete_line LINE: runs the completion function bound to LINE's command
# and leaves its replies, sorted, one per line, in REPLIES.
complete_line() {
  local line=$1 func spec
  split_line "$line"
  COMP_LINE=$line
  COMP_POINT=${#line}
  COMP_TYPE=9
  COMP_KEY=9
  spec=$(complete -p "${COMP_WORDS[0]}" 2>/dev/null) || {
    REPLIES=""
    fail "no completion bound to ${COMP_WORDS[0]}"
    return
  }
  func=$(sed -n 's/.* -F \([^ ]*\) .*/\1/p' <<<"$spec")
  COMPREPLY=()
  local prevword=""
  [[ $COMP_CWORD -gt 0 ]] && prevword=${COMP_WORDS[COMP_CWORD - 1]}
  "$func" "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" "$prevword" 2>/dev/null
  REPLIES=$(printf '%s\n' "${COMPREPLY[@]}" | sed '/^$/d' | LC_ALL=C sort -u)
}

# expect LINE WORD...: the replies are exactly these words.
expect() {
  local line=$1 want
  shift
  checks=$((checks + 1))
  complete_line "$line"
  want=$(printf '%s\n' "$@" | sed '/^$/d' | LC_ALL=C sort -u)
  if [[ $REPLIES != "$want" ]]; then
    fail "'$line<TAB>' offers [$(echo $REPLIES)], expected [$(echo $want)]"
  fi
}

# expect_some LINE WORD...: the replies include these words.
expect_some() {
  local line=$1 w missing=()
  shift
  checks=$((checks + 1))
  complete_line "$line"
  for w in "$@"; do
    grep -qxF -- "$w" <<<"$REPLIES" || missing+=("$w")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    fail "'$line<TAB>' does not offer [${missing[*]}] (offers [$(echo $REPLIES)])"
  fi
}

# expect_none LINE WORD...: the replies include none of these words.
expect_none() {
  local line=$1 w
  shift
  checks=$((checks + 1))
  complete_line "$line"
  for w in "$@"; do
    grep -qxF -- "$w" <<<"$REPLIES" && fail "'$line<TAB>' offers '$w'"
  done
}

# A directory to complete file names in: images, other files, directories.
mkdir -p "$WORK/files/mnt" "$WORK/files/images.d" "$WORK/other/sub"
cd "$WORK/files"
qemu-img create -q -f qcow2 vm.qcow2 64M
qemu-img snapshot -c before-upgrade vm.qcow2
qemu-img snapshot -c clean vm.qcow2
: >notes.txt
: >disk.img
: >"$WORK/other/disk.img"

# ------------------------------------------------------------ mount.qcow2fs

expect_some "mount.qcow2fs -" -f -d -o -s -h --help -V --version
expect "mount.qcow2fs --h" --help
expect "mount.qcow2fs -t " fuse.qcow2fs
expect_some "mount.qcow2fs -o " ro rw create cache-size= log= snapshot= compress=
# The key after the last comma, the words before it kept.
expect "mount.qcow2fs -o ro,cache" ro,cache-size=
expect "mount.qcow2fs -o ro,compress" ro,compress= ro,compress-cache-size= ro,compression_type=
expect "mount.qcow2fs -oro,write" -oro,write-behind=
# After a '=' in the word, readline replaces only what follows it.
expect "mount.qcow2fs -o create,size=20G,cluster" 20G,cluster_size=
expect "mount.qcow2fs -o ro,allow" ro,allow_other
# Values: readline replaces only what follows the last '=', so the replies
# are just the values.
expect "mount.qcow2fs -o compress=" zlib zstd
expect "mount.qcow2fs -o ro,discard=o" on off
expect "mount.qcow2fs -o ro,discard=of" off
expect "mount.qcow2fs -o host_cache=" on off
expect "mount.qcow2fs -o create,size=1G,backing_fmt=" qcow2 raw
expect "mount.qcow2fs -oro,lock=" on off
expect "mount.qcow2fs -o cache-size=" # free-form: nothing to offer
# snapshot=: the snapshots of the image, when it is given before.
expect "mount.qcow2fs vm.qcow2 mnt -o ro,snapshot=" before-upgrade clean
expect "mount.qcow2fs vm.qcow2 -o snapshot=b" before-upgrade
expect "mount.qcow2fs -o snapshot="
expect "mount.qcow2fs -o log=no" notes.txt
expect "mount.qcow2fs -o ro,log=$WORK/other/d" "$WORK/other/disk.img"
# Operands: the image (qcow2 files and directories, any file where there is
# no qcow2 file), then the mount point (directories), then nothing.
expect "mount.qcow2fs " vm.qcow2 mnt images.d
expect "mount.qcow2fs -o ro -f " vm.qcow2 mnt images.d
expect "mount.qcow2fs $WORK/other/" "$WORK/other/disk.img" "$WORK/other/sub"
expect "mount.qcow2fs vm.qcow2 " mnt images.d
expect "mount.qcow2fs -o ro vm.qcow2 m" mnt
expect "mount.qcow2fs vm.qcow2 -o ro " mnt images.d
expect "mount.qcow2fs vm.qcow2 mnt "
expect "mount.qcow2fs -- -o " mnt images.d
# The other names it is run by.
expect "qcow2fs -o ro,cache" ro,cache-size=
expect "mount.fuse.qcow2fs vm.qcow2 " mnt images.d

# Drift: every flag and -o key the daemon's --help lists, and every value
# it lists for a key, is offered.
help=$("$DAEMON" --help) || fail "$DAEMON --help failed"
flags=$(sed -n 's/^  \(-[a-zA-Z]\)\( .*\)\?$/\1/p' <<<"$help")
[[ $(wc -w <<<"$flags") -ge 3 ]] || fail "found only [$flags] as flags in --help"
# shellcheck disable=SC2086
expect_some "mount.qcow2fs -" $flags
# The -o block: from the -o line to the blank line; an entry starts 5 to 8
# columns in and ends at two blanks; "(...)" holds examples of mount options.
entries=$(awk '/^  -o /{ on = 1; next } on && /^$/ { exit }
  on { match($0, /^ */) } on && RLENGTH >= 5 && RLENGTH <= 8 {
    sub(/^ +/, ""); sub(/  .*/, ""); print }' <<<"$help")
keys=()
while IFS= read -r entry; do
  if [[ $entry == *"("* ]]; then
    entry=${entry#*\(}
    entry=${entry%\)*}
  fi
  entry=${entry//[\[\],]/ }
  for token in $entry; do
    case $token in
      [a-z]*=*)
        key=${token%%=*}
        keys+=("$key=")
        values=${token#*=}
        if [[ $values == *"|"* && $values =~ ^[a-z0-9|]+$ ]]; then
          # shellcheck disable=SC2086
          expect "mount.qcow2fs -o $key=" ${values//|/ }
        fi
        ;;
      [a-z]*) keys+=("$token") ;;
    esac
  done
done <<<"$entries"
[[ ${#keys[@]} -ge 20 ]] || fail "found only ${#keys[@]} -o keys in --help: ${keys[*]}"
expect_some "mount.qcow2fs -o " "${keys[@]}"
echo "mount.qcow2fs --help lists ${#keys[@]} -o keys and flags [$(echo $flags)]: checked"

# -------------------------------------------------------------- qcow2fs-img

expect "qcow2fs-img " info map convert dump check snapshot
expect "qcow2fs-img c" convert check
expect "qcow2fs-img -" -h --help --version
expect "qcow2fs-img info -" --output= --backing-chain -U --force-share -h --help
expect "qcow2fs-img map --" --output= --force-share --help
expect "qcow2fs-img convert -" -p -U --force-share -l -h --help
expect "qcow2fs-img dump -" -p -U --force-share -l -h --help
expect "qcow2fs-img check -" --output= -r -U --force-share -h --help
expect "qcow2fs-img info --output=" human json
expect "qcow2fs-img check --output=j" json
expect "qcow2fs-img map --output " human json
expect "qcow2fs-img check -r " leaks all
expect "qcow2fs-img check -r leaks " vm.qcow2 mnt images.d
expect "qcow2fs-img info " vm.qcow2 mnt images.d
expect "qcow2fs-img info -U --output=json " vm.qcow2 mnt images.d
expect "qcow2fs-img info vm.qcow2 "
expect "qcow2fs-img convert -p " vm.qcow2 mnt images.d
expect "qcow2fs-img convert vm.qcow2 " disk.img images.d mnt notes.txt vm.qcow2
expect "qcow2fs-img convert -l clean vm.qcow2 n" notes.txt
expect "qcow2fs-img convert vm.qcow2 -l " before-upgrade clean
expect "qcow2fs-img convert vm.qcow2 out.raw "
expect "qcow2fs-img snapshot " list create delete apply
expect "qcow2fs-img snapshot list " vm.qcow2 mnt images.d
expect "qcow2fs-img snapshot -U list --output=json " vm.qcow2 mnt images.d
expect "qcow2fs-img snapshot delete vm.qcow2 " before-upgrade clean
expect "qcow2fs-img snapshot apply vm.qcow2 c" clean
expect "qcow2fs-img snapshot create vm.qcow2 "
expect "qcow2fs-img snapshot list vm.qcow2 "

# Drift: every command (and alias) qcow2fs-img --help lists, every snapshot
# action, and every option (and listed value) of each command's usage line.
help=$("$IMG" --help) || fail "$IMG --help failed"
commands=$(awk '/^Commands:/ { on = 1; next } on && /^[^ ]/ { exit }
  on && /^  [a-z]/ { print $1 } on && /\(alias: / { sub(/.*\(alias: /, ""); sub(/\).*/, ""); print }' <<<"$help" |
  sort -u)
[[ $(wc -w <<<"$commands") -ge 6 ]] || fail "found only [$(echo $commands)] as commands in qcow2fs-img --help"
# shellcheck disable=SC2086
expect_some "qcow2fs-img " $commands
actions=$(sed -n 's/^  snapshot \([a-z|]*\) .*/\1/p' <<<"$help" | tr '|' '\n' | sort -u)
[[ $(wc -w <<<"$actions") -ge 4 ]] || fail "found only [$(echo $actions)] as snapshot actions"
# shellcheck disable=SC2086
expect_some "qcow2fs-img snapshot " $actions
for command in $commands; do
  usage=$("$IMG" "$command" --help | grep '^Usage:') || { fail "qcow2fs-img $command --help has no Usage: line"; continue; }
  options=()
  for token in $(tr '[]' '  ' <<<"$usage"); do
    case $token in
      --*=*)
        options+=("${token%%=*}=")
        # shellcheck disable=SC2086
        expect "qcow2fs-img $command ${token%%=*}=" $(tr '|' ' ' <<<"${token#*=}")
        ;;
      -*) options+=("$token") ;;
    esac
  done
  [[ ${#options[@]} -ge 1 ]] || fail "no options in: $usage"
  expect_some "qcow2fs-img $command -" "${options[@]}"
done
# Values given as a separate word in the usage ("-r leaks|all").
while read -r command option values; do
  # shellcheck disable=SC2086
  expect "qcow2fs-img $command $option " ${values//|/ }
done < <(for command in $commands; do
  "$IMG" "$command" --help | grep '^Usage:' |
    grep -o '\[-[a-zA-Z] [a-z]*|[a-z|]*\]' | tr -d '[]' | sed "s/^/$command /"
done)
echo "qcow2fs-img --help lists commands [$(echo $commands)]: checked, with their options"

echo "$checks checks, $failures failed"
[[ $failures -eq 0 ]]
