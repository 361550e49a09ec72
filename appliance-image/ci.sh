#!/usr/bin/env bash
# CI entry point for the appliance image: install the host tools the build and the boot test need
# (Debian 12, as root), then build the image and boot-test it under qemu.
#   appliance-image/ci.sh [--ditto PATH] [--out DIR]     (as for build.sh)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export DEBIAN_FRONTEND=noninteractive
out="$here/../target/appliance"
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --ditto) shift 2 ;;
    *) echo "usage: $0 [--ditto PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done

packages=(mkosi debootstrap systemd-container debian-archive-keyring mtools dosfstools e2fsprogs fdisk
  binutils ovmf qemu-system-x86 qemu-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "appliance-image: installing ${missing[*]}"
  apt-get update -q
  # qemu-system-x86 needs the qemu-utils of its own release: a newer qemu-utils (from backports, as some
  # machines ship) declares Breaks on it, and apt would rather remove qemu-utils. When qemu is to be installed,
  # ask for the matching qemu-utils explicitly, allowing a downgrade only when a different one is installed.
  install=() extra=()
  for p in "${missing[@]}"; do
    [ "$p" = qemu-utils ] || install+=("$p")
  done
  if printf '%s\n' "${missing[@]}" | grep -qx 'qemu-system-x86\|qemu-utils'; then
    qver="$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: *//p')"
    have="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
    install+=("qemu-utils=$qver")
    if [ -n "$have" ] && [ "$have" != "$qver" ]; then
      echo "appliance-image: qemu-utils $have -> $qver (the version qemu-system-x86 needs)"
      extra+=(--allow-downgrades)
    fi
  fi
  apt-get install -y -q --no-install-recommends "${extra[@]}" "${install[@]}"
fi

"$here/build.sh" "${args[@]}"
"$here/test.sh" "$out/ditto-appliance.qcow2"
