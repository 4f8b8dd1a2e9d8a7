#!/usr/bin/env bash
# The cache core alone and `comm`, two builds side by side in alternating rounds (the commands of
# docs/BENCHMARKS.md, "Bytes and speed, and the cache core alone").
#
#   bash bench/scripts/core-ab.sh BASE_BENCH NEW_BENCH OUT_DIR
#
# BASE_BENCH and NEW_BENCH are release `hetkv-bench` binaries. Writes OUT_DIR/core.txt (a line a
# run: build, optimizer, round, then ns a key in all and for plan, place and update, and the hit
# rate) and OUT_DIR/comm-{base,new}-ROUND.json.
set -euo pipefail
if [ $# -ne 3 ]; then sed -n 2,9p "$0" >&2; exit 2; fi
base=$1 new=$2 out=$3
mkdir -p "$out"
{ nproc; lscpu | grep -E 'Model name' || true; } | tee "$out/core.txt"
row() {
  python3 -c "import json,sys; d=json.load(sys.stdin); print('$1 $2 $3', round(d['ns_per_key'],1), round(d['plan_ns_per_key'],1), round(d['place_ns_per_key'],1), round(d['update_ns_per_key'],1), round(d['hit_rate'],4))"
}
for i in 1 2 3 4 5 6; do
  "$base" core 2>/dev/null | row base sgd "$i" | tee -a "$out/core.txt"
  "$new" core 2>/dev/null | row new sgd "$i" | tee -a "$out/core.txt"
done
for i in 1 2 3; do
  for o in adagrad adam; do
    "$base" core --optimizer "$o" 2>/dev/null | row base "$o" "$i" | tee -a "$out/core.txt"
    "$new" core --optimizer "$o" 2>/dev/null | row new "$o" "$i" | tee -a "$out/core.txt"
  done
done
for i in 1 2; do
  "$base" comm --bounds 100 --clients 1 --repeats 3 --prefetch >"$out/comm-base-$i.json" 2>/dev/null
  "$new" comm --bounds 100 --clients 1 --repeats 3 --prefetch >"$out/comm-new-$i.json" 2>/dev/null
done
echo "core-ab: $out/core.txt and $out/comm-*.json"
