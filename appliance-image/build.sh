#!/usr/bin/env bash
# Builds the ditto appliance: a UEFI-bootable Debian 12 disk image with ditto inline on a bridge.
#
#   appliance-image/build.sh [--ditto PATH] [--out DIR] [--size MIB]
#
#   --ditto PATH  the ditto binary to install (default: `cargo build --release --locked -p ditto`)
#   --out DIR     where the images go (default: target/appliance/ in the workspace)
#   --size MIB    size of the disk image (default: 2048; the root file system grows to fill a bigger disk)
#
# Produces DIR/ditto-appliance.raw (sparse) and DIR/ditto-appliance.qcow2 (compressed), and SHA256SUMS.
# Needs root and Debian 12's mkosi, mtools, dosfstools, e2fsprogs, fdisk, binutils and qemu-utils
# (ci.sh installs them). No loop devices or mounts are used:
#   1. mkosi builds the root file system as a directory (mkosi/mkosi.conf, mkosi.extra/, mkosi.postinst);
#   2. the kernel, initrd and command line become one unified kernel image (UKI) with systemd's EFI stub;
#   3. the EFI system partition (FAT, systemd-boot + the UKI) is made in a file with mkfs.vfat and mtools,
#      the root partition (ext4) with `mkfs.ext4 -d`, and both are placed into a GPT disk image.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
ditto="" out="$repo/target/appliance" size_mib=2048

usage() { sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --ditto) ditto="$(realpath "$2")"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --size) size_mib="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (mkosi builds the root file system in a container)"
for t in mkosi debootstrap systemd-nspawn mkfs.vfat mmd mcopy sfdisk mkfs.ext4 objcopy objdump qemu-img; do
  command -v "$t" >/dev/null || die "$t is missing (appliance-image/ci.sh installs what the build needs)"
done

t_start=$SECONDS
step() { printf '== [%3ds] %s\n' "$((SECONDS - t_start))" "$*"; }

if [ -z "$ditto" ]; then
  step "cargo build --release --locked -p ditto"
  (cd "$repo" && cargo build --release --locked -p ditto)
  ditto="$repo/target/release/ditto"
fi
[ -x "$ditto" ] || die "no ditto binary at $ditto"
version="$("$ditto" --version | awk '{print $2}')"

mkdir -p "$out"
out="$(realpath "$out")"
work="$out/work"
mkdir -p "$work"
tree="$work/root"
stage="$work/stage"

# ditto goes in as a second extra tree (naming one on the command line turns off mkosi's automatic use of
# mkosi.extra/, hence both are named), without its debug info (symbols are kept for backtraces).
rm -rf "$stage"
mkdir -p "$stage/usr/bin"
objcopy --strip-debug "$ditto" "$stage/usr/bin/ditto"
chmod 755 "$stage/usr/bin/ditto"

step "mkosi: root file system (Debian bookworm) in $tree"
rm -rf "$tree"
mkdir -p "$work/cache"
mkosi -C "$here/mkosi" --force --output "$tree" --workspace-dir "$work" --cache "$work/cache" \
  --extra-tree "$here/mkosi/mkosi.extra" --extra-tree "$stage" build
[ -x "$tree/usr/bin/ditto" ] || die "mkosi produced no tree with /usr/bin/ditto"

kver="$(ls "$tree/usr/lib/modules" | sort -V | tail -n 1)"
vmlinuz="$tree/boot/vmlinuz-$kver"
initrd="$tree/boot/initrd.img-$kver"
[ -f "$vmlinuz" ] && [ -f "$initrd" ] || die "kernel or initrd for $kver missing in the tree"

# The root partition's GPT id, which the kernel command line names.
root_uuid="$(cat /proc/sys/kernel/random/uuid)"
cmdline="root=PARTUUID=$root_uuid ro console=tty0 console=ttyS0,115200n8 quiet panic=10"

# What the image is, for os-release readers (systemd-boot, hostnamectl).
osrel="$tree/etc/os-release"
cp --remove-destination "$tree/usr/lib/os-release" "$osrel"
debian="$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$osrel")"
sed -i "s|^PRETTY_NAME=.*|PRETTY_NAME=\"ditto appliance $version on $debian\"|" "$osrel"
printf 'IMAGE_ID=ditto-appliance\nIMAGE_VERSION=%s\n' "$version" >>"$osrel"
printf 'PARTUUID=%s / ext4 defaults,errors=remount-ro,x-systemd.growfs 0 1\n' "$root_uuid" >"$tree/etc/fstab"

step "unified kernel image (kernel $kver)"
stub="$tree/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
sdboot="$tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
[ -f "$stub" ] && [ -f "$sdboot" ] || die "systemd-boot-efi is missing from the tree"
uki="$work/ditto.efi"
printf '%s' "$cmdline" >"$work/cmdline"
# Each added section starts page-aligned after the end of the stub's own sections.
align() { echo $(( ($1 + 0xfff) / 0x1000 * 0x1000 )); }
end=0
while read -r idx _ size vma _; do
  [[ "$idx" =~ ^[0-9]+$ ]] || continue
  [ $((0x$vma + 0x$size)) -le "$end" ] || end=$((0x$vma + 0x$size))
done < <(objdump -h "$stub")
osrel_vma="$(align "$end")"
cmdline_vma="$(align $((osrel_vma + $(stat -c %s "$osrel"))))"
linux_vma="$(align $((cmdline_vma + $(stat -c %s "$work/cmdline"))))"
initrd_vma="$(align $((linux_vma + $(stat -c %s "$vmlinuz"))))"
objcopy \
  --add-section .osrel="$osrel" --change-section-vma .osrel="$(printf 0x%x "$osrel_vma")" \
  --add-section .cmdline="$work/cmdline" --change-section-vma .cmdline="$(printf 0x%x "$cmdline_vma")" \
  --add-section .linux="$vmlinuz" --change-section-vma .linux="$(printf 0x%x "$linux_vma")" \
  --add-section .initrd="$initrd" --change-section-vma .initrd="$(printf 0x%x "$initrd_vma")" \
  "$stub" "$uki"

step "EFI system partition (systemd-boot + UKI)"
esp_mib=128
esp="$work/esp.img"
rm -f "$esp"
mkfs.vfat -C -F 32 -n DITTO-ESP "$esp" $((esp_mib * 1024)) >/dev/null
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/Linux ::/loader
mcopy -i "$esp" "$sdboot" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$sdboot" ::/EFI/systemd/systemd-bootx64.efi
mcopy -i "$esp" "$uki" "::/EFI/Linux/ditto-$version.efi"
printf 'timeout 1\nconsole-mode keep\neditor yes\n' >"$work/loader.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf

step "root file system (ext4)"
used_mib="$(du -sx --block-size=1M "$tree" | cut -f1)"
root_mib=$((size_mib - 1 - esp_mib - 1))
need_mib=$((used_mib * 5 / 4 + 256))
[ "$root_mib" -ge "$need_mib" ] || die "--size $size_mib is too small: the root needs ${need_mib} MiB"
root="$work/root.img"
rm -f "$root"
truncate -s "${root_mib}M" "$root"
mkfs.ext4 -q -F -L ditto-root -m 1 -d "$tree" "$root"

step "disk image ($size_mib MiB, GPT)"
raw="$out/ditto-appliance.raw"
qcow2="$out/ditto-appliance.qcow2"
rm -f "$raw" "$qcow2"
truncate -s "${size_mib}M" "$raw"
sfdisk --quiet "$raw" <<EOF
label: gpt
unit: sectors
first-lba: 2048
start=2048, size=$((esp_mib * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=$(((1 + esp_mib) * 2048)), size=$((root_mib * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_uuid, name="root"
EOF
dd if="$esp" of="$raw" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$root" of="$raw" bs=1M seek=$((1 + esp_mib)) conv=notrunc,sparse status=none
rm -f "$esp" "$root"

step "qcow2 (compressed)"
qemu-img convert -c -O qcow2 "$raw" "$qcow2"
(cd "$out" && sha256sum ditto-appliance.raw ditto-appliance.qcow2 >SHA256SUMS)

step "done: ditto $version, kernel $kver, root file system ${used_mib} MiB"
ls -ls --block-size=M "$raw" "$qcow2" | awk '{ printf "  %s (%s allocated, %s apparent)\n", $NF, $1, $6 }'
