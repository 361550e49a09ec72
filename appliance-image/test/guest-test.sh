#!/bin/bash
# The appliance's boot test, run inside the VM by ditto-test.service at each of two boots. test.sh writes this
# script, its unit and a test address for br0 into a throwaway copy of the image; the shipped image has none.
#
# First boot: the VM has four NICs: lan0 and wan0 (the first two, the bridge ports) and two more wired back
# to back to them (qemu hubs). Those two go into network namespaces: a client "cli" on the LAN side and a
# server "srv" on the WAN side, in one subnet, so traffic between them crosses the bridge, where ditto
# intercepts it. Then ditto is killed (-9) and stopped (SIGSTOP) while new connections are timed. It ends
# with "DITTO-TEST: REBOOT" and a reboot (qemu exits; test.sh boots the same disk again).
# Second boot: what the first boot made persists (NIC names applied by udev, node key, SSH keys), and ditto
# comes up again. Ends with "DITTO-TEST: PASS".
# Any failure ends with "DITTO-TEST: FAIL ..." and a power-off. Every wait is bounded.
set -u
exec </dev/null
con=/dev/console
run=/run/ditto-test
mkdir -p "$run"

say() { echo "DITTO-TEST: $*" | tee -a "$con"; }
fails=0
fail() { say "FAIL: $*"; fails=$((fails + 1)); }
ok() { say "ok: $*"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

cleanup() {
  [ -n "${srv_pids:-}" ] && kill $srv_pids 2>/dev/null
  ip netns del cli 2>/dev/null
  ip netns del srv 2>/dev/null
}

finish() {
  {
    echo "--- journal of ditto.service (this boot)"
    journalctl -b --no-pager -o short-monotonic -u ditto.service | tail -n 60
  } >"$con" 2>&1
  if [ "$fails" = 0 ]; then
    [ "${1:-}" = reboot ] || say "PASS"
  else
    {
      echo "--- journal (firstboot, nics)"
      journalctl -b --no-pager -o short-monotonic -u ditto-firstboot.service -u ditto-nics.service | tail -n 40
      echo "--- nft list ruleset"
      nft list ruleset
      echo "--- links and addresses"
      ip -br link
      ip -br addr
      echo "--- failed units"
      systemctl --failed --no-pager
    } >"$con" 2>&1
    say "FAIL ($fails check(s) failed)"
  fi
  cleanup
  if [ "$fails" = 0 ] && [ "${1:-}" = reboot ]; then
    say "REBOOT"
    systemctl reboot --no-block
  else
    systemctl poweroff --no-block
  fi
  exit 0
}

# Polls "$@" every 100 ms until it succeeds or $timeout_ms passes; sets $waited_ms.
timeout_ms=10000
wait_for() {
  local t0
  t0=$(now_ms)
  while ! "$@" >/dev/null 2>&1; do
    if [ $(($(now_ms) - t0)) -ge "$timeout_ms" ]; then
      waited_ms=$(($(now_ms) - t0))
      return 1
    fi
    sleep 0.1
  done
  waited_ms=$(($(now_ms) - t0))
}

# GET from ditto's admin endpoint.
admin_get() {
  timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/9090 || exit 1
    printf "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" "$1" >&3
    cat <&3' _ "$1"
}
healthy() { admin_get /healthz | tail -n 1 | grep -qx ok; }
# Connections ditto passed through (intercepted, no [[route]] matched: no peer is configured).
passthrough() {
  admin_get /metrics | awk '/^ditto_flows_total\{/ && /outcome="passthrough"/ && /reason="no-route"/ { n += $2 }
    END { print n + 0 }'
}
main_pid() { systemctl show -P MainPID ditto.service; }
rules_installed() { nft list tables | grep -qx 'table inet ditto' && nft list tables | grep -qx 'table bridge ditto'; }
# Up, healthy and intercepting, with a main PID other than $1.
recovered() {
  local p
  p=$(main_pid)
  [ "$p" != 0 ] && [ "$p" != "$1" ] && systemctl -q is-active ditto.service && healthy && rules_installed
}

# The SHA-256 of what the client receives from the server at $1 port $2, within $3 seconds.
fetch() {
  ip netns exec cli timeout "$3" bash -c 'exec 3<>"/dev/tcp/$1/$2" && exec sha256sum <&3' _ "$1" "$2" \
    2>/dev/null | cut -d' ' -f1
}
fetch_ok() { [ "$(fetch "$1" "$2" "$3")" = "$4" ]; }

state=/var/lib/ditto-test
mkdir -p "$state"
if [ -e "$state/first-boot-done" ]; then
  boot=2
else
  boot=1
fi
say "boot $boot: the test started at $(cut -d' ' -f1 /proc/uptime) s of uptime"

# --- the appliance came up as shipped
timeout_ms=60000
if wait_for systemctl -q is-active ditto.service; then
  ok "ditto.service active (${waited_ms} ms after the test started; uptime $(cut -d' ' -f1 /proc/uptime) s)"
else
  fail "ditto.service is $(systemctl is-active ditto.service)"
  finish
fi
if [ "$boot" = 2 ]; then
  for i in lan0 wan0; do
    f=$(udevadm info -q property "/sys/class/net/$i" 2>/dev/null | sed -n 's/^ID_NET_LINK_FILE=//p')
    [ "$f" = "/etc/systemd/network/10-ditto-$i.link" ] &&
      [ "$(basename "$(readlink "/sys/class/net/$i/master" 2>/dev/null)")" = br0 ] &&
      ok "$i named at boot by udev from $f, a port of br0" || fail "$i not named by udev from its .link file ($f)"
  done
  [ "$(ditto fingerprint /var/lib/ditto/node.key 2>/dev/null)" = "$(cat "$state/fingerprint")" ] &&
    ok "node key kept across the reboot" || fail "the node key changed or is gone"
  [ "$(sha256sum /etc/ssh/ssh_host_ed25519_key.pub)" = "$(cat "$state/ssh-host-key")" ] &&
    ok "SSH host key kept across the reboot" || fail "the SSH host key changed"
  timeout_ms=10000
  wait_for healthy && rules_installed && ok "ditto healthy, rules installed" || fail "ditto not healthy after the reboot"
  failed_units=$(systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')
  [ -z "$failed_units" ] && ok "no failed units" || fail "failed units: $failed_units"
  finish
fi

for i in lan0 wan0; do
  if [ "$(basename "$(readlink /sys/class/net/$i/master 2>/dev/null)")" = br0 ]; then
    ok "$i ($(cat /sys/class/net/$i/address)) is a port of br0"
  else
    fail "$i is missing or not a port of br0"
  fi
done
[ "$(cat /sys/class/net/lan0/address 2>/dev/null)" = 52:54:00:d1:77:01 ] &&
  [ "$(cat /sys/class/net/wan0/address 2>/dev/null)" = 52:54:00:d1:77:02 ] &&
  ok "lan0 and wan0 are the first two NICs in PCI order" || fail "lan0/wan0 are not the first two NICs"
[ -s /etc/systemd/network/10-ditto-lan0.link ] && [ -s /etc/systemd/network/10-ditto-wan0.link ] &&
  ok "NIC names pinned in /etc/systemd/network/10-ditto-{lan0,wan0}.link" || fail "no pinned .link files"
[ -s /var/lib/ditto/node.key ] && ok "node key made on first boot: $(ditto fingerprint /var/lib/ditto/node.key)" ||
  fail "no node key"
ls /etc/ssh/ssh_host_ed25519_key >/dev/null 2>&1 && ok "SSH host keys made on first boot" || fail "no SSH host keys"
user=$(ps -o user= -p "$(main_pid)")
[ "$user" = ditto ] && ok "ditto runs as user ditto (capabilities: $(grep CapEff "/proc/$(main_pid)/status" | cut -f2))" ||
  fail "ditto runs as '$user'"
timeout_ms=10000
wait_for healthy && ok "/healthz: ok" || fail "/healthz is not ok"
if status=$(timeout 5 ditto status 2>&1); then
  ok "ditto status:"
  echo "$status" | sed 's/^/DITTO-TEST:   /' | tee -a "$con" >/dev/null
else
  fail "ditto status: $status"
fi
rules_installed && ok "nftables: table inet ditto and table bridge ditto installed" ||
  fail "ditto's tables are missing: $(nft list tables | tr '\n' ' ')"
ip rule show | grep -q 'fwmark 0x1d1' && ok "ip rule for fwmark 0x1d1 installed" || fail "no fwmark ip rule"
size_mib=$(df -m --output=size / | tail -n 1 | tr -d ' ')
[ "$size_mib" -gt 2200 ] && ok "root file system grew to the disk: ${size_mib} MiB" ||
  fail "root file system is ${size_mib} MiB: not grown to the enlarged disk"
systemctl -q is-active ssh.service && ok "sshd active (keys only)" || fail "sshd is $(systemctl is-active ssh.service)"
banner=$(HOME=/root timeout 10 bash -lic true 2>&1 </dev/null | grep -v '^bash: .*job control\|^bash: cannot set terminal')
if echo "$banner" | grep -q '^== ditto appliance' && echo "$banner" | grep -q 'node ditto'; then
  ok "login banner:"
  echo "$banner" | sed 's/^/DITTO-TEST:   /' | tee -a "$con" >/dev/null
else
  fail "login banner without ditto status: $banner"
fi
# A later boot keeps the pinned names (the script runs at every boot).
links_before=$(cat /etc/systemd/network/10-ditto-*.link | sha256sum)
/usr/lib/ditto/ditto-nics >/dev/null 2>&1
[ "$(cat /etc/systemd/network/10-ditto-*.link | sha256sum)" = "$links_before" ] && [ -e /sys/class/net/lan0 ] &&
  ok "ditto-nics again (as on a later boot): names and .link files unchanged" || fail "ditto-nics changed the pinning"
failed_units=$(systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')
[ -z "$failed_units" ] && ok "no failed units" || fail "failed units: $failed_units"

# --- a client and a server on the two sides of the bridge
nic_by_mac() { for d in /sys/class/net/*; do [ "$(cat "$d/address")" = "$1" ] && basename "$d" && return; done; }
cli_if=$(nic_by_mac 52:54:00:d1:77:03)
srv_if=$(nic_by_mac 52:54:00:d1:77:04)
[ -n "$cli_if" ] && [ -n "$srv_if" ] || { fail "the client/server NICs are missing"; finish; }
for ns in cli srv; do
  if [ "$ns" = cli ]; then nic=$cli_if n=1; else nic=$srv_if n=2; fi
  ip netns add "$ns"
  ip link set "$nic" netns "$ns"
  ip -n "$ns" link set "$nic" name eth0
  ip -n "$ns" addr add "192.0.2.$n/24" dev eth0
  ip -n "$ns" addr add "2001:db8:77::$n/64" dev eth0 nodad
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
done
head -c 4M /dev/urandom >"$run/big"
big=$(sha256sum <"$run/big" | cut -d' ' -f1)
# 445 is one of ditto's intercepted ports, 8445 is not. Each connection gets a process that sends 4 MiB.
srv_pids=""
for p in 445 8445; do
  ip netns exec srv systemd-socket-activate -l "$p" --accept --inetd cat "$run/big" >/dev/null 2>&1 &
  srv_pids="$srv_pids $!"
done
timeout_ms=10000
listening() { [ "$(ip netns exec srv ss -Hltn | grep -c ':\(445\|8445\) ')" -ge 2 ]; }
wait_for listening || fail "the test servers do not listen"
timeout_ms=15000
wait_for fetch_ok 192.0.2.2 8445 5 "$big" && ok "bridged (not intercepted) port 8445: 4 MiB byte-exact" ||
  fail "no connection across the bridge on port 8445"

before=$(passthrough)
t0=$(now_ms)
fetch_ok 192.0.2.2 445 20 "$big" && ok "intercepted port 445 over IPv4: 4 MiB byte-exact in $(($(now_ms) - t0)) ms" ||
  fail "IPv4 connection to port 445 failed or corrupted"
fetch_ok 2001:db8:77::2 445 20 "$big" && ok "intercepted port 445 over IPv6: 4 MiB byte-exact" ||
  fail "IPv6 connection to port 445 failed or corrupted"
after=$(passthrough)
[ "$after" -ge $((before + 2)) ] && ok "both went through ditto: passthrough flows $before -> $after" ||
  fail "ditto's passthrough counter did not move ($before -> $after): the flows bypassed ditto"

# Recovery is measured with short transfers: the first 64 KiB from port 445, within 1 s.
intercepted_ok() {
  [ "$(ip netns exec cli timeout 1 bash -c 'exec 3<>/dev/tcp/192.0.2.2/445 && exec head -c 65536 <&3' |
    sha256sum | cut -d' ' -f1)" = "$(head -c 65536 "$run/big" | sha256sum | cut -d' ' -f1)" ]
}

# Opens a new connection to port 445 every 200 ms (each in the background, given 1 s: a connection to a
# stopped ditto hangs) until one works or $2 ms pass since $1 (ms). Sets $opened_ms (when the first connection
# that worked was opened, in ms after $1: traffic flowed again by then) and $done_ms (when it finished).
first_ok_after() {
  local t0=$1 limit=$2 a first pids=()
  rm -f "$run"/ok.*
  while :; do
    a=$(now_ms)
    (intercepted_ok && echo "$a $(now_ms)" >"$run/ok.$a") &
    pids+=($!)
    sleep 0.2
    first=$(cat "$run"/ok.* 2>/dev/null | sort -n | head -n 1)
    if [ -n "$first" ]; then
      opened_ms=$((${first% *} - t0))
      done_ms=$((${first#* } - t0))
      wait "${pids[@]}"
      return 0
    fi
    if [ $(($(now_ms) - t0)) -ge "$limit" ]; then
      wait "${pids[@]}"
      return 1
    fi
  done
}

# In the background: notes in $run/rules-gone when ditto's inet table disappears, in ms after $1 (start, ms).
watch_rules() {
  local t0=$1
  rm -f "$run/rules-gone"
  (
    end=$(($(now_ms) + 15000))
    while [ "$(now_ms)" -lt "$end" ]; do
      if ! nft list tables | grep -qx 'table inet ditto'; then
        echo $(($(now_ms) - t0)) >"$run/rules-gone"
        exit 0
      fi
      sleep 0.05
    done
  ) &
  watcher=$!
}
# Sets $gone to when the watcher saw the rules go.
rules_gone() {
  wait "$watcher" 2>/dev/null
  if [ -s "$run/rules-gone" ]; then gone="rules seen gone at $(cat "$run/rules-gone") ms, polled"; else gone="rules stayed"; fi
}

# --- kill -9: the rules stay, but without ditto's sockets nothing is diverted (fail-to-wire)
pid=$(main_pid)
t0=$(now_ms)
watch_rules "$t0"
kill -9 "$pid"
if first_ok_after "$t0" 10000; then
  rules_gone
  msg="a new connection to port 445 opened ${opened_ms} ms after the kill works (done at ${done_ms} ms; $gone)"
  [ "$opened_ms" -le 3000 ] && ok "after kill -9: $msg" || fail "after kill -9 (limit 3000 ms): $msg"
else
  fail "after kill -9: no new connection to port 445 within 10 s"
fi
timeout_ms=20000
if wait_for recovered "$pid"; then
  ok "after kill -9: ditto restarted and healthy $(($(now_ms) - t0)) ms after the kill (pid $pid -> $(main_pid))"
else
  fail "after kill -9: ditto did not recover in 20 s ($(systemctl is-active ditto.service))"
fi
before=$(passthrough)
fetch_ok 192.0.2.2 445 20 "$big" && [ "$(passthrough)" -gt "$before" ] &&
  ok "after kill -9: port 445 intercepted again, byte-exact" || fail "after kill -9: not intercepting again"

# --- SIGSTOP: a hung ditto still holds its sockets; the guard/watchdog must take it out of the path
pid=$(main_pid)
t0=$(now_ms)
watch_rules "$t0"
kill -STOP "$pid"
if first_ok_after "$t0" 15000; then
  rules_gone
  msg="a new connection to port 445 opened ${opened_ms} ms after the stop works (done at ${done_ms} ms; $gone)"
  # The guard's watchdog is 2 s and the unit's WatchdogSec 5 s; the extra second allows for the guard's nft
  # and ip commands and these probes running slowly under qemu's software emulation.
  [ "$opened_ms" -le 6000 ] && ok "after SIGSTOP: $msg" || fail "after SIGSTOP (limit: WatchdogSec=5s + 1 s): $msg"
else
  fail "after SIGSTOP: no new connection to port 445 within 15 s"
fi
timeout_ms=30000
if wait_for recovered "$pid"; then
  ok "after SIGSTOP: ditto restarted and healthy $(($(now_ms) - t0)) ms after the stop (pid $pid -> $(main_pid))"
else
  kill -CONT "$pid" 2>/dev/null
  fail "after SIGSTOP: ditto did not recover in 30 s ($(systemctl is-active ditto.service))"
fi
before=$(passthrough)
fetch_ok 192.0.2.2 445 20 "$big" && [ "$(passthrough)" -gt "$before" ] &&
  ok "after SIGSTOP: port 445 intercepted again, byte-exact" || fail "after SIGSTOP: not intercepting again"
ok "ditto.service restarts: $(systemctl show -P NRestarts ditto.service)"

# --- a clean stop removes every rule (ExecStopPost and ditto's own cleanup)
systemctl stop ditto.service
if nft list tables | grep -q ' ditto$' || ip rule show | grep -q 'fwmark 0x1d1'; then
  fail "rules left after systemctl stop: $(nft list tables | tr '\n' ' ')"
else
  ok "systemctl stop ditto: no nftables tables or ip rules left"
fi
fetch_ok 192.0.2.2 445 5 "$big" && ok "ditto stopped: port 445 bridged untouched" || fail "ditto stopped: port 445 broken"
ditto fingerprint /var/lib/ditto/node.key >"$state/fingerprint"
sha256sum /etc/ssh/ssh_host_ed25519_key.pub >"$state/ssh-host-key"
touch "$state/first-boot-done"
sync
say "first boot's test took $(cut -d' ' -f1 /proc/uptime) s of uptime"
finish reboot
