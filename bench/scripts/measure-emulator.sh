#!/usr/bin/env bash
# Measures ditto-wanem against its targets on a throw-away topology (needs root):
#  1. capacity: 1.1 Gbit/s of 1500-byte UDP packets offered to a 1 Gbit/s link for 5 s;
#     the receiver's rate and the emulator's delivery lateness (actual - scheduled) are reported;
#  2. one CUBIC flow over 100 Mbit/s, 40 ms RTT: goodput of a 128 MiB download.
# Prints the linktest JSON reports to results/emulator-<date>-*.json next to this script.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
cargo build --release -p ditto-bench
bench="$root/target/release/ditto-bench"
out="$here/../results"
mkdir -p "$out"
day="$(date +%F)"
"$bench" linktest --rate 1gbit --rtt 10ms --udp-rate 1.1gbit --udp-secs 5 | tee "$out/emulator-$day-udp-1gbit.json"
"$bench" linktest --rate 100mbit --rtt 40ms --size 128MiB | tee "$out/emulator-$day-tcp-100mbit.json"
"$bench" linktest --rate 1gbit --rtt 10ms --size 512MiB | tee "$out/emulator-$day-tcp-1gbit.json"
