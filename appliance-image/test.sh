#!/usr/bin/env bash
# Boot test of the appliance image under qemu (TCG: no KVM needed).
#
#   appliance-image/test.sh [IMAGE]     (default: target/appliance/ditto-appliance.qcow2; raw works too)
#
# The shipped image is never modified: the test boots a throwaway raw copy, enlarged by 1 GiB (the root file
# system must grow into it), into whose root file system debugfs writes three test-only files: the test
# (test/guest-test.sh), a unit that runs it at boot (test/ditto-test.service), and a static
# address for br0 (test/br0-test-address.conf). The VM gets four NICs: lan0 and wan0 (the first two, in PCI
# order) and two more wired back to back to them through qemu hubs, for a client and a server on the two
# sides of the bridge (see test/guest-test.sh). The VM is booted twice: the first boot runs the full test and
# reboots, the second checks that what the first boot made persists. The serial console goes to log files;
# the DITTO-TEST lines are shown as they come. Exits 0 only when both boots passed.
#
# Environment: DITTO_TEST_TIMEOUT (seconds per boot, default 900), DITTO_TEST_DIR (logs; default
# target/appliance/test), DITTO_TEST_ACCEL (qemu accelerator, default tcg; kvm where it works).
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
image="$(realpath "${1:-$repo/target/appliance/ditto-appliance.qcow2}")"
limit="${DITTO_TEST_TIMEOUT:-900}"
accel="${DITTO_TEST_ACCEL:-tcg}"
logdir="${DITTO_TEST_DIR:-$repo/target/appliance/test}"

die() { echo "test.sh: $*" >&2; exit 1; }
[ -f "$image" ] || die "no image at $image (build it with appliance-image/build.sh)"
for t in qemu-system-x86_64 qemu-img sfdisk debugfs; do
  command -v "$t" >/dev/null || die "$t is missing (appliance-image/ci.sh installs what the test needs)"
done
ovmf_code=/usr/share/OVMF/OVMF_CODE_4M.fd
ovmf_vars=/usr/share/OVMF/OVMF_VARS_4M.fd
[ -f "$ovmf_code" ] && [ -f "$ovmf_vars" ] || die "OVMF is missing (apt-get install ovmf)"

mkdir -p "$logdir"
work="$(mktemp -d "${TMPDIR:-/var/tmp}/ditto-appliance-test.XXXXXX")"
qemu_pid=""
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

t0=$SECONDS
echo "== test copy of $image"
image_sum="$(sha256sum <"$image")"
disk="$work/test.raw"
qemu-img convert -O raw "$image" "$disk"
truncate -s +1G "$disk"
start="$(sfdisk -d "$disk" 2>/dev/null | awk -F'[=,]' '/type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709/ { gsub(/ /, "", $2); print $2 }')"
[ -n "$start" ] || die "no root partition in $image"
cat >"$work/debugfs.cmds" <<EOF
cd /usr/local/lib
mkdir ditto-test
cd /usr/local/lib/ditto-test
write $here/test/guest-test.sh guest-test.sh
sif guest-test.sh mode 0100755
sif guest-test.sh uid 0
sif guest-test.sh gid 0
cd /etc/systemd/system
write $here/test/ditto-test.service ditto-test.service
sif ditto-test.service mode 0100644
sif ditto-test.service uid 0
sif ditto-test.service gid 0
cd /etc/systemd/system/multi-user.target.wants
symlink ditto-test.service /etc/systemd/system/ditto-test.service
cd /etc/systemd/network
mkdir 22-br0.network.d
cd /etc/systemd/network/22-br0.network.d
write $here/test/br0-test-address.conf test.conf
sif test.conf mode 0100644
sif test.conf uid 0
sif test.conf gid 0
EOF
debugfs -w -f "$work/debugfs.cmds" "$disk?offset=$((start * 512))" >"$work/debugfs.log" 2>&1 ||
  { cat "$work/debugfs.log"; die "debugfs failed"; }
if grep -qi "error\|not found\|could not\|failed" "$work/debugfs.log"; then
  cat "$work/debugfs.log"
  die "writing the test files into the copy failed"
fi
cp "$ovmf_vars" "$work/vars.fd"

# lan0/wan0 are the first two NICs in PCI order; cli/srv are wired to them (hub 1: LAN side, hub 2: WAN side).
nic() { echo "-netdev hubport,id=$1,hubid=$2 -device virtio-net-pci,netdev=$1,mac=52:54:00:d1:77:0$3,addr=$4"; }

# Boots the test copy once, showing the DITTO-TEST lines as they come; sets $result to the last word the test
# said (REBOOT, PASS, FAIL) or to "timeout"/"no result", and $first to the seconds until the test's first line.
boot() {
  local log=$1 tboot=$SECONDS shown=0 lines n
  result="" first=""
  rm -f "$log"
  # shellcheck disable=SC2046
  qemu-system-x86_64 -machine q35 -accel "$accel" -smp 2 -m 1024 -nodefaults -display none -no-reboot \
    -drive if=pflash,format=raw,unit=0,readonly=on,file="$ovmf_code" \
    -drive if=pflash,format=raw,unit=1,file="$work/vars.fd" \
    -drive if=virtio,format=raw,cache=unsafe,file="$disk" \
    $(nic lan 1 1 0x10) $(nic wan 2 2 0x11) $(nic cli 1 3 0x12) $(nic srv 2 4 0x13) \
    -device virtio-rng-pci -serial file:"$log" -monitor none 2>"$work/qemu.err" &
  qemu_pid=$!
  while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ $((SECONDS - tboot)) -ge "$limit" ]; then
      result="timeout"
      kill "$qemu_pid" 2>/dev/null || true
      break
    fi
    sleep 1
    lines="$(grep -a 'DITTO-TEST:' "$log" 2>/dev/null | tr -d '\r' || true)"
    n="$(printf '%s' "$lines" | grep -c . || true)"
    if [ "$n" -gt "$shown" ]; then
      [ -n "$first" ] || first=$((SECONDS - tboot))
      printf '%s\n' "$lines" | tail -n +$((shown + 1)) | sed "s/^.*DITTO-TEST:/  [$((SECONDS - tboot))s]/"
      shown=$n
    fi
  done
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=""
  lines="$(grep -a 'DITTO-TEST:' "$log" 2>/dev/null | tr -d '\r' || true)"
  printf '%s\n' "$lines" | tail -n +$((shown + 1)) | grep . | sed 's/^.*DITTO-TEST:/  [end]/' || true
  if [ -z "$result" ]; then
    if printf '%s\n' "$lines" | grep -q 'DITTO-TEST: FAIL'; then
      result=FAIL
    elif printf '%s\n' "$lines" | grep -q 'DITTO-TEST: REBOOT$'; then
      result=REBOOT
    elif printf '%s\n' "$lines" | grep -q 'DITTO-TEST: PASS$'; then
      result=PASS
    else
      result="no result (the VM stopped before the test ended)"
    fi
  fi
  echo "== boot to the test's first line: ${first:-?} s; this boot: $((SECONDS - tboot)) s"
}

failed() {
  echo "== last 150 lines of the serial console ($1):"
  tail -n 150 "$1" | tr -d '\r'
  grep -v "hub [0-9] is not connected to host network" "$work/qemu.err" || true
  echo "appliance boot test: $2" >&2
  exit 1
}

echo "== first boot under qemu ($accel), serial console in $logdir/serial-boot1.log, limit ${limit}s"
boot "$logdir/serial-boot1.log"
[ "$result" = REBOOT ] || failed "$logdir/serial-boot1.log" "first boot: $result"
echo "== second boot, serial console in $logdir/serial-boot2.log"
boot "$logdir/serial-boot2.log"
[ "$result" = PASS ] || failed "$logdir/serial-boot2.log" "second boot: $result"
[ "$(sha256sum <"$image")" = "$image_sum" ] || die "$image changed during the test"
echo "appliance boot test: PASS ($((SECONDS - t0)) s)"
