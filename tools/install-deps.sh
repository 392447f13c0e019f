#!/usr/bin/env bash
# Installs the Debian 12 packages qcow2fs needs to build and test.
# Idempotent: checks with dpkg-query first and only runs apt-get (with one
# apt-get update) when something is missing. Must run as root (or via sudo).
set -euo pipefail

PACKAGES=(
  meson ninja-build pkg-config g++ clang libclang-rt-14-dev
  libfuse3-dev fuse3 zlib1g-dev libzstd-dev libdeflate-dev libtbb-dev
  libgtest-dev libbenchmark-dev
  qemu-utils qemu-system-common fio e2fsprogs util-linux python3
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
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
echo "install-deps: done"
