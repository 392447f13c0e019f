#!/usr/bin/env bash
# Installs the Debian 12 packages qcow2fs needs to build and test, and
# every program the tests (tests/mount, tests/fuzz, tools/test.sh), the demo
# and the benchmarks (tools/bench) call, so that a minimal Debian root (no
# sudo, procps, python3...) runs them all.
# Idempotent: checks with dpkg-query first and only runs apt-get (with one
# apt-get update) when something is missing. Must run as root (or, if sudo
# is installed, as a user who may use it).
set -euo pipefail

PACKAGES=(
  # build
  meson ninja-build pkg-config g++ clang libclang-rt-14-dev
  # the format and tidy stages (the versions .clang-format and .clang-tidy
  # are checked with)
  clang-format-14 clang-tidy-14
  libfuse3-dev zlib1g-dev libzstd-dev libdeflate-dev libtbb-dev
  libgtest-dev libbenchmark-dev
  # run: fusermount3, mount.fuse3
  fuse3
  # tests and demo: qemu-img, qemu-io
  qemu-utils
  # mount, umount, losetup
  mount
  # findmnt, flock, fallocate, unshare, runuser, blockdev, fstrim, dmesg,
  # mountpoint
  util-linux
  # mkfs.ext4, fsck.ext4, debugfs, chattr
  e2fsprogs
  # pgrep
  procps
  # timeout, numfmt, sha256sum, truncate, stat, dd...; cmp, diff; find,
  # xargs; awk; grep; sed; tar (most are always there; listed to be sure)
  coreutils diffutils findutils mawk grep sed tar
  # tests, benchmarks and tools/bench/report.py
  python3
  # tests/tool/img_cli.sh: compares qcow2fs-img's JSON with qemu-img's
  jq
  # benchmarks: fio, qemu-storage-daemon (QEMU's FUSE export), gnuplot for
  # the chart, git for the commit named in the results
  fio qemu-system-common gnuplot-nox git
  # the Debian package (tools/test.sh package stage, debian/): dpkg-buildpackage,
  # dh with the meson build system, lintian; bash-completion for its
  # pkg-config file (where completions go) and for the completion test
  build-essential dpkg-dev debhelper lintian bash-completion
)

# Every program the scripts call, checked after installing: a missing one
# means a package above is missing, or PATH lacks /usr/sbin (as after `su`
# without `-` on Debian).
COMMANDS=(
  meson ninja pkg-config g++ clang fusermount3 mount.fuse3 qemu-img qemu-io
  mount umount losetup findmnt flock fallocate unshare runuser blockdev
  fstrim dmesg mountpoint mkfs.ext4 fsck.ext4 debugfs chattr pgrep timeout
  numfmt sha256sum truncate cmp diff find xargs awk grep sed tar python3
  fio qemu-storage-daemon gnuplot git dpkg-buildpackage dh lintian jq
  clang-format-14 clang-tidy-14
)

check_commands() {
  local absent=() cmd
  for cmd in "${COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || absent+=("$cmd")
  done
  if [[ ${#absent[@]} -gt 0 ]]; then
    echo "install-deps: not found in PATH ($PATH): ${absent[*]}" >&2
    echo "install-deps: (as root, PATH must include /usr/sbin: use 'su -', not 'su')" >&2
    exit 1
  fi
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  check_commands
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "install-deps: installing: ${missing[*]}"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "install-deps: not root and no sudo; cannot install: ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"

# Verify: a package apt could not install is a failure, not a warning.
still=()
for pkg in "${missing[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "installed" ]] || still+=("$pkg")
done
if [[ ${#still[@]} -gt 0 ]]; then
  echo "install-deps: still missing after apt-get: ${still[*]}" >&2
  exit 1
fi
check_commands
echo "install-deps: done"
