#!/usr/bin/env bash
# Wire cost of sending V2 when V1 was sent before: ditto vs zstd --patch-from vs rsync's literal data.
# Usage: bench/scripts/compare-versions.sh V1 V2   (ditto must be built: cargo build --release)
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 V1 V2" >&2; exit 2; }
v1=$1 v2=$2
here=$(cd "$(dirname "$0")/../.." && pwd)
ditto=${DITTO:-$here/target/release/ditto}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ditto_v2=$("$ditto" analyze --json "$v1" "$v2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["files"][1]["wire_bytes"])')
ditto_v2_flush=$("$ditto" analyze --json --read-size 65536 --flush-every-read "$v1" "$v2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["files"][1]["wire_bytes"])')
zstd -q -19 --long=30 --patch-from="$v1" "$v2" -o "$tmp/patch.zst" 2>/dev/null
zstd_patch=$(stat -c %s "$tmp/patch.zst")
cp "$v1" "$tmp/target"
rsync_literal=$(rsync --no-whole-file --stats "$v2" "$tmp/target" | awk -F': ' '/^Literal data/ {gsub(/[ ,]|bytes/, "", $2); print $2}')
printf '%-44s %12s\n' "v2 size" "$(stat -c %s "$v2")"
printf '%-44s %12s\n' "ditto wire bytes" "$ditto_v2"
printf '%-44s %12s\n' "ditto wire bytes (64 KiB reads, flush each)" "$ditto_v2_flush"
printf '%-44s %12s\n' "zstd -19 --long=30 --patch-from" "$zstd_patch"
printf '%-44s %12s\n' "rsync literal data" "$rsync_literal"
