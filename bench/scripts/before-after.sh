#!/usr/bin/env bash
# Runs `hetkv-bench tcp`, `transport` and `comm` with two builds in alternating rounds (A, B, A,
# B, ...), so that the machine's drift hits both alike, and prints each figure's B/A ratio per
# round and its median (bench/scripts/ratios.py).
#
#   bench/scripts/before-after.sh A_BIN B_BIN OUT_DIR [ROUNDS]
#
# A_BIN and B_BIN are two release builds of hetkv-bench (for instance the parent commit's, built
# in a git worktree with its own CARGO_TARGET_DIR, and this one's).
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,10p "$0"; exit 2; }
a=$1 b=$2 out=$3 rounds=${4:-3}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
for r in $(seq 1 "$rounds"); do
  for side in A B; do
    bin=$a; [ "$side" = B ] && bin=$b
    echo "round $r, build $side: $bin" >&2
    "$bin" tcp --dims 64,128 --threads 1,2 --seconds 2 --json "$out/tcp-$side-$r.json" >/dev/null
    "$bin" transport --dims 64,128 --seconds 1 --json "$out/transport-$side-$r.json" >/dev/null
    "$bin" comm --clients 1,4 --bounds 0,100 --repeats 1 --warmup 100 --measured 300 \
      --json "$out/comm-$side-$r.json" >/dev/null
  done
done
python3 "$here/ratios.py" "$out" "$rounds"
