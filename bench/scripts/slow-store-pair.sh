#!/usr/bin/env bash
# Cold throughput of a ditto pair on loopback whose receiving node (site-b) keeps its store in STORE_DIR
# (e.g. a mount of bench/scripts/slowfs.py, a tmpfs, or a normal disk). Prints MB/s and the writes the
# store skipped. Usage: bench/scripts/slow-store-pair.sh DITTO STORE_DIR [MIB]   (DITTO: a ditto binary)
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DITTO STORE_DIR [MIB]" >&2; exit 2; }
ditto=$1 store_b=$2 mib=${3:-200}
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
# Five ports the kernel says are free right now.
read -r tunnel admin_a admin_b fwd sink < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(5)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
fp() { "$ditto" keygen --out "$tmp/$1" 2>/dev/null | grep -oE '[0-9a-f]{64}' | head -1; }
fp_a=$(fp site-a) fp_b=$(fp site-b)
mkdir -p "$store_b"
cat > "$tmp/a.toml" <<EOF
[node]
name = "site-a"
key = "$tmp/site-a.key"
admin = "127.0.0.1:$admin_a"
store_dir = "$tmp/store-a"

[[peer]]
name = "site-b"
address = "127.0.0.1:$tunnel"
fingerprint = "$fp_b"

[[forward]]
listen = "127.0.0.1:$fwd"
peer = "site-b"
target = "127.0.0.1:$sink"
EOF
cat > "$tmp/b.toml" <<EOF
[node]
name = "site-b"
key = "$tmp/site-b.key"
admin = "127.0.0.1:$admin_b"
store_dir = "$store_b"

[tunnel]
listen = "127.0.0.1:$tunnel"

[[peer]]
name = "site-a"
fingerprint = "$fp_a"
EOF
head -c $((mib << 20)) /dev/urandom > "$tmp/payload"
"$ditto" run --config "$tmp/b.toml" 2> "$tmp/b.log" & pids+=($!)
"$ditto" run --config "$tmp/a.toml" 2> "$tmp/a.log" & pids+=($!)
for _ in $(seq 100); do
  curl -s "http://127.0.0.1:$admin_a/metrics" | grep -q 'ditto_tunnel_connections{peer="site-b"} [1-9]' && break
  sleep 0.1
done
nc -l 127.0.0.1 "$sink" > "$tmp/received" & sinkpid=$!
pids+=("$sinkpid")
sleep 0.2
start=$(date +%s.%N)
nc -N 127.0.0.1 "$fwd" < "$tmp/payload"
wait "$sinkpid"
end=$(date +%s.%N)
cmp -s "$tmp/payload" "$tmp/received" || { echo "received bytes differ" >&2; exit 1; }
skipped=$(curl -s "http://127.0.0.1:$admin_b/metrics" | awk '/^ditto_store_writes_skipped_total/ {print $2}')
python3 -c "import sys; s=$end-$start; print(f'{$mib} MiB cold in {s:.2f} s: {$mib*1048576/s/1e6:.1f} MB/s; site-b writes skipped: ${skipped:-n/a}')"
